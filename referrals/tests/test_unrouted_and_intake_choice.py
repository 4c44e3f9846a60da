"""A review of the web's "already done", the unrouted deadline and the intake's department
choice: each test failed before its fix."""

from __future__ import annotations

import importlib
from datetime import timedelta
from typing import Any

import pytest
from django.apps import apps
from django.utils import timezone

from referrals import checks, escalation, routing, simulation
from referrals.models import Message, Referral
from referrals.tests.conftest import World
from referrals.tests.test_web import action_post, client_for, new_referral_form
from registry.models import Department, Facility, Tier

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_routing() -> None:
    routing.routing_cache_clear()


def _no_candidate(world: World) -> None:
    Department.objects.filter(pk__in=[world.hub_paeds.pk, world.hub2_paeds.pk]).update(
        accepting=False
    )
    routing.routing_cache_clear()


def _more_hubs(world: World, n: int) -> None:
    for i in range(n):
        hub = Facility.objects.create(
            code=f"H{i}", name=f"Hub {i}", country=world.country, tier=Tier.PROVINCIAL
        )
        Department.objects.create(
            facility=hub, specialty=world.paeds, name=f"Paeds H{i}", sla_hours=24 + i
        )
    routing.routing_cache_clear()


# --- "already done" is for a second click, not a second question -----------------------


def test_a_second_different_question_from_another_tab_is_kept_not_already_done(
    world: World,
) -> None:
    referral = world.act(world.submit(), "accept")
    client = client_for(world.consultant)
    url = f"/referrals/{referral.pk}/actions/request_info/"
    first = action_post(referral, "request_info", question="Latest blood count?")
    assert client.post(url, first).status_code == 303

    second = action_post(referral, "request_info", question="Is the child vaccinated (BCG)?")
    response = client.post(url, second)

    assert response.status_code == 409
    body = response.content.decode()
    assert "someone else" in body and "Is the child vaccinated (BCG)?" in body
    assert list(Message.objects.values_list("text", flat=True)) == ["Latest blood count?"]


# --- unrouted referrals -----------------------------------------------------------------


def test_an_unrouted_referral_stored_before_the_deadline_rule_gets_one(world: World) -> None:
    """Without it the job routed it again for ever (deadline__lte never matches NULL)."""
    _no_candidate(world)
    t0 = timezone.now() - timedelta(days=30)
    old = world.submit(department=None, now=t0)
    Referral.objects.filter(pk=old.pk).update(deadline=None)  # as stored before
    migration = importlib.import_module("referrals.migrations.0011_unrouted_deadlines")

    migration.set_deadlines(apps, None)

    old.refresh_from_db()
    assert old.deadline == t0 + timedelta(hours=72)
    escalation.referral_escalate_overdue(now=timezone.now())
    old.refresh_from_db()
    assert old.state == "expired"


def test_the_bulk_simulation_expires_its_unrouted_referrals_as_the_job_would(
    world: World,
) -> None:
    _no_candidate(world)
    now = timezone.now()
    simulation.simulate_bulk(count=30, seed=7, days=60, batch=30, now=now)
    unrouted = Referral.objects.filter(assigned_department__isnull=True)
    assert unrouted.exists()
    assert not unrouted.filter(deadline__isnull=True).exists()
    # none past its deadline is left waiting
    assert not unrouted.filter(state="submitted", deadline__lt=now - timedelta(minutes=2)).exists()


@pytest.mark.parametrize("hours", [0, -5, "72"])
def test_an_unrouted_deadline_below_one_hour_is_a_configuration_error(
    settings: Any, hours: Any
) -> None:
    settings.REFERRAL_UNROUTED_DEADLINE_HOURS = hours
    [error] = checks.unrouted_deadline_check()
    assert error.id == "referrals.E001"
    settings.REFERRAL_UNROUTED_DEADLINE_HOURS = 1
    assert checks.unrouted_deadline_check() == []


# --- the intake's department choice: the list shapes the select, the submit judges --------


def test_a_department_that_left_the_offered_few_since_the_form_is_still_taken(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The select lists routing's best few when the page is shown; by the post the list
    may have moved (the cache's TTL, a registry change). The intake still takes it."""
    _more_hubs(world, 3)
    offered = routing.intake_choices(world.district.pk, per_specialty=5)[world.paeds.pk]
    last = offered[-1].department_id
    client = client_for(world.referrer)
    assert f'<option value="{last}">' in client.get("/referrals/new/").content.decode()
    monkeypatch.setattr("referrals.web.INTAKE_CHOICES_PER_SPECIALTY", 1)  # the list moved

    response = client.post(
        "/referrals/new/", new_referral_form(world, department=str(last), patient_ref="")
    )

    assert response.status_code == 303, response.content.decode()
    assert Referral.objects.get().assigned_department_id == last


def test_a_retry_of_a_sent_form_finds_it_though_its_department_stopped_accepting(
    world: World,
) -> None:
    client = client_for(world.referrer)
    data = new_referral_form(world, department=str(world.hub2_paeds.pk), patient_ref="")
    assert client.post("/referrals/new/", data).status_code == 303
    Department.objects.filter(pk=world.hub2_paeds.pk).update(accepting=False)
    routing.routing_cache_clear()

    again = client.post("/referrals/new/", data)

    assert again.status_code == 303
    assert Referral.objects.count() == 1


def test_a_transfer_only_department_is_offered_and_taken(world: World) -> None:
    hub = Facility.objects.create(
        code="T1", name="Transfer Centre", country=world.country, tier=Tier.CENTRAL
    )
    transfers = Department.objects.create(
        facility=hub,
        specialty=world.paeds,
        name="Paeds transfers",
        offers_async=False,
        offers_transfer=True,
    )
    routing.routing_cache_clear()
    client = client_for(world.referrer)
    assert (
        f'<option value="{transfers.pk}">Paeds transfers — '
        in client.get("/referrals/new/").content.decode()
    )

    response = client.post(
        "/referrals/new/", new_referral_form(world, mode="transfer", department=transfers.pk)
    )

    assert response.status_code == 303, response.content.decode()
    assert Referral.objects.get().assigned_department == transfers


@pytest.mark.parametrize("value", ["999999", "abc", "-1", "99999999999999999999"])
def test_a_tampered_department_is_a_field_error(world: World, value: str) -> None:
    response = client_for(world.referrer).post(
        "/referrals/new/", new_referral_form(world, department=value)
    )
    assert response.status_code == 400
    assert not Referral.objects.exists()
