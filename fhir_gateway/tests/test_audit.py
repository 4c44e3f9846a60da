"""Patient data read or written over FHIR is recorded in the audit log, as over REST."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db.models import F

from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway.intake import intake_drain
from fhir_gateway.models import FhirResource
from fhir_gateway.referral_mapping import filler_of
from fhir_gateway.tests.conftest import FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
    submit,
    task_of,
    transaction,
)
from referrals.models import Attachment, AuditEntry, Referral
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _entries() -> list[tuple[Any, ...]]:
    return list(
        AuditEntry.objects.order_by("id").values_list(
            "user__username", "action", "object_type", "referral_id", "detail", "ip_address"
        )
    )


def _referral(task_id: str) -> int:
    return int(Referral.objects.get(filler_id=task_id).pk)


def test_a_transaction_is_a_create_and_its_resubmission_a_read(world: World):
    task_id = str(task_of(submit(world))["id"])
    pk, who = _referral(task_id), world.submitter.username

    assert _entries() == [(who, "create", "referral", pk, "fhir transaction", "127.0.0.1")]
    submit(world)  # the same placer identifier: the existing referral answers
    assert _entries()[1:] == [(who, "read", "referral", pk, "fhir transaction", "127.0.0.1")]


def test_a_resubmission_adding_a_case_file_is_a_create(world: World):
    bundle = transaction(world, "SR-9")
    assert world.r4.post("/fhir", bundle).status_code == 200
    AuditEntry.objects.all().delete()
    bundle["entry"].append(  # the same Bundle again, now with a case file
        {
            "resource": case_file(None, "new"),
            "request": {"method": "POST", "url": "DocumentReference"},
        }
    )

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 200, response.content
    assert Attachment.objects.count() == 1
    assert [(e[1], e[4]) for e in _entries()] == [("create", "fhir transaction")]


def test_reads_vreads_and_histories_record_their_referral(world: World):
    task_id = str(task_of(submit(world))["id"])
    pk, who = _referral(task_id), world.submitter.username
    AuditEntry.objects.all().delete()

    read = world.r4.get(f"/fhir/Task/{task_id}")
    world.r4.get(f"/fhir/Patient/{task_id}/_history/1")
    world.r4.get(f"/fhir/ServiceRequest/{task_id}/_history")
    # Not modified: nothing sent, nothing recorded.
    etag = read["ETag"]
    assert world.r4.get(f"/fhir/Task/{task_id}", **{"If-None-Match": etag}).status_code == 304

    assert [(e[0], e[1], e[3], e[4]) for e in _entries()] == [
        (who, "read", pk, "fhir read Task"),
        (who, "read", pk, "fhir vread Patient"),
        (who, "read", pk, "fhir history ServiceRequest"),
    ]


def test_a_search_records_each_referral_once_with_what_it_included(world: World):
    first = str(task_of(submit(world, "SR-1"))["id"])
    second = str(task_of(submit(world, "SR-2"))["id"])
    AuditEntry.objects.all().delete()

    response = world.r4.get("/fhir/Task?status=requested&_include=Task:focus&_include=Task:patient")

    assert len(body(response)["entry"]) == 6
    assert sorted(e[3] for e in _entries()) == sorted([_referral(first), _referral(second)])
    assert {e[4] for e in _entries()} == {"fhir search Task"}
    # A search finding nothing, and registry data, record nothing.
    world.r4.get("/fhir/Task?status=completed")
    world.r4.get("/fhir/Organization")
    world.r4.get(f"/fhir/Organization/{world.network.hub.pk}")
    assert len(_entries()) == 2


def test_full_resource_events_record_each_referral_read_and_id_only_nothing(world: World):
    """``$events?content=full-resource`` carries the versions themselves (patient data):
    read, as a search's matches are; the id-only feed names them only."""
    created = world.r4.post(
        "/fhir/Subscription",
        {
            "resourceType": "Subscription",
            "status": "requested",
            "topic": "https://consilium.example.org/fhir/SubscriptionTopic/referral",
            "channelType": {
                "system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type",
                "code": "rest-hook",
            },
            "content": "id-only",
        },
        content_type=FHIR_R5,
        Accept=FHIR_R5,
    )
    assert created.status_code == 201, created.content
    sub = body(created)["id"]
    first = str(task_of(submit(world, "SR-1"))["id"])
    second = str(task_of(submit(world, "SR-2"))["id"])
    AuditEntry.objects.all().delete()

    world.r4.get(f"/fhir/Subscription/{sub}/$events")
    assert _entries() == []
    response = world.r4.get(f"/fhir/Subscription/{sub}/$events?content=full-resource")

    assert response.status_code == 200
    assert sorted(e[3] for e in _entries()) == sorted([_referral(first), _referral(second)])
    assert {(e[1], e[4]) for e in _entries()} == {("read", "fhir $events")}


def test_refusals_and_ministry_reads_record_nothing(world: World):
    task_id = str(task_of(submit(world))["id"])
    AuditEntry.objects.all().delete()
    ministry = UserFactory.create(facility=world.network.hub, roles=[Role.MINISTRY])

    response = world.other.get(f"/fhir/Task/{task_id}")
    assert (response.status_code, outcome_issue(response)["code"]) == (404, "not-found")
    world.other.get("/fhir/Task?status=requested")
    FhirClient(api_token_issue(user=ministry, name="t").raw).get("/fhir/Task")

    assert _entries() == []


def test_workflow_writes_record_an_update_or_a_create(world: World):
    task_id = accepted(world)  # the consultant's system accepts: an update of the Task
    pk, consultant = _referral(task_id), world.consultant.username
    assert (consultant, "update", "referral", pk, "fhir update Task", "127.0.0.1") in _entries()
    AuditEntry.objects.all().delete()

    response = world.r5.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
    )

    assert response.status_code == 201, response.content
    assert [(e[0], e[1], e[4]) for e in _entries()] == [
        (consultant, "create", "fhir create DocumentReference")
    ]


def test_an_asynchronous_transaction_is_recorded_when_applied(world: World):
    response = world.r4.post("/fhir", transaction(world, "SR-A"), Prefer="respond-async")
    assert response.status_code == 202
    assert _entries() == []  # accepted: nothing of a referral yet

    intake_drain()

    pk = int(Referral.objects.get().pk)
    assert _entries() == [
        (world.submitter.username, "create", "referral", pk, "fhir transaction (async)", None)
    ]


def test_the_answer_of_an_asynchronous_job_is_a_read(world: World):
    response = world.r4.post("/fhir", transaction(world, "SR-A"), Prefer="respond-async")
    poll = str(response["Content-Location"]).removeprefix("http://testserver")
    assert world.r4.get(poll).status_code == 202  # pending: nothing of a referral yet
    assert _entries() == []
    intake_drain()
    AuditEntry.objects.all().delete()

    assert world.r4.get(poll).status_code == 200
    assert world.other.get(poll).status_code == 404  # another's job: refused, not recorded

    pk = int(Referral.objects.get().pk)
    assert _entries() == [
        (world.submitter.username, "read", "referral", pk, "fhir async answer", "127.0.0.1")
    ]


def test_a_refused_asynchronous_job_records_nothing_when_polled(world: World):
    bundle = transaction(world, "SR-R")
    bundle["entry"][1]["resource"]["status"] = "bogus"  # refused when applied
    response = world.r4.post("/fhir", bundle, Prefer="respond-async")
    poll = str(response["Content-Location"]).removeprefix("http://testserver")
    intake_drain()

    answer = world.r4.get(poll)

    assert answer.status_code == 200
    assert body(answer)["entry"][0]["response"]["status"].startswith("4")
    assert _entries() == []


@pytest.mark.parametrize(
    ("resource_type", "logical_id", "filler"),
    [
        ("Task", "CSL-1", "CSL-1"),
        ("Patient", "CSL-1", "CSL-1"),
        ("Communication", "CSL-1-msg-3", "CSL-1"),
        ("DocumentReference", "CSL-1-note-2", "CSL-1"),
        ("DocumentReference", "CSL-1-att-12", "CSL-1"),
        ("Organization", "12", None),
        ("Subscription", "abc", None),
    ],
)
def test_filler_of(resource_type: str, logical_id: str, filler: str | None):
    assert filler_of(resource_type, logical_id) == filler


def test_a_read_not_modified_since_sends_and_records_nothing(world: World):
    """``If-Modified-Since`` (RFC 9110 13.1.3): 304 when the current version is no newer
    than the date, to the second; the version when it is newer, the date is invalid, or
    an ``If-None-Match`` that does not match is sent too (it decides alone)."""
    task_id = str(task_of(submit(world))["id"])
    first = world.r4.get(f"/fhir/Task/{task_id}")
    stamp, etag = first["Last-Modified"], first["ETag"]
    AuditEntry.objects.all().delete()

    def status(**headers: str) -> int:
        return int(world.r4.get(f"/fhir/Task/{task_id}", **headers).status_code)

    held = world.r4.get(f"/fhir/Task/{task_id}", **{"If-Modified-Since": stamp})
    assert (held.status_code, held["ETag"], held["Last-Modified"]) == (304, etag, stamp)
    assert held.content == b""
    assert status(**{"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT"}) == 200  # older
    assert status(**{"If-Modified-Since": "not a date"}) == 200
    assert status(**{"If-Modified-Since": stamp, "If-None-Match": 'W/"99"'}) == 200
    assert (
        status(**{"If-Modified-Since": "Sun, 06 Nov 1994 08:49:37 GMT", "If-None-Match": etag})
        == 304
    )
    assert [e[4] for e in _entries()] == ["fhir read Task"] * 3  # the three 200s only

    # A version stored after the date (a second later): sent.
    FhirResource.objects.filter(resource_type="Task", logical_id=task_id, is_current=True).update(
        last_updated=F("last_updated") + timedelta(seconds=1)
    )
    assert status(**{"If-Modified-Since": stamp}) == 200
