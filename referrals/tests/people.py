"""Everyone the permission tests need around one referral of ``World`` (referrals/tests/
conftest.py): the two sides, outsiders, regional coordinators, an invited expert, ministry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from referrals.tests.conftest import World
from registry.models import AdministrativeArea, AreaLevel, Department, Facility, Tier

ROLES = (
    "referrer_own",
    "referrer_foreign",
    "consultant_assigned",
    "consultant_other",
    "coordinator_same_province",
    "coordinator_other_province",
    "ministry",
    "invited_expert",
    "anonymous",
)


@dataclass
class People:
    world: World
    users: dict[str, User]
    province: AdministrativeArea
    other_province: AdministrativeArea

    def user(self, role: str) -> User:
        return self.users[role]

    def client(self, role: str) -> APIClient:
        client = APIClient()
        if role != "anonymous":
            issued = api_token_issue(user=self.users[role], name="tests")
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
        return client


def _user(username: str, role: Role, facility: Facility | None, **extra: Any) -> User:
    user = User.objects.create_user(username=username, password="x", facility=facility, **extra)
    user.groups.add(Group.objects.get_or_create(name=role.value)[0])
    return user


def _expert(world: World) -> User:
    clinic = Facility.objects.create(
        code="EXP1", name="Paediatric Research Institute", country=world.country, tier=Tier.CENTRAL
    )
    department = Department.objects.create(
        facility=clinic, specialty=world.paeds, name="Paediatric research", accepting=False
    )
    user = _user("expert", Role.CONSULTANT, clinic)
    user.departments.add(department)
    return user


def people_around(world: World) -> People:
    """The requesting district and the coordinator's facility are in one province; the
    assigned hub and the other coordinator elsewhere."""
    province = AdministrativeArea.objects.create(
        country=world.country, level=AreaLevel.PROVINCE, code="79", name="Ba Ria - Vung Tau"
    )
    other = AdministrativeArea.objects.create(
        country=world.country, level=AreaLevel.PROVINCE, code="02", name="Ha Giang"
    )
    hub_province = AdministrativeArea.objects.create(
        country=world.country, level=AreaLevel.PROVINCE, code="01", name="Ha Noi"
    )
    Facility.objects.filter(pk=world.district.pk).update(province=province, area=province)
    Facility.objects.filter(pk__in=[world.hub.pk, world.hub2.pk]).update(province=hub_province)
    provincial = Facility.objects.create(
        code="PH79", name="Provincial Health Office", country=world.country,
        tier=Tier.PROVINCIAL, province=province, area=province,
    )  # fmt: skip
    remote = Facility.objects.create(
        code="PH02", name="Ha Giang Health Office", country=world.country,
        tier=Tier.PROVINCIAL, province=other, area=other,
    )  # fmt: skip
    users = {
        "referrer_own": world.referrer,
        "referrer_foreign": world.foreign_referrer,
        "consultant_assigned": world.consultant,
        "consultant_other": world.consultant2,
        "coordinator_same_province": _user("coord-79", Role.COORDINATOR, provincial),
        "coordinator_other_province": _user("coord-02", Role.COORDINATOR, remote),
        # The hardest ministry case: attached to the assigned department itself.
        "ministry": world.ministry_at_hub,
        # A consultant of another facility with no department in the case (a paediatrician
        # of a department that takes no referrals: an expert one may invite, nothing more).
        "invited_expert": _expert(world),
    }
    return People(world=world, users=users, province=province, other_province=other)
