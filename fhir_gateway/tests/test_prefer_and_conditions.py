"""Conditional requests and ``Prefer: return`` (review findings): a conditional create's
key must name one submission; If-None-Match compares weakly, in lists and with ``*``;
type-level history is an interaction we do not offer; a write answered minimal or as an
OperationOutcome keeps the FHIR media type, transactions included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fhir_gateway.tests.conftest import FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    HIS_PATIENT,
    PLACER,
    World,
    body,
    service_request,
    submit,
    task_of,
    transaction,
)
from referrals.models import AuditEntry, Referral

pytestmark = pytest.mark.django_db

FILLER_SYSTEM = "https://consilium.example.org/fhir/sid/referral"


@pytest.mark.parametrize("key", [f"{PLACER}|", f"{FILLER_SYSTEM}|", f"SR-2,{PLACER}|"])
def test_a_transaction_key_without_a_value_is_refused(world: World, key: str) -> None:
    submit(world, "SR-1")
    bundle = transaction(world, "SR-2")
    bundle["entry"][1]["request"]["ifNoneExist"] = f"identifier={key}"
    response = world.r4.post("/fhir", bundle)
    assert response.status_code == 400, response.content
    assert "needs an identifier with a value" in outcome_issue(response)["diagnostics"]
    assert list(Referral.objects.values_list("placer_value", flat=True)) == ["SR-1"]


def test_a_header_key_without_a_value_is_refused(world: World) -> None:
    submit(world, "SR-1")
    first = Referral.objects.get(placer_value="SR-1")
    sr = service_request(world, "SR-9", subject=f"Patient/{first.filler_id}")
    response = world.r4.post(
        "/fhir/ServiceRequest", sr, **{"If-None-Exist": f"identifier={PLACER}|"}
    )
    assert response.status_code == 400, response.content
    assert not Referral.objects.filter(placer_value="SR-9").exists()


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ('W/"{v}"', 304),
        ('"{v}"', 304),  # weak comparison: the strong form of the same tag
        ('W/"0", W/"{v}"', 304),
        ("*", 304),
        ('W/"{w}"', 200),  # another version
        ('"x", W/"{w}"', 200),
        ("garbage", 200),
    ],
)
def test_if_none_match_compares_weakly(world: World, header: str, status: int) -> None:
    task_id = task_of(submit(world))["id"]
    first = world.r4.get(f"/fhir/Task/{task_id}")
    version = int(json.loads(first.content)["meta"]["versionId"])
    value = header.format(v=version, w=version + 1)
    response = world.r4.get(f"/fhir/Task/{task_id}", **{"If-None-Match": value})
    assert response.status_code == status, (value, response.status_code)
    if status == 304:
        assert response["ETag"] == f'W/"{version}"'
        assert response.content == b""


def test_type_level_history_is_not_offered(world: World) -> None:
    submit(world)
    response = world.r4.get("/fhir/Task/_history")
    assert response.status_code == 405
    assert outcome_issue(response)["code"] == "not-supported"


def _acknowledge(world: World, task_id: str, prefer: str) -> Any:
    """PATCH Task.status received (a new version, 2) with ``Prefer: <prefer>``."""
    return world.r5.patch(
        f"/fhir/Task/{task_id}",
        [{"op": "replace", "path": "/status", "value": "received"}],
        Accept=FHIR_R5,
        Prefer=prefer,
    )


def test_return_minimal_keeps_the_fhir_media_type(world: World) -> None:
    task_id = task_of(submit(world))["id"]
    response = _acknowledge(world, task_id, "return=minimal")
    assert response.status_code == 200, response.content
    assert response.content == b""
    assert response["Content-Type"] == FHIR_R5
    assert response["ETag"] == 'W/"2"'
    assert response["Location"].endswith(f"/fhir/Task/{task_id}/_history/2")


def test_return_operation_outcome_answers_one(world: World) -> None:
    task_id = task_of(submit(world))["id"]
    response = _acknowledge(world, task_id, "return=OperationOutcome")
    assert response.status_code == 200, response.content
    outcome = body(response)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"
    assert f"Task/{task_id}/_history/2" in outcome["issue"][0]["diagnostics"]
    assert response["ETag"] == 'W/"2"'


def test_a_transaction_answered_minimal_has_no_resources(world: World) -> None:
    response = world.r4.post("/fhir", transaction(world), Prefer="return=minimal")
    assert response.status_code == 200, response.content
    entries = body(response)["entry"]
    assert entries and all("resource" not in e for e in entries)
    assert all(e["response"]["status"].startswith("201") for e in entries)
    assert all(e["response"]["location"] for e in entries)
    assert Referral.objects.count() == 1


def _audit() -> list[tuple[str, int | None, str]]:
    return list(AuditEntry.objects.order_by("id").values_list("action", "referral_id", "detail"))


@pytest.mark.parametrize("prefer", ["return=minimal", "return=OperationOutcome"])
def test_a_conditional_create_that_sends_nothing_records_no_read(world: World, prefer: str) -> None:
    submit(world, "A")
    AuditEntry.objects.all().delete()
    response = world.r4.post(
        "/fhir/ServiceRequest",
        service_request(world, "A", subject=HIS_PATIENT),
        **{"If-None-Exist": f"identifier={PLACER}|A", "Prefer": prefer},
    )
    assert response.status_code == 200, response.content
    assert b"reasonCode" not in response.content
    assert _audit() == []
    # The same answered with the resource is a read
    response = world.r4.post(
        "/fhir/ServiceRequest",
        service_request(world, "A", subject=HIS_PATIENT),
        **{"If-None-Exist": f"identifier={PLACER}|A", "Prefer": "return=representation"},
    )
    assert response.status_code == 200
    referral = Referral.objects.get(placer_value="A")
    assert _audit() == [("read", referral.pk, "fhir create ServiceRequest")]


def test_a_patch_that_changes_nothing_answered_minimal_records_no_read(world: World) -> None:
    task_id = task_of(submit(world, "A"))["id"]
    AuditEntry.objects.all().delete()
    test_only = [{"op": "test", "path": "/status", "value": "requested"}]
    response = world.r5.patch(f"/fhir/Task/{task_id}", test_only, Prefer="return=minimal")
    assert response.status_code == 200, response.content
    assert response.content == b""
    assert _audit() == []
    response = world.r5.patch(f"/fhir/Task/{task_id}", test_only, Prefer="return=whatever")
    assert response.status_code == 200 and body(response)["resourceType"] == "Task"
    assert [a for a, _r, _d in _audit()] == ["read"]
