"""Every (state, action) pair of the table: allowed ones move to the target and append
exactly one event; forbidden ones raise and change nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from core.errors import ApplicationError, Conflict, NotFound, PermissionDenied
from referrals import services
from referrals.models import ActorSide, Priority, Referral, ReferralEvent, ReferralState
from referrals.tests.conftest import ALL_STATES, World, shortest_paths
from referrals.workflow import ACTIONS, TRANSITIONS, TRANSITIONS_BY_ACTION, check_table

PAIRS = [(state, action) for state in ALL_STATES for action in ACTIONS]


def test_table_is_consistent() -> None:
    assert check_table() == []


def test_every_state_is_reachable_from_draft() -> None:
    assert set(shortest_paths()) == set(ALL_STATES)


def test_every_action_with_inputs_has_an_effect_or_reason() -> None:
    # An input nobody stores would be silently dropped.
    for t in TRANSITIONS:
        stored = t.action in services.EFFECTS or all(
            f.name in services.REASON_INPUTS for f in t.inputs
        )
        assert stored, t.action


def _snapshot(referral_id: int) -> tuple[str, int, int]:
    referral = Referral.objects.get(pk=referral_id)
    return referral.state, referral.version, ReferralEvent.objects.filter(referral=referral).count()


@pytest.mark.parametrize(("state", "action"), PAIRS)
def test_state_action_pair(world: World, state: str, action: str) -> None:
    # given a referral in `state` and the right actor for `action`
    referral = world.referral_in(state)
    before = _snapshot(referral.pk)
    transition = TRANSITIONS_BY_ACTION[action]

    if state in transition.sources:
        # when it is allowed: it moves to the target with one new event
        result = world.act(referral, action)
        expected = transition.target_from(state)
        assert result.state == expected
        assert result.version == before[1] + 1
        event = ReferralEvent.objects.get(referral=referral, seq=result.version)
        assert (event.action, event.from_state, event.to_state) == (action, state, expected)
        assert ReferralEvent.objects.filter(referral=referral).count() == before[2] + 1
    elif state == ReferralState.DRAFT and transition.side == ActorSide.ASSIGNEE:
        # a draft is not its department's until it is sent: not found, nothing changed
        with pytest.raises(NotFound):
            world.act(referral, action)
        assert _snapshot(referral.pk) == before
    else:
        # when it is forbidden: 409 with the current state, nothing changed
        with pytest.raises(Conflict) as caught:
            world.act(referral, action)
        assert caught.value.code == "transition_not_allowed"
        assert caught.value.extra == {"state": state, "version": before[1]}
        assert _snapshot(referral.pk) == before


@pytest.mark.parametrize("action", [t.action for t in TRANSITIONS if t.side != "system"])
def test_wrong_side_is_refused(world: World, action: str) -> None:
    transition = TRANSITIONS_BY_ACTION[action]
    referral = world.referral_in(sorted(transition.sources)[0])
    before = _snapshot(referral.pk)
    wrong = world.consultant if transition.side == "requester" else world.referrer
    # The department does not see a draft at all (not found rather than forbidden).
    refusal = NotFound if referral.state == ReferralState.DRAFT else PermissionDenied
    with pytest.raises(refusal):
        services.referral_transition(
            actor=wrong, referral_id=referral.pk, action=action, **world.inputs_for(action)
        )
    assert _snapshot(referral.pk) == before


def test_a_user_cannot_run_the_system_action(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    with pytest.raises(PermissionDenied):
        services.referral_transition(
            actor=world.consultant, referral_id=referral.pk, action="expire"
        )


def test_role_without_the_right_is_refused(world: World) -> None:
    # given a referrer who is (also) staff of the assigned department, but not a consultant
    world.referrer.departments.add(world.hub_paeds)
    referral = world.referral_in(ReferralState.SUBMITTED)
    with pytest.raises(PermissionDenied):
        services.referral_transition(actor=world.referrer, referral_id=referral.pk, action="accept")


def test_missing_required_input_is_400_and_changes_nothing(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    before = _snapshot(referral.pk)
    with pytest.raises(ApplicationError) as caught:
        services.referral_transition(
            actor=world.consultant, referral_id=referral.pk, action="decline", reason_code="bogus"
        )
    assert caught.value.status_code == 400
    assert caught.value.extra == {
        "errors": {"reason_code": caught.value.extra["errors"]["reason_code"]}
    }
    assert _snapshot(referral.pk) == before


def test_expected_version_mismatch_is_a_conflict(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    with pytest.raises(Conflict) as caught:
        services.referral_transition(
            actor=world.consultant, referral_id=referral.pk, action="accept", expected_version=0
        )
    assert caught.value.code == "version_mismatch"
    assert caught.value.extra == {"state": "submitted", "version": 1}
    services.referral_transition(
        actor=world.consultant, referral_id=referral.pk, action="accept", expected_version=1
    )


def test_expire_guard_needs_a_passed_deadline(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    with pytest.raises(Conflict) as caught:
        services.referral_transition(actor=None, referral_id=referral.pk, action="expire")
    assert caught.value.code == "guard_failed"
    assert _snapshot(referral.pk) == ("submitted", 1, 1)


def test_forward_moves_the_referral_and_its_access(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    world.act(referral, "acknowledge")
    world.act(referral, "forward")
    referral.refresh_from_db()
    assert referral.assigned_department == world.hub2_paeds
    assert referral.state == "submitted"
    assert referral.acknowledged_at is None  # the new department has not acknowledged it
    assert services.referral_available_actions(world.consultant2, referral) == [
        "acknowledge",
        "accept",
        "decline",
        "forward",
    ]
    # the first department no longer sees it
    with pytest.raises(ApplicationError) as caught:
        world.act(referral, "accept")
    assert caught.value.status_code == 404


def test_acknowledge_once_per_assignment_and_the_state_stays(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    assert referral.acknowledged_at is None
    world.act(referral, "acknowledge")
    referral.refresh_from_db()
    assert (referral.state, referral.acknowledged_at is not None) == ("submitted", True)
    event = referral.events.order_by("-seq").first()
    assert event is not None
    assert (event.action, event.from_state, event.to_state) == (
        "acknowledge",
        "submitted",
        "submitted",
    )
    assert "acknowledge" not in services.referral_available_actions(world.consultant, referral)
    before = (referral.version, referral.acknowledged_at, referral.events.count())
    with pytest.raises(ApplicationError) as caught:  # twice: the guard says no, nothing moves
        world.act(referral, "acknowledge")
    assert (caught.value.status_code, caught.value.code) == (409, "guard_failed")
    referral.refresh_from_db()
    assert (referral.version, referral.acknowledged_at, referral.events.count()) == before
    with pytest.raises(ApplicationError) as caught:  # the requester side may not
        services.referral_transition(
            actor=world.referrer, referral_id=referral.pk, action="acknowledge"
        )
    assert caught.value.status_code == 403


def test_forward_to_the_same_department_is_refused(world: World) -> None:
    referral = world.referral_in(ReferralState.SUBMITTED)
    with pytest.raises(Conflict) as caught:
        world.act(referral, "forward", department=world.hub_paeds.pk)
    assert caught.value.code == "guard_failed"


def test_counter_referral_links_a_new_referral_back_down(world: World) -> None:
    original = world.referral_in(ReferralState.CLOSED_LOCAL)
    world.act(original, "counter_refer")
    child = Referral.objects.get(parent_referral=original)
    assert (child.state, child.requester_facility, child.assigned_department) == (
        "submitted",
        world.hub,
        world.district_paeds,
    )
    assert Referral.objects.get(pk=original.pk).state == "closed_local"
    # the district department can accept it
    services.referral_transition(
        actor=world.district_consultant, referral_id=child.pk, action="accept"
    )


def test_a_counter_referral_may_carry_its_own_priority_and_mode(world: World) -> None:
    world.district_paeds.offers_live = True
    world.district_paeds.save()
    original = world.referral_in(ReferralState.ADVISED)
    world.act(original, "counter_refer", priority="urgent", mode="live")
    child = Referral.objects.get(parent_referral=original)
    assert (child.priority, child.mode) == (Priority.URGENT, "live")
    # Without them: routine and asynchronous, as before.
    world.act(original, "counter_refer")
    second = Referral.objects.filter(parent_referral=original).latest("pk")
    assert (second.priority, second.mode) == (Priority.ROUTINE, "async")


def test_a_counter_referral_in_a_mode_the_department_does_not_offer_is_refused(
    world: World,
) -> None:
    original = world.referral_in(ReferralState.ADVISED)
    before = (original.version, original.events.count(), Referral.objects.count())
    with pytest.raises(Conflict) as caught:
        world.act(original, "counter_refer", mode="live")
    assert caught.value.code == "guard_failed"
    assert "does not offer live" in caught.value.message
    original.refresh_from_db()
    assert (original.version, original.events.count(), Referral.objects.count()) == before
    with pytest.raises(ApplicationError) as bad:
        world.act(original, "counter_refer", priority="whenever")
    assert "priority" in str(bad.value.extra)
    # Without a mode the counter-referral is asynchronous: a department offering only live
    # consults is refused, as a submission to it would be.
    world.district_paeds.offers_async, world.district_paeds.offers_live = False, True
    world.district_paeds.save()
    with pytest.raises(Conflict) as no_async:
        world.act(original, "counter_refer")
    assert "does not offer async" in no_async.value.message
    original.refresh_from_db()
    assert (original.version, original.events.count(), Referral.objects.count()) == before


def test_available_actions(world: World) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    assert services.referral_available_actions(world.consultant, referral) == [
        "forward",
        "request_info",
        "schedule",
        "advise",
    ]
    assert services.referral_available_actions(world.referrer, referral) == ["cancel"]
    assert services.referral_available_actions(world.foreign_referrer, referral) == []
    assert services.referral_available_actions(world.ministry_at_hub, referral) == []


def test_the_old_expire_job_escalates_like_the_deadline_job(world: World) -> None:
    """``referrals_expire_overdue`` (a name a queued message may still carry) used to expire
    an overdue referral at once: no notice to the department, no re-routing."""
    from referrals.tasks import referrals_expire_overdue

    late = world.referral_in(ReferralState.SUBMITTED)
    on_time = world.referral_in(ReferralState.SUBMITTED)
    Referral.objects.filter(pk=late.pk).update(deadline=timezone.now() - timedelta(minutes=1))
    Referral.objects.filter(pk=on_time.pk).update(deadline=timezone.now() + timedelta(hours=1))

    assert referrals_expire_overdue.apply().get() == 0

    late.refresh_from_db()
    assert late.state == ReferralState.SUBMITTED  # noticed first, not expired
    assert (
        list(late.events.order_by("seq").values_list("action", flat=True))[-1]
        == "escalation_notify"
    )
    assert not on_time.events.filter(action="escalation_notify").exists()


def test_a_conference_time_must_be_representable_in_utc(world: World) -> None:
    """Found by a fuzz hunt: 9999-12-31T23:59:59-14:00 is past year 9999 in UTC."""
    referral = world.referral_in(ReferralState.ACCEPTED)
    before = (referral.version, referral.events.count())
    for when in ("9999-12-31T23:59:59-14:00", "3000-01-01T00:00:00Z", "1899-12-31T23:00:00Z"):
        with pytest.raises(ApplicationError) as caught:
            world.act(referral, "schedule", scheduled_at=when)
        assert "1900 and 2999" in str(caught.value.extra), when
    referral.refresh_from_db()
    assert (referral.version, referral.events.count()) == before
