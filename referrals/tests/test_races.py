"""Two actors on one referral at once, on PostgreSQL: the requester and the department,
the department and the deadline job, crossing forwards. Each pair is released together
by a barrier, each on its own connection; whatever the order the database picks, one
story is told: the event log numbered 1..version, one Task version per event, the load
counters equal to a count, and the loser refused with nothing changed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from core.errors import ApplicationError, Conflict, NotFound
from fhir_gateway.models import FhirResource
from referrals import escalation, routing, services
from referrals.load import department_load_matches
from referrals.models import Message, Referral, ReferralState
from referrals.tests.conftest import World

pytestmark = pytest.mark.django_db(transaction=True)


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call on a thread of its own, released at once: what each returned or raised,
    in the order of ``calls``."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            start.wait(10)
            results[index] = calls[index]()
        except Exception as exc:  # noqa: BLE001 (reported in the results, not hung)
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _one_story(referral: Referral) -> Referral:
    """The referral as stored, after checking that its event log, its Task history and the
    load counters tell the same story."""
    referral.refresh_from_db()
    seqs = list(referral.events.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, referral.version + 1))
    tasks = list(
        FhirResource.objects.filter(resource_type="Task", logical_id=referral.filler_id)
        .order_by("version_id")
        .values_list("version_id", flat=True)
    )
    assert tasks == list(range(1, referral.version + 1))
    assert department_load_matches()
    return referral


def _actions(referral: Referral) -> list[str]:
    return list(referral.events.order_by("seq").values_list("action", flat=True))


def test_cancel_and_accept_at_once_one_wins(world: World) -> None:
    referral = world.submit()

    cancel, accept = _together(
        [
            lambda: services.referral_cancel(
                actor=world.referrer, referral_id=referral.pk, reason="improved"
            ),
            lambda: services.referral_accept(actor=world.consultant, referral_id=referral.pk),
        ]
    )

    stored = _one_story(referral)
    assert isinstance(cancel, Referral), cancel  # a case may be cancelled before or after
    assert stored.state == ReferralState.CANCELLED
    if isinstance(accept, Referral):  # accepted first
        assert _actions(stored) == ["submit", "accept", "cancel"]
    else:  # cancelled first: the accept found it cancelled and changed nothing
        assert isinstance(accept, Conflict), accept
        assert accept.extra == {"state": "cancelled", "version": 2}
        assert _actions(stored) == ["submit", "cancel"]


def test_forward_and_accept_at_once_leave_one_assignment(world: World) -> None:
    referral = world.submit()

    forward, accept = _together(
        [
            lambda: services.referral_forward(
                actor=world.consultant,
                referral_id=referral.pk,
                department=world.hub2_paeds.pk,
                reason="closer",
            ),
            lambda: services.referral_accept(actor=world.consultant, referral_id=referral.pk),
        ]
    )

    stored = _one_story(referral)
    assert isinstance(forward, Referral), forward
    assert (stored.state, stored.assigned_department_id) == ("submitted", world.hub2_paeds.pk)
    if isinstance(accept, Referral):  # accepted, then forwarded from accepted
        assert _actions(stored) == ["submit", "accept", "forward"]
    else:  # forwarded first: no longer the consultant's to accept
        assert isinstance(accept, NotFound), accept
        assert _actions(stored) == ["submit", "forward"]


def test_the_deadline_job_and_an_accept_at_once_one_acts(world: World, settings: Any) -> None:
    """Past the deadline and the grace after the notice, the job re-routes while the
    department accepts: either the job skips the row the accept holds (or finds it
    accepted), or the accept meets a case that left the department."""
    settings.REFERRAL_ESCALATION_GRACE_MINUTES = 60
    settings.REFERRAL_ESCALATION_AUTO_FORWARD = True
    routing.routing_cache_clear()
    t0 = timezone.now() - timedelta(days=3)
    referral = world.submit(now=t0)
    late = t0 + timedelta(hours=48, minutes=1)
    assert escalation.referral_escalate_overdue(now=late).notified == [referral.pk]

    job, accept = _together(
        [
            lambda: escalation.referral_escalate_overdue(now=late + timedelta(minutes=61)),
            lambda: services.referral_accept(actor=world.consultant, referral_id=referral.pk),
        ]
    )

    stored = _one_story(referral)
    assert isinstance(job, escalation.EscalationResult), job
    if isinstance(accept, Referral):
        assert job.rerouted == []
        assert _actions(stored) == ["submit", "escalation_notify", "accept"]
    else:
        assert isinstance(accept, NotFound), accept
        assert job.rerouted == [referral.pk]
        assert _actions(stored) == ["submit", "escalation_notify", "reroute"]
        assert stored.assigned_department_id == world.hub2_paeds.pk


def test_the_deadline_jobs_expiry_and_an_accept_at_once_one_acts(
    world: World, settings: Any
) -> None:
    """Past the deadline and the grace after the notice, without re-routing, the job
    expires the case while the department accepts it: one of the two acts."""
    settings.REFERRAL_ESCALATION_GRACE_MINUTES = 60
    settings.REFERRAL_ESCALATION_AUTO_FORWARD = False
    t0 = timezone.now() - timedelta(days=3)
    referral = world.submit(now=t0)
    late = t0 + timedelta(hours=48, minutes=1)
    assert escalation.referral_escalate_overdue(now=late).notified == [referral.pk]

    job, accept = _together(
        [
            lambda: escalation.referral_escalate_overdue(now=late + timedelta(minutes=61)),
            lambda: services.referral_accept(actor=world.consultant, referral_id=referral.pk),
        ]
    )

    stored = _one_story(referral)
    assert isinstance(job, escalation.EscalationResult), job
    if isinstance(accept, Referral):
        assert job.expired == []
        assert _actions(stored) == ["submit", "escalation_notify", "accept"]
    else:
        assert isinstance(accept, Conflict), accept
        assert job.expired == [referral.pk]
        assert _actions(stored) == ["submit", "escalation_notify", "expire"]


def test_crossing_forwards_neither_deadlock_nor_miscount(world: World) -> None:
    """Cases forwarded from hub to hub2 and from hub2 to hub at the same moment: each
    moves its unit of load between the same two departments' counter rows, in opposite
    directions (``referrals.load``: written in one order, so no deadlock)."""
    world.consultant2.departments.add(world.hub2_paeds)
    down = [world.submit() for _ in range(6)]
    up = [world.submit(department=world.hub2_paeds) for _ in range(6)]

    def forward(actor: Any, referral: Referral, department: int) -> Callable[[], Any]:
        return lambda: services.referral_forward(
            actor=actor, referral_id=referral.pk, department=department, reason="r"
        )

    results = _together(
        [forward(world.consultant, r, world.hub2_paeds.pk) for r in down]
        + [forward(world.consultant2, r, world.hub_paeds.pk) for r in up]
    )

    assert all(isinstance(r, Referral) for r in results), results
    for referral in down + up:
        _one_story(referral)
    assert {r.assigned_department_id for r in results[:6]} == {world.hub2_paeds.pk}
    assert {r.assigned_department_id for r in results[6:]} == {world.hub_paeds.pk}


def test_a_question_and_messages_at_once_get_distinct_numbers(world: World) -> None:
    """The department's question (a transition that writes a message) and plain messages
    of both sides, all at once: numbers 1..n, the question's event naming its own."""
    referral = world.referral_in(ReferralState.ACCEPTED)
    texts = iter(range(10))

    def post(actor: Any) -> Callable[[], Any]:
        return lambda: services.referral_message_post(
            actor=actor, referral_id=referral.pk, text=f"note {next(texts)}"
        )

    results = _together(
        [
            lambda: services.referral_request_info(
                actor=world.consultant, referral_id=referral.pk, question="Weight?"
            ),
            *(post(world.referrer) for _ in range(3)),
            *(post(world.consultant) for _ in range(3)),
        ]
    )

    assert not [r for r in results if isinstance(r, ApplicationError | Exception)], results
    stored = _one_story(referral)
    numbers = sorted(Message.objects.filter(referral=referral).values_list("number", flat=True))
    assert numbers == list(range(1, 8))
    event = stored.events.get(action="request_info")
    question = Message.objects.get(pk=event.payload["message_id"])
    assert question.text == "Weight?"
    assert stored.state == ReferralState.INFO_REQUESTED
