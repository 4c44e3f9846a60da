"""The rest of the workflow over FHIR Task updates: forward (Task.owner), schedule,
close_local with the close-out answer and the transfer steps (Task.businessStatus)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from accounts.roles import Role
from fhir_gateway import referral_mapping as m
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, FhirClient, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    advised,
    member_client,
    read_task,
    submit,
    task_input,
    task_of,
    update_task,
)
from referrals.models import AuditEntry, CloseOut, Referral, ReferralEvent, ReferralState
from referrals.workflow import TRANSITIONS_BY_ACTION
from registry.models import Department
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

S = ReferralState


@pytest.fixture
def people(world: World) -> dict[str, FhirClient]:
    """Clinicians' apps (their roles take these actions) beside the two member systems."""
    referrer = UserFactory.create(facility=world.network.spoke, roles=[Role.REFERRER])
    consultant = UserFactory.create(facility=world.network.hub, roles=[Role.CONSULTANT])
    consultant.departments.add(world.network.pediatrics)
    return {
        "referrer": member_client(referrer),
        "consultant": member_client(consultant),
        "consultant_user": consultant,  # type: ignore[dict-item]
    }


def _state(
    state: str,
    reason: str = "",
    inputs: list[dict[str, Any]] | None = None,
    version: str = FHIR_R4,
) -> Callable[[dict[str, Any]], None]:
    def change(task: dict[str, Any]) -> None:
        task["businessStatus"] = {"coding": [{"system": m.REFERRAL_STATE_SYSTEM, "code": state}]}
        if reason:  # R4 CodeableConcept, R5 CodeableReference
            text: dict[str, Any] = {"text": reason}
            task["statusReason"] = text if version == FHIR_R4 else {"concept": text}
        if inputs:
            task["input"] = inputs

    return change


def _snapshot(task_id: str) -> tuple[str, int, int]:
    referral = Referral.objects.get(filler_id=task_id)
    return referral.state, referral.version, ReferralEvent.objects.filter(referral=referral).count()


# --------------------------------------------------------------------------- the table


def test_every_business_status_action_leads_to_that_state():
    for state, action in m.BUSINESS_STATUS_ACTIONS.items():
        assert TRANSITIONS_BY_ACTION[action].target == state


# --------------------------------------------------------------------------- close-out


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_requester_closes_locally_with_the_close_out_answer(
    world: World, people: dict[str, Any], version: str
):
    task_id = advised(world)

    response = update_task(
        people["referrer"],
        task_id,
        _state(
            S.CLOSED_LOCAL,
            inputs=[
                task_input("transfer-originally-considered", valueBoolean=True),
                task_input("outcome", valueCode="avoided"),
            ],
        ),
        version,
    )

    assert response.status_code == 200, response.content
    task = json.loads(response.content)
    assert (task["status"], m.business_state(task)) == ("completed", "closed_local")
    close_out = CloseOut.objects.get(referral__filler_id=task_id)
    assert (close_out.transfer_originally_considered, close_out.outcome) == (True, "avoided")
    assert "input" not in task  # the answer is the referral's, not kept on the Task


def test_close_out_needs_its_answer_and_changes_nothing_without(
    world: World, people: dict[str, Any]
):
    task_id = advised(world)
    before = _snapshot(task_id)

    missing = update_task(people["referrer"], task_id, _state(S.CLOSED_LOCAL))
    wrong = update_task(
        people["referrer"],
        task_id,
        _state(
            S.CLOSED_LOCAL,
            inputs=[
                task_input("transfer-originally-considered", valueString="yes"),
                task_input("outcome", valueCode="avoided"),
            ],
        ),
    )
    stray = update_task(
        people["referrer"],
        task_id,
        _state(
            S.CLOSED_LOCAL,
            inputs=[task_input("scheduled-at", valueDateTime="2030-01-01T10:00:00Z")],
        ),
    )

    for response in (missing, wrong, stray):
        assert response.status_code == 422, response.content
        assert outcome_issue(response)["code"] == "business-rule"
    assert _snapshot(task_id) == before
    assert not CloseOut.objects.exists()


# --------------------------------------------------------------------------- transfer


def test_the_transfer_steps_each_side_in_turn(world: World, people: dict[str, Any]):
    Department.objects.filter(pk=world.network.pediatrics.pk).update(offers_transfer=True)
    task_id = advised(world)
    steps = [
        ("referrer", S.TRANSFER_REQUESTED, "Needs surgery.", "in-progress"),
        ("consultant", S.TRANSFER_ACCEPTED, "Bed 12 ready.", "in-progress"),
        ("referrer", S.IN_TRANSIT, "", "in-progress"),
        ("consultant", S.ARRIVED, "Arrived 14:10.", "in-progress"),
        ("consultant", S.COMPLETED, "", "completed"),
    ]
    for who, state, reason, status in steps:
        response = update_task(
            people[who], task_id, _state(state, reason, version=FHIR_R5), FHIR_R5
        )
        assert response.status_code == 200, (state, response.content)
        task = json.loads(response.content)
        assert (m.business_state(task), task["status"]) == (state, status)
    actions = list(
        ReferralEvent.objects.filter(referral__filler_id=task_id)
        .order_by("seq")
        .values_list("action", "reason")
    )
    assert actions[-5:] == [
        ("request_transfer", "Needs surgery."),
        ("accept_transfer", "Bed 12 ready."),
        ("depart", ""),
        ("arrive", "Arrived 14:10."),
        ("complete", ""),
    ]


def test_wrong_side_wrong_state_and_wrong_role_are_refused_and_change_nothing(
    world: World, people: dict[str, Any]
):
    Department.objects.filter(pk=world.network.pediatrics.pk).update(offers_transfer=True)
    task_id = advised(world)
    before = _snapshot(task_id)

    wrong_side = update_task(
        people["consultant"], task_id, _state(S.TRANSFER_REQUESTED, "Why not.")
    )
    wrong_state = update_task(people["consultant"], task_id, _state(S.ARRIVED))
    # The consultant's member system is on the wrong side for a transfer request.
    system = update_task(world.r5, task_id, _state(S.TRANSFER_REQUESTED, "Needs surgery."))
    no_change = update_task(world.r4, task_id, lambda t: t.update(note=[{"text": "Seen."}]))

    assert wrong_side.status_code == 403
    assert wrong_state.status_code == 409
    assert system.status_code == 403
    assert outcome_issue(system)["code"] == "forbidden"
    assert no_change.status_code == 422  # no change the workflow knows: nothing to do
    assert world.other.put(f"/fhir/Task/{task_id}", read_task(world.r4, task_id)).status_code == 404
    assert _snapshot(task_id) == before
    # The requester's member system holds the role (referrals/workflow.py): it may.
    requested = update_task(world.r4, task_id, _state(S.TRANSFER_REQUESTED, "Needs surgery."))
    assert requested.status_code == 200
    assert Referral.objects.get(filler_id=task_id).state == S.TRANSFER_REQUESTED


@pytest.mark.parametrize(
    ("change", "element"),
    [
        (_state("expired"), "Task.businessStatus"),
        (_state("info_requested"), "Task.businessStatus"),  # a Communication does that
        (
            lambda t: t.update(businessStatus={"coding": [{"system": "x", "code": "done"}]}),
            "Task.businessStatus",
        ),
        (
            lambda t: (_state(S.CLOSED_LOCAL)(t), t.update(status="cancelled")),
            "Task.status",
        ),
        (
            lambda t: t.update(input=[task_input("outcome", valueCode="avoided")]),
            "Task.input",
        ),
        (
            _state(S.CLOSED_LOCAL, inputs=[{"type": {"text": "outcome"}, "valueCode": "avoided"}]),
            "Task.input[0].type",
        ),
        # Another referral's order: a Task's focus is its own referral's, never changed.
        (lambda t: t.update(focus={"reference": "ServiceRequest/CSL-OTHER"}), "Task.focus"),
    ],
)
def test_updates_we_cannot_map_are_422_and_change_nothing(
    world: World, people: dict[str, Any], change: Any, element: str
):
    task_id = advised(world)
    before = _snapshot(task_id)

    response = update_task(people["referrer"], task_id, change)

    assert response.status_code == 422, response.content
    assert outcome_issue(response)["expression"] == [element]
    assert _snapshot(task_id) == before


# --------------------------------------------------------------------------- schedule, forward


def test_assignee_schedules_a_live_conference(world: World, people: dict[str, Any]):
    task_id = str(task_of(submit(world))["id"])
    update_task(world.r5, task_id, lambda t: t.update(status="accepted"), FHIR_R5)
    expert = people["consultant_user"]
    at = (timezone.now() + timedelta(days=1)).replace(microsecond=0)

    response = update_task(
        people["consultant"],
        task_id,
        _state(
            S.SCHEDULED,
            inputs=[
                task_input("scheduled-at", valueDateTime=at.isoformat()),
                task_input(
                    "experts", valueIdentifier={"system": m.USER_SYSTEM, "value": str(expert.pk)}
                ),
                task_input("video-url", valueUrl="https://meet.example.org/room-42"),
            ],
        ),
    )

    assert response.status_code == 200, response.content
    referral = Referral.objects.get(filler_id=task_id)
    assert (referral.state, referral.conference_at, referral.conference_url) == (
        S.SCHEDULED,
        at,
        "https://meet.example.org/room-42",
    )
    assert list(referral.conference_experts.all()) == [expert]
    past = update_task(
        people["consultant"],
        task_id,
        _state(
            S.SCHEDULED,
            inputs=[task_input("scheduled-at", valueDateTime="2020-01-01T10:00:00Z")],
        ),
    )
    assert past.status_code == 422  # a reschedule into the past: nothing rescheduled
    assert Referral.objects.get(filler_id=task_id).conference_at == at


def test_assignee_forwards_by_changing_the_owner(world: World, people: dict[str, Any]):
    task_id = str(task_of(submit(world))["id"])
    cardiology = world.network.cardiology

    def forward(task: dict[str, Any]) -> None:
        task["owner"] = {"reference": f"HealthcareService/{cardiology.pk}"}
        task["statusReason"] = {"text": "Murmur: cardiology first."}

    response = update_task(people["consultant"], task_id, forward)

    assert response.status_code == 200, response.content
    task = json.loads(response.content)
    assert task["owner"]["reference"] == f"HealthcareService/{cardiology.pk}"
    assert (task["status"], m.business_state(task)) == ("requested", "submitted")
    referral = Referral.objects.get(filler_id=task_id)
    assert referral.assigned_department_id == cardiology.pk
    assert ReferralEvent.objects.filter(referral=referral, action="forward").get().reason == (
        "Murmur: cardiology first."
    )
    # The old department's consultant no longer sees it.
    assert people["consultant"].get(f"/fhir/Task/{task_id}").status_code == 404


def test_forward_needs_a_reason_and_a_healthcare_service(world: World, people: dict[str, Any]):
    task_id = str(task_of(submit(world))["id"])
    before = _snapshot(task_id)
    cardiology = world.network.cardiology

    no_reason = update_task(
        people["consultant"],
        task_id,
        lambda t: t.update(owner={"reference": f"HealthcareService/{cardiology.pk}"}),
    )
    to_organization = update_task(
        people["consultant"],
        task_id,
        lambda t: t.update(
            owner={"reference": f"Organization/{world.network.lao.pk}"},
            statusReason={"text": "Elsewhere."},
        ),
    )
    by_requester = update_task(
        people["referrer"],
        task_id,
        lambda t: t.update(
            owner={"reference": f"HealthcareService/{cardiology.pk}"},
            statusReason={"text": "Rather cardiology."},
        ),
    )

    assert (no_reason.status_code, outcome_issue(no_reason)["expression"]) == (
        422,
        ["Task.statusReason"],
    )
    assert (to_organization.status_code, outcome_issue(to_organization)["expression"]) == (
        422,
        ["Task.owner"],
    )
    assert by_requester.status_code == 403
    assert _snapshot(task_id) == before


def test_status_driven_actions_still_work_with_a_consistent_business_status(world: World):
    task_id = str(task_of(submit(world))["id"])

    def accept(task: dict[str, Any]) -> None:
        task["status"] = "accepted"
        _state(S.ACCEPTED)(task)

    response = update_task(world.r5, task_id, accept, FHIR_R5)

    assert response.status_code == 200, response.content
    assert Referral.objects.get(filler_id=task_id).state == S.ACCEPTED


def test_a_put_of_the_task_as_it_is_answers_the_current_version(world: World) -> None:
    """A client retrying an update that went through (If-Match: *), or saving what it
    read, got 422 "nothing to do" where a PATCH that changes nothing answers 200."""
    task_id = advised(world)
    before = _snapshot(task_id)
    version = read_task(world.r4, task_id)["meta"]["versionId"]

    for if_match in (None, "*"):
        AuditEntry.objects.all().delete()
        again = update_task(world.r4, task_id, lambda t: None, if_match=if_match)
        # Recorded as what it was: the Task read back (with read_task's own read), no update.
        assert list(AuditEntry.objects.values_list("action", flat=True)) == ["read", "read"]
        assert again.status_code == 200, again.content
        assert again.json()["meta"]["versionId"] == version
        assert again["ETag"] == f'W/"{version}"'
    stale = update_task(world.r4, task_id, lambda t: None, if_match='W/"1"')
    assert stale.status_code == 412
    assert _snapshot(task_id) == before
