"""The live conference and the counter-referral over FHIR: reschedule (new conference
inputs on a scheduled Task), start / finish (Task.businessStatus in_conference / advised)
and counter-referral (a new ServiceRequest basedOn the referral)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from accounts.roles import Role
from fhir_gateway import referral_mapping as m
from fhir_gateway.models import FhirResource, OutboxMessage
from fhir_gateway.registry_projection import CONSULT_MODE_SYSTEM
from fhir_gateway.storage import validate_resource
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    advised,
    member_client,
    read_task,
    submit,
    task_input,
    task_of,
    transaction,
    update_task,
)
from referrals.models import (
    AuditEntry,
    ConsultNote,
    Priority,
    Referral,
    ReferralEvent,
    ReferralState,
)
from registry.models import Department
from tests.factories import NEUROLOGY, DepartmentFactory, SpecialtyFactory, UserFactory

pytestmark = pytest.mark.django_db

S = ReferralState
VERSIONS = [FHIR_R4, FHIR_R5]
MEDIA_VERSION = {FHIR_R4: m.R4, FHIR_R5: m.R5}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def people(world: World) -> dict[str, Any]:
    """The two member systems of ``world`` take every step (start / finish / counter-referral
    included: ``ASSIGNEE_OR_SYSTEM_ROLES`` in referrals/workflow.py); a consultant of the hub
    is the expert invited to the conference."""
    consultant = UserFactory.create(facility=world.network.hub, roles=[Role.CONSULTANT])
    consultant.departments.add(world.network.pediatrics)
    return {
        "referrer": member_client(world.submitter),
        "consultant": member_client(world.consultant),
        "consultant_user": consultant,
    }


@pytest.fixture
def spoke_neurology(world: World) -> Department:
    """A department of the original requester: where a counter-referral goes back to."""
    return DepartmentFactory.create(
        facility=world.network.spoke, specialty=SpecialtyFactory.create(code=NEUROLOGY)
    )


def _business(
    state: str, inputs: list[dict[str, Any]] | None = None, status: str | None = None
) -> Callable[[dict[str, Any]], None]:
    """A new businessStatus (+ inputs added to what the Task shows, + a Task.status)."""

    def change(task: dict[str, Any]) -> None:
        task["businessStatus"] = {"coding": [{"system": m.REFERRAL_STATE_SYSTEM, "code": state}]}
        if inputs:
            task["input"] = [*task.get("input", []), *inputs]
        if status:
            task["status"] = status

    return change


def _set_input(code: str, **value: Any) -> Callable[[dict[str, Any]], None]:
    """Replace the value of one input the Task shows (the others echoed back)."""

    def change(task: dict[str, Any]) -> None:
        for item in task["input"]:
            if item["type"]["coding"][0]["code"] == code:
                item.pop(next(k for k in item if k.startswith("value")))
                item.update(value)

    return change


def _later(days: int) -> datetime:
    return (timezone.now() + timedelta(days=days)).replace(microsecond=0)


def _scheduled(world: World, people: dict[str, Any], at: datetime | None = None) -> str:
    task_id = accepted(world)
    expert = people["consultant_user"]
    response = update_task(
        people["consultant"],
        task_id,
        _business(
            S.SCHEDULED,
            [
                task_input("scheduled-at", valueDateTime=(at or _later(1)).isoformat()),
                task_input(
                    "experts", valueIdentifier={"system": m.USER_SYSTEM, "value": str(expert.pk)}
                ),
                task_input("video-url", valueUrl="https://meet.example.org/room-42"),
            ],
        ),
    )
    assert response.status_code == 200, response.content
    return task_id


def _in_conference(world: World, people: dict[str, Any]) -> str:
    task_id = _scheduled(world, people)
    response = update_task(people["consultant"], task_id, _business(S.IN_CONFERENCE))
    assert response.status_code == 200, response.content
    return task_id


def _snapshot(task_id: str) -> tuple[Any, ...]:
    """Everything a refused update must leave as it was."""
    referral = Referral.objects.get(filler_id=task_id)
    task = FhirResource.objects.get(resource_type="Task", logical_id=task_id, is_current=True)
    return (
        referral.state,
        referral.version,
        ReferralEvent.objects.filter(referral=referral).count(),
        task.version_id,
        referral.conference_at,
        referral.conference_url,
        sorted(referral.conference_experts.values_list("pk", flat=True)),
        Referral.objects.count(),
        ConsultNote.objects.count(),
        OutboxMessage.objects.count(),
    )


def _codes(task: dict[str, Any], element: str) -> list[str]:
    return [item["type"]["coding"][0]["code"] for item in task.get(element, [])]


def _validates(resource: dict[str, Any], media: str) -> None:
    validate_resource(resource, MEDIA_VERSION[media])


# --------------------------------------------------------------------------- the table


def test_business_status_reaches_the_conference_states():
    assert m.BUSINESS_STATUS_ACTIONS[S.IN_CONFERENCE] == "start_conference"
    assert m.BUSINESS_STATUS_ACTIONS[S.ADVISED] == "finish_conference"
    assert m.TASK_STATUS[S.SCHEDULED] == m.TASK_STATUS[S.IN_CONFERENCE] == "in-progress"


# --------------------------------------------------------------------------- reschedule


@pytest.mark.parametrize("version", VERSIONS)
def test_a_scheduled_task_shows_the_planned_conference(
    world: World, people: dict[str, Any], version: str
):
    at = _later(1)
    task_id = _scheduled(world, people, at)

    task = read_task(world.r4, task_id, version)

    _validates(task, version)
    expert = people["consultant_user"]
    assert task["input"] == [
        task_input("scheduled-at", valueDateTime=m.fhir_instant(at)),
        task_input("experts", valueIdentifier={"system": m.USER_SYSTEM, "value": str(expert.pk)}),
        task_input("video-url", valueUrl="https://meet.example.org/room-42"),
    ]
    assert (task["status"], m.business_state(task)) == ("in-progress", S.SCHEDULED)


@pytest.mark.parametrize("version", VERSIONS)
def test_assignee_reschedules_by_changing_the_conference_time(
    world: World, people: dict[str, Any], version: str
):
    task_id = _scheduled(world, people)
    later = _later(3)

    response = update_task(
        people["consultant"],
        task_id,
        _set_input("scheduled-at", valueDateTime=later.isoformat()),
        version,
    )

    assert response.status_code == 200, response.content
    task = json.loads(response.content)
    _validates(task, version)
    assert (task["status"], m.business_state(task)) == ("in-progress", S.SCHEDULED)
    assert task["input"][0]["valueDateTime"] == m.fhir_instant(later)
    referral = Referral.objects.get(filler_id=task_id)
    assert (referral.state, referral.conference_at) == (S.SCHEDULED, later)
    assert referral.conference_url == "https://meet.example.org/room-42"  # unchanged
    assert list(referral.conference_experts.all()) == [people["consultant_user"]]
    schedules = ReferralEvent.objects.filter(referral=referral, action="schedule")
    assert [(e.from_state, e.to_state) for e in schedules.order_by("seq")] == [
        (S.ACCEPTED, S.SCHEDULED),
        (S.SCHEDULED, S.SCHEDULED),
    ]
    assert int(task["meta"]["versionId"]) == referral.version


def test_sending_only_a_new_video_link_keeps_the_rest(world: World, people: dict[str, Any]):
    at = _later(1)
    task_id = _scheduled(world, people, at)

    response = update_task(
        people["consultant"],
        task_id,
        lambda t: t.update(input=[task_input("video-url", valueUrl="https://meet.example.org/b")]),
        FHIR_R5,
    )

    assert response.status_code == 200, response.content
    referral = Referral.objects.get(filler_id=task_id)
    assert (referral.conference_at, referral.conference_url) == (at, "https://meet.example.org/b")
    assert list(referral.conference_experts.all()) == [people["consultant_user"]]


@pytest.mark.parametrize("version", VERSIONS)
def test_reschedule_refusals_change_nothing(world: World, people: dict[str, Any], version: str):
    task_id = _scheduled(world, people)
    before = _snapshot(task_id)
    consultant = people["consultant"]

    past = update_task(
        consultant,
        task_id,
        _set_input("scheduled-at", valueDateTime="2020-01-01T10:00:00Z"),
        version,
    )
    invalid = update_task(
        consultant, task_id, _set_input("scheduled-at", valueDateTime="2031-02-03"), version
    )
    # Found by a fuzz hunt: an instant past year 9999 in UTC broke the Task's rendering (500).
    far_future = update_task(
        consultant,
        task_id,
        _set_input("scheduled-at", valueDateTime="9999-12-31T23:59:59-14:00"),
        version,
    )
    bad_url = update_task(consultant, task_id, _set_input("video-url", valueUrl="ftp://x"), version)
    long_url = update_task(  # a valid URL, longer than the 500 characters stored
        consultant,
        task_id,
        _set_input("video-url", valueUrl="https://meet.example.org/" + "r" * 600),
        version,
    )
    stray = update_task(
        consultant,
        task_id,
        lambda t: t["input"].append(task_input("minutes", valueString="Too early.")),
        version,
    )
    unchanged = update_task(consultant, task_id, lambda t: None, version)
    dropped = update_task(consultant, task_id, lambda t: t.pop("input"), version)
    with_status = update_task(
        consultant,
        task_id,
        lambda t: (
            _set_input("scheduled-at", valueDateTime=_later(2).isoformat())(t),
            t.update(status="completed"),
        ),
        version,
    )
    wrong_side = update_task(
        people["referrer"],
        task_id,
        _set_input("scheduled-at", valueDateTime=_later(2).isoformat()),
        version,
    )
    stale = update_task(
        consultant,
        task_id,
        _set_input("scheduled-at", valueDateTime=_later(2).isoformat()),
        version,
        if_match='W/"1"',
    )
    outsider = world.other.put(f"/fhir/Task/{task_id}", read_task(world.r4, task_id))

    for response in (
        past,
        invalid,
        far_future,
        bad_url,
        long_url,
        stray,
        dropped,
        with_status,
    ):
        assert response.status_code == 422, response.content
        assert outcome_issue(response)["code"] == "business-rule"
    assert "future" in outcome_issue(past)["diagnostics"]
    assert "scheduled-at:" in outcome_issue(invalid)["diagnostics"]  # the Task.input code
    assert "between the years 1900 and 2999" in outcome_issue(far_future)["diagnostics"]
    assert "video-url:" in outcome_issue(bad_url)["diagnostics"]
    assert "at most 500 characters" in outcome_issue(long_url)["diagnostics"]
    assert "minutes" in outcome_issue(stray)["diagnostics"]
    assert unchanged.status_code == 200  # the Task as it is: its current version, no new one
    assert "nothing to do" in outcome_issue(dropped)["diagnostics"]
    assert outcome_issue(with_status)["expression"] == ["Task.input"]
    assert (wrong_side.status_code, outcome_issue(wrong_side)["code"]) == (403, "forbidden")
    assert (stale.status_code, outcome_issue(stale)["code"]) == (412, "conflict")
    assert outsider.status_code == 404
    assert _snapshot(task_id) == before


@pytest.mark.parametrize("spelling", ["0{}", " {}", "{} "])
def test_the_same_expert_spelled_otherwise_is_no_reschedule(
    world: World, people: dict[str, Any], spelling: str
):
    """ " 4", "4 " and "04" name the user "4" shows: echoing them back is "nothing to do",
    not a new schedule event sent to both members (found by an integrator)."""
    task_id = _scheduled(world, people)
    before = _snapshot(task_id)
    expert = str(people["consultant_user"].pk)
    identifier = {"system": m.USER_SYSTEM, "value": spelling.format(expert)}

    response = update_task(
        people["consultant"], task_id, _set_input("experts", valueIdentifier=identifier), FHIR_R5
    )

    assert response.status_code == 422, response.content
    assert "nothing to do" in outcome_issue(response)["diagnostics"]
    assert _snapshot(task_id) == before


def test_conference_inputs_on_a_task_that_is_not_scheduled_are_refused(
    world: World, people: dict[str, Any]
):
    task_id = accepted(world)
    before = _snapshot(task_id)

    response = update_task(
        people["consultant"],
        task_id,
        lambda t: t.update(input=[task_input("scheduled-at", valueDateTime=_later(1).isoformat())]),
    )

    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["Task.input"]
    assert _snapshot(task_id) == before


# --------------------------------------------------------------------------- start / finish


@pytest.mark.parametrize("version", VERSIONS)
def test_assignee_starts_and_finishes_the_conference(
    world: World, people: dict[str, Any], version: str
):
    task_id = _scheduled(world, people)

    started = update_task(people["consultant"], task_id, _business(S.IN_CONFERENCE), version)

    assert started.status_code == 200, started.content
    task = json.loads(started.content)
    _validates(task, version)
    assert (task["status"], m.business_state(task)) == ("in-progress", S.IN_CONFERENCE)
    assert _codes(task, "input") == ["scheduled-at", "experts", "video-url"]
    assert Referral.objects.get(filler_id=task_id).state == S.IN_CONFERENCE

    finished = update_task(
        people["consultant"],
        task_id,
        _business(
            S.ADVISED,
            [
                task_input("minutes", valueString="Echo reviewed; IVIG agreed."),
                task_input(
                    "disposition",
                    valueCoding={"system": m.DISPOSITION_SYSTEM, "code": "manage_locally"},
                ),
                task_input("text", valueString="IVIG 2 g/kg + aspirin; echo in 2 weeks."),
            ],
            status="in-progress",
        ),
        version,
    )

    assert finished.status_code == 200, finished.content
    task = json.loads(finished.content)
    _validates(task, version)
    assert (task["status"], m.business_state(task)) == ("in-progress", S.ADVISED)
    assert "input" not in task  # the conference is over; the note is the output
    referral = Referral.objects.get(filler_id=task_id)
    note = referral.consult_notes.get()
    assert (note.disposition, note.conference_minutes, note.text) == (
        "manage_locally",
        "Echo reviewed; IVIG agreed.",
        "IVIG 2 g/kg + aspirin; echo in 2 weeks.",
    )
    assert task["output"][0]["valueReference"]["reference"] == (
        f"DocumentReference/{m.note_id(referral, note.number)}"
    )
    # The requester's system reads the minutes too (they were stored and shown only on
    # the web and REST: found by an integrator), in either version.
    for reader, media in ((world.r4, FHIR_R4), (world.r5, FHIR_R5)):
        read = reader.get(
            f"/fhir/DocumentReference/{m.note_id(referral, note.number)}", Accept=media
        )
        assert read.status_code == 200, read.content
        _validates(json.loads(read.content), media)
        attached = [
            (c["attachment"]["title"], base64.b64decode(c["attachment"]["data"]).decode())
            for c in json.loads(read.content)["content"]
        ]
        assert attached == [
            ("Consult note", "IVIG 2 g/kg + aspirin; echo in 2 weeks."),
            ("Conference minutes", "Echo reviewed; IVIG agreed."),
        ]
    actions = ReferralEvent.objects.filter(referral=referral).order_by("seq")
    assert list(actions.values_list("action", flat=True))[-2:] == [
        "start_conference",
        "finish_conference",
    ]
    # Both members are sent the new Task versions and the consult note.
    sent = OutboxMessage.objects.filter(aggregate_key__startswith=f"referral:{referral.pk}:")
    for endpoint in (world.spoke_endpoint, world.hub_endpoint):
        mine = sent.filter(endpoint=endpoint)
        assert set(mine.filter(resource_type="Task").values_list("version_id", flat=True)) == set(
            range(1, referral.version + 1)
        )
        assert mine.filter(resource_type="DocumentReference").count() == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_finish_needs_its_inputs_and_refusals_change_nothing(
    world: World, people: dict[str, Any], version: str
):
    task_id = _in_conference(world, people)
    before = _snapshot(task_id)
    consultant = people["consultant"]
    minutes = task_input("minutes", valueString="Discussed.")
    advice = task_input("text", valueString="Manage locally.")
    disposition = task_input("disposition", valueCode="manage_locally")

    missing = update_task(consultant, task_id, _business(S.ADVISED, [minutes, advice]), version)
    bad_code = update_task(
        consultant,
        task_id,
        _business(S.ADVISED, [minutes, advice, task_input("disposition", valueCode="pray")]),
        version,
    )
    stray = update_task(
        consultant,
        task_id,
        _business(S.ADVISED, [minutes, advice, disposition, task_input("outcome", valueCode="x")]),
        version,
    )
    wrong_status = update_task(
        consultant,
        task_id,
        _business(S.ADVISED, [minutes, advice, disposition], status="completed"),
        version,
    )
    wrong_side = update_task(
        people["referrer"], task_id, _business(S.ADVISED, [minutes, advice, disposition]), version
    )
    stale = update_task(
        consultant,
        task_id,
        _business(S.ADVISED, [minutes, advice, disposition]),
        version,
        if_match='W/"2"',
    )

    for response in (missing, bad_code, stray, wrong_status):
        assert response.status_code == 422, response.content
        assert outcome_issue(response)["code"] == "business-rule"
    assert "disposition" in outcome_issue(missing)["diagnostics"]
    assert "disposition" in outcome_issue(bad_code)["diagnostics"]
    assert outcome_issue(stray)["expression"] == ["Task.input"]
    assert outcome_issue(wrong_status)["expression"] == ["Task.status"]
    assert wrong_side.status_code == 403
    assert stale.status_code == 412
    assert _snapshot(task_id) == before


def test_start_and_finish_from_the_wrong_state_change_nothing(world: World, people: dict[str, Any]):
    task_id = accepted(world)
    before = _snapshot(task_id)

    start = update_task(people["consultant"], task_id, _business(S.IN_CONFERENCE))
    finish = update_task(
        people["consultant"],
        task_id,
        _business(
            S.ADVISED,
            [
                task_input("minutes", valueString="-"),
                task_input("disposition", valueCode="manage_locally"),
                task_input("text", valueString="-"),
            ],
        ),
    )

    assert start.status_code == 409  # the service: not from accepted
    assert "accepted" in outcome_issue(start)["diagnostics"]
    # advised from accepted is e-consult advice: a consult note, not a Task update.
    assert finish.status_code == 422
    assert outcome_issue(finish)["expression"] == ["Task.businessStatus"]
    assert "DocumentReference" in outcome_issue(finish)["diagnostics"]
    assert _snapshot(task_id) == before


def test_requester_cannot_start_the_conference(world: World, people: dict[str, Any]):
    task_id = _scheduled(world, people)
    before = _snapshot(task_id)

    for client in (people["referrer"], world.r4):
        response = update_task(client, task_id, _business(S.IN_CONFERENCE), FHIR_R5)
        assert (response.status_code, outcome_issue(response)["code"]) == (403, "forbidden")
    assert _snapshot(task_id) == before


def test_a_cancel_of_a_scheduled_task_echoing_its_inputs_still_cancels(
    world: World, people: dict[str, Any]
):
    task_id = _scheduled(world, people)

    response = update_task(
        world.r4,
        task_id,
        lambda t: t.update(status="cancelled", statusReason={"text": "Transferred elsewhere."}),
    )

    assert response.status_code == 200, response.content
    task = json.loads(response.content)
    assert (task["status"], "input" in task) == ("cancelled", False)
    assert Referral.objects.get(filler_id=task_id).state == S.CANCELLED


# --------------------------------------------------------------------------- counter-referral


def _counter_referral(
    world: World, task_id: str, department: Department, version: str = FHIR_R4, **changes: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "basedOn": [{"reference": f"ServiceRequest/{task_id}"}],
        "subject": {"reference": f"Patient/{task_id}"},
        "requester": {"reference": f"Organization/{world.network.hub.pk}"},
        "performer": [{"reference": f"HealthcareService/{department.pk}"}],
    }
    question = {"text": "Follow-up EEG after the febrile seizure, please."}
    if version == FHIR_R4:
        resource["reasonCode"] = [question]
    else:
        resource["reason"] = [{"concept": question}]
    resource.update(changes)
    return {k: v for k, v in resource.items() if v is not None}


def _mode_code(mode: str) -> dict[str, Any]:
    return {"coding": [{"system": CONSULT_MODE_SYSTEM, "code": mode}]}


@pytest.mark.parametrize("version", VERSIONS)
def test_a_counter_referral_carries_its_priority_and_consult_mode(
    world: World, people: dict[str, Any], spoke_neurology: Department, version: str
):
    """An urgent follow-up by live consult: the new referral is urgent and live, and its
    ServiceRequest says so back (R5 ``code`` is a CodeableReference)."""
    spoke_neurology.offers_live = True
    spoke_neurology.save()
    task_id = advised(world)
    code = _mode_code("live")
    resource = _counter_referral(
        world,
        task_id,
        spoke_neurology,
        version,
        priority="urgent",
        code=code if version == FHIR_R4 else {"concept": code},
    )

    response = people["consultant"].post(
        "/fhir/ServiceRequest", resource, content_type=version, Accept=version
    )

    assert response.status_code == 201, response.content
    child = Referral.objects.get(parent_referral__filler_id=task_id)
    assert (child.priority, child.mode) == (Priority.URGENT, "live")
    created = json.loads(response.content)
    assert created["priority"] == "urgent"
    concept = created["code"] if version == FHIR_R4 else created["code"]["concept"]
    assert {"system": CONSULT_MODE_SYSTEM, "code": "live"}.items() <= concept["coding"][0].items()


@pytest.mark.parametrize("version", VERSIONS)
def test_assignee_counter_refers_with_a_service_request_based_on_the_referral(
    world: World, people: dict[str, Any], spoke_neurology: Department, version: str
):
    task_id = advised(world)
    original = Referral.objects.get(filler_id=task_id)
    resource = _counter_referral(world, task_id, spoke_neurology, version)

    response = people["consultant"].post(
        "/fhir/ServiceRequest", resource, content_type=version, Accept=version
    )

    assert response.status_code == 201, response.content
    created = json.loads(response.content)
    _validates(created, version)
    child = Referral.objects.get(parent_referral=original)
    assert created["id"] == child.filler_id
    assert response["Location"].endswith(f"/ServiceRequest/{child.filler_id}/_history/1")
    assert created["basedOn"] == [{"reference": f"ServiceRequest/{task_id}"}]
    assert created["requester"] == {"reference": f"Organization/{world.network.hub.pk}"}
    assert created["performer"] == [{"reference": f"HealthcareService/{spoke_neurology.pk}"}]
    assert (created["status"], created["priority"]) == ("active", "routine")
    # The new referral's Task (same id), submitted to the spoke's department.
    new_task = read_task(people["consultant"], child.filler_id, version)
    _validates(new_task, version)
    assert (new_task["status"], m.business_state(new_task)) == ("requested", S.SUBMITTED)
    assert new_task["owner"] == {"reference": f"HealthcareService/{spoke_neurology.pk}"}
    assert new_task["focus"] == {"reference": f"ServiceRequest/{child.filler_id}"}
    assert (child.state, child.clinical_question, child.patient_ref) == (
        S.SUBMITTED,
        "Follow-up EEG after the febrile seizure, please.",
        original.patient_ref,
    )
    # The original keeps its state; its Task names the counter-referral in Task.output.
    original.refresh_from_db()
    assert original.state == S.ADVISED
    task = read_task(world.r4, task_id, version)
    _validates(task, version)
    assert task["output"][-1] == {
        "type": {
            "coding": [
                {
                    "system": m.TASK_OUTPUT_SYSTEM,
                    "code": "counter-referral",
                    "display": "Counter-referral",
                }
            ]
        },
        "valueReference": {"reference": f"ServiceRequest/{child.filler_id}"},
    }
    assert int(task["meta"]["versionId"]) == original.version


def test_the_counter_referral_is_published_to_both_members(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    task_id = advised(world)

    response = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology)
    )

    assert response.status_code == 201, response.content
    child = Referral.objects.get(filler_id=json.loads(response.content)["id"])
    sent = OutboxMessage.objects.filter(aggregate_key__startswith=f"referral:{child.pk}:")
    for endpoint in (world.spoke_endpoint, world.hub_endpoint):  # receiver, sender
        assert sorted(
            sent.filter(endpoint=endpoint).values_list("resource_type", "logical_id", "version_id")
        ) == [
            ("Patient", child.filler_id, 1),
            ("ServiceRequest", child.filler_id, 1),
            ("Task", child.filler_id, 1),
        ]
    original = Referral.objects.get(filler_id=task_id)
    latest = OutboxMessage.objects.filter(
        aggregate_key__startswith=f"referral:{original.pk}:",
        resource_type="Task",
        version_id=original.version,
    )
    assert latest.count() == 2  # the original's new Task version, to both members


def test_a_counter_referral_is_audited_on_both_referrals(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    task_id = advised(world)
    original = Referral.objects.get(filler_id=task_id)
    AuditEntry.objects.all().delete()

    response = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology)
    )

    assert response.status_code == 201, response.content
    child = Referral.objects.get(filler_id=json.loads(response.content)["id"])
    # The child's create, and the original's transition as the REST action records it
    assert sorted(AuditEntry.objects.values_list("action", "referral_id", "detail")) == sorted(
        [
            ("create", child.pk, "fhir create ServiceRequest"),
            ("transition", original.pk, "counter_refer"),
        ]
    )


def test_a_conditional_counter_referral_is_made_once(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    task_id = advised(world)
    condition = {"If-None-Exist": f"identifier=urn:consilium:counter-referral|{task_id}/1"}

    first = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology), **condition
    )
    again = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology), **condition
    )

    assert (first.status_code, again.status_code) == (201, 200)
    assert json.loads(first.content)["id"] == json.loads(again.content)["id"]
    assert Referral.objects.filter(parent_referral__filler_id=task_id).count() == 1

    # The second one, then its retry: one more, not two.
    second = {"If-None-Exist": f"identifier=urn:consilium:counter-referral|{task_id}/2"}
    made = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology), **second
    )
    retried = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology), **second
    )
    assert (made.status_code, retried.status_code) == (201, 200)
    assert json.loads(made.content)["id"] == json.loads(retried.content)["id"]
    assert json.loads(made.content)["id"] != json.loads(first.content)["id"]
    assert Referral.objects.filter(parent_referral__filler_id=task_id).count() == 2


def test_a_conditional_counter_referral_naming_another_number_or_referral_is_refused(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    """A condition that could not find the one this request makes is refused (412): a
    retry of it would otherwise make another counter-referral every time."""
    task_id = advised(world)
    other_id = advised(world, "SR-2")
    before = (_snapshot(task_id), Referral.objects.count(), OutboxMessage.objects.count())
    for value in (
        f"urn:consilium:counter-referral|{task_id}/2",  # none yet: the next is 1
        f"urn:consilium:counter-referral|{task_id}/0",
        f"urn:consilium:counter-referral|{task_id}/\u00b2",  # "²": isdigit, not int (a 500)
        f"urn:consilium:counter-referral|{other_id}/1",  # not the referral in basedOn
        f"{m.FILLER_SYSTEM}|{task_id}",
    ):
        response = people["consultant"].post(
            "/fhir/ServiceRequest",
            _counter_referral(world, task_id, spoke_neurology),
            **{"If-None-Exist": f"identifier={value}"},
        )
        assert response.status_code == 412, (value, response.content)
        assert outcome_issue(response)["code"] == "business-rule"
    assert (_snapshot(task_id), Referral.objects.count(), OutboxMessage.objects.count()) == before


def test_based_on_the_members_own_order_is_an_ordinary_submission(world: World):
    """Only a relative ``ServiceRequest/<id>`` points at this server: a basedOn URL of the
    member's own system is ignored, as for any ServiceRequest (not a counter-referral)."""
    bundle = transaction(world, "SR-OWN")
    order = bundle["entry"][1]["resource"]
    order["basedOn"] = [{"reference": "https://his.example.org/fhir/ServiceRequest/123"}]
    response = world.r4.post("/fhir", bundle, content_type=FHIR_R4)
    assert response.status_code == 200, response.content
    referral = Referral.objects.get(placer_value="SR-OWN")
    assert referral.parent_referral_id is None


def test_counter_referral_refusals_change_nothing(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    task_id = advised(world)
    before = _snapshot(task_id)
    consultant = people["consultant"]

    def post(client: FhirClient, **changes: Any) -> Any:
        return client.post(
            "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology, **changes)
        )

    hub_department = post(
        consultant, performer=[{"reference": f"HealthcareService/{world.network.cardiology.pk}"}]
    )
    no_performer = post(consultant, performer=None)
    no_question = post(consultant, reasonCode=None)
    live = post(consultant, code=_mode_code("live"))  # spoke_neurology is asynchronous only
    whenever = post(consultant, priority="whenever")
    other_patient = post(consultant, subject={"reference": "Patient/someone-else"})
    wrong_specialty = post(
        consultant,
        performerType={"coding": [{"system": "http://snomed.info/sct", "code": "394537008"}]},
    )
    wrong_side = post(people["referrer"], requester=None)
    other_organization = post(people["referrer"])  # names the hub as requester
    outsider = post(world.other, requester=None)
    unknown = post(consultant, basedOn=[{"reference": "ServiceRequest/CSL-NOPE"}])

    for response in (hub_department, no_performer, no_question, live, other_patient):
        assert response.status_code == 422, response.content
    assert wrong_specialty.status_code == 422
    assert "requesting facility" in outcome_issue(hub_department)["diagnostics"]
    assert outcome_issue(no_performer)["expression"] == ["ServiceRequest.performer"]
    assert "does not offer live" in outcome_issue(live)["diagnostics"]
    assert (whenever.status_code, outcome_issue(whenever)["code"]) == (422, "code-invalid")
    assert outcome_issue(other_patient)["expression"] == ["ServiceRequest.subject"]
    assert outcome_issue(wrong_specialty)["expression"] == ["ServiceRequest.performerType"]
    assert (wrong_side.status_code, outcome_issue(wrong_side)["code"]) == (403, "forbidden")
    assert other_organization.status_code == 403
    assert outsider.status_code == 404
    assert unknown.status_code == 404
    assert _snapshot(task_id) == before
    assert not Referral.objects.filter(parent_referral__isnull=False).exists()


def test_counter_referral_of_a_case_not_finished_is_refused(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    task_id = accepted(world)
    before = _snapshot(task_id)

    response = people["consultant"].post(
        "/fhir/ServiceRequest", _counter_referral(world, task_id, spoke_neurology)
    )

    assert response.status_code == 409
    assert "accepted" in outcome_issue(response)["diagnostics"]
    assert _snapshot(task_id) == before


def test_a_counter_referral_cannot_come_in_a_transaction(world: World, spoke_neurology: Department):
    task_id = advised(world)
    bundle = transaction(world, "SR-2")
    bundle["entry"][1]["resource"]["basedOn"] = [{"reference": f"ServiceRequest/{task_id}"}]
    before = Referral.objects.count()

    response = world.r4.post("/fhir", bundle)

    assert response.status_code == 422
    assert outcome_issue(response)["expression"] == ["ServiceRequest.basedOn"]
    assert Referral.objects.count() == before


@pytest.mark.parametrize("base", ["http://testserver/fhir", "HTTP://TestServer:80/fhir"])
def test_a_counter_referral_may_name_the_referral_by_its_url_on_this_server(
    world: World, people: dict[str, Any], spoke_neurology: Department, base: str
):
    """It was: only a relative basedOn was read, so ``<our base>/ServiceRequest/<id>`` (as
    a client that writes absolute references sends it) made an ordinary new referral from
    the consultant's facility, not a counter-referral (writes read a reference on this
    server's base as ours: docs/fhir.md, *References in writes*)."""
    # Given an advised referral, and a counter-referral naming it and its patient by their
    # absolute URLs on this server (with a placer identifier, as a new referral carries)
    task_id = advised(world)
    original = Referral.objects.get(filler_id=task_id)
    resource = _counter_referral(
        world,
        task_id,
        spoke_neurology,
        basedOn=[{"reference": f"{base}/ServiceRequest/{task_id}"}],
        subject={"reference": f"{base}/Patient/{task_id}"},
        identifier=[{"system": "https://nhi.example.org/sid/order", "value": "CR-1"}],
    )
    before = Referral.objects.count()

    # When it is posted
    response = people["consultant"].post("/fhir/ServiceRequest", resource)

    # Then it is the counter-referral of that referral, and nothing else was made
    assert response.status_code == 201, response.content
    child = Referral.objects.get(parent_referral=original)
    assert json.loads(response.content)["id"] == child.filler_id
    assert Referral.objects.count() == before + 1


def test_a_based_on_care_plan_is_not_a_counter_referral():
    resource = {"basedOn": [{"reference": "CarePlan/gpvisit"}, {"display": "An order"}]}
    assert m.based_on_referral(resource, "http://testserver/fhir") is None


def test_experts_that_are_not_user_ids_are_refused(world: World, people: dict[str, Any]):
    """Found by a review: True, 1.9 and a fullwidth "1" were all user 1 (``int``), and
    user 1 was django-guardian's anonymous user, who got a view grant on the referral."""
    from guardian.utils import get_anonymous_user

    task_id = accepted(world)
    before = _snapshot(task_id)
    anonymous = get_anonymous_user()
    for value in (
        {"valueBoolean": True},
        {"valueDecimal": 1.9},
        {"valueIdentifier": {"system": m.USER_SYSTEM, "value": "\uff11"}},  # fullwidth 1
        {"valueIdentifier": {"system": m.USER_SYSTEM, "value": "\u0661"}},  # Arabic-Indic 1
        {"valueIdentifier": {"system": m.USER_SYSTEM, "value": str(anonymous.pk)}},
    ):
        inputs = [
            task_input("scheduled-at", valueDateTime=_later(1).isoformat()),
            task_input("experts", **value),
            task_input("video-url", valueUrl="https://meet.example.org/room-42"),
        ]
        response = update_task(
            people["consultant"], task_id, _business(S.SCHEDULED, inputs), FHIR_R5
        )
        assert response.status_code == 422, (value, response.content)
        assert "user ids" in outcome_issue(response)["diagnostics"], value
        assert _snapshot(task_id) == before


# --- found by a review of the Task update path -----------------------------------------


def test_a_second_scheduled_at_beside_the_shown_one_is_refused(world: World, people):
    """It was answered 200 with a new version while the conference time stayed (the
    first item, the old time, won)."""
    task_id = _scheduled(world, people)
    before = _snapshot(task_id)
    version = before[3]
    patch = [
        {
            "op": "add",
            "path": "/input/-",
            "value": task_input("scheduled-at", valueDateTime=m.fhir_instant(_later(5))),
        }
    ]
    response = people["consultant"].patch(
        f"/fhir/Task/{task_id}", patch, Accept=FHIR_R4, **{"If-Match": f'W/"{version}"'}
    )
    assert response.status_code == 422, response.content
    assert "takes one value" in outcome_issue(response)["diagnostics"]
    assert _snapshot(task_id) == before
    # Replacing it (the documented way) reschedules.
    task = read_task(people["consultant"], task_id)
    new_at = _later(6)
    for item in task["input"]:
        if item["type"]["coding"][0]["code"] == "scheduled-at":
            item["valueDateTime"] = m.fhir_instant(new_at)
    response = people["consultant"].put(
        f"/fhir/Task/{task_id}", task, **{"If-Match": f'W/"{version}"'}
    )
    assert response.status_code == 200, response.content
    assert Referral.objects.get(filler_id=task_id).conference_at == new_at


def test_an_input_repeated_as_shown_is_nothing_to_do(world: World, people):
    """A repeated expert made the inputs longer, read as a reschedule: a new event,
    version and notifications for no change."""
    task_id = _scheduled(world, people)
    before = _snapshot(task_id)
    patch = [{"op": "copy", "from": "/input/1", "path": "/input/-"}]
    response = people["consultant"].patch(
        f"/fhir/Task/{task_id}", patch, Accept=FHIR_R4, **{"If-Match": f'W/"{before[3]}"'}
    )
    assert response.status_code == 422, response.content
    assert _snapshot(task_id) == before


def test_the_answer_to_an_update_is_the_version_it_stored(world: World, monkeypatch):
    """The Task was read after the transition had committed: a change committed in
    between was answered (its ETag, with return=minimal) as if it were the caller's."""
    from fhir_gateway import referral_resources as rr
    from referrals.services import referral_transition

    task_id = str(task_of(submit(world))["id"])
    task = read_task(world.r5, task_id, FHIR_R5)

    def then_someone_else(**kwargs: Any) -> Referral:
        referral = referral_transition(**kwargs)
        if kwargs["action"] == "accept":  # another change, committed right after ours
            referral_transition(
                actor=world.submitter,
                referral_id=referral.pk,
                action="cancel",
                reason="patient went elsewhere",
            )
        return referral

    monkeypatch.setattr(rr, "referral_transition", then_someone_else)
    task["status"] = "accepted"
    response = world.r5.put(
        f"/fhir/Task/{task_id}",
        task,
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        Prefer="return=minimal",
        **{"If-Match": 'W/"1"'},
    )
    assert response.status_code == 200, response.content
    assert response["ETag"] == 'W/"2"'


def test_the_same_owner_written_otherwise_is_no_forward(world: World):
    """An echo whose owner is the same department as an absolute URL was read as a new
    owner (a forward): a decline on it was 422 instead of the workflow's answer."""
    task_id = str(task_of(submit(world))["id"])
    pk = world.network.pediatrics.pk

    def decline(task: dict[str, Any]) -> None:
        task["owner"] = {"reference": f"http://testserver/fhir/HealthcareService/{pk}/_history/1"}
        task["status"] = "rejected"
        task["statusReason"] = {"concept": {"text": "Full today."}}

    response = update_task(world.r5, task_id, decline, FHIR_R5)
    assert response.status_code == 200, response.content
    event = ReferralEvent.objects.filter(referral__filler_id=task_id).order_by("-seq").first()
    assert event is not None and event.action == "decline"


def test_a_counter_referral_naming_more_than_its_department_is_refused(
    world: World, people: dict[str, Any], spoke_neurology: Department
):
    """A performer beside the department (an Organization) was dropped without a word."""
    task_id = advised(world)
    body = _counter_referral(world, task_id, spoke_neurology)
    body["performer"].append({"reference": f"Organization/{world.network.spoke.pk}"})

    response = people["consultant"].post("/fhir/ServiceRequest", body)

    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == ["ServiceRequest.performer"]
    assert not Referral.objects.filter(parent_referral__filler_id=task_id).exists()


# --- A Task.input whose value is a complex datatype (valueCodeableConcept, valueReference,
# valuePeriod: valid FHIR, taken by no input of ours) was a 500 (unhashable in
# referral_mapping._task_inputs): 422 now.


def test_close_out_outcome_as_a_codeable_concept_is_422_not_500(world: World) -> None:
    task_id = advised(world)
    before = _snapshot(task_id)
    response = update_task(
        world.r4,
        task_id,
        _business(
            "closed_local",
            [
                task_input("transfer-originally-considered", valueBoolean=True),
                task_input("outcome", valueCodeableConcept={"text": "avoided"}),
            ],
        ),
    )
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["code"] == "business-rule"
    assert _snapshot(task_id) == before


def test_schedule_experts_as_a_reference_is_422_not_500(
    world: World, people: dict[str, Any]
) -> None:
    task_id = accepted(world)
    before = _snapshot(task_id)
    expert = people["consultant_user"]
    response = update_task(
        people["consultant"],
        task_id,
        _business(
            "scheduled",
            [
                task_input("scheduled-at", valueDateTime=_later(1).isoformat()),
                task_input("experts", valueReference={"reference": f"Practitioner/{expert.pk}"}),
                task_input("video-url", valueUrl="https://meet.example.org/room-42"),
            ],
        ),
    )
    assert response.status_code == 422, response.content
    assert _snapshot(task_id) == before


@pytest.mark.parametrize(
    ("disposition", "version", "code"),
    [
        # a CodeableConcept, taken by no input of ours: was a 500 (unhashable)
        (
            {
                "valueCodeableConcept": {
                    "coding": [{"system": m.DISPOSITION_SYSTEM, "code": "manage_locally"}]
                }
            },
            FHIR_R5,
            "business-rule",
        ),
        # a coding of another system whose code happens to be ours ("transfer") was read
        # as our disposition (docs/fhir.md: valueCode, or valueCoding of
        # …/CodeSystem/consult-disposition; a consult note's category is read so: disposition_of)
        (
            {"valueCoding": {"system": "http://snomed.info/sct", "code": "transfer"}},
            FHIR_R4,
            "code-invalid",
        ),
    ],
    ids=["codeable-concept", "foreign-coding"],
)
def test_a_finish_conference_disposition_we_cannot_read_is_422_and_changes_nothing(
    world: World, people: dict[str, Any], disposition: dict[str, Any], version: str, code: str
) -> None:
    task_id = _in_conference(world, people)
    before = _snapshot(task_id)
    response = update_task(
        people["consultant"],
        task_id,
        _business(
            "advised",
            [
                task_input("minutes", valueString="Discussed."),
                task_input("disposition", **disposition),
                task_input("text", valueString="IVIG 2 g/kg."),
            ],
        ),
        version,
    )
    assert response.status_code == 422, response.content
    assert outcome_issue(response)["code"] == code
    assert _snapshot(task_id) == before
    assert not ConsultNote.objects.filter(referral__filler_id=task_id).exists()
