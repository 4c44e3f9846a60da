"""The hand-computed scenario: a small network and 20 referrals (plus one counter-referral)
with known lifecycles, driven through referrals.services with controlled timestamps.

Geography is chosen so distances are easy by hand: every facility lies on the meridian
105.8 E, so a distance is (difference in latitude, degrees) x 111.19508 km
(6371.0088 km x pi / 180). Round trips are therefore whole multiples of that "unit":
D1-H1 2 units, C1-H1 4, L1-H1 6, D1-H2 1, C1-H2 3.

Referral lifecycles (times are hours after that referral's submission; H1P = central
paediatrics, SLA 24 h; H1C = central cardiology, SLA 48 h; H2P = provincial paediatrics,
SLA 12 h):

 #  req spec  month dept  lifecycle
 1  D1  P     Jan   H1P   accept 2, advise 10, close 24: considered, avoided
 2  D1  P     Jan   H1P   accept 30 (late), advise 40, close 48: avoided (p2 comes back: #3)
 3  D1  P     Jan   H1P   accept 1, advise 5, transfer requested 6 ... completed 20
 4  D1  P     Jan   H1P   decline 3
 5  D1  P     Jan   H1P   forward 5 to H2P, accept 8, advise 9, close 24: avoided (hub H2)
 6  C1  P     Jan   H1P   cancel 2
 7  C1  C     Jan   H1C   campaign heart-2025; accept 20, advise 30, close 48: not considered
 8  L1  P     Jan   H1P   cross-border; accept 4, advise 20, close 48: avoided
 9  D1  P     Feb   H1P   accept 1, advise 3, close 24: considered, still needed
10  D1  P     Feb   H1P   expire 25
11  C1  C     Feb   H1C   heart-2025; accept 50 (late), conference, advice 72, close 96: avoided
12  C1  P     Feb   H1P   (patient of #11) accept 2, advise 6, close 24: not considered
13  L1  P     Feb   H1P   cross-border; accept 6, advise 8, close 24: avoided (back after 38 d)
14  D1  P     Feb   H1P   accept 3, advise 4, counter-referral 5 (#21), close 24: avoided
15  D1  C     Feb   H1C   accept 10, info requested/provided, advise 20, transfer requested 21
16  D1  P     Mar   H1P   accept 5, advise 6, close on 20 Mar: avoided (verification pending)
17  C1  P     Mar   H2P   accept 13 (late), advise 14, close 24: avoided (p17 back: #18)
18  C1  P     Mar   H2P   decline 20 (late)
19  L1  P     Mar   H1P   cross-border, patient of #13; accept 3
20  D1  P     Mar   (H2P) no department chosen: routing picks H2P (nearest); cancel 1
21  H1  P     Feb   D1P   counter-referral of #14 (requester H1, hub D1), left submitted
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from accounts.models import User
from accounts.roles import Role
from accounts.services import api_token_issue
from referrals import services
from referrals.models import Referral
from referrals.workflow import TRANSITIONS_BY_ACTION
from registry.models import (
    AdministrativeArea,
    AreaLevel,
    Country,
    Department,
    Facility,
    Specialty,
    SupportLink,
    Tier,
)

UNIT_KM = 6371.0088 * 3.141592653589793 / 180  # one degree of latitude
NOW = datetime.fromisoformat("2025-04-15T12:00:00+00:00")
PAEDS = "394537008"
CARDIO = "394579002"
_placer = itertools.count(1)


def at(day: str, hours: float = 0) -> datetime:
    return datetime.fromisoformat(f"{day}T08:00:00+00:00") + timedelta(hours=hours)


@dataclass
class Network:
    vn: Country
    la: Country
    ha_noi: AdministrativeArea
    quang_ninh: AdministrativeArea
    lao_cai: AdministrativeArea
    vientiane: AdministrativeArea
    paeds: Specialty
    cardio: Specialty
    h1: Facility
    h2: Facility
    d1: Facility
    c1: Facility
    l1: Facility
    h1p: Department
    h1c: Department
    h2p: Department
    d1p: Department
    referrer_d1: User
    referrer_c1: User
    referrer_l1: User
    consultant_h1: User
    consultant_h2: User
    coordinator_h2: User
    ministry: User
    steward: User
    referrals: dict[int, Referral]


def _user(username: str, role: Role, facility: Facility | None, *departments: Department) -> User:
    user = User.objects.create_user(username=username, password="pw-scenario", facility=facility)
    user.groups.add(Group.objects.get_or_create(name=role.value)[0])
    if departments:
        user.departments.set(departments)
    return user


def build_network() -> Network:
    vn = Country.objects.create(code="VN", name="Viet Nam")
    la = Country.objects.create(code="LA", name="Lao PDR")

    def province(country: Country, code: str, name: str) -> AdministrativeArea:
        return AdministrativeArea.objects.create(
            country=country, level=AreaLevel.PROVINCE, code=code, name=name
        )

    ha_noi = province(vn, "VN-HN", "Ha Noi")
    quang_ninh = province(vn, "VN-13", "Quang Ninh")
    lao_cai = province(vn, "VN-02", "Lao Cai")
    vientiane = province(la, "LA-VT", "Vientiane")
    paeds = Specialty.objects.create(code=PAEDS, display="Pediatric specialty")
    cardio = Specialty.objects.create(code=CARDIO, display="Cardiology")

    def facility(code: str, name: str, area: AdministrativeArea, tier: int, lat: float) -> Facility:
        return Facility.objects.create(
            code=code,
            name=name,
            country=area.country,
            area=area,
            province=area,
            tier=tier,
            latitude=lat,
            longitude=105.8,
        )

    h1 = facility("H1", "Central Hospital", ha_noi, Tier.CENTRAL, 21.0)
    h2 = facility("H2", "Quang Ninh Provincial Hospital", quang_ninh, Tier.PROVINCIAL, 21.5)
    d1 = facility("D1", "Van Don District Hospital", quang_ninh, Tier.DISTRICT, 22.0)
    c1 = facility("C1", "Sa Pa Commune Health Station", lao_cai, Tier.COMMUNE, 23.0)
    l1 = facility("L1", "Vientiane District Hospital", vientiane, Tier.DISTRICT, 18.0)

    def department(fac: Facility, spec: Specialty, sla: int, transfer: bool) -> Department:
        return Department.objects.create(
            facility=fac,
            specialty=spec,
            name=f"{spec.display} {fac.code}",
            offers_live=True,
            offers_transfer=transfer,
            sla_hours=sla,
        )

    h1p = department(h1, paeds, 24, True)
    h1c = department(h1, cardio, 48, True)
    h2p = department(h2, paeds, 12, True)
    d1p = department(d1, paeds, 48, False)
    # Across the border only with a data-sharing agreement (routing insists).
    SupportLink.objects.create(
        hub=h1, spoke=l1, agreement_reference="DSA-VN-LA-2024", valid_from=date(2024, 1, 1)
    )
    return Network(
        vn=vn,
        la=la,
        ha_noi=ha_noi,
        quang_ninh=quang_ninh,
        lao_cai=lao_cai,
        vientiane=vientiane,
        paeds=paeds,
        cardio=cardio,
        h1=h1,
        h2=h2,
        d1=d1,
        c1=c1,
        l1=l1,
        h1p=h1p,
        h1c=h1c,
        h2p=h2p,
        d1p=d1p,
        referrer_d1=_user("referrer-d1", Role.REFERRER, d1),
        referrer_c1=_user("referrer-c1", Role.REFERRER, c1),
        referrer_l1=_user("referrer-l1", Role.REFERRER, l1),
        consultant_h1=_user("consultant-h1", Role.CONSULTANT, h1, h1p, h1c),
        consultant_h2=_user("consultant-h2", Role.CONSULTANT, h2, h2p),
        coordinator_h2=_user("coordinator-h2", Role.COORDINATOR, h2),
        ministry=_user("ministry-official", Role.MINISTRY, None),
        steward=_user("steward-x", Role.REGISTRY_STEWARD, None),
        referrals={},
    )


class Driver:
    def __init__(self, net: Network) -> None:
        self.net = net

    def referrer_of(self, facility: Facility) -> User:
        return {
            self.net.d1.pk: self.net.referrer_d1,
            self.net.c1.pk: self.net.referrer_c1,
            self.net.l1.pk: self.net.referrer_l1,
        }[facility.pk]

    def consultant_of(self, referral: Referral) -> User:
        referral.refresh_from_db()
        department = referral.assigned_department
        assert department is not None
        return (
            self.net.consultant_h2
            if department.facility_id == self.net.h2.pk
            else (self.net.consultant_h1)
        )

    def submit(
        self,
        number: int,
        facility: Facility,
        specialty: Specialty,
        department: Department | None,
        patient: str,
        when: datetime,
        campaign: str = "",
    ) -> Referral:
        referral, _ = services.referral_submit(
            actor=self.referrer_of(facility),
            requester_facility=facility,
            placer_system="urn:scenario",
            placer_value=f"S-{next(_placer)}",
            specialty=specialty,
            clinical_question=f"Case {number}",
            patient_ref=patient,
            department=department,
            campaign=campaign,
            now=when,
        )
        self.net.referrals[number] = referral
        return referral

    def act(self, number: int, action: str, when: datetime, **inputs: Any) -> None:
        referral = self.net.referrals[number]
        side = TRANSITIONS_BY_ACTION[action].side
        actor: User | None
        if side == "requester":
            actor = self.referrer_of(referral.requester_facility)
        elif side == "assignee":
            actor = self.consultant_of(referral)
        else:
            actor = None
        services.referral_transition(
            actor=actor, referral_id=referral.pk, action=action, now=when, **inputs
        )

    def advise(self, number: int, when: datetime) -> None:
        self.act(number, "advise", when, disposition="manage_locally", text="Advice.")

    def close(self, number: int, when: datetime, considered: bool, outcome: str) -> None:
        self.act(
            number,
            "close_local",
            when,
            transfer_originally_considered=considered,
            outcome=outcome,
        )


def run_scenario(net: Network) -> Network:
    d = Driver(net)
    n = net
    P, C = n.paeds, n.cardio

    t = at("2025-01-06")
    d.submit(1, n.d1, P, n.h1p, "p1", t)
    d.act(1, "accept", t + timedelta(hours=2))
    d.advise(1, t + timedelta(hours=10))
    d.close(1, t + timedelta(hours=24), True, "avoided")

    t = at("2025-01-08")
    d.submit(2, n.d1, P, n.h1p, "p2", t)
    d.act(2, "accept", t + timedelta(hours=30))
    d.advise(2, t + timedelta(hours=40))
    d.close(2, t + timedelta(hours=48), True, "avoided")

    t = at("2025-01-20")
    d.submit(3, n.d1, P, n.h1p, "p2", t)
    d.act(3, "accept", t + timedelta(hours=1))
    d.advise(3, t + timedelta(hours=5))
    d.act(3, "request_transfer", t + timedelta(hours=6), reason="Needs surgery.")
    d.act(3, "accept_transfer", t + timedelta(hours=7))
    d.act(3, "depart", t + timedelta(hours=8))
    d.act(3, "arrive", t + timedelta(hours=12))
    d.act(3, "complete", t + timedelta(hours=20))

    t = at("2025-01-10")
    d.submit(4, n.d1, P, n.h1p, "p4", t)
    d.act(4, "decline", t + timedelta(hours=3), reason_code="not_indicated")

    t = at("2025-01-12")
    d.submit(5, n.d1, P, n.h1p, "p5", t)
    d.act(5, "forward", t + timedelta(hours=5), department=n.h2p.pk, reason="Closer.")
    d.act(5, "accept", t + timedelta(hours=8))
    d.advise(5, t + timedelta(hours=9))
    d.close(5, t + timedelta(hours=24), True, "avoided")

    t = at("2025-01-15")
    d.submit(6, n.c1, P, n.h1p, "p6", t)
    d.act(6, "cancel", t + timedelta(hours=2), reason="Improved.")

    t = at("2025-01-16")
    d.submit(7, n.c1, C, n.h1c, "p7", t, campaign="heart-2025")
    d.act(7, "accept", t + timedelta(hours=20))
    d.advise(7, t + timedelta(hours=30))
    d.close(7, t + timedelta(hours=48), False, "not_applicable")

    t = at("2025-01-18")
    d.submit(8, n.l1, P, n.h1p, "p8", t)
    d.act(8, "accept", t + timedelta(hours=4))
    d.advise(8, t + timedelta(hours=20))
    d.close(8, t + timedelta(hours=48), True, "avoided")

    t = at("2025-02-03")
    d.submit(9, n.d1, P, n.h1p, "p9", t)
    d.act(9, "accept", t + timedelta(hours=1))
    d.advise(9, t + timedelta(hours=3))
    d.close(9, t + timedelta(hours=24), True, "still_needed")

    t = at("2025-02-05")
    d.submit(10, n.d1, P, n.h1p, "p10", t)
    d.act(10, "expire", t + timedelta(hours=25))

    t = at("2025-02-06")
    d.submit(11, n.c1, C, n.h1c, "p11", t, campaign="heart-2025")
    d.act(11, "accept", t + timedelta(hours=50))
    d.act(
        11,
        "schedule",
        t + timedelta(hours=51),
        scheduled_at=(t + timedelta(hours=70)).isoformat(),
        experts=[n.consultant_h1.pk],
        video_url="https://meet.example.org/case-11",
    )
    d.act(11, "start_conference", t + timedelta(hours=70))
    d.act(
        11,
        "finish_conference",
        t + timedelta(hours=72),
        minutes="Discussed.",
        disposition="manage_locally",
        text="Advice.",
    )
    d.close(11, t + timedelta(hours=96), True, "avoided")

    t = at("2025-02-12")
    d.submit(12, n.c1, P, n.h1p, "p11", t)
    d.act(12, "accept", t + timedelta(hours=2))
    d.advise(12, t + timedelta(hours=6))
    d.close(12, t + timedelta(hours=24), False, "not_applicable")

    t = at("2025-02-14")
    d.submit(13, n.l1, P, n.h1p, "p13", t)
    d.act(13, "accept", t + timedelta(hours=6))
    d.advise(13, t + timedelta(hours=8))
    d.close(13, t + timedelta(hours=24), True, "avoided")

    t = at("2025-02-20")
    d.submit(14, n.d1, P, n.h1p, "p14", t)
    d.act(14, "accept", t + timedelta(hours=3))
    d.advise(14, t + timedelta(hours=4))
    d.act(
        14,
        "counter_refer",
        t + timedelta(hours=5),
        department=n.d1p.pk,
        clinical_question="Follow up in two weeks.",
    )
    d.close(14, t + timedelta(hours=24), True, "avoided")
    n.referrals[21] = Referral.objects.get(parent_referral=n.referrals[14])

    t = at("2025-02-25")
    d.submit(15, n.d1, C, n.h1c, "p15", t)
    d.act(15, "accept", t + timedelta(hours=10))
    d.act(15, "request_info", t + timedelta(hours=11), question="ECG?")
    d.act(15, "provide_info", t + timedelta(hours=12), text="Attached.")
    d.advise(15, t + timedelta(hours=20))
    d.act(15, "request_transfer", t + timedelta(hours=21), reason="Needs a catheter lab.")
    d.act(15, "accept_transfer", t + timedelta(hours=22))

    t = at("2025-03-03")
    d.submit(16, n.d1, P, n.h1p, "p16", t)
    d.act(16, "accept", t + timedelta(hours=5))
    d.advise(16, t + timedelta(hours=6))
    d.close(16, at("2025-03-20"), True, "avoided")

    t = at("2025-03-05")
    d.submit(17, n.c1, P, n.h2p, "p17", t)
    d.act(17, "accept", t + timedelta(hours=13))
    d.advise(17, t + timedelta(hours=14))
    d.close(17, t + timedelta(hours=24), True, "avoided")

    t = at("2025-03-25")
    d.submit(18, n.c1, P, n.h2p, "p17", t)
    d.act(18, "decline", t + timedelta(hours=20), reason_code="no_capacity")

    d.submit(19, n.l1, P, n.h1p, "p13", t)
    d.act(19, "accept", t + timedelta(hours=3))

    t = at("2025-03-28")
    d.submit(20, n.d1, P, None, "p20", t)
    d.act(20, "cancel", t + timedelta(hours=1), reason="Sent by mistake.")
    return n


def client_for(user: User) -> APIClient:
    """An API client with a bearer token of ``user`` (as a member system calls)."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_token_issue(user=user, name='t').raw}")
    return client


def get(user: User, path: str, **params: Any) -> Any:
    """``GET /api/v1/reports/<path>`` as ``user``."""
    return client_for(user).get(f"/api/v1/reports/{path}", params)
