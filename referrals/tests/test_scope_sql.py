"""``referral_scope_sql`` (the hand-written scope of the hot FHIR searches) selects exactly
the referrals ``referral_scope_filter`` does, for every kind of user."""

from __future__ import annotations

from typing import Any

from django.db import connection

from accounts.models import User
from accounts.roles import Role
from referrals.models import Referral, ReferralState
from referrals.permissions import referral_experts_grant
from referrals.selectors import referral_scope_filter, referral_scope_sql
from referrals.tests.conftest import World, _user
from referrals.tests.people import people_around
from registry.models import Facility, Tier


def _by_sql(user: User) -> set[int]:
    where, params = referral_scope_sql(user, "r")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT r.id FROM {Referral._meta.db_table} r WHERE {where}", params)  # noqa: S608
        return {row[0] for row in cursor.fetchall()}


def _by_orm(user: User) -> set[int]:
    scope = referral_scope_filter(user)
    return (
        set() if scope is None else set(Referral.objects.filter(scope).values_list("pk", flat=True))
    )


def test_the_sql_scope_equals_the_orm_scope_for_every_kind_of_user(world: World) -> None:
    people = people_around(world)
    world.submit()
    world.referral_in(ReferralState.ACCEPTED)
    forwarded = world.submit()
    world.act(forwarded, "forward")  # now the provincial hub's
    conference = world.referral_in(ReferralState.SCHEDULED)
    referral_experts_grant(referral=conference, experts=[people.user("invited_expert")])
    world.submit(actor=world.foreign_referrer, requester_facility=world.foreign_district)
    no_province = Facility.objects.create(
        code="NP", name="No province", country=world.country, tier=Tier.PROVINCIAL
    )
    users = {
        **people.users,
        "ministry_plain": world.ministry,
        "district_consultant": world.district_consultant,
        "coordinator_without_province": _user("coord-np", Role.COORDINATOR, no_province),
        "nobody": _user("nobody", Role.REFERRER, None),
    }
    inactive = _user("inactive", Role.REFERRER, world.district)
    inactive.is_active = False
    inactive.save()
    users["inactive"] = inactive
    seen: set[frozenset[int]] = set()
    for name, user in users.items():
        fresh = User.objects.get(pk=user.pk)
        expected = _by_orm(fresh)
        assert _by_sql(User.objects.get(pk=user.pk)) == expected, name
        seen.add(frozenset(expected))
    # The cases differ (the comparison is not between empty sets only).
    assert len(seen) >= 5, seen
    assert _by_sql(User.objects.get(pk=people.user("invited_expert").pk)) >= {conference.pk}
    assert _by_sql(User.objects.get(pk=world.ministry_at_hub.pk)) == set()


def test_the_sql_scope_and_worklist_equal_the_orm_for_experts_abroad(world: World) -> None:
    """A grant counts while the case's data may reach the expert (the border rule at read
    time): the hand-written scope and worklist apply it as the ORM does, link by link."""
    from referrals import selectors
    from registry.models import Country, Department, SupportLink

    lao = Country.objects.create(code="LA", name="Lao PDR")
    identifiable = world.referral_in(ReferralState.ACCEPTED)
    anonymous = world.referral_in(ReferralState.ACCEPTED)
    Referral.objects.filter(pk=identifiable.pk).update(patient_ref="P-1")
    Referral.objects.filter(pk=anonymous.pk).update(patient_ref="")
    links: dict[str, dict[str, Any] | None] = {
        "agreement": {"agreement_reference": "DSA-1"},
        "anonymous_only": {"agreement_reference": "DSA-2", "identifiable_data_allowed": False},
        "inactive": {"agreement_reference": "DSA-3", "active": False},
        "no_link": None,
    }
    expected = {
        "agreement": {identifiable.pk, anonymous.pk},
        "anonymous_only": {anonymous.pk},
        "inactive": set(),
        "no_link": set(),
        "no_department": set(),
    }
    experts: dict[str, User] = {}
    for n, (name, link) in enumerate(links.items()):
        facility = Facility.objects.create(
            code=f"LA{n}", name=f"Lao {name}", country=lao, tier=Tier.CENTRAL
        )
        department = Department.objects.create(facility=facility, specialty=world.paeds, name=name)
        experts[name] = _user(f"lao-{name}", Role.CONSULTANT, facility, department)
        if link is not None:
            SupportLink.objects.create(hub=facility, spoke=world.district, **link)
    experts["no_department"] = _user("lao-none", Role.CONSULTANT, None)
    for referral in (identifiable, anonymous):
        referral_experts_grant(referral=referral, experts=list(experts.values()))

    for name, expert in experts.items():
        ours = {identifiable.pk, anonymous.pk}
        assert _by_orm(User.objects.get(pk=expert.pk)) & ours == expected[name], name
        assert _by_sql(User.objects.get(pk=expert.pk)) & ours == expected[name], name
        rows = selectors.referral_worklist_rows(User.objects.get(pk=expert.pk))
        orm = selectors.referral_worklist(User.objects.get(pk=expert.pk))
        assert {r[0] for r in rows[0:50]} == set(orm.values_list("pk", flat=True)), name
        assert {r[0] for r in rows[0:50]} == expected[name], name
