"""Simulated lifecycles replay to their final state through the transition table, on both
paths (real services and bulk rows), deterministically, with the intended mix."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from django.utils import timezone

from referrals import routing, simulation
from referrals.load import department_load_matches
from referrals.models import CloseOut, DepartmentDayLoad, Referral, ReferralEvent
from referrals.tests.conftest import World
from referrals.workflow import INITIAL_STATE, TRANSITIONS_BY_ACTION


@pytest.fixture(autouse=True)
def _fresh_routing() -> None:
    routing.routing_cache_clear()


def assert_events_replay(referrals: Any) -> None:
    for referral in referrals:
        events = list(ReferralEvent.objects.filter(referral=referral).order_by("seq"))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert referral.version == len(events)
        state: str = INITIAL_STATE
        at = None
        for event in events:
            transition = TRANSITIONS_BY_ACTION[event.action]
            assert event.from_state == state, (referral.pk, event.action)
            assert state in transition.sources
            assert event.to_state == transition.target_from(state)
            assert at is None or event.at >= at  # time runs forward
            state, at = event.to_state, event.at
        assert state == referral.state
        assert at is None or at <= timezone.now()


def test_service_path_lifecycles_replay(world: World) -> None:
    tally = simulation.simulate_with_services(count=40, seed=3, days=20)
    assert sum(tally.values()) == 40
    assert "diverged" not in tally
    referrals = Referral.objects.filter(placer_system=simulation.PLACER_SYSTEM)
    assert referrals.count() == 40
    assert_events_replay(Referral.objects.all())
    # Routing's load counters, kept by the transitions, equal a fresh count.
    assert department_load_matches()


def test_bulk_path_lifecycles_replay_and_are_deterministic(world: World) -> None:
    now = timezone.now()
    written = simulation.simulate_bulk(count=300, seed=7, days=60, batch=120, now=now)
    assert written >= 300
    referrals = list(Referral.objects.all())
    assert len(referrals) == written
    assert_events_replay(referrals)
    # close-outs match the close_local events
    assert CloseOut.objects.count() == ReferralEvent.objects.filter(action="close_local").count()
    # The bulk path bypasses the services; it derives the load counters at the end.
    assert DepartmentDayLoad.objects.exists()
    assert department_load_matches()

    def fingerprint() -> list[tuple[str, ...]]:
        return [
            tuple(e.action for e in events)
            for batch in simulation.iter_bulk_batches(count=50, seed=11, days=30, batch=50, now=now)
            for events in [batch[1]]
        ]

    assert fingerprint() == fingerprint()


def test_the_mix(world: World) -> None:
    now = timezone.now()
    finals: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    avoided = 0
    total = 0
    for referrals, events, close_outs in simulation.iter_bulk_batches(
        count=3000, seed=5, days=365, batch=1000, now=now
    ):
        total += sum(1 for r in referrals if r.parent_referral_id is None)
        finals.update(r.state for r in referrals if r.parent_referral_id is None)
        actions.update(e.action for e in events)
        avoided += sum(1 for c in close_outs if c.outcome == "avoided")
    # about half of all consults avoid a face-to-face referral
    assert 0.40 <= avoided / total <= 0.60
    assert finals["closed_local"] > total * 0.6
    assert finals["completed"] > 0 and finals["cancelled"] > 0 and finals["expired"] > 0
    for action in ("decline", "reroute", "escalation_notify", "forward", "counter_refer"):
        assert actions[action] > 0, action
