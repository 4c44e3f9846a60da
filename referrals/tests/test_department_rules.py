"""Rules the REST API and web UI must keep as routing and the intake do (review findings):
a draft is its requester's alone; sending a draft or forwarding a case re-checks the
department as the intake would; a conference time has its time zone; invited experts are
consultants of the specialty."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import User
from accounts.roles import Role
from core.errors import ApplicationError, Conflict
from referrals import services
from referrals.models import Message, Notification, Referral, ReferralEvent, ReferralState
from referrals.selectors import (
    referral_expert_candidates,
    referral_scope_filter,
    referral_scope_sql,
)
from referrals.tests.conftest import World, _user
from registry.models import Country, Department, Facility, Specialty, Tier

pytestmark = pytest.mark.django_db


def api(user: User) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def web(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- a draft is its requester's alone --------------------------------------------------


def test_a_draft_is_not_shown_to_the_department_it_names(world: World) -> None:
    draft = world.submit(draft=True)
    assert draft.state == ReferralState.DRAFT and draft.assigned_department == world.hub_paeds
    assert api(world.consultant).get(f"/api/v1/referrals/{draft.pk}/").status_code == 404
    assert web(world.consultant).get(f"/referrals/{draft.pk}/").status_code == 404
    # ... nor to anyone through the hand-written scope (the FHIR searches)
    scope = referral_scope_filter(world.consultant)
    assert scope is not None and not Referral.objects.filter(scope, pk=draft.pk).exists()
    sql, params = referral_scope_sql(world.consultant, "r")
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM {Referral._meta.db_table} r WHERE r.id = %s AND {sql}",  # noqa: S608
            [draft.pk, *params],
        )
        assert cursor.fetchone()[0] == 0
    # The requester sees it; once sent, the department does
    assert api(world.referrer).get(f"/api/v1/referrals/{draft.pk}/").status_code == 200
    world.act(draft, "submit")
    assert api(world.consultant).get(f"/api/v1/referrals/{draft.pk}/").status_code == 200


def test_the_department_cannot_post_on_an_unsent_draft(world: World) -> None:
    draft = world.submit(draft=True)
    response = web(world.consultant).post(f"/referrals/{draft.pk}/messages/", {"text": "seen"})
    assert response.status_code == 404
    assert not Message.objects.filter(referral=draft).exists()


def test_cancelling_a_draft_tells_the_department_nothing(world: World) -> None:
    draft = world.submit(draft=True)
    services.referral_transition(
        actor=world.referrer, referral_id=draft.pk, action="cancel", reason="changed my mind"
    )
    assert not Notification.objects.filter(recipient=world.consultant).exists()


def test_sending_a_draft_tells_the_department(world: World) -> None:
    draft = world.submit(draft=True)
    world.act(draft, "submit")
    assert Notification.objects.filter(recipient=world.consultant).exists()


# --- sending a draft and forwarding re-check the department -----------------------------


def test_a_draft_is_not_sent_to_a_department_that_stopped_accepting(world: World) -> None:
    draft = world.submit(draft=True)
    Department.objects.filter(pk=world.hub_paeds.pk).update(accepting=False)
    events = ReferralEvent.objects.count()
    response = api(world.referrer).post(f"/api/v1/referrals/{draft.pk}/submit/", {}, format="json")
    assert response.status_code == 409, response.json()
    draft.refresh_from_db()
    assert draft.state == ReferralState.DRAFT
    assert ReferralEvent.objects.count() == events


def _abroad(world: World) -> Department:
    facility = Facility.objects.create(
        code="KH1",
        name="Foreign Central Hospital",
        country=Country.objects.create(code="KH", name="Cambodia"),
        tier=Tier.CENTRAL,
    )
    return Department.objects.create(facility=facility, specialty=world.paeds, name="Paeds KH")


def test_a_forward_across_a_border_without_an_agreement_is_refused(world: World) -> None:
    referral = world.submit(patient_ref="P-4711")  # identifiable
    foreign = _abroad(world)
    with pytest.raises(ApplicationError):  # the intake refuses this department
        world.submit(department=foreign, patient_ref="P-4712")
    events = ReferralEvent.objects.count()
    response = api(world.consultant).post(
        f"/api/v1/referrals/{referral.pk}/forward/",
        {"department": foreign.pk, "reason": "they have a bed"},
        format="json",
    )
    assert response.status_code == 409, response.json()
    referral.refresh_from_db()
    assert referral.assigned_department_id == world.hub_paeds.pk
    assert ReferralEvent.objects.count() == events


def test_a_forward_to_another_specialty_follows_that_specialtys_rules(world: World) -> None:
    referral = world.submit()
    derm = Specialty.objects.create(code="394582007", display="Dermatology")
    # Not to a department the district could not refer to (its own tier, no support link)
    peer = Facility.objects.create(
        code="DX9", name="Peer district", country=world.district.country, tier=world.district.tier
    )
    peer_derm = Department.objects.create(facility=peer, specialty=derm, name="Derm DX9")
    events = ReferralEvent.objects.count()
    with pytest.raises(Conflict):
        services.referral_transition(
            actor=world.consultant,
            referral_id=referral.pk,
            action="forward",
            department=peer_derm.pk,
            reason="closer",
        )
    referral.refresh_from_db()
    assert referral.assigned_department_id == world.hub_paeds.pk
    assert ReferralEvent.objects.count() == events
    # A case sent to the wrong specialty may go to the right one: hub2 (a higher tier than
    # the district) has dermatology, a candidate for a dermatology referral
    hub_derm = Department.objects.create(facility=world.hub2, specialty=derm, name="Derm P1")
    services.referral_transition(
        actor=User.objects.get(pk=world.consultant.pk),
        referral_id=referral.pk,
        action="forward",
        department=hub_derm.pk,
        reason="wrong desk",
    )
    referral.refresh_from_db()
    assert referral.assigned_department_id == hub_derm.pk


def test_a_forward_to_a_candidate_still_works(world: World) -> None:
    referral = world.submit()
    world.act(referral, "forward")  # the world's forward: to hub2's paediatrics
    referral.refresh_from_db()
    assert referral.assigned_department_id == world.hub2_paeds.pk


def test_the_web_forward_form_offers_only_what_the_forward_would_take(world: World) -> None:
    referral = world.submit(patient_ref="P-4711")  # identifiable, at hub's paediatrics
    foreign = _abroad(world)  # across a border, no agreement
    peer = Facility.objects.create(
        code="DX9", name="Peer district", country=world.district.country, tier=world.district.tier
    )
    peer_paeds = Department.objects.create(facility=peer, specialty=world.paeds, name="Paeds DX9")
    closed = Department.objects.create(
        facility=Facility.objects.create(
            code="C9", name="Closed hub", country=world.country, tier=Tier.CENTRAL
        ),
        specialty=world.paeds,
        name="Paeds C9",
        accepting=False,
    )
    body = web(world.consultant).get(f"/referrals/{referral.pk}/").content.decode()
    select = body[body.index('<select name="forward-department"') :]
    select = select[: select.index("</select>")]
    assert f'<option value="{world.hub2_paeds.pk}">' in select  # a candidate
    for refused in (foreign, peer_paeds, closed, world.hub_paeds, world.district_paeds):
        assert f'<option value="{refused.pk}">' not in select, refused.name
    # and each of those the form leaves out, the forward itself refuses
    for refused in (foreign, peer_paeds, closed):
        with pytest.raises(Conflict):
            services.referral_transition(
                actor=User.objects.get(pk=world.consultant.pk),
                referral_id=referral.pk,
                action="forward",
                department=refused.pk,
                reason="x",
            )


# --- a conference time has its zone; experts are consultants of the specialty -----------


def _schedule(world: World, referral: Referral, **changes: object) -> object:
    data = {
        "scheduled_at": "2031-01-01T10:00:00Z",
        "experts": [world.consultant2.pk],
        "video_url": "https://meet.example.org/x",
        **changes,
    }
    return api(world.consultant).post(
        f"/api/v1/referrals/{referral.pk}/schedule/", data, format="json"
    )


@pytest.mark.parametrize("when", ["2031-01-01T10:00:00", "2031-01-01 10:00"])
def test_a_conference_time_without_a_zone_is_refused(world: World, when: str) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    response = _schedule(world, referral, scheduled_at=when)
    assert response.status_code == 400, response.json()  # type: ignore[attr-defined]
    referral.refresh_from_db()
    assert referral.state == ReferralState.ACCEPTED
    ok = _schedule(world, referral, scheduled_at="2031-01-01T10:00:00+07:00")
    assert ok.status_code == 200, ok.json()  # type: ignore[attr-defined]


def test_experts_are_consultants_of_the_specialty(world: World) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    referral.patient_ref = "P-99"
    referral.save(update_fields=["patient_ref"])
    response = _schedule(world, referral, experts=[world.foreign_referrer.pk])
    assert response.status_code == 409, response.json()  # type: ignore[attr-defined]
    referral.refresh_from_db()
    assert referral.state == ReferralState.ACCEPTED
    assert not referral.conference_experts.exists()
    assert api(world.foreign_referrer).get(f"/api/v1/referrals/{referral.pk}/").status_code == 404


def test_after_a_forward_to_another_specialty_its_consultants_may_be_experts(
    world: World,
) -> None:
    """The department a case was forwarded to (another specialty: the right desk) could
    not invite its own consultants: experts were checked against the specialty the
    requester first asked for (found by an integrator)."""
    referral = world.submit()
    derm = Specialty.objects.create(code="394582007", display="Dermatology")
    hub_derm = Department.objects.create(
        facility=world.hub2, specialty=derm, name="Derm P1", offers_live=True
    )
    derm_consultant = _user("derm", Role.CONSULTANT, world.hub2, hub_derm)
    derm_colleague = _user("derm2", Role.CONSULTANT, world.hub2, hub_derm)
    services.referral_transition(
        actor=world.consultant,
        referral_id=referral.pk,
        action="forward",
        department=hub_derm.pk,
        reason="wrong desk",
    )
    services.referral_transition(actor=derm_consultant, referral_id=referral.pk, action="accept")

    response = api(derm_consultant).post(
        f"/api/v1/referrals/{referral.pk}/schedule/",
        {
            "scheduled_at": "2031-01-01T10:00:00Z",
            "experts": [derm_colleague.pk],
            "video_url": "https://meet.example.org/x",
        },
        format="json",
    )

    assert response.status_code == 200, response.json()
    referral.refresh_from_db()
    assert referral.state == ReferralState.SCHEDULED
    assert list(referral.conference_experts.all()) == [derm_colleague]
    # Someone of neither specialty still may not be invited
    assert set(referral_expert_candidates(referral)) >= {derm_colleague, world.consultant2}
    assert world.referrer not in set(referral_expert_candidates(referral))


@pytest.mark.parametrize(
    ("link", "identifiable", "invited"),
    [
        (None, True, False),  # abroad, no link: never
        (None, False, False),
        ({"agreement_reference": "DSA-1"}, True, True),  # a data-sharing agreement
        ({"agreement_reference": "DSA-1", "identifiable_data_allowed": False}, True, False),
        ({"agreement_reference": "DSA-1", "identifiable_data_allowed": False}, False, True),
        ({"agreement_reference": "DSA-1", "active": False}, True, False),
    ],
)
def test_an_expert_abroad_is_invited_only_where_routing_may_send_the_data(
    world: World, link: dict[str, object] | None, identifiable: bool, invited: bool
) -> None:
    """A forward to a department abroad needs a support link with a data-sharing agreement
    (and one allowing identifiable data for an identifiable case); inviting that
    department's consultant as an expert granted the same case without either."""
    from registry.models import SupportLink

    abroad = Facility.objects.create(
        code="LA1",
        name="Mahosot Hospital",
        country=Country.objects.create(code="LA", name="Lao PDR"),
        tier=Tier.CENTRAL,
    )
    lao_paeds = Department.objects.create(facility=abroad, specialty=world.paeds, name="Paeds LA1")
    expert = _user("lao-expert", Role.CONSULTANT, abroad, lao_paeds)
    if link is not None:
        SupportLink.objects.create(hub=abroad, spoke=world.district, **link)
    referral = world.referral_in(ReferralState.ACCEPTED)
    Referral.objects.filter(pk=referral.pk).update(patient_ref="P-99" if identifiable else "")
    before = (referral.version, ReferralEvent.objects.filter(referral=referral).count())

    response = _schedule(world, referral, experts=[expert.pk])

    referral.refresh_from_db()
    if invited:
        assert response.status_code == 200, response.json()  # type: ignore[attr-defined]
        assert list(referral.conference_experts.all()) == [expert]
        assert api(expert).get(f"/api/v1/referrals/{referral.pk}/").status_code == 200
        return
    assert response.status_code == 409, response.json()  # type: ignore[attr-defined]
    assert response.json()["code"] == "guard_failed"  # type: ignore[attr-defined]
    assert referral.state == ReferralState.ACCEPTED
    assert (referral.version, ReferralEvent.objects.filter(referral=referral).count()) == before
    assert not referral.conference_experts.exists()
    assert expert not in set(referral_expert_candidates(referral))
    assert api(expert).get(f"/api/v1/referrals/{referral.pk}/").status_code == 404


# --- an expert's access rests on the link that let the data reach them ------------------


def _read_everywhere(expert: User, referral: Referral) -> dict[str, int]:
    """The expert's reads of the case: REST detail, files, worklist; FHIR read, vread,
    history and search (a match counted as 200)."""
    from accounts.services import api_token_issue

    rest = api(expert)
    fhir = Client(HTTP_AUTHORIZATION=f"Bearer {api_token_issue(user=expert, name='t').raw}")
    task = f"/fhir/Task/{referral.filler_id}"
    worklist = rest.get("/api/v1/referrals/worklist/").json()["results"]
    search = fhir.get(f"/fhir/Task?_id={referral.filler_id}").json()
    return {
        "api detail": rest.get(f"/api/v1/referrals/{referral.pk}/").status_code,
        "api attachments": rest.get(f"/api/v1/referrals/{referral.pk}/attachments/").status_code,
        "api worklist": 200 if referral.pk in [r["id"] for r in worklist] else 404,
        "fhir read": fhir.get(task).status_code,
        "fhir ServiceRequest": fhir.get(f"/fhir/ServiceRequest/{referral.filler_id}").status_code,
        "fhir vread": fhir.get(f"{task}/_history/1").status_code,
        "fhir history": fhir.get(f"{task}/_history").status_code,
        "fhir search": 200 if search.get("total") else 404,
    }


@pytest.mark.parametrize("ending", ["deactivated", "expired", "identifiable_withdrawn", "deleted"])
def test_an_expert_invited_through_a_support_link_loses_the_case_when_the_link_ends(
    world: World, ending: str
) -> None:
    """An expert abroad may be invited only along a data-sharing support link (the border
    rule above); the invitation kept its access until the case ended, whatever became of
    the link. The grant now counts only while the link still lets the data go there,
    checked at each read: when the link ends, every read of the case by the expert, REST
    and FHIR, is 404, and the refused reads change and record nothing."""
    from datetime import timedelta

    from django.utils import timezone

    from referrals.models import AuditEntry
    from registry.models import SupportLink

    abroad = Facility.objects.create(
        code="LA1",
        name="Mahosot Hospital",
        country=Country.objects.create(code="LA", name="Lao PDR"),
        tier=Tier.CENTRAL,
    )
    lao_paeds = Department.objects.create(facility=abroad, specialty=world.paeds, name="Paeds LA1")
    expert = _user("lao-expert", Role.CONSULTANT, abroad, lao_paeds)
    steward = _user("steward", Role.REGISTRY_STEWARD, None)
    today = timezone.localdate()
    link = SupportLink.objects.create(
        hub=abroad,
        spoke=world.district,
        agreement_reference="DSA-1",
        valid_from=today - timedelta(days=30),
    )
    referral = world.referral_in(ReferralState.ACCEPTED)
    Referral.objects.filter(pk=referral.pk).update(patient_ref="P-99")
    assert _schedule(world, referral, experts=[expert.pk]).status_code == 200  # type: ignore[attr-defined]
    referral.refresh_from_db()
    assert set(_read_everywhere(expert, referral).values()) == {200}

    links = f"/api/v1/support-links/{link.pk}/"
    if ending == "deactivated":
        assert api(steward).patch(links, {"active": False}, format="json").status_code == 200
    elif ending == "identifiable_withdrawn":  # the case carries a patient reference
        change = {"identifiable_data_allowed": False}
        assert api(steward).patch(links, change, format="json").status_code == 200
    elif ending == "expired":  # its last day passed: nothing saves the link or the grant
        SupportLink.objects.filter(pk=link.pk).update(valid_to=today - timedelta(days=1))
    else:
        link.delete()  # as the admin deletes it
    before = (
        referral.state,
        referral.version,
        ReferralEvent.objects.filter(referral=referral).count(),
        AuditEntry.objects.count(),
        list(referral.conference_experts.all()),
    )

    reads = _read_everywhere(expert, referral)

    assert set(reads.values()) == {404}, reads
    referral.refresh_from_db()
    assert (
        referral.state,
        referral.version,
        ReferralEvent.objects.filter(referral=referral).count(),
        AuditEntry.objects.count(),
        list(referral.conference_experts.all()),
    ) == before
    # the department and the requester read on (their access is no grant)
    assert api(world.consultant).get(f"/api/v1/referrals/{referral.pk}/").status_code == 200
    assert api(world.referrer).get(f"/api/v1/referrals/{referral.pk}/").status_code == 200
    if ending == "deactivated":  # the agreement in force again: the invitation counts again
        assert api(steward).patch(links, {"active": True}, format="json").status_code == 200
        assert set(_read_everywhere(expert, referral).values()) == {200}


def test_an_expert_at_home_keeps_the_case_whatever_becomes_of_a_link(world: World) -> None:
    """At home no link carries the data: deactivating the district's links changes
    nothing for an invited expert of the same country."""
    from registry.models import SupportLink

    referral = world.referral_in(ReferralState.ACCEPTED)
    assert api(world.consultant2).get(f"/api/v1/referrals/{referral.pk}/").status_code == 404
    invited = _schedule(world, referral)  # consultant2 (hub2)
    assert invited.status_code == 200  # type: ignore[attr-defined]
    SupportLink.objects.update(active=False)
    assert api(world.consultant2).get(f"/api/v1/referrals/{referral.pk}/").status_code == 200


def test_an_expert_whose_link_ended_hears_no_more_of_the_conference(world: World) -> None:
    """Notifications follow the same rule as reads: once the support link that let the
    case reach an expert abroad is deactivated, starting the conference tells the
    requester but no longer the expert (their reads are 404 by then)."""
    from datetime import timedelta

    from django.utils import timezone

    from registry.models import SupportLink

    abroad = Facility.objects.create(
        code="LA1",
        name="Mahosot Hospital",
        country=Country.objects.create(code="LA", name="Lao PDR"),
        tier=Tier.CENTRAL,
    )
    lao_paeds = Department.objects.create(facility=abroad, specialty=world.paeds, name="Paeds LA1")
    expert = _user("lao-expert", Role.CONSULTANT, abroad, lao_paeds)
    link = SupportLink.objects.create(
        hub=abroad,
        spoke=world.district,
        agreement_reference="DSA-1",
        valid_from=timezone.localdate() - timedelta(days=30),
    )
    referral = world.referral_in(ReferralState.ACCEPTED)
    invited = _schedule(world, referral, experts=[expert.pk, world.consultant2.pk])
    assert invited.status_code == 200  # type: ignore[attr-defined]
    assert Notification.objects.filter(recipient=expert, kind="schedule").exists()

    SupportLink.objects.filter(pk=link.pk).update(active=False)
    world.act(referral, "start_conference")

    told = set(
        Notification.objects.filter(referral=referral, kind="start_conference").values_list(
            "recipient__username", flat=True
        )
    )
    assert "lao-expert" not in told
    assert {"consultant2", "referrer"} <= told  # the expert at home and the requester
