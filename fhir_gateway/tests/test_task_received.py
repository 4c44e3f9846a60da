"""Task.status ``received``: the owner's system acknowledges a referral (the ``acknowledge``
action); searches tell ``requested`` and ``received`` apart; a reassignment starts over."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fhir_gateway import referral_mapping as m
from fhir_gateway.models import OutboxMessage
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5
from fhir_gateway.tests.referral_world import World, body, read_task, submit, task_of, update_task
from referrals.models import Referral, ReferralEvent

pytestmark = pytest.mark.django_db


def _received(task: dict[str, Any]) -> None:
    task["status"] = "received"


def _snapshot(task_id: str) -> tuple[str, int, Any, int]:
    referral = Referral.objects.get(filler_id=task_id)
    events = ReferralEvent.objects.filter(referral=referral).count()
    return referral.state, referral.version, referral.acknowledged_at, events


def test_the_owners_system_acknowledges_a_referral(world: World) -> None:
    task_id = str(task_of(submit(world))["id"])
    assert read_task(world.r5, task_id, FHIR_R5)["status"] == "requested"
    outbox = OutboxMessage.objects.count()
    response = update_task(world.r5, task_id, _received, FHIR_R5)
    assert response.status_code == 200, response.content
    task = body(response)
    assert (task["status"], m.business_state(task)) == ("received", "submitted")
    referral = Referral.objects.get(filler_id=task_id)
    assert referral.state == "submitted" and referral.acknowledged_at is not None
    event = ReferralEvent.objects.filter(referral=referral).order_by("-seq").first()
    assert event is not None and event.action == "acknowledge"
    assert event.actor == world.consultant
    # The requester's system hears of it (the new Task version goes out).
    assert OutboxMessage.objects.count() > outbox
    assert read_task(world.r4, task_id)["status"] == "received"


def test_acknowledging_twice_or_from_the_wrong_side_or_state_changes_nothing(
    world: World,
) -> None:
    task_id = str(task_of(submit(world))["id"])
    before = _snapshot(task_id)
    by_requester = update_task(world.r4, task_id, _received)
    assert by_requester.status_code == 403, by_requester.content
    assert _snapshot(task_id) == before
    assert update_task(world.r5, task_id, _received, FHIR_R5).status_code == 200
    once = _snapshot(task_id)
    # The same again is the Task as it is now: its current version, nothing more.
    again = update_task(world.r5, task_id, _received, FHIR_R5)
    assert again.status_code == 200, again.content
    assert _snapshot(task_id) == once
    accepted = update_task(world.r5, task_id, lambda t: t.update(status="accepted"), FHIR_R5)
    assert accepted.status_code == 200, accepted.content
    after_accept = _snapshot(task_id)
    assert after_accept[1] == once[1] + 1
    late = update_task(world.r5, task_id, _received, FHIR_R5)
    assert late.status_code == 409, late.content  # an accepted referral is past that
    assert _snapshot(task_id) == after_accept


def test_search_tells_requested_and_received_apart(world: World) -> None:
    first = str(task_of(submit(world, "SR-1"))["id"])
    second = str(task_of(submit(world, "SR-2"))["id"])
    third = str(task_of(submit(world, "SR-3"))["id"])
    assert update_task(world.r5, first, _received, FHIR_R5).status_code == 200
    assert (
        update_task(world.r5, third, lambda t: t.update(status="accepted"), FHIR_R5).status_code
        == 200
    )
    owner = world.network.pediatrics.pk

    def ids(query: str) -> list[str]:
        found = body(world.r5.get(f"/fhir/Task?owner={owner}&{query}&_sort=_id", Accept=FHIR_R5))
        return [e["resource"]["id"] for e in found.get("entry", [])]

    assert ids("status=received") == [first]
    assert ids("status=requested") == [second]
    assert ids("status=requested,received") == sorted([first, second])
    assert ids("status=received,accepted") == sorted([first, third])
    assert ids("status=requested,accepted") == sorted([second, third])
    assert ids("status=requested&status=received") == []  # repeated parameters AND
    assert ids("business-status=submitted") == sorted([first, second])  # the state's


def test_a_forward_makes_a_received_task_requested_for_the_new_department(
    world: World,
) -> None:
    task_id = str(task_of(submit(world))["id"])
    assert update_task(world.r5, task_id, _received, FHIR_R5).status_code == 200
    cardiology = world.network.cardiology

    def forward(task: dict[str, Any]) -> None:
        task["owner"] = {"reference": f"HealthcareService/{cardiology.pk}"}
        task["status"] = "requested"
        task["statusReason"] = {"concept": {"text": "Murmur: cardiology first."}}

    response = update_task(world.r5, task_id, forward, FHIR_R5)
    assert response.status_code == 200, response.content
    assert json.loads(response.content)["status"] == "requested"
    assert Referral.objects.get(filler_id=task_id).acknowledged_at is None
    assert read_task(world.r4, task_id, FHIR_R4)["status"] == "requested"


def test_the_documented_worklist_and_patch_guard_keep_an_acknowledged_referral(
    world: World,
) -> None:
    """Found by a review: the docs polled status=requested and guarded accepts on it; an
    acknowledged referral, still awaiting an answer, fell out of both. docs/fhir.md now
    shows status=requested,received and a guard on businessStatus."""
    task_id = str(task_of(submit(world))["id"])
    assert update_task(world.r5, task_id, _received, FHIR_R5).status_code == 200
    owner = f"HealthcareService/{world.network.pediatrics.pk}"
    found = body(
        world.r5.get(f"/fhir/Task?owner={owner}&status=requested,received", Accept=FHIR_R5)
    )
    assert [e["resource"]["id"] for e in found["entry"]] == [task_id]
    patch = [
        {"op": "test", "path": "/businessStatus/coding/0/code", "value": "submitted"},
        {"op": "replace", "path": "/status", "value": "accepted"},
    ]
    response = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
    assert response.status_code == 200, response.content
    assert body(response)["status"] == "accepted"
    again = world.r5.patch(f"/fhir/Task/{task_id}", patch, Accept=FHIR_R5)
    assert again.status_code == 422  # the guard: no longer submitted


def test_a_retry_of_an_acknowledge_that_went_through_answers_the_current_version(
    world: World,
) -> None:
    """The very body sent again (its answer lost; If-Match: *): it carries the Task as
    it was read, so its lastModified (and narrative) are the earlier version's. It was
    422 "already received", though it asks for nothing the Task is not."""
    task_id = str(task_of(submit(world))["id"])
    task = read_task(world.r5, task_id, FHIR_R5)
    _received(task)

    def put() -> Any:
        return world.r5.put(
            f"/fhir/Task/{task_id}",
            task,
            content_type=FHIR_R5,
            Accept=FHIR_R5,
            **{"If-Match": "*"},
        )

    first = put()
    assert first.status_code == 200, first.content
    once = _snapshot(task_id)
    again = put()
    assert again.status_code == 200, again.content
    assert body(again)["meta"]["versionId"] == body(first)["meta"]["versionId"]
    assert _snapshot(task_id) == once
