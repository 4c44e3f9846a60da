"""Routing's live load counters (referrals/load.py): kept by the transitions in their
transaction, equal to a fresh count of the referrals at every step, rebuilt and pruned."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.utils import timezone

from referrals import routing, services
from referrals.load import (
    department_load_deferred,
    department_load_matches,
    department_load_prune,
    department_load_rebuild,
    department_load_today,
)
from referrals.models import DepartmentDayLoad, Referral, ReferralState
from referrals.tests.conftest import World


def today(world: World) -> dict[int, int]:
    ids = [world.hub_paeds.pk, world.hub2_paeds.pk, world.district_paeds.pk]
    return {k: v for k, v in department_load_today(ids, timezone.now()).items() if v}


def test_the_counters_follow_submit_forward_and_stay_equal_to_a_count(world: World) -> None:
    first = world.submit()
    assert today(world) == {world.hub_paeds.pk: 1}
    world.submit()
    assert today(world) == {world.hub_paeds.pk: 2}
    world.act(first, "forward")  # hub -> hub2: the unit moves with the case
    assert today(world) == {world.hub_paeds.pk: 1, world.hub2_paeds.pk: 1}
    draft = world.submit(draft=True)  # a draft is nobody's load yet
    assert today(world) == {world.hub_paeds.pk: 1, world.hub2_paeds.pk: 1}
    world.act(draft, "submit")
    assert today(world) == {world.hub_paeds.pk: 2, world.hub2_paeds.pk: 1}
    accepted = world.referral_in(ReferralState.ACCEPTED)  # accept, cancel ... keep the slot
    world.act(accepted, "request_info")
    assert today(world) == {world.hub_paeds.pk: 3, world.hub2_paeds.pk: 1}
    assert department_load_matches()


def test_a_case_assigned_yesterday_and_forwarded_today_leaves_yesterdays_row(
    world: World,
) -> None:
    yesterday = timezone.now() - timedelta(days=1)
    referral, _ = services.referral_submit(
        actor=world.referrer,
        requester_facility=world.district,
        placer_system="urn:district-his",
        placer_value="SR-yesterday",
        specialty=world.paeds,
        clinical_question="Cough.",
        department=world.hub_paeds,
        now=yesterday,
    )
    row = DepartmentDayLoad.objects.get(department=world.hub_paeds)
    assert (row.day, row.assigned) == (timezone.localdate(yesterday), 1)
    world.act(referral, "forward")
    assert (
        DepartmentDayLoad.objects.get(
            department=world.hub_paeds, day=timezone.localdate(yesterday)
        ).assigned
        == 0
    )
    assert today(world) == {world.hub2_paeds.pk: 1}
    assert department_load_matches()


def test_a_rolled_back_transition_leaves_the_counters_unchanged(world: World) -> None:
    referral = world.submit()
    before = list(DepartmentDayLoad.objects.values_list("department_id", "day", "assigned"))
    with pytest.raises(RuntimeError), transaction.atomic():
        world.act(referral, "forward")
        raise RuntimeError("the caller's transaction fails")
    after = list(DepartmentDayLoad.objects.values_list("department_id", "day", "assigned"))
    assert after == before
    assert Referral.objects.get(pk=referral.pk).assigned_department_id == world.hub_paeds.pk


def test_routing_reads_the_counters_capacity_full_after_daily_capacity(world: World) -> None:
    type(world.hub_paeds).objects.filter(pk=world.hub_paeds.pk).update(daily_capacity=2)
    type(world.hub2_paeds).objects.filter(pk=world.hub2_paeds.pk).update(daily_capacity=5)
    routing.routing_cache_clear()
    world.submit()
    world.submit()
    probe = world.submit(draft=True, department=None)
    ranked = {s.department_id: s for s in routing.suggest_departments(probe)}
    assert ranked[world.hub_paeds.pk].capacity_left == 0
    assert "capacity_full" in ranked[world.hub_paeds.pk].reasons
    assert ranked[world.hub2_paeds.pk].capacity_left == 5


def test_rebuild_repairs_and_prune_drops_old_days(world: World) -> None:
    world.submit()
    world.submit()
    DepartmentDayLoad.objects.update(assigned=99)  # a corrupted counter
    assert not department_load_matches()
    assert department_load_rebuild() == 1
    assert department_load_matches()
    assert today(world) == {world.hub_paeds.pk: 2}
    old = DepartmentDayLoad.objects.create(
        department=world.hub2_paeds, day=timezone.localdate() - timedelta(days=30), assigned=3
    )
    assert department_load_prune() == 1
    assert not DepartmentDayLoad.objects.filter(pk=old.pk).exists()
    assert today(world) == {world.hub_paeds.pk: 2}


def test_the_rebuild_command_reports_and_repairs(world: World) -> None:
    world.submit()
    out = StringIO()
    call_command("rebuild_department_load", stdout=out)
    assert "already matched" in out.getvalue()
    DepartmentDayLoad.objects.update(assigned=5)
    out = StringIO()
    call_command("rebuild_department_load", "--all", stdout=out)
    assert "differed and were repaired" in out.getvalue()
    assert department_load_matches()
    with pytest.raises(CommandError):
        call_command("rebuild_department_load", "--days", "-1")


def test_a_busy_department_spreads_over_shards_and_still_sums(world: World) -> None:
    for _ in range(6):
        world.submit()
    shards = set(
        DepartmentDayLoad.objects.filter(department=world.hub_paeds).values_list("shard", flat=True)
    )
    assert len(shards) > 1  # consecutive ids land in different rows
    assert today(world) == {world.hub_paeds.pk: 6}
    assert department_load_matches()


def test_a_deferred_block_writes_its_moves_at_its_end_in_one_shard(world: World) -> None:
    """A batch of submissions (the asynchronous intake's) writes the counters once, at its
    end; routing inside it already counts the earlier ones; a submission rolled back with
    its savepoint is not counted; a unit later leaving by its id's shard leaves that row
    below zero and the sum exact."""
    with transaction.atomic(), department_load_deferred():
        referrals = [world.submit() for _ in range(4)]
        assert not DepartmentDayLoad.objects.exists()  # nothing written, nothing locked yet
        assert today(world) == {world.hub_paeds.pk: 4}
        with pytest.raises(RuntimeError), transaction.atomic():
            world.submit()
            raise RuntimeError("refused after writing")
        assert today(world) == {world.hub_paeds.pk: 4}
        referrals.append(world.submit())
    rows = dict(
        DepartmentDayLoad.objects.filter(department=world.hub_paeds).values_list(
            "shard", "assigned"
        )
    )
    assert list(rows.values()) == [5]
    (shard,) = rows
    assert department_load_matches()

    moved = next(r for r in referrals if r.pk % 16 != shard)
    world.act(moved, "forward")  # outside the block: -1 in the shard of its id

    left = DepartmentDayLoad.objects.get(department=world.hub_paeds, shard=moved.pk % 16)
    assert left.assigned == -1
    assert today(world) == {world.hub_paeds.pk: 4, world.hub2_paeds.pk: 1}
    assert department_load_matches()


def test_a_deferred_block_that_fails_writes_nothing(world: World) -> None:
    with pytest.raises(RuntimeError), transaction.atomic(), department_load_deferred():
        world.submit()
        raise RuntimeError("the batch broke")
    assert not DepartmentDayLoad.objects.exists()
    assert Referral.objects.count() == 0


def test_a_deferred_block_needs_a_transaction() -> None:
    with pytest.raises(RuntimeError, match="inside a transaction"), department_load_deferred():
        pass
