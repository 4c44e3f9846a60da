"""Random action sequences by random actors: whatever happens, the event log replays to
the current state, every event is an edge of the table, and version == number of events."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from accounts.models import User
from core.errors import ApplicationError
from referrals import services
from referrals.load import department_load_matches
from referrals.models import Referral, ReferralEvent
from referrals.tests.conftest import World
from referrals.workflow import ACTIONS, INITIAL_STATE, TRANSITIONS_BY_ACTION

ACTORS = (
    "right",
    "referrer",
    "consultant",
    "consultant2",
    "foreign_referrer",
    "ministry",
    "system",
)


class ReferralLifecycle(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.referral = self.world.submit(draft=True)

    def _actor(self, who: str, action: str) -> User | None:
        if who == "right":
            return self.world.actor_for(action)
        if who == "system":
            return None
        user: User = getattr(self.world, who)
        return user

    def _snapshot(self) -> tuple[str, int, int]:
        referral = Referral.objects.get(pk=self.referral.pk)
        return referral.state, referral.version, referral.events.count()

    @rule(action=st.sampled_from(ACTIONS), who=st.sampled_from(ACTORS))
    def act(self, action: str, who: str) -> None:
        before = self._snapshot()
        try:
            services.referral_transition(
                actor=self._actor(who, action),
                referral_id=self.referral.pk,
                action=action,
                **self.world.inputs_for(action),
            )
        except ApplicationError:
            assert self._snapshot() == before
        else:
            state, version, events = self._snapshot()
            assert (version, events) == (before[1] + 1, before[2] + 1)
            assert state == TRANSITIONS_BY_ACTION[action].target_from(before[0])

    @rule(pick=st.integers(min_value=0, max_value=1000))
    def take_an_offered_action(self, pick: int) -> None:
        # Mostly-random actions rarely get far; this one walks the offered paths deep.
        referral = Referral.objects.get(pk=self.referral.pk)
        offered = [
            (action, actor)
            for actor in (self.world.referrer, self.world.consultant, None)
            for action in services.referral_available_actions(actor, referral)
        ]
        if not offered:
            return
        action, actor = offered[pick % len(offered)]
        before = self._snapshot()
        try:
            services.referral_transition(
                actor=actor,
                referral_id=referral.pk,
                action=action,
                **self.world.inputs_for(action),
            )
        except ApplicationError:
            # Only an input-dependent guard may still refuse an offered action.
            assert action in {"forward", "reroute", "counter_refer"}
            assert self._snapshot() == before

    @rule()
    def deadline_passes(self) -> None:
        Referral.objects.filter(pk=self.referral.pk, deadline__isnull=False).update(
            deadline=timezone.now() - timedelta(minutes=1)
        )

    @invariant()
    def event_log_replays_to_the_state(self) -> None:
        referral = Referral.objects.get(pk=self.referral.pk)
        events = list(ReferralEvent.objects.filter(referral=referral).order_by("seq"))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert referral.version == len(events)
        state: str = INITIAL_STATE
        for event in events:
            transition = TRANSITIONS_BY_ACTION[event.action]
            assert event.from_state == state
            assert event.from_state in transition.sources
            assert event.to_state == transition.target_from(event.from_state)
            state = event.to_state
        assert state == referral.state

    @invariant()
    def deadline_follows_the_last_assignment(self) -> None:
        # The deadline is set by the last submit/forward/reroute: its time + the (capped) SLA.
        referral = Referral.objects.select_related("assigned_department").get(pk=self.referral.pk)
        assigned = (
            ReferralEvent.objects.filter(
                referral=referral, action__in=["submit", "forward", "reroute"]
            )
            .order_by("-seq")
            .first()
        )
        if assigned is None or referral.assigned_department is None:
            assert referral.deadline is None
            return
        expected = services.referral_deadline(
            department=referral.assigned_department, priority=referral.priority, start=assigned.at
        )
        moved_by_test = referral.deadline is not None and referral.deadline < timezone.now()
        assert referral.deadline == expected or moved_by_test

    @invariant()
    def load_counters_equal_a_count(self) -> None:
        # Routing's per-day load counters (referrals/load.py) follow every (re)assignment.
        assert department_load_matches()


def test_random_lifecycles_keep_the_invariants(world: World) -> None:
    ReferralLifecycle.world = world
    run_state_machine_as_test(
        ReferralLifecycle,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
