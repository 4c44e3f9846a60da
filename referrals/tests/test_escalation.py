"""Deadlines with controlled time: notice, then re-route to the next candidate (or expire),
declines re-routed, idempotent and safe to run concurrently; access moves with the case."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from referrals import escalation, routing, services
from referrals.models import Notification, Priority, Referral
from referrals.tests.conftest import World

GRACE = timedelta(minutes=60)


@pytest.fixture(autouse=True)
def _clear_routing_cache(settings: Any) -> None:
    settings.REFERRAL_ESCALATION_GRACE_MINUTES = 60
    settings.REFERRAL_ESCALATION_AUTO_FORWARD = True
    settings.REFERRAL_DECLINE_AUTO_REROUTE = True
    routing.routing_cache_clear()


def actions(referral: Referral) -> list[str]:
    return list(referral.events.order_by("seq").values_list("action", flat=True))


def submitted(world: World, t0: datetime) -> Referral:
    return world.submit(department=world.hub_paeds, now=t0)


def test_nothing_happens_before_the_deadline(world: World) -> None:
    t0 = timezone.now() - timedelta(days=3)
    referral = submitted(world, t0)
    assert referral.deadline == t0 + timedelta(hours=48)
    result = escalation.referral_escalate_overdue(now=t0 + timedelta(hours=47, minutes=59))
    assert (result.notified, result.rerouted, result.expired) == ([], [], [])
    assert actions(referral) == ["submit"]


def test_notify_then_forward_to_the_next_candidate(world: World) -> None:
    t0 = timezone.now() - timedelta(days=3)
    referral = submitted(world, t0)
    deadline = t0 + timedelta(hours=48)

    # at the deadline: a notice, the state stays
    late = deadline + timedelta(minutes=1)
    assert escalation.referral_escalate_overdue(now=late).notified == [referral.pk]
    referral.refresh_from_db()
    assert (referral.state, referral.assigned_department_id) == ("submitted", world.hub_paeds.pk)
    assert actions(referral) == ["submit", "escalation_notify"]
    # again within the grace: nothing more
    assert escalation.referral_escalate_overdue(now=late) == escalation.EscalationResult()
    within = late + GRACE - timedelta(minutes=1)
    assert escalation.referral_escalate_overdue(now=within) == escalation.EscalationResult()

    # after the grace: the system re-routes to the next candidate with a new deadline
    after = late + GRACE
    assert escalation.referral_escalate_overdue(now=after).rerouted == [referral.pk]
    referral.refresh_from_db()
    assert referral.state == "submitted"
    assert referral.assigned_department_id == world.hub2_paeds.pk
    assert referral.deadline == after + timedelta(hours=24)
    assert referral.assigned_at == after
    event = referral.events.get(seq=3)
    assert (event.action, event.actor_side, event.actor_id) == ("reroute", "system", None)
    assert event.payload["from_department_id"] == world.hub_paeds.pk
    assert event.payload["routing"]["department_id"] == world.hub2_paeds.pk
    # running twice does not forward twice
    assert escalation.referral_escalate_overdue(now=after) == escalation.EscalationResult()
    assert actions(referral) == ["submit", "escalation_notify", "reroute"]

    # access moved: the old department's consultant gets 404, the new one 200
    old, new = APIClient(), APIClient()
    old.force_authenticate(world.consultant)
    new.force_authenticate(world.consultant2)
    assert old.get(f"/api/v1/referrals/{referral.pk}/").status_code == 404
    assert new.get(f"/api/v1/referrals/{referral.pk}/").status_code == 200

    # late again and nobody is left: notice, then expired
    later = after + timedelta(hours=24, minutes=1)
    assert escalation.referral_escalate_overdue(now=later).notified == [referral.pk]
    assert escalation.referral_escalate_overdue(now=later + GRACE).expired == [referral.pk]
    referral.refresh_from_db()
    assert referral.state == "expired"
    assert actions(referral)[-2:] == ["escalation_notify", "expire"]


def test_auto_forward_off_expires_after_the_grace(world: World, settings: Any) -> None:
    settings.REFERRAL_ESCALATION_AUTO_FORWARD = False
    t0 = timezone.now() - timedelta(days=3)
    referral = submitted(world, t0)
    late = t0 + timedelta(hours=48, minutes=1)
    escalation.referral_escalate_overdue(now=late)
    assert escalation.referral_escalate_overdue(now=late + GRACE).expired == [referral.pk]
    assert actions(referral) == ["submit", "escalation_notify", "expire"]


def test_accepted_in_the_grace_is_left_alone(world: World) -> None:
    t0 = timezone.now() - timedelta(days=3)
    referral = submitted(world, t0)
    late = t0 + timedelta(hours=48, minutes=1)
    escalation.referral_escalate_overdue(now=late)
    services.referral_transition(
        actor=world.consultant, referral_id=referral.pk, action="accept", now=late
    )
    assert escalation.referral_escalate_overdue(now=late + GRACE) == escalation.EscalationResult()
    assert actions(referral) == ["submit", "escalation_notify", "accept"]


def test_decline_is_offered_to_the_next_candidate(world: World) -> None:
    referral = submitted(world, timezone.now())
    world.act(referral, "decline")
    assert escalation.referral_reroute_declined(referral_id=referral.pk) is True
    referral.refresh_from_db()
    assert (referral.state, referral.assigned_department_id) == ("submitted", world.hub2_paeds.pk)
    assert actions(referral) == ["submit", "decline", "reroute"]
    assert escalation.referral_reroute_declined(referral_id=referral.pk) is False  # twice
    # the second department declines too: nobody left, it stays declined
    services.referral_transition(
        actor=world.consultant2, referral_id=referral.pk, action="decline", reason_code="other"
    )
    assert escalation.referral_reroute_declined(referral_id=referral.pk) is False
    referral.refresh_from_db()
    assert referral.state == "declined"
    assert actions(referral) == ["submit", "decline", "reroute", "decline"]


def test_decline_queues_the_reroute_after_commit(
    world: World, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    from referrals import tasks

    monkeypatch.setattr(  # run the task inline instead of through the broker
        tasks.referrals_reroute_declined,
        "delay",
        lambda referral_id: escalation.referral_reroute_declined(referral_id=referral_id),
    )
    referral = submitted(world, timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "decline")
    referral.refresh_from_db()
    assert (referral.state, referral.assigned_department_id) == ("submitted", world.hub2_paeds.pk)


def test_the_job_sweeps_recent_declines_and_unassigned(world: World) -> None:
    referral = submitted(world, timezone.now())
    world.act(referral, "decline")
    assert escalation.referral_escalate_overdue().rerouted == [referral.pk]
    # a referral that found no candidate at intake is routed once one appears
    world.hub_paeds.accepting = False
    world.hub_paeds.save()
    world.hub2_paeds.accepting = False
    world.hub2_paeds.save()
    waiting = world.submit(department=None)
    assert waiting.assigned_department_id is None
    world.hub_paeds.accepting = True
    world.hub_paeds.save()
    assert escalation.referral_escalate_overdue().routed == [waiting.pk]
    waiting.refresh_from_db()
    assert waiting.assigned_department_id == world.hub_paeds.pk


def _no_candidate(world: World) -> None:
    for department in (world.hub_paeds, world.hub2_paeds):
        department.accepting = False
        department.save()
    routing.routing_cache_clear()


@pytest.mark.parametrize(("priority", "hours"), [(Priority.ROUTINE, 72), (Priority.ASAP, 4)])
def test_a_referral_no_department_can_take_expires_at_its_deadline(
    world: World, settings: Any, priority: int, hours: int
) -> None:
    """It had no deadline: routed again every minute for ever, unseen, its requester never
    told (found by a clinician's test)."""
    settings.REFERRAL_UNROUTED_DEADLINE_HOURS = 72
    _no_candidate(world)
    t0 = timezone.now() - timedelta(days=4)
    waiting = world.submit(department=None, priority=priority, now=t0)
    assert (waiting.assigned_department_id, waiting.deadline) == (None, t0 + timedelta(hours=hours))

    before = escalation.referral_escalate_overdue(now=t0 + timedelta(hours=hours, minutes=-1))
    assert before == escalation.EscalationResult()
    result = escalation.referral_escalate_overdue(now=t0 + timedelta(hours=hours, minutes=1))

    assert (result.notified, result.expired) == ([], [waiting.pk])
    waiting.refresh_from_db()
    assert waiting.state == "expired" and actions(waiting) == ["submit", "expire"]
    assert Notification.objects.filter(recipient=world.referrer, referral=waiting).exists()


def test_an_unrouted_referral_still_goes_to_a_department_that_appears_by_its_deadline(
    world: World,
) -> None:
    _no_candidate(world)
    t0 = timezone.now() - timedelta(days=4)
    waiting = world.submit(department=None, now=t0)
    world.hub2_paeds.accepting = True
    world.hub2_paeds.save()
    routing.routing_cache_clear()
    late = t0 + timedelta(hours=72, minutes=1)

    assert escalation.referral_escalate_overdue(now=late).rerouted == [waiting.pk]

    waiting.refresh_from_db()
    assert (waiting.state, waiting.assigned_department_id) == ("submitted", world.hub2_paeds.pk)
    assert waiting.deadline == late + timedelta(hours=world.hub2_paeds.sla_hours)


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_runs_forward_once(world: World) -> None:
    t0 = timezone.now() - timedelta(days=3)
    referrals = [submitted(world, t0) for _ in range(6)]
    late = t0 + timedelta(hours=48, minutes=1)
    escalation.referral_escalate_overdue(now=late)
    barrier = threading.Barrier(2)
    results: list[escalation.EscalationResult] = []

    def run() -> None:
        try:
            barrier.wait()
            results.append(escalation.referral_escalate_overdue(now=late + GRACE))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rerouted = sorted(pk for result in results for pk in result.rerouted)
    assert rerouted == sorted(r.pk for r in referrals)  # each exactly once
    for referral in referrals:
        assert actions(referral) == ["submit", "escalation_notify", "reroute"]


def test_an_acknowledgement_in_the_grace_neither_renotifies_nor_restarts_it(
    world: World,
) -> None:
    """Acknowledging is not accepting: the case still moves on after the grace, and the
    notice is not sent twice (the escalation read the last event only: an acknowledgement
    after the notice made it notify again, and restart the grace)."""
    t0 = timezone.now() - timedelta(days=3)
    referral = submitted(world, t0)
    late = t0 + timedelta(hours=48, minutes=1)
    assert escalation.referral_escalate_overdue(now=late).notified == [referral.pk]
    services.referral_transition(
        actor=world.consultant, referral_id=referral.pk, action="acknowledge", now=late
    )
    assert escalation.referral_escalate_overdue(now=late + timedelta(minutes=5)) == (
        escalation.EscalationResult()
    )
    assert escalation.referral_escalate_overdue(now=late + GRACE).rerouted == [referral.pk]
    assert actions(referral) == ["submit", "escalation_notify", "acknowledge", "reroute"]
    referral.refresh_from_db()
    assert referral.acknowledged_at is None  # the next department has not acknowledged it
