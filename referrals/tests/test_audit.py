"""Audit of patient data: exact rows for detail, lists, download, transitions, intake."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import User
from referrals import attachments
from referrals.models import AuditEntry, ReferralState
from referrals.tests.conftest import World

PDF = b"%PDF-1.7\n" + b"1" * 50
HEADERS: dict[str, Any] = {"HTTP_USER_AGENT": "Consilium-Test/1.0", "HTTP_X_REQUEST_ID": "req-42"}


def client_for(user: User) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def rows() -> list[tuple[Any, ...]]:
    return list(
        AuditEntry.objects.order_by("id").values_list(
            "user__username",
            "action",
            "object_type",
            "object_id",
            "referral_id",
            "detail",
            "ip_address",
            "user_agent",
            "request_id",
        )
    )


def test_detail_read_is_one_exact_row(world: World) -> None:
    referral = world.submit()
    response = client_for(world.consultant).get(f"/api/v1/referrals/{referral.pk}/", **HEADERS)
    assert response.status_code == 200
    assert rows() == [
        (
            "consultant",
            "read",
            "referral",
            str(referral.pk),
            referral.pk,
            "",
            "127.0.0.1",
            "Consilium-Test/1.0",
            "req-42",
        )
    ]


def test_refused_read_records_nothing(world: World) -> None:
    referral = world.submit()
    assert (
        client_for(world.foreign_referrer).get(f"/api/v1/referrals/{referral.pk}/").status_code
        == 404
    )
    assert (
        client_for(world.ministry_at_hub).get(f"/api/v1/referrals/{referral.pk}/").status_code
        == 404
    )
    assert rows() == []


def test_transition_is_one_row_naming_the_action(world: World) -> None:
    referral = world.submit()
    response = client_for(world.consultant).post(
        f"/api/v1/referrals/{referral.pk}/accept/", **HEADERS
    )
    assert response.status_code == 200
    assert rows() == [
        (
            "consultant",
            "transition",
            "referral",
            str(referral.pk),
            referral.pk,
            "accept",
            "127.0.0.1",
            "Consilium-Test/1.0",
            "req-42",
        )
    ]


def test_intake_is_create_then_read_on_the_idempotent_retry(world: World) -> None:
    body = {
        "placer_system": "urn:his",
        "placer_value": "A-1",
        "specialty": world.paeds.code,
        "clinical_question": "Cough.",
        "department": world.hub_paeds.pk,
    }
    client = client_for(world.referrer)
    first = client.post("/api/v1/referrals/", body, format="json")
    again = client.post("/api/v1/referrals/", body, format="json")
    assert (first.status_code, again.status_code) == (201, 200)
    pk = first.json()["id"]
    assert [(r[1], r[4]) for r in rows()] == [("create", pk), ("read", pk)]


def test_download_and_upload_and_file_list_rows(world: World) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    client = client_for(world.referrer)
    created = client.post(
        f"/api/v1/referrals/{referral.pk}/attachments/",
        {"file": SimpleUploadedFile("a.pdf", PDF, content_type="application/pdf")},
        format="multipart",
    )
    aid = created.json()["id"]
    client.get(f"/api/v1/referrals/{referral.pk}/attachments/")
    client_for(world.consultant).get(f"/api/v1/referrals/{referral.pk}/attachments/{aid}/")
    assert [r[:6] for r in rows()] == [
        ("referrer", "create", "attachment", str(aid), referral.pk, ""),
        ("referrer", "read", "attachment_list", str(referral.pk), referral.pk, ""),
        ("consultant", "download", "attachment", str(aid), referral.pk, ""),
    ]


def test_list_page_is_one_row_per_referral_in_one_insert(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from referrals import audit

    referrals = [world.submit() for _ in range(3)]
    client = client_for(world.consultant)
    prepared: list[str] = []  # PostgreSQL: a prepared statement, outside Django's query log
    real = audit.fetch_prepared

    def recorded(sql: str, *args: Any, **kwargs: Any) -> Any:
        prepared.append(sql)
        return real(sql, *args, **kwargs)

    monkeypatch.setattr(audit, "fetch_prepared", recorded)
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/api/v1/referrals/worklist/").status_code == 200
    inserts = [
        sql
        for sql in [q["sql"] for q in queries.captured_queries] + prepared
        if sql.replace('"', "").startswith("INSERT INTO referrals_auditentry")
    ]
    assert len(inserts) == 1
    assert sorted(r[4] for r in rows()) == sorted(r.pk for r in referrals)
    assert {r[:3] for r in rows()} == {("consultant", "read", "referral")}


def test_user_agent_is_truncated_and_forwarded_for_only_when_trusted(
    world: World, settings: Any
) -> None:
    referral = world.submit()
    client = client_for(world.referrer)
    headers: dict[str, Any] = {
        "HTTP_USER_AGENT": "A" * 1000,
        "HTTP_X_FORWARDED_FOR": "203.0.113.9, 10.0.0.1",
    }
    client.get(f"/api/v1/referrals/{referral.pk}/", **headers)
    settings.AUDIT_TRUST_X_FORWARDED_FOR = True
    client.get(f"/api/v1/referrals/{referral.pk}/", **headers)
    # the address the trusted proxy appended (the last), not what the client wrote first
    assert [(r[6], len(r[7])) for r in rows()] == [("127.0.0.1", 255), ("10.0.0.1", 255)]


def test_a_forwarded_for_that_is_no_address_falls_back_to_the_peer(
    world: World, settings: Any
) -> None:
    """The header is the client's to write: junk in it must not fail the request (the
    column is inet on PostgreSQL) nor be recorded."""
    referral = world.submit()
    client = client_for(world.referrer)
    settings.AUDIT_TRUST_X_FORWARDED_FOR = True

    for forwarded in ("unknown", "203.0.113.9'; --", "::ffff:not", ""):
        response = client.get(f"/api/v1/referrals/{referral.pk}/", HTTP_X_FORWARDED_FOR=forwarded)
        assert response.status_code == 200, forwarded
    assert [r[6] for r in rows()] == ["127.0.0.1"] * 4
    # An IPv6 address with a zone (which inet cannot hold): kept without it.
    response = client.get(f"/api/v1/referrals/{referral.pk}/", HTTP_X_FORWARDED_FOR="fe80::1%eth0")
    assert response.status_code == 200
    assert rows()[-1][6] == "fe80::1"


def test_helper_never_records_for_ministry(world: World, rf: Any) -> None:
    from referrals.audit import audit_record

    request = rf.get("/")
    request.user = world.ministry_at_hub
    assert audit_record(request, "read", [1, 2]) == 0
    assert not AuditEntry.objects.exists()
    request.user = world.consultant
    assert audit_record(request, "read", [1, 1, 2]) == 2  # de-duplicated


def test_attachment_service_alone_does_not_audit(world: World) -> None:
    """The audit is the API's explicit call (the request is what it records)."""
    referral = world.referral_in(ReferralState.ACCEPTED)
    attachments.attachment_upload(
        actor=world.referrer,
        referral_id=referral.pk,
        upload=SimpleUploadedFile("a.pdf", PDF, content_type="application/pdf"),
    )
    assert rows() == []


@pytest.mark.parametrize("vendor", ["postgresql", "sqlite"], ids=["one-statement", "orm"])
def test_both_write_paths_record_the_same_rows(
    world: World, rf: Any, vendor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from referrals.audit import audit_record

    if vendor == "sqlite":  # the path make run takes
        monkeypatch.setattr(connection, "vendor", "sqlite")
    request = rf.get("/", HTTP_USER_AGENT="ua/1", REMOTE_ADDR="192.0.2.7")
    request.user = world.consultant
    assert audit_record(request, "read", [7, 8]) == 2
    assert audit_record(request, "download", [9], object_type="attachment", object_id=55) == 1
    fields = ("user_id", "action", "object_type", "object_id", "referral_id", "detail")
    got = list(AuditEntry.objects.order_by("id").values_list(*fields, "ip_address", "user_agent"))
    assert got == [
        (world.consultant.pk, "read", "referral", "7", 7, "", "192.0.2.7", "ua/1"),
        (world.consultant.pk, "read", "referral", "8", 8, "", "192.0.2.7", "ua/1"),
        (world.consultant.pk, "download", "attachment", "55", 9, "", "192.0.2.7", "ua/1"),
    ]
    assert all(entry.at is not None for entry in AuditEntry.objects.all())


@pytest.mark.parametrize("vendor", ["postgresql", "sqlite"], ids=["one-statement", "orm"])
def test_referral_ids_and_filler_ids_record_each_referral_once(
    world: World, rf: Any, vendor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FHIR search page gives its referrals' ids, what it included their filler ids:
    one row per referral whichever way it was named, both ways at once included."""
    from referrals.audit import audit_record_fillers

    first, second, third = world.submit(), world.submit(), world.submit()
    if vendor == "sqlite":  # the path make run takes
        monkeypatch.setattr(connection, "vendor", "sqlite")
    request = rf.get("/")
    request.user = world.consultant
    audit_record_fillers(
        request,
        "read",
        [first.filler_id, third.filler_id, "CSL-NOT-A-REFERRAL"],
        referral_ids=[first.pk, second.pk, second.pk],
        detail="page",
    )
    audit_record_fillers(request, "read", [], referral_ids=[third.pk], detail="ids only")
    audit_record_fillers(request, "read", [], referral_ids=[], detail="nothing")

    got = sorted(AuditEntry.objects.values_list("referral_id", "object_id", "detail"))
    assert got == sorted(
        [
            (first.pk, str(first.pk), "page"),
            (second.pk, str(second.pk), "page"),
            (third.pk, str(third.pk), "page"),
            (third.pk, str(third.pk), "ids only"),
        ]
    )


def test_a_user_with_entries_cannot_be_deleted_and_one_without_can(world: World, rf: Any) -> None:
    """``user`` has no constraint in the database; Django's PROTECT keeps the log's answer
    to "who read X": deleting an account that has entries is refused, nothing changes."""
    from django.db.models import ProtectedError

    from referrals.audit import audit_record

    referral = world.submit()
    request = rf.get("/")
    request.user = world.consultant
    assert audit_record(request, "read", [referral.pk]) == 1
    before = list(AuditEntry.objects.values_list("id", "user_id", "referral_id"))

    with pytest.raises(ProtectedError):
        world.consultant.delete()

    assert User.objects.filter(pk=world.consultant.pk).exists()
    assert list(AuditEntry.objects.values_list("id", "user_id", "referral_id")) == before
    unused = User.objects.create(username="created-by-mistake")
    unused.delete()
    assert not User.objects.filter(username="created-by-mistake").exists()
