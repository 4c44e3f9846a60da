"""Every case file is a DocumentReference both members hear about, whichever way it came
in (FHIR, the REST API, the web UI): stored in the upload's transaction, pushed to both
parties' Endpoints in their versions and in both facilities' feeds. A draft's files are
shared when it is submitted; a refused upload leaves nothing."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from accounts.models import User
from fhir_gateway.delivery import _render
from fhir_gateway.models import FeedEvent, FhirResource, OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    draft,
    stored_files,
    submit,
    task_of,
    transaction,
    with_case_file,
)
from referrals import services
from referrals.models import Attachment, Referral, ReferralState

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.4\n% an ECG strip\n%%EOF\n"


def _rest_upload(user: User, referral: Referral, content: bytes = PDF) -> Any:
    client = APIClient()
    client.force_authenticate(user)
    return client.post(
        f"/api/v1/referrals/{referral.pk}/attachments/",
        {"file": SimpleUploadedFile("ecg.pdf", content, content_type="application/pdf")},
        format="multipart",
    )


def _told(logical_id: str) -> tuple[set[str], set[int]]:
    """The Endpoints the outbox pushes ``logical_id`` to, and the facilities whose feeds
    carry it."""
    pushed = OutboxMessage.objects.filter(resource_type="DocumentReference", logical_id=logical_id)
    fed = FeedEvent.objects.filter(resource_type="DocumentReference", logical_id=logical_id)
    return (
        {m.endpoint.base_url for m in pushed},
        set(fed.values_list("facility_id", flat=True)),
    )


def test_a_file_uploaded_through_the_rest_api_is_a_document_reference_both_members_hear_of(
    world: World,
) -> None:
    task_id = accepted(world)
    referral = Referral.objects.get(filler_id=task_id)
    response = _rest_upload(world.submitter, referral)
    assert response.status_code == 201, response.content
    attachment = Attachment.objects.get(pk=response.json()["id"])
    doc_id = f"{task_id}-att-{attachment.number}"

    # The consultant's system (R5) reads it and its bytes.
    shown = body(world.r5.get(f"/fhir/DocumentReference/{doc_id}", Accept=FHIR_R5))
    (content,) = shown["content"]
    assert content["attachment"] == {
        "contentType": "application/pdf",
        "url": f"Binary/{doc_id}",
        "size": str(len(PDF)),  # R5 integer64
        "hash": base64.b64encode(hashlib.sha1(PDF).digest()).decode(),  # noqa: S324
        "title": "ecg.pdf",
    }
    assert shown["basedOn"] == [{"reference": f"ServiceRequest/{task_id}"}]
    raw = world.r5.get(f"/fhir/Binary/{doc_id}", Accept="application/pdf")
    assert raw.status_code == 200
    assert (b"".join(raw.streaming_content) if raw.streaming else raw.content) == PDF
    found = body(world.r5.get(f"/fhir/DocumentReference?related=ServiceRequest/{task_id}"))
    assert [e["resource"]["id"] for e in found["entry"]] == [doc_id]

    endpoints, feeds = _told(doc_id)
    assert endpoints == {world.spoke_endpoint.base_url, world.hub_endpoint.base_url}
    assert feeds == {world.network.spoke.pk, world.network.hub.pk}
    for message in OutboxMessage.objects.filter(logical_id=doc_id):
        sent = json.loads(_render(message, message.endpoint.fhir_version))
        assert sent["id"] == doc_id
    # An outsider sees none of it.
    assert world.other.get(f"/fhir/DocumentReference/{doc_id}").status_code == 404


def test_a_file_posted_over_fhir_is_pushed_to_both_members(world: World) -> None:
    task_id = accepted(world)
    made = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a"))
    assert made.status_code == 201, made.content
    doc_id = body(made)["id"]
    endpoints, feeds = _told(doc_id)
    assert endpoints == {world.spoke_endpoint.base_url, world.hub_endpoint.base_url}
    assert feeds == {world.network.spoke.pk, world.network.hub.pk}
    # One version, as answered.
    (row,) = FhirResource.objects.filter(resource_type="DocumentReference", logical_id=doc_id)
    assert json.loads(row.json_r4) == body(made)


def test_a_drafts_files_are_shared_when_it_is_submitted(world: World) -> None:
    referral = draft(world)
    assert referral.state == ReferralState.DRAFT
    assert _rest_upload(world.submitter, referral).status_code == 201
    not_shared = FhirResource.objects.filter(resource_type__in=("DocumentReference", "Task"))
    assert not not_shared.exists()
    assert not OutboxMessage.objects.exists()

    services.referral_transition(actor=world.submitter, referral_id=referral.pk, action="submit")
    referral.refresh_from_db()
    doc_id = f"{referral.filler_id}-att-1"
    endpoints, feeds = _told(doc_id)
    assert endpoints == {world.spoke_endpoint.base_url, world.hub_endpoint.base_url}
    assert feeds == {world.network.spoke.pk, world.network.hub.pk}
    shown = body(world.r5.get(f"/fhir/DocumentReference/{doc_id}", Accept=FHIR_R5))
    assert shown["content"][0]["attachment"]["title"] == "ecg.pdf"


def test_a_refused_upload_leaves_no_document_reference(world: World) -> None:
    task_id = accepted(world)
    referral = Referral.objects.get(filler_id=task_id)
    before = (
        FhirResource.objects.count(),
        OutboxMessage.objects.count(),
        FeedEvent.objects.count(),
    )
    outsider = _rest_upload(world.outsider, referral)
    assert outsider.status_code == 404, outsider.content
    lying = _rest_upload(world.submitter, referral, b"MZ\x90\x00 not a pdf")
    assert lying.status_code == 415, lying.content
    after = (FhirResource.objects.count(), OutboxMessage.objects.count(), FeedEvent.objects.count())
    assert after == before
    assert not Attachment.objects.exists()


def test_a_draft_cancelled_unsent_tells_no_one_of_it_or_its_files(world: World) -> None:
    # A draft is its requester's alone until sent: cancelled unsent, neither the department
    # it names nor the requester's own system hears of it (its files were being pushed to
    # the department's Endpoint and feed, with its Task).
    referral = draft(world)
    assert _rest_upload(world.submitter, referral).status_code == 201
    services.referral_transition(
        actor=world.submitter, referral_id=referral.pk, action="cancel", reason="changed my mind"
    )
    referral.refresh_from_db()
    assert referral.state == ReferralState.CANCELLED
    assert not FhirResource.objects.filter(logical_id__startswith=referral.filler_id).exists()
    assert not OutboxMessage.objects.exists()
    assert not FeedEvent.objects.exists()
    doc_id = f"{referral.filler_id}-att-1"
    assert world.r5.get(f"/fhir/DocumentReference/{doc_id}").status_code == 404
    assert world.r5.get(f"/fhir/Task/{referral.filler_id}").status_code == 404


def test_a_case_file_sent_over_fhir_for_a_draft_is_refused_and_nothing_stored(
    world: World,
) -> None:
    # Over FHIR a draft has no DocumentReference to answer with (its files are projected
    # when it is submitted): a 409, as a message on a draft, not a 500 with the file kept.
    referral = draft(world)
    files = stored_files()  # the storage is in memory, shared by the tests
    document = world.r4.post("/fhir/DocumentReference", case_file(referral.filler_id, "a"))
    binary = world.r4.post(
        "/fhir/Binary",
        {
            "resourceType": "Binary",
            "contentType": "application/pdf",
            "securityContext": {"reference": f"ServiceRequest/{referral.filler_id}"},
            "data": base64.b64encode(PDF).decode(),
        },
    )
    for response in (document, binary):
        assert response.status_code == 409, response.content
        assert body(response)["issue"][0]["code"] == "conflict"
    assert not Attachment.objects.exists()
    assert stored_files() == files
    assert not FhirResource.objects.filter(logical_id__startswith=referral.filler_id).exists()
    assert not OutboxMessage.objects.exists()
    # Submitted, the draft takes files over FHIR as any referral.
    services.referral_transition(actor=world.submitter, referral_id=referral.pk, action="submit")
    made = world.r4.post("/fhir/DocumentReference", case_file(referral.filler_id, "a"))
    assert made.status_code == 201, made.content


def test_a_new_referral_asks_for_no_files(world: World) -> None:
    """Only a draft's submission looks for files to share: a referral created in the
    transaction has none, so the hot intake path does not ask (found by review)."""
    with CaptureQueriesContext(connection) as queries:
        response = world.r4.post("/fhir", transaction(world))
    assert response.status_code == 200, response.content
    table = Attachment._meta.db_table
    assert not [q["sql"] for q in queries.captured_queries if table in q["sql"]]


# --- A transaction's case file naming another referral was filed on this one (review) ---
# transaction_bundle stores every DocumentReference entry on the Bundle's new referral and
# never reads the entry's own context.related (R4) / basedOn (R5); only subject is checked
# (_check_subject). A file the member tied to referral A is silently attached to referral
# B, and reads back with context.related = B: not what was sent.


def test_a_bundle_case_file_naming_another_referral_is_refused(world: World) -> None:
    other = task_of(submit(world, "SR-OTHER"))["id"]
    bundle = with_case_file(
        transaction(world, "SR-2"),
        {
            "contentType": "application/pdf",
            "title": "letter.pdf",
            "data": base64.b64encode(b"%PDF-1.4 letter\n%%EOF\n").decode(),
        },
    )
    bundle["entry"][-1]["resource"]["context"] = {"related": [{"reference": f"Task/{other}"}]}
    referrals, files = Referral.objects.count(), Attachment.objects.count()

    response = world.r4.post("/fhir", bundle, content_type=FHIR_R4)

    assert response.status_code == 422, response.content
    assert (Referral.objects.count(), Attachment.objects.count()) == (referrals, files)
    assert not FhirResource.objects.filter(
        resource_type="DocumentReference", logical_id__startswith=f"{other}-att-"
    ).exists()
