"""Small fixtures for the referral tests, built directly with the ORM (the shared
factories in tests/ are written separately)."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from accounts.models import User
from accounts.roles import Role
from referrals import services
from referrals.models import ActorSide, Referral, ReferralState
from referrals.workflow import INITIAL_STATE, TRANSITIONS, TRANSITIONS_BY_ACTION
from registry.models import Country, Department, Facility, Specialty, Tier

_placer = itertools.count(1)


def shortest_paths() -> dict[str, list[str]]:
    """For every state, the shortest list of actions from draft (derived from the table)."""
    paths: dict[str, list[str]] = {str(INITIAL_STATE): []}
    queue: deque[str] = deque([str(INITIAL_STATE)])
    while queue:
        state = queue.popleft()
        for t in TRANSITIONS:
            if state in t.sources and t.target is not None and t.target not in paths:
                paths[t.target] = [*paths[state], t.action]
                queue.append(t.target)
    return paths


@dataclass
class World:
    country: Country
    paeds: Specialty
    district: Facility
    foreign_district: Facility
    hub: Facility
    hub2: Facility
    hub_paeds: Department
    hub2_paeds: Department
    district_paeds: Department
    referrer: User
    foreign_referrer: User
    consultant: User
    consultant2: User
    district_consultant: User
    ministry: User
    ministry_at_hub: User
    paths: dict[str, list[str]] = field(default_factory=shortest_paths)

    def actor_for(self, action: str) -> User | None:
        side = TRANSITIONS_BY_ACTION[action].side
        if side == ActorSide.SYSTEM:
            return None
        return self.referrer if side == ActorSide.REQUESTER else self.consultant

    def inputs_for(self, action: str) -> dict[str, Any]:
        now = timezone.now()
        inputs: dict[str, dict[str, Any]] = {
            "decline": {"reason_code": "no_capacity", "note": "full today"},
            "forward": {"department": self.hub2_paeds.pk, "reason": "closer to the patient"},
            "reroute": {"department": self.hub2_paeds.pk, "reason": "next candidate"},
            "cancel": {"reason": "patient improved"},
            "request_info": {"question": "Latest blood count?"},
            "provide_info": {"text": "Hb 9.1"},
            "schedule": {
                "scheduled_at": (now + timedelta(hours=2)).isoformat(),
                "experts": [self.consultant.pk, self.consultant2.pk],
                "video_url": "https://meet.example.org/abc",
            },
            "finish_conference": {
                "minutes": "Discussed.",
                "disposition": "manage_locally",
                "text": "Oral antibiotics.",
            },
            "advise": {"disposition": "manage_locally", "text": "Oral antibiotics."},
            "close_local": {"transfer_originally_considered": True, "outcome": "avoided"},
            "request_transfer": {"reason": "needs surgery"},
            "counter_refer": {
                "department": self.district_paeds.pk,
                "clinical_question": "Follow up in two weeks.",
            },
        }
        return inputs.get(action, {})

    def submit(self, *, draft: bool = False, **overrides: Any) -> Referral:
        kwargs: dict[str, Any] = {
            "actor": self.referrer,
            "requester_facility": self.district,
            "placer_system": "urn:district-his",
            "placer_value": f"SR-{next(_placer)}",
            "specialty": self.paeds,
            "clinical_question": "Fever for 5 days in a 2-year-old.",
            "department": self.hub_paeds,
            "draft": draft,
        }
        kwargs.update(overrides)
        referral, _ = services.referral_submit(**kwargs)
        return referral

    def act(self, referral: Referral, action: str, **extra: Any) -> Referral:
        if action in ("expire", "escalation_notify"):
            Referral.objects.filter(pk=referral.pk).update(
                deadline=timezone.now() - timedelta(minutes=1)
            )
        return services.referral_transition(
            actor=self.actor_for(action),
            referral_id=referral.pk,
            action=action,
            **{**self.inputs_for(action), **extra},
        )

    def referral_in(self, state: str) -> Referral:
        """A referral driven from draft to ``state`` through the table."""
        referral = self.submit(draft=True)
        for action in self.paths[state]:
            referral = self.act(referral, action)
        assert referral.state == state
        return Referral.objects.get(pk=referral.pk)


def _user(
    username: str, role: Role | None, facility: Facility | None, *departments: Department
) -> User:
    user = User.objects.create_user(username=username, password="x", facility=facility)
    if role is not None:
        user.groups.add(Group.objects.get_or_create(name=role.value)[0])
    if departments:
        user.departments.set(departments)
    return user


@pytest.fixture
def world(db: Any) -> World:
    return build_world()


def build_world() -> World:
    country = Country.objects.create(code="VN", name="Viet Nam")
    paeds = Specialty.objects.create(code="394537008", display="Pediatric specialty")
    district = Facility.objects.create(
        code="D1", name="Con Dao District Hospital", country=country, tier=Tier.DISTRICT
    )
    foreign_district = Facility.objects.create(
        code="D2", name="Another District Hospital", country=country, tier=Tier.DISTRICT
    )
    hub = Facility.objects.create(
        code="C1", name="Central Children's Hospital", country=country, tier=Tier.CENTRAL
    )
    hub2 = Facility.objects.create(
        code="P1", name="Provincial Hospital", country=country, tier=Tier.PROVINCIAL
    )

    def department(facility: Facility, **flags: Any) -> Department:
        return Department.objects.create(
            facility=facility, specialty=paeds, name=f"Paediatrics {facility.code}", **flags
        )

    hub_paeds = department(hub, offers_live=True, offers_transfer=True, sla_hours=48)
    hub2_paeds = department(hub2, offers_live=True, offers_transfer=True, sla_hours=24)
    district_paeds = department(district)
    return World(
        country=country,
        paeds=paeds,
        district=district,
        foreign_district=foreign_district,
        hub=hub,
        hub2=hub2,
        hub_paeds=hub_paeds,
        hub2_paeds=hub2_paeds,
        district_paeds=district_paeds,
        referrer=_user("referrer", Role.REFERRER, district),
        foreign_referrer=_user("foreign-referrer", Role.REFERRER, foreign_district),
        consultant=_user("consultant", Role.CONSULTANT, hub, hub_paeds),
        consultant2=_user("consultant2", Role.CONSULTANT, hub2, hub2_paeds),
        district_consultant=_user("district-consultant", Role.CONSULTANT, district, district_paeds),
        ministry=_user("ministry", Role.MINISTRY, None),
        # Ministry role wins even when attached to a facility and department.
        ministry_at_hub=_user("ministry-hub", Role.MINISTRY, hub, hub_paeds),
    )


ALL_STATES: tuple[str, ...] = tuple(ReferralState.values)
