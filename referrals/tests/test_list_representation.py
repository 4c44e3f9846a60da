"""The list rows (worklist, outgoing) are built from tuples by ``referral_list_data``, not
through ``ReferralListSerializer``; the serializer stays the documented schema. Both must
give the same JSON for every kind of row."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import User
from core.errors import NotFound
from referrals import selectors
from referrals.models import Priority, Referral, ReferralState
from referrals.selectors import LIST_COLUMNS
from referrals.serializers import ReferralListSerializer, referral_list_data
from referrals.tests.conftest import World


def _as_json(data: Any) -> Any:
    return json.loads(json.dumps(data))


def _both(queryset: Any) -> tuple[Any, Any]:
    fast = referral_list_data(queryset.values_list(*LIST_COLUMNS))
    reference = ReferralListSerializer(list(queryset), many=True).data
    return _as_json(fast), _as_json(reference)


def _varied(world: World) -> None:
    world.submit(draft=True, department=None)  # no department, no deadline
    world.submit(priority=Priority.STAT)
    world.referral_in(ReferralState.ACCEPTED)
    world.referral_in(ReferralState.CLOSED_LOCAL)
    world.submit(campaign="dengue-2026")


def test_the_fast_rows_equal_the_serializer_for_every_kind_of_row(world: World) -> None:
    _varied(world)
    queryset = Referral.objects.order_by("id")
    fast, reference = _both(queryset)
    assert len(fast) == Referral.objects.count() >= 4
    assert fast == reference
    kinds = {(r["assigned_department"] is None, r["deadline"] is None) for r in fast}
    assert (True, True) in kinds  # the draft
    assert (False, False) in kinds
    assert {r["campaign"] for r in fast} >= {"", "dengue-2026"}
    assert list(fast[0]) == list(ReferralListSerializer.Meta.fields)


@override_settings(TIME_ZONE="Asia/Ho_Chi_Minh")
def test_the_fast_rows_render_times_in_the_current_zone_like_drf(world: World) -> None:
    world.submit()
    with timezone.override("Asia/Ho_Chi_Minh"):
        fast, reference = _both(Referral.objects.order_by("id"))
    assert fast == reference
    assert fast[0]["created_at"].endswith("+07:00")


def test_the_worklist_endpoint_serves_the_documented_shape(world: World) -> None:
    referral = world.submit()
    client = APIClient()
    client.force_authenticate(world.consultant)
    response = client.get("/api/v1/referrals/worklist/")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 1
    expected = _as_json(ReferralListSerializer(Referral.objects.get(pk=referral.pk)).data)
    assert body["results"] == [expected]


def test_list_pages_count_and_refuse_a_page_beyond_the_end(world: World) -> None:
    for _ in range(3):
        world.submit()
    client = APIClient()
    client.force_authenticate(world.referrer)
    first = client.get("/api/v1/referrals/outgoing/?page_size=2").json()
    assert first["count"] == 3
    assert len(first["results"]) == 2
    assert first["next"].endswith("page=2&page_size=2")
    second = client.get(first["next"]).json()
    assert [r["id"] for r in second["results"]] == [
        r.pk for r in Referral.objects.order_by("-created_at", "-id")[2:]
    ]
    assert second["next"] is None
    for bad in ("9", "abc", "0"):
        response = client.get(f"/api/v1/referrals/outgoing/?page_size=2&page={bad}")
        assert response.status_code == 404, bad
        assert response["Content-Type"].startswith("application/problem+json")


def _orm(user: User, department: int | None, states: tuple[str, ...] | None) -> list[Any]:
    queryset = selectors.referral_worklist(user, department, states=states)
    return list(queryset.values_list(*LIST_COLUMNS))


@pytest.mark.parametrize("vendor_sql", [True, False], ids=["hand-written", "orm-fallback"])
def test_the_worklist_rows_equal_the_orm_selector_in_every_scope(
    world: World, vendor_sql: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not vendor_sql:  # what SQLite (make run) uses
        monkeypatch.setattr(selectors.connection, "vendor", "sqlite")
    for priority in (Priority.ROUTINE, Priority.STAT, Priority.URGENT):
        world.submit(priority=priority)
    world.referral_in(ReferralState.ACCEPTED)
    world.referral_in(ReferralState.CLOSED_LOCAL)  # terminal: not on a worklist
    forwarded = world.submit()
    world.act(forwarded, "forward")  # now hub2's
    conference = world.referral_in(ReferralState.SCHEDULED)  # consultant2 invited (grant)
    cases = [
        (world.consultant, None, None),
        (world.consultant, world.hub_paeds.pk, None),
        (world.consultant, world.hub_paeds.pk, (ReferralState.ACCEPTED.value,)),
        (world.consultant2, None, None),  # own department + the conference grant
        (world.consultant2, world.hub2_paeds.pk, None),  # a department: no grants
    ]
    for user, department, states in cases:
        fresh = User.objects.get(pk=user.pk)
        rows = selectors.referral_worklist_rows(fresh, department, states=states)
        expected = _orm(fresh, department, states)
        assert rows.count() == len(expected) > 0, (user.username, department, states)
        assert rows[0 : len(expected) + 5] == expected
        assert rows[1:3] == expected[1:3]
    consultant2 = User.objects.get(pk=world.consultant2.pk)
    ids = [r[0] for r in selectors.referral_worklist_rows(consultant2)[0:50]]
    assert conference.pk in ids and forwarded.pk in ids
    # Outside one's departments: not found, as the ORM selector.
    with pytest.raises(NotFound):
        selectors.referral_worklist_rows(consultant2, world.hub_paeds.pk)


def test_a_user_without_departments_or_grants_has_an_empty_worklist(world: World) -> None:
    world.submit()
    rows = selectors.referral_worklist_rows(User.objects.get(pk=world.referrer.pk))
    assert (rows.count(), rows[0:50]) == (0, [])
