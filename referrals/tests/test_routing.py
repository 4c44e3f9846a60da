"""Routing on a small hand-built network: exact order and reasons, eligibility rules,
capacity, tried departments, intake integration and the suggestions endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import User
from accounts.roles import Role
from core.errors import ApplicationError
from referrals import routing, services
from referrals.models import DepartmentResponseTime, Referral, ReferralEvent
from registry.geo import haversine_km
from registry.models import Country, Department, Facility, Specialty, SupportLink, Tier

D_LAT, D_LON = 10.0, 106.0
NEAR = (10.1, 106.1)
FAR = (21.0, 105.8)
LAO = (17.97, 102.6)


@dataclass
class Net:
    paeds: Specialty
    district: Facility
    lao: Facility
    central: Facility
    provincial: Facility
    peer: Facility
    central2: Facility
    central_paeds: Department
    provincial_paeds: Department
    peer_paeds: Department
    central2_paeds: Department
    referrer: User
    lao_referrer: User


def _km(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"distance_km:{haversine_km(*a, *b):.0f}"


@pytest.fixture
def net(db: Any) -> Net:
    routing.routing_cache_clear()
    vn = Country.objects.create(code="VN", name="Viet Nam")
    la = Country.objects.create(code="LA", name="Lao PDR")
    paeds = Specialty.objects.create(code="394537008", display="Pediatric specialty")

    def facility(
        code: str,
        tier: int,
        where: tuple[float, float],
        country: Country = vn,
        languages: tuple[str, ...] = ("vi",),
    ) -> Facility:
        return Facility.objects.create(
            code=code,
            name=code,
            country=country,
            tier=tier,
            latitude=where[0],
            longitude=where[1],
            languages=list(languages),
        )

    def department(f: Facility, **kw: Any) -> Department:
        kw.setdefault("daily_capacity", 10)
        kw.setdefault("sla_hours", 24)
        return Department.objects.create(facility=f, specialty=paeds, name=f"Paeds {f.code}", **kw)

    district = facility("D", Tier.DISTRICT, (D_LAT, D_LON))
    lao = facility("L", Tier.PROVINCIAL, LAO, la, ("lo",))
    central = facility("C", Tier.CENTRAL, FAR)
    provincial = facility("P", Tier.PROVINCIAL, NEAR)
    peer = facility("X", Tier.DISTRICT, NEAR)  # same tier, no link: never a candidate
    central2 = facility("C2", Tier.CENTRAL, FAR, languages=("vi", "lo"))
    SupportLink.objects.create(hub=provincial, spoke=district)  # all specialties
    SupportLink.objects.create(
        hub=central2,
        spoke=lao,
        agreement_reference="MOU-VN-LA-1",
        identifiable_data_allowed=False,
    )
    group = Group.objects.get_or_create(name=Role.REFERRER.value)[0]
    referrer = User.objects.create_user(username="ref", password="x", facility=district)
    referrer.groups.add(group)
    lao_referrer = User.objects.create_user(username="ref-la", password="x", facility=lao)
    lao_referrer.groups.add(group)
    return Net(
        paeds=paeds,
        district=district,
        lao=lao,
        central=central,
        provincial=provincial,
        peer=peer,
        central2=central2,
        central_paeds=department(central, sla_hours=48),
        provincial_paeds=department(provincial),
        peer_paeds=department(peer),
        central2_paeds=department(central2, offers_live=True),
        referrer=referrer,
        lao_referrer=lao_referrer,
    )


def probe(net: Net, facility: Facility | None = None, **kw: Any) -> Referral:
    return Referral(
        requester_facility=facility or net.district,
        specialty=net.paeds,
        mode=kw.pop("mode", "async"),
        patient_ref=kw.pop("patient_ref", ""),
        **kw,
    )


def submit(net: Net, n: int, **kw: Any) -> Referral:
    referral, _ = services.referral_submit(
        actor=kw.pop("actor", net.referrer),
        requester_facility=kw.pop("facility", net.district),
        placer_system="urn:test",
        placer_value=f"R-{n}",
        specialty=net.paeds,
        clinical_question="Fever.",
        **kw,
    )
    return referral


def test_ranks_with_exact_order_and_reasons(net: Net) -> None:
    # given a district hospital with a linked provincial hospital nearby and two central
    # hospitals far away (a same-tier peer and nothing else)
    suggestions = routing.suggest_departments(probe(net))

    # then the linked, near provincial hospital comes first, then the central ones
    assert [s.department_id for s in suggestions] == [
        net.provincial_paeds.pk,
        net.central2_paeds.pk,
        net.central_paeds.pk,
    ]
    first, second, third = suggestions
    assert first.reasons == [
        "offers:async",
        "tier_above",
        "support_link",
        "capacity_left:10/10",
        _km((D_LAT, D_LON), NEAR),
        "shared_language:vi",
        "no_recent_responses",
    ]
    assert third.reasons == [
        "offers:async",
        "tier_above",
        "capacity_left:10/10",
        _km((D_LAT, D_LON), FAR),
        "shared_language:vi",
        "no_recent_responses",
    ]
    # the documented weighted sum
    distance = haversine_km(D_LAT, D_LON, *NEAR)
    assert first.score == pytest.approx(5 + 30 + 20 - 4 * distance / 100 + 15 - 0.5 * 12, abs=1e-3)
    far = haversine_km(D_LAT, D_LON, *FAR)
    assert third.score == pytest.approx(10 + 20 - 4 * far / 100 + 15 - 0.5 * 24, abs=1e-3)
    # central2 has a shorter SLA (24 h) than central (48 h): ranked above it
    assert second.score > third.score
    assert all(s.allowed for s in suggestions)


def test_mode_accepting_and_active_filters(net: Net) -> None:
    # live: only central2 offers it
    assert [s.department_id for s in routing.suggest_departments(probe(net, mode="live"))] == [
        net.central2_paeds.pk
    ]
    Department.objects.filter(pk=net.provincial_paeds.pk).update(accepting=False)
    assert net.provincial_paeds.pk not in {
        s.department_id for s in routing.suggest_departments(probe(net))
    }


def test_cross_border_needs_an_agreement(net: Net) -> None:
    # given a Lao provincial hospital: central (VN, tier 1) is higher but across the border
    # without a link; central2 is linked with an agreement that forbids identifiable data
    ranked = routing.suggest_departments(probe(net, net.lao))
    assert [s.department_id for s in ranked] == [net.central2_paeds.pk]
    assert ranked[0].reasons[:4] == [
        "offers:async",
        "support_link",
        "cross_border_agreement:MOU-VN-LA-1",
        "deidentified_only",
    ]
    assert "shared_language:lo" in ranked[0].reasons

    # a link across the border without an agreement (bypassing the model check) is ignored
    SupportLink.objects.bulk_create([SupportLink(hub=net.central, spoke=net.lao)])
    routing.routing_cache_clear()
    assert [s.department_id for s in routing.suggest_departments(probe(net, net.lao))] == [
        net.central2_paeds.pk
    ]


def test_identifiable_data_over_a_link_that_forbids_it(net: Net) -> None:
    # an identifiable referral sees the department, not allowed, and is never routed there
    ranked = routing.suggest_departments(probe(net, net.lao, patient_ref="P-1"))
    assert [(s.department_id, s.allowed) for s in ranked] == [(net.central2_paeds.pk, False)]
    assert "identifiable_data_not_allowed" in ranked[0].reasons
    referral = submit(net, 1, actor=net.lao_referrer, facility=net.lao, patient_ref="P-1")
    assert (referral.state, referral.assigned_department_id) == ("submitted", None)
    # routed again until the unrouted deadline (then it expires: referrals.escalation)
    assert referral.deadline == services.referral_deadline(
        department=None, priority=referral.priority, start=referral.events.get().at
    )
    # choosing it explicitly is refused with the reason, and nothing is created
    with pytest.raises(ApplicationError) as caught:
        submit(
            net,
            2,
            actor=net.lao_referrer,
            facility=net.lao,
            patient_ref="P-2",
            department=net.central2_paeds,
        )
    assert caught.value.code == "department_not_candidate"
    assert "identifiable" in caught.value.message
    assert not Referral.objects.filter(placer_value="R-2").exists()
    # de-identified, it is routed there
    ok = submit(net, 3, actor=net.lao_referrer, facility=net.lao)
    assert ok.assigned_department_id == net.central2_paeds.pk


def test_capacity_exhausted_is_demoted(net: Net) -> None:
    Department.objects.filter(pk=net.provincial_paeds.pk).update(daily_capacity=2)
    for n in range(2):
        submit(net, n, department=net.provincial_paeds)
    ranked = routing.suggest_departments(probe(net))
    assert ranked[-1].department_id == net.provincial_paeds.pk
    assert "capacity_full" in ranked[-1].reasons
    assert ranked[-1].capacity_left == 0
    # yesterday's load does not count
    tomorrow = timezone.now() + timedelta(days=1)
    assert routing.suggest_departments(probe(net), now=tomorrow)[0].department_id == (
        net.provincial_paeds.pk
    )


def test_tried_departments_are_excluded(net: Net) -> None:
    referral = submit(net, 1)
    assert referral.assigned_department_id == net.provincial_paeds.pk
    ids = [s.department_id for s in routing.suggest_departments(referral)]
    assert ids == [net.central2_paeds.pk, net.central_paeds.pk]


def test_submit_without_department_routes_and_records_why(net: Net) -> None:
    referral = submit(net, 1)
    event = ReferralEvent.objects.get(referral=referral, seq=1)
    assert event.payload["department_id"] == net.provincial_paeds.pk
    assert event.payload["routing"]["department_id"] == net.provincial_paeds.pk
    assert "support_link" in event.payload["routing"]["reasons"]
    assert referral.assigned_at == event.at
    assert referral.deadline == event.at + timedelta(hours=24)


def test_submit_with_a_department_that_is_not_a_candidate(net: Net) -> None:
    with pytest.raises(ApplicationError) as caught:
        submit(net, 1, department=net.peer_paeds)
    assert caught.value.code == "department_not_candidate"
    assert Referral.objects.count() == 0


def test_median_response_time_from_events(net: Net) -> None:
    consultant = User.objects.create_user(username="c", password="x", facility=net.central)
    consultant.groups.add(Group.objects.get_or_create(name=Role.CONSULTANT.value)[0])
    consultant.departments.add(net.central_paeds)
    t0 = timezone.now() - timedelta(days=2)
    referral = submit(net, 1, department=net.central_paeds, now=t0)
    services.referral_transition(
        actor=consultant, referral_id=referral.pk, action="accept", now=t0 + timedelta(hours=3)
    )
    routing.routing_cache_clear()
    # Requests never run the grouped query: before the beat job, no median is known.
    before = {s.department_id: s for s in routing.suggest_departments(probe(net))}
    assert before[net.central_paeds.pk].median_response_hours is None
    assert "no_recent_responses" in before[net.central_paeds.pk].reasons
    assert routing.response_times_refresh() == 1
    stored = DepartmentResponseTime.objects.get()
    assert (stored.department_id, stored.median_hours, stored.samples) == (
        net.central_paeds.pk,
        3.0,
        1,
    )
    ranked = {s.department_id: s for s in routing.suggest_departments(probe(net))}
    assert ranked[net.central_paeds.pk].median_response_hours == 3.0
    assert "median_response_h:3.0" in ranked[net.central_paeds.pk].reasons
    # A department without accepts in the window loses its stored median on refresh.
    DepartmentResponseTime.objects.create(
        department=net.central2_paeds, median_hours=9.0, samples=4, computed_at=t0
    )
    assert routing.response_times_refresh(now=timezone.now() + timedelta(days=40)) == 0
    assert not DepartmentResponseTime.objects.exists()


def test_suggestions_endpoint(net: Net) -> None:
    referral = submit(net, 1)
    client = APIClient()
    client.force_authenticate(net.referrer)
    response = client.get(f"/api/v1/referrals/{referral.pk}/suggestions/")
    assert response.status_code == 200
    assert [s["department_id"] for s in response.json()] == [
        net.central2_paeds.pk,
        net.central_paeds.pk,
    ]
    assert response.json()[0]["reasons"][0] == "offers:async"
    client.force_authenticate(net.lao_referrer)
    assert client.get(f"/api/v1/referrals/{referral.pk}/suggestions/").status_code == 404


def test_submit_api_refuses_a_non_candidate_department(net: Net) -> None:
    client = APIClient()
    client.force_authenticate(net.referrer)
    body = {
        "placer_system": "urn:test",
        "placer_value": "API-1",
        "specialty": net.paeds.code,
        "clinical_question": "Fever.",
        "department": net.peer_paeds.pk,
    }
    response = client.post("/api/v1/referrals/", body, format="json")
    assert response.status_code == 400
    assert "not a routing candidate" in response.json()["detail"]
    body.pop("department")
    created = client.post("/api/v1/referrals/", body, format="json")
    assert created.status_code == 201
    assert created.json()["assigned_department"]["id"] == net.provincial_paeds.pk


def test_judging_one_department_equals_its_entry_in_the_full_ranking(net: Net) -> None:
    """``only`` (candidate_check) gives exactly the suggestion the full ranking gives that
    department (same score and reasons, load and tried departments included), or nothing
    where the ranking leaves it out."""
    Department.objects.filter(pk=net.provincial_paeds.pk).update(daily_capacity=3)
    submit(net, 1, department=net.provincial_paeds)
    tried = submit(net, 2, department=net.central_paeds)
    departments = list(Department.objects.values_list("pk", flat=True))
    probes = [
        probe(net),
        probe(net, patient_ref="P-9"),
        probe(net, mode="live"),
        probe(net, net.lao),
        probe(net, net.lao, patient_ref="P-8"),
        probe(net, net.central),
        Referral.objects.get(pk=tried.pk),  # its assigned department is excluded
    ]
    compared = 0
    for referral in probes:
        full = {s.department_id: s for s in routing.suggest_departments(referral, limit=None)}
        for department_id in departments:
            alone = routing.suggest_departments(referral, limit=None, only=department_id)
            assert alone == ([full[department_id]] if department_id in full else []), (
                referral.requester_facility_id,
                referral.patient_ref,
                department_id,
            )
            compared += department_id in full
    assert compared >= 8
