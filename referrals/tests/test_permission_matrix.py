"""Every referral endpoint x every role -> the expected status; refusals change nothing.

Roles (referrals/tests/people.py): the requesting facility's referrer, a referrer of
another facility, a consultant of the assigned department, a consultant of another
department, coordinators of the requester's province and of another province, a ministry
official (attached to the assigned department, the hardest case), an expert invited to the
case conference (guardian grant), and an anonymous caller.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from referrals import attachments
from referrals.models import (
    ActorSide,
    Attachment,
    AuditEntry,
    Notification,
    Referral,
    ReferralEvent,
    ReferralState,
)
from referrals.permissions import referral_experts_grant
from referrals.tests.conftest import World
from referrals.tests.people import ROLES, People, people_around
from referrals.workflow import TRANSITIONS, Transition

PDF = b"%PDF-1.7\n" + b"0" * 200
# Who can see the referral at all (detail, lists of files, downloads, suggestions).
SEES = {"referrer_own", "consultant_assigned", "coordinator_same_province", "invited_expert"}
ACTION_TRANSITIONS = [t for t in TRANSITIONS if t.side != ActorSide.SYSTEM]


@pytest.fixture
def people(world: World) -> People:
    return people_around(world)


def _snapshot(referral_id: int) -> tuple[Any, ...]:
    referral = Referral.objects.get(pk=referral_id)
    return (
        referral.state,
        referral.version,
        referral.assigned_department_id,
        ReferralEvent.objects.filter(referral_id=referral_id).count(),
        Attachment.objects.filter(referral_id=referral_id).count(),
        Referral.objects.count(),
    )


def _prepared(people: People, state: str) -> Referral:
    """A referral in ``state`` whose only explicit grant is the invited expert's."""
    referral = people.world.referral_in(state)
    referral_experts_grant(referral=referral, experts=[people.user("invited_expert")])
    return referral


def _visible_status(role: str, ok: int = 200) -> int:
    if role == "anonymous":
        return 401
    return ok if role in SEES else 404


# --- actions -------------------------------------------------------------------------------


def _source_state(transition: Transition, world: World) -> str:
    reachable = [s for s in sorted(transition.sources) if s in world.paths]
    # Prefer a live state: a terminal one would revoke nothing but is a less useful case.
    return reachable[0]


def _expected_action_status(transition: Transition, role: str, state: str) -> int:
    if role == "anonymous":
        return 401
    # A draft is not its department's until it is sent.
    sees = SEES - {"consultant_assigned"} if state == ReferralState.DRAFT else SEES
    if role not in sees:
        return 404
    if role == "referrer_own" and transition.side == ActorSide.REQUESTER:
        return 200
    if role == "consultant_assigned" and transition.side == ActorSide.ASSIGNEE:
        return 200
    return 403  # sees it, but is not the side that acts (or no acting role)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("transition", ACTION_TRANSITIONS, ids=lambda t: t.action)
def test_action_endpoint(people: People, transition: Transition, role: str) -> None:
    world = people.world
    state = _source_state(transition, world)
    referral = _prepared(people, state)
    before = _snapshot(referral.pk)
    response = people.client(role).post(
        f"/api/v1/referrals/{referral.pk}/{transition.action}/",
        world.inputs_for(transition.action),
        format="json",
    )
    expected = _expected_action_status(transition, role, state)
    assert response.status_code == expected, (response.status_code, response.content)
    after = _snapshot(referral.pk)
    if expected == 200:
        assert after[1] == before[1] + 1
        assert after[0] == transition.target_from(before[0])
    else:
        assert after == before


# --- the other endpoints -------------------------------------------------------------------


@pytest.fixture
def case(people: People) -> Referral:
    """A scheduled conference with one file and one notification for the referrer."""
    referral = _prepared(people, ReferralState.SCHEDULED)
    attachments.attachment_upload(
        actor=people.world.referrer,
        referral_id=referral.pk,
        upload=SimpleUploadedFile("scan.pdf", PDF, content_type="application/pdf"),
    )
    return referral


@pytest.mark.parametrize("role", ROLES)
def test_detail(people: People, case: Referral, role: str) -> None:
    response = people.client(role).get(f"/api/v1/referrals/{case.pk}/")
    assert response.status_code == _visible_status(role)
    if response.status_code == 200:
        assert response.json()["id"] == case.pk


@pytest.mark.parametrize("role", ROLES)
def test_suggestions(people: People, case: Referral, role: str) -> None:
    response = people.client(role).get(f"/api/v1/referrals/{case.pk}/suggestions/")
    assert response.status_code == _visible_status(role)


@pytest.mark.parametrize("role", ROLES)
def test_attachment_list(people: People, case: Referral, role: str) -> None:
    response = people.client(role).get(f"/api/v1/referrals/{case.pk}/attachments/")
    assert response.status_code == _visible_status(role)
    if response.status_code == 200:
        assert [a["original_name"] for a in response.json()] == ["scan.pdf"]


@pytest.mark.parametrize("role", ROLES)
def test_attachment_download(people: People, case: Referral, role: str) -> None:
    attachment = Attachment.objects.get(referral=case)
    response = people.client(role).get(f"/api/v1/referrals/{case.pk}/attachments/{attachment.pk}/")
    assert response.status_code == _visible_status(role)
    if response.status_code == 200:
        assert b"".join(response.streaming_content) == PDF  # type: ignore[attr-defined]


UPLOAD_STATUS = {
    "referrer_own": 201,
    "consultant_assigned": 201,
    "coordinator_same_province": 403,
    "invited_expert": 403,
    "anonymous": 401,
}


@pytest.mark.parametrize("role", ROLES)
def test_attachment_upload(people: People, case: Referral, role: str) -> None:
    before = _snapshot(case.pk)
    response = people.client(role).post(
        f"/api/v1/referrals/{case.pk}/attachments/",
        {"file": SimpleUploadedFile("labs.pdf", PDF, content_type="application/pdf")},
        format="multipart",
    )
    expected = UPLOAD_STATUS.get(role, 404)
    assert response.status_code == expected, response.content
    count = Attachment.objects.filter(referral=case).count()
    assert count == (2 if expected == 201 else 1)
    if expected != 201:
        assert _snapshot(case.pk) == before


SUBMIT_STATUS = {
    "referrer_own": 201,
    "referrer_foreign": 201,  # for their own facility
    "coordinator_same_province": 201,
    "coordinator_other_province": 201,
    "anonymous": 401,
}


@pytest.mark.parametrize("role", ROLES)
def test_submit(people: People, role: str) -> None:
    world = people.world
    before = Referral.objects.count()
    response = people.client(role).post(
        "/api/v1/referrals/",
        {
            "placer_system": "urn:his",
            "placer_value": f"M-{role}",
            "specialty": world.paeds.code,
            "clinical_question": "Fever.",
            "department": world.hub_paeds.pk,
        },
        format="json",
    )
    expected = SUBMIT_STATUS.get(role, 403)
    assert response.status_code == expected, response.content
    assert Referral.objects.count() == before + (1 if expected == 201 else 0)
    if expected == 201:
        created = Referral.objects.get(pk=response.json()["id"])
        assert created.requester_facility_id == people.user(role).facility_id


@pytest.mark.parametrize("role", ROLES)
def test_outgoing(people: People, case: Referral, role: str) -> None:
    response = people.client(role).get("/api/v1/referrals/outgoing/")
    if role == "anonymous":
        assert response.status_code == 401
        return
    assert response.status_code == 200
    ids = [r["id"] for r in response.json()["results"]]
    assert ids == ([case.pk] if role == "referrer_own" else [])


WORKLIST_SEES = {"consultant_assigned", "invited_expert"}


@pytest.mark.parametrize("role", ROLES)
def test_worklist(people: People, case: Referral, role: str) -> None:
    response = people.client(role).get("/api/v1/referrals/worklist/")
    expected = {"anonymous": 401, "ministry": 404}.get(role, 200)
    assert response.status_code == expected
    if expected == 200:
        ids = [r["id"] for r in response.json()["results"]]
        assert ids == ([case.pk] if role in WORKLIST_SEES else [])


@pytest.mark.parametrize("role", ROLES)
def test_notifications(people: People, case: Referral, role: str) -> None:
    event = ReferralEvent.objects.filter(referral=case).last()
    assert event is not None
    # The transitions wrote their own notifications; one known row is enough here.
    Notification.objects.all().delete()
    mine = Notification.objects.create(
        recipient=people.user("referrer_own"), referral=case, event=event, kind="x", text="t"
    )
    client = people.client(role)
    listing = client.get("/api/v1/notifications/")
    read = client.post(f"/api/v1/notifications/{mine.pk}/read/")
    if role == "anonymous":
        assert (listing.status_code, read.status_code) == (401, 401)
    elif role == "referrer_own":
        assert listing.status_code == 200
        assert [n["id"] for n in listing.json()["results"]] == [mine.pk]
        assert read.status_code == 200
    else:
        assert listing.status_code == 200
        assert listing.json()["results"] == []
        assert read.status_code == 404
    mine.refresh_from_db()
    assert (mine.read_at is not None) == (role == "referrer_own")


def test_ministry_never_reaches_patient_data_nor_the_audit_log(
    people: People, case: Referral
) -> None:
    for user in (people.world.ministry, people.world.ministry_at_hub):
        client = people.client("anonymous")
        client.force_authenticate(user)
        assert client.get(f"/api/v1/referrals/{case.pk}/").status_code == 404
        assert client.get(f"/api/v1/referrals/{case.pk}/attachments/").status_code == 404
        assert client.get("/api/v1/referrals/worklist/").status_code == 404
        assert client.get("/api/v1/referrals/outgoing/").json()["results"] == []
    assert not AuditEntry.objects.filter(
        user__in=[people.world.ministry, people.world.ministry_at_hub]
    ).exists()


# --- grants and relationships move with the case -------------------------------------------


def test_schedule_grants_experts_and_reschedule_and_cancel_revoke(people: People) -> None:
    world = people.world
    expert = people.user("invited_expert")
    referral = world.referral_in(ReferralState.ACCEPTED)
    assert not expert.has_perm("referrals.view_referral", referral)
    world.act(referral, "schedule", experts=[expert.pk])
    expert = type(expert).objects.get(pk=expert.pk)  # fresh permission cache
    assert expert.has_perm("referrals.view_referral", referral)
    assert (
        people.client("invited_expert").get(f"/api/v1/referrals/{referral.pk}/").status_code == 200
    )
    # Re-scheduled without them: the grant goes.
    world.act(referral, "schedule", experts=[world.consultant2.pk])
    assert (
        people.client("invited_expert").get(f"/api/v1/referrals/{referral.pk}/").status_code == 404
    )
    consultant2 = people.client("consultant_other")
    assert consultant2.get(f"/api/v1/referrals/{referral.pk}/").status_code == 200
    # The case ends: every grant goes.
    world.act(referral, "cancel")
    assert consultant2.get(f"/api/v1/referrals/{referral.pk}/").status_code == 404


def test_forward_moves_access_to_the_new_department(people: People) -> None:
    world = people.world
    referral = world.referral_in(ReferralState.SUBMITTED)
    url = f"/api/v1/referrals/{referral.pk}/"
    assert people.client("consultant_other").get(url).status_code == 404
    world.act(referral, "forward")
    assert people.client("consultant_other").get(url).status_code == 200
    assert people.client("consultant_assigned").get(url).status_code == 404


def test_coordinator_sees_referrals_assigned_into_their_province(people: People) -> None:
    """The region rule also covers the assigned department's province."""
    world = people.world
    referral = world.referral_in(ReferralState.SUBMITTED)
    hub_coordinator = people.user("coordinator_other_province")
    hub_coordinator.facility = world.hub2  # same province as the assigned hub
    hub_coordinator.save()
    assert (
        people.client("coordinator_other_province")
        .get(f"/api/v1/referrals/{referral.pk}/")
        .status_code
        == 200
    )
