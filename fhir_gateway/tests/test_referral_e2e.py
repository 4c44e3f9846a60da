"""End to end with a real FHIR client library (fhirpy) against the running server:
an R4 district hospital system submits, an R5 consultant system answers; a consultant's
app runs the live conference and refers the patient back down (counter-referral)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import requests
from django.utils import timezone
from fhirpy import SyncFHIRClient

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from fhir_gateway import referral_mapping as m
from fhir_gateway.intake import intake_drain
from fhir_gateway.models import OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R5
from fhir_gateway.tests.referral_world import World, transaction
from referrals.models import Referral, ReferralState
from tests.factories import NEUROLOGY, DepartmentFactory, SpecialtyFactory, UserFactory


def _client(live_server: Any, user: Any, **headers: str) -> SyncFHIRClient:
    token = api_token_issue(user=user, name="e2e").raw
    return SyncFHIRClient(
        f"{live_server.url}/fhir", authorization=f"Bearer {token}", extra_headers=headers or None
    )


def _consultant(world: World) -> User:
    """A consultant of the assigned department (start / finish / counter-referral are
    consultant or coordinator actions; their app uses their token)."""
    user = UserFactory.create(facility=world.network.hub, roles=[Role.CONSULTANT])
    user.departments.add(world.network.pediatrics)
    return user


def _put_task(live_server: Any, user: Any, task: Any, **headers: str) -> Any:
    """PUT the Task with If-Match on the version it was read at (fhirpy's save)."""
    version = task["meta"]["versionId"]
    client = _client(live_server, user, **headers, **{"If-Match": f'W/"{version}"'})
    saved = client.resource("Task", **task.serialize())
    saved.save()
    return saved


def _state_coding(state: str) -> dict[str, Any]:
    return {"coding": [{"system": m.REFERRAL_STATE_SYSTEM, "code": state}]}


def _input(code: str, **value: Any) -> dict[str, Any]:
    return {"type": {"coding": [{"system": m.TASK_INPUT_SYSTEM, "code": code}]}, **value}


@pytest.mark.django_db(transaction=True)
def test_full_lifecycle_r4_submitter_r5_consultant(live_server: Any, world: World) -> None:
    submitter = _client(live_server, world.submitter)
    r5 = {"Accept": FHIR_R5, "Content-Type": FHIR_R5}
    consultant = _client(live_server, world.consultant, **r5)

    # R4 submitter: one transaction Bundle (Patient + ServiceRequest + Task).
    answer = submitter.execute("", method="post", data=transaction(world, "E2E-1"))
    assert answer["type"] == "transaction-response"
    task_id = answer["entry"][2]["resource"]["id"]
    owner = f"HealthcareService/{world.network.pediatrics.pk}"
    assert answer["entry"][2]["resource"]["owner"]["reference"] == owner

    # R5 consultant: its worklist, with the orders included.
    found = (
        consultant.resources("Task").search(owner=owner, status="requested,received").fetch_raw()
    )
    assert [e["resource"]["id"] for e in found["entry"]] == [task_id]
    tasks = consultant.resources("Task").search(owner=owner).include("Task", "focus").fetch_raw()
    assert {e["resource"]["resourceType"] for e in tasks["entry"]} == {"Task", "ServiceRequest"}
    # fhirpy's three-part include and :iterate: the orders and, through them, the patients.
    worklist = (
        consultant.resources("Task")
        .search(owner=owner)
        .include("Task", "focus", "ServiceRequest")
        .include("ServiceRequest", "patient", iterate=True)
        .fetch_raw()
    )
    assert [(e["resource"]["resourceType"], e["search"]["mode"]) for e in worklist["entry"]] == [
        ("Task", "match"),
        ("ServiceRequest", "include"),
        ("Patient", "include"),
    ]

    # fhirpy's count() (_count=0) and elements() (_elements: the Task cut down, tagged).
    assert consultant.resources("Task").search(owner=owner, status="requested").count() == 1
    slim = consultant.resources("Task").search(owner=owner).elements("owner").fetch_raw()
    slim_task = slim["entry"][0]["resource"]
    assert set(slim_task) == {"resourceType", "id", "meta", "owner", "status", "intent"}
    assert slim_task["meta"]["tag"][0]["code"] == "SUBSETTED"

    # Acknowledge (Task.status received), then accept, each with If-Match on the version
    # it read.
    task = consultant.reference("Task", task_id).to_resource()
    assert "requestedPerformer" in task  # the R5 rendering
    acknowledging = _client(live_server, world.consultant, **r5, **{"If-Match": 'W/"1"'})
    task["status"] = "received"
    received = acknowledging.resource("Task", **task.serialize())
    received.save()
    assert received["status"] == "received"
    assert consultant.resources("Task").search(owner=owner, status="received").count() == 1
    task = consultant.reference("Task", task_id).to_resource()
    accepting = _client(live_server, world.consultant, **r5, **{"If-Match": 'W/"2"'})
    task["status"] = "accepted"
    accepted = accepting.resource("Task", **task.serialize())
    accepted.save()
    assert accepted["status"] == "accepted"

    # A Communication (R5 has no contentString: a text attachment).
    question = consultant.resource(
        "Communication",
        status="completed",
        partOf=[{"reference": f"Task/{task_id}"}],
        payload=[{"contentCodeableConcept": {"text": "Any echocardiogram?"}}],
    )
    question.save()
    assert Referral.objects.get().state == ReferralState.INFO_REQUESTED
    reply = submitter.resource(
        "Communication",
        status="completed",
        partOf=[{"reference": f"Task/{task_id}"}],
        inResponseTo=[{"reference": f"Communication/{question.id}"}],
        payload=[{"contentString": "Normal echo yesterday."}],
        identifier=[{"system": "https://codao.example.org/sid/message", "value": "R-1"}],
    )
    reply.save()
    # Found again by the identifier the submitter's system gave it.
    mine = (
        submitter.resources("Communication")
        .search(identifier="https://codao.example.org/sid/message|R-1")
        .fetch()
    )
    assert [c.id for c in mine] == [reply.id]
    assert mine[0]["identifier"] == reply["identifier"]

    # The consult note.
    note = consultant.resource(
        "DocumentReference",
        status="current",
        extension=[{"url": m.DISPOSITION_EXTENSION, "valueCode": "manage_locally"}],
        type={"coding": [{"system": "http://loinc.org", "code": "11488-4"}]},
        basedOn=[{"reference": f"ServiceRequest/{task_id}"}],
        content=[{"attachment": {"contentType": "text/plain", "data": "SVZJRyArIGFzcGlyaW4="}}],
    )
    note.save()

    # The R4 submitter reads the updated Task.
    seen = submitter.reference("Task", task_id).to_resource()
    assert seen["status"] == "in-progress"
    assert seen["businessStatus"]["coding"][0]["code"] == "advised"
    assert seen["output"][0]["valueReference"]["reference"] == f"DocumentReference/{note.id}"
    assert "performerType" in seen  # the R4 rendering
    referral = Referral.objects.get()
    assert referral.state == ReferralState.ADVISED
    assert referral.consult_notes.get().text == "IVIG + aspirin"

    # Both members were sent every change, each in its own version.
    sent = OutboxMessage.objects.filter(aggregate_key__startswith=f"referral:{referral.pk}:")
    by_endpoint = {
        endpoint.fhir_version: [
            (x.resource_type, x.version_id) for x in sent.filter(endpoint=endpoint).order_by("seq")
        ]
        for endpoint in (world.spoke_endpoint, world.hub_endpoint)
    }
    assert set(by_endpoint) == {"4.0", "5.0"}
    assert by_endpoint["4.0"] == by_endpoint["5.0"]
    assert [v for t, v in by_endpoint["4.0"] if t == "Task"] == [1, 2, 3, 4, 5, 6]
    assert ("DocumentReference", 1) in by_endpoint["5.0"]
    assert sum(1 for t, _v in by_endpoint["5.0"] if t == "Communication") == 2

    # The consultant's app refers the patient back down to a department of the district
    # hospital: a new ServiceRequest basedOn the referral (R4 here).
    neurology = DepartmentFactory.create(
        facility=world.network.spoke, specialty=SpecialtyFactory.create(code=NEUROLOGY)
    )
    app = _client(live_server, _consultant(world))
    back = app.resource(
        "ServiceRequest",
        status="active",
        intent="order",
        basedOn=[{"reference": f"ServiceRequest/{task_id}"}],
        subject={"reference": f"Patient/{task_id}"},
        performer=[{"reference": f"HealthcareService/{neurology.pk}"}],
        reasonCode=[{"text": "Follow-up echocardiogram in 6 weeks."}],
    )
    back.save()
    child = Referral.objects.get(parent_referral=referral)
    assert back.id == child.filler_id
    assert back.serialize()["basedOn"] == [{"reference": f"ServiceRequest/{task_id}"}]
    new_task = app.reference("Task", back.id).to_resource()
    assert (new_task["status"], new_task["owner"]["reference"]) == (
        "requested",
        f"HealthcareService/{neurology.pk}",
    )
    seen = submitter.reference("Task", task_id).to_resource()
    assert seen["output"][-1]["valueReference"]["reference"] == f"ServiceRequest/{back.id}"
    # The district hospital's system is sent the new referral (it is the receiver now).
    assert sorted(
        OutboxMessage.objects.filter(
            aggregate_key__startswith=f"referral:{child.pk}:", endpoint=world.spoke_endpoint
        ).values_list("resource_type", flat=True)
    ) == ["Patient", "ServiceRequest", "Task"]


@pytest.mark.django_db(transaction=True)
def test_live_conference_lifecycle_over_task_updates(live_server: Any, world: World) -> None:
    submitter = _client(live_server, world.submitter)
    r5 = {"Accept": FHIR_R5, "Content-Type": FHIR_R5}
    consultant = _consultant(world)
    app = _client(live_server, consultant, **r5)
    answer = submitter.execute("", method="post", data=transaction(world, "E2E-2"))
    task_id = answer["entry"][2]["resource"]["id"]

    # The consultant system accepts; the consultant's app schedules the conference.
    task = app.reference("Task", task_id).to_resource()
    task["status"] = "accepted"
    _put_task(live_server, world.consultant, task, **r5)
    task = app.reference("Task", task_id).to_resource()
    at = (timezone.now() + timedelta(days=1)).replace(microsecond=0)
    task["businessStatus"] = _state_coding("scheduled")
    task["input"] = [
        _input("scheduled-at", valueDateTime=at.isoformat()),
        _input("experts", valueIdentifier={"system": m.USER_SYSTEM, "value": str(consultant.pk)}),
        _input("video-url", valueUrl="https://meet.example.org/e2e"),
    ]
    scheduled = _put_task(live_server, consultant, task, **r5)
    assert scheduled["status"] == "in-progress"

    # Reschedule: the Task shows the conference; change its time.
    task = app.reference("Task", task_id).to_resource()
    later = at + timedelta(days=2)
    task["input"][0]["valueDateTime"] = later.isoformat()
    _put_task(live_server, consultant, task, **r5)
    assert Referral.objects.get().conference_at == later

    # Start the conference with fhirpy's patch (a JSON merge patch of one element, sent
    # with the client's FHIR R5 Content-Type, no If-Match), then finish it.
    started = app.reference("Task", task_id).patch(businessStatus=_state_coding("in_conference"))
    assert started["businessStatus"]["coding"][0]["code"] == "in_conference"
    assert started["meta"]["versionId"] == "5"
    task = app.reference("Task", task_id).to_resource()
    task["businessStatus"] = _state_coding("advised")
    task["input"] = [
        *task["input"],
        _input("minutes", valueString="Echo reviewed together."),
        _input("disposition", valueCode="manage_locally"),
        _input("text", valueString="IVIG + aspirin; echo in 2 weeks."),
    ]
    finished = _put_task(live_server, consultant, task, **r5)
    assert (finished["status"], finished["businessStatus"]["coding"][0]["code"]) == (
        "in-progress",
        "advised",
    )

    # The R4 submitter sees the advice as the Task's output and can close out.
    seen = submitter.reference("Task", task_id).to_resource()
    note_ref = seen["output"][0]["valueReference"]["reference"]
    assert submitter.reference(*note_ref.split("/")).to_resource()["description"]
    referral = Referral.objects.get()
    assert referral.state == ReferralState.ADVISED
    assert referral.consult_notes.get().conference_minutes == "Echo reviewed together."
    actions = list(referral.events.order_by("seq").values_list("action", flat=True))
    assert actions == [
        "submit",
        "accept",
        "schedule",
        "schedule",
        "start_conference",
        "finish_conference",
    ]


@pytest.mark.django_db(transaction=True)
def test_asynchronous_transaction_over_http(live_server: Any, world: World) -> None:
    """docs/fhir.md's asynchronous example as a member system runs it (plain HTTP: the
    pattern needs the Content-Location header, which FHIR client libraries do not expose)."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_token_issue(user=world.submitter).raw}"
    kick = session.post(
        f"{live_server.url}/fhir",
        json=transaction(world),
        headers={"Content-Type": "application/fhir+json", "Prefer": "respond-async"},
        timeout=30,
    )
    assert kick.status_code == 202, kick.text
    poll = kick.headers["Content-Location"]
    assert poll.startswith(f"{live_server.url}/fhir/_async/")
    waiting = session.get(poll, timeout=30)
    assert (waiting.status_code, waiting.headers["Retry-After"]) == (202, "1")

    assert intake_drain() == 1  # what the worker's intake_drain task does

    answer = session.get(poll, timeout=30)
    assert answer.status_code == 200
    entry = answer.json()["entry"][0]
    assert entry["response"]["status"] == "200 OK"
    task = next(
        e["resource"] for e in entry["resource"]["entry"] if e["resource"]["resourceType"] == "Task"
    )
    read = session.get(f"{live_server.url}/fhir/Task/{task['id']}", timeout=30)
    assert read.json() == task
    assert session.delete(poll, timeout=30).status_code == 200  # forgotten, answered once more
    assert session.get(poll, timeout=30).status_code == 404
    assert Referral.objects.get().state == ReferralState.SUBMITTED
