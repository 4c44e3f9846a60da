"""Notifications: the right people; in-app rows commit with the transition, e-mail after
the commit, exactly once; a lost hand-off is caught by the sweep; in-app list and read."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core import mail
from django.db import transaction
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import User
from accounts.roles import Role
from config.celery import app as celery_app
from referrals import notifications, services
from referrals.models import Notification, Referral, ReferralEvent, ReferralState
from referrals.notifications import AUDIENCES, notify_transition
from referrals.tests.conftest import World
from referrals.workflow import TRANSITIONS


@pytest.fixture
def eager() -> Iterator[None]:
    """Tasks run in-process when queued (the on-commit hook calls ``.delay``)."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def emails(world: World) -> World:
    for user in (world.referrer, world.consultant, world.consultant2, world.ministry_at_hub):
        User.objects.filter(pk=user.pk).update(email=f"{user.username}@example.org")
    return world


def recipients(event: ReferralEvent) -> set[str]:
    return set(
        Notification.objects.filter(event=event).values_list("recipient__username", flat=True)
    )


def last_event(referral: Referral) -> ReferralEvent:
    event = ReferralEvent.objects.filter(referral=referral).order_by("seq").last()
    assert event is not None
    return event


def test_every_action_of_the_table_has_an_audience() -> None:
    assert {t.action for t in TRANSITIONS} <= set(AUDIENCES)


def test_submit_notifies_the_department_in_the_transaction_and_mails_after_commit(
    emails: World, eager: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    world = emails
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        referral = world.submit()
        # The in-app row is written with the event; the e-mail waits for the commit.
        assert Notification.objects.filter(emailed_at__isnull=True).count() == 1
        assert mail.outbox == []
    assert len(callbacks) == 1
    event = last_event(referral)
    assert recipients(event) == {"consultant"}
    assert [m.to for m in mail.outbox] == [["consultant@example.org"]]
    assert referral.filler_id in mail.outbox[0].subject
    # No patient data in the e-mail or the in-app text.
    assert "Fever" not in mail.outbox[0].body
    assert (
        Notification.objects.get().text == f"Referral {referral.filler_id}: submit — now Submitted."
    )


def test_accept_notifies_the_requester_and_the_facilitys_referrers(
    world: World, eager: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    colleague = User.objects.create_user(username="colleague", facility=world.district)
    colleague.groups.add(Group.objects.get_or_create(name=Role.REFERRER.value)[0])
    admin = User.objects.create_user(username="fac-admin", facility=world.district)
    admin.groups.add(Group.objects.get_or_create(name=Role.FACILITY_ADMIN.value)[0])
    referral = world.submit()
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "accept")
    assert recipients(last_event(referral)) == {"referrer", "colleague"}


def test_forward_notifies_the_new_department_and_the_requester(
    world: World, eager: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    referral = world.submit()
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "forward")
    assert recipients(last_event(referral)) == {"consultant2", "referrer"}


def test_schedule_notifies_the_requester_and_the_invited_experts(
    world: World, eager: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    referral = world.referral_in(ReferralState.ACCEPTED)
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "schedule")  # experts: consultant (the actor) and consultant2
    assert recipients(last_event(referral)) == {"referrer", "consultant2"}


def test_running_the_task_twice_notifies_and_mails_exactly_once(emails: World) -> None:
    world = emails
    referral = world.submit()
    event = last_event(referral)
    assert notify_transition.apply(args=(event.pk,)).get() == 1
    assert notify_transition.apply(args=(event.pk,)).get() == 0
    assert notifications.notify_event(event_id=event.pk) == 0
    assert Notification.objects.filter(event=event).count() == 1
    assert len(mail.outbox) == 1


def test_a_rolled_back_transition_notifies_nobody(
    world: World, eager: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    referral = world.submit()
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(Exception, match="Cannot"),
    ):
        services.referral_transition(
            actor=world.consultant,
            referral_id=referral.pk,
            action="advise",
            disposition="manage_locally",
            text="x",
        )
    assert callbacks == []
    # Only the submit's notification exists: the refused advise wrote nothing.
    assert list(Notification.objects.values_list("kind", flat=True)) == ["submit"]
    # A transition applied and then rolled back takes its notifications with it.
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        world.act(referral, "accept")
        assert Notification.objects.filter(kind="accept").exists()
        raise RuntimeError("the caller's transaction fails after the transition")
    assert callbacks == []
    assert list(Notification.objects.values_list("kind", flat=True)) == ["submit"]
    assert Referral.objects.get(pk=referral.pk).state == ReferralState.SUBMITTED


def test_a_broker_outage_does_not_fail_the_committed_transition(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(notify_transition, "delay", down)
    notifications.notify_transition_later(123)  # logs, does not raise


def test_a_lost_hand_off_loses_nothing_the_sweep_mails_it_once(
    emails: World,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    world = emails

    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(notify_transition, "delay", down)
    with django_capture_on_commit_callbacks(execute=True):
        referral = world.submit()
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "accept")
    # The broker was down at both commits: no e-mail, but the in-app rows are there.
    assert mail.outbox == []
    pending = Notification.objects.filter(emailed_at__isnull=True)
    assert sorted(pending.values_list("kind", "recipient__username")) == [
        ("accept", "referrer"),
        ("submit", "consultant"),
    ]
    # Within the grace period the sweep leaves them to the (maybe late) task.
    assert notifications.notification_email_sweep() == 0
    later = timezone.now() + timedelta(minutes=5)
    assert notifications.notification_email_sweep(now=later) == 2
    assert sorted(m.to[0] for m in mail.outbox) == [
        "consultant@example.org",
        "referrer@example.org",
    ]
    assert not Notification.objects.filter(emailed_at__isnull=True).exists()
    # A second sweep, and the late task, send nothing more.
    assert notifications.notification_email_sweep(now=later) == 0
    assert notifications.notify_event(event_id=last_event(referral).pk) == 0
    assert len(mail.outbox) == 2


def test_the_sweep_leaves_old_and_address_less_notifications_in_app_only(
    emails: World,
) -> None:
    world = emails
    referral = world.submit()  # consultant has an address
    User.objects.filter(pk=world.referrer.pk).update(email="")
    world.act(referral, "accept")  # referrer has none now
    assert Notification.objects.count() == 2
    too_late = timezone.now() + timedelta(hours=25)
    assert notifications.notification_email_sweep(now=too_late) == 0
    assert mail.outbox == []
    in_time = timezone.now() + timedelta(minutes=5)
    assert notifications.notification_email_sweep(now=in_time) == 1
    assert [m.to for m in mail.outbox] == [["consultant@example.org"]]
    # The address-less recipient keeps the in-app notice, unsent.
    assert Notification.objects.get(recipient=world.referrer).emailed_at is None


def test_the_task_derives_missing_rows_for_events_written_without_them(
    emails: World,
) -> None:
    world = emails
    referral = world.submit()
    event = last_event(referral)
    Notification.objects.all().delete()  # as for an event from before this change
    assert notifications.notify_event(event_id=event.pk) == 1
    assert recipients(event) == {"consultant"}


def test_missing_event_is_a_no_op(db: None) -> None:
    assert notifications.notify_event(event_id=987654) == 0


def test_in_app_list_is_own_only_with_unread_filter_and_read(world: World) -> None:
    referral = world.submit()
    world.act(referral, "accept")
    world.act(referral, "request_info")
    for event in ReferralEvent.objects.filter(referral=referral):
        notifications.notify_event(event_id=event.pk)
    client = APIClient()
    client.force_authenticate(world.referrer)
    listing = client.get("/api/v1/notifications/").json()
    assert [n["kind"] for n in listing["results"]] == ["request_info", "accept"]
    first = listing["results"][1]
    assert first["filler_id"] == referral.filler_id
    assert client.post(f"/api/v1/notifications/{first['id']}/read/").json()["read_at"]
    unread = client.get("/api/v1/notifications/?unread=true").json()["results"]
    assert [n["kind"] for n in unread] == ["request_info"]
    read = client.get("/api/v1/notifications/?unread=false").json()["results"]
    assert [n["kind"] for n in read] == ["accept"]
    # Someone else's notification is not found, and stays unread.
    theirs = Notification.objects.get(recipient=world.consultant)
    assert client.post(f"/api/v1/notifications/{theirs.pk}/read/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.read_at is None


def test_the_hand_written_audience_equals_the_orm_query(world: World) -> None:
    """``notify_in_transaction`` runs ``_recipients_sql`` (hand-written: compiling the ORM
    query cost ~1 ms of every transition); it must pick exactly whom ``_recipients_query``
    picks, for every action's audience, with and without a department, a requester user
    and an actor, among users in every relation: department staff (one inactive, one a
    ministry official), the facility's referrers and non-referrers, a referrer who is also
    a ministry official, conference experts."""
    from django.db import connection

    from tests.factories import UserFactory

    referral = world.submit()
    inactive = UserFactory.create(facility=world.hub, roles=[Role.CONSULTANT])
    inactive.departments.add(world.hub_paeds)
    User.objects.filter(pk=inactive.pk).update(is_active=False)
    UserFactory.create(facility=world.district, roles=[Role.REFERRER, Role.MINISTRY])
    UserFactory.create(facility=world.district, roles=[Role.CONSULTANT])  # not a referrer
    second_referrer = UserFactory.create(facility=world.district, roles=[Role.REFERRER])
    referral.conference_experts.add(world.consultant2, world.ministry, second_referrer)
    actions = [*notifications.AUDIENCES, "an_action_added_later"]
    compared = 0
    for action in actions:
        for department_id in (world.hub_paeds.pk, world.hub2_paeds.pk, None):
            for requester_id in (world.referrer.pk, None):
                for actor_id in (None, world.referrer.pk, world.consultant.pk, second_referrer.pk):
                    referral.requester_id = requester_id
                    event = ReferralEvent(
                        referral=referral,
                        action=action,
                        department_id=department_id,
                        actor_id=actor_id,
                    )
                    expected = {u.pk for u in notifications._recipients_query(event, referral)}
                    written = notifications._recipients_sql(event, referral)
                    if written is None:
                        found: set[int] = set()
                    else:
                        with connection.cursor() as cursor:
                            cursor.execute(*written)
                            rows = [r[0] for r in cursor.fetchall()]
                        assert len(rows) == len(set(rows))  # each recipient once
                        found = set(rows)
                    assert found == expected, (action, department_id, requester_id, actor_id)
                    compared += bool(expected)
    assert compared > 50  # the cases are not all empty audiences


def test_the_hand_written_expert_audience_follows_the_links_as_the_orm(world: World) -> None:
    """Experts hear of the conference while its data may reach them: at home, or along a
    data-sharing link in effect (allowing identifiable data for an identifiable case).
    The hand-written audience picks whom the ORM picks, link state by link state."""
    from django.db import connection

    from registry.models import Country, Department, Facility, SupportLink, Tier

    lao = Country.objects.create(code="LA", name="Lao PDR")
    referral = world.submit()
    experts = {}
    for n, link in enumerate(
        [
            {"agreement_reference": "DSA-1"},
            {"agreement_reference": "DSA-2", "identifiable_data_allowed": False},
            {"agreement_reference": "DSA-3", "active": False},
            None,
        ]
    ):
        facility = Facility.objects.create(
            code=f"LA{n}", name=f"L{n}", country=lao, tier=Tier.CENTRAL
        )
        department = Department.objects.create(facility=facility, specialty=world.paeds, name="P")
        expert = User.objects.create_user(username=f"lao{n}", password="x", facility=facility)
        expert.departments.add(department)
        experts[n] = expert.pk
        if link is not None:
            SupportLink.objects.create(hub=facility, spoke=world.district, **link)
    referral.conference_experts.add(world.consultant2, *experts.values())
    seen = {}
    for patient_ref in ("", "P-1"):
        referral.patient_ref = patient_ref
        event = ReferralEvent(referral=referral, action="start_conference", actor_id=None)
        expected = {u.pk for u in notifications._recipients_query(event, referral)}
        written = notifications._recipients_sql(event, referral)
        assert written is not None
        with connection.cursor() as cursor:
            cursor.execute(*written)
            found = {r[0] for r in cursor.fetchall()}
        assert found == expected, patient_ref
        seen[patient_ref] = found & {world.consultant2.pk, *experts.values()}
    assert seen[""] == {world.consultant2.pk, experts[0], experts[1]}
    assert seen["P-1"] == {world.consultant2.pk, experts[0]}


def test_an_acknowledgement_is_listed_in_app_and_never_mailed(
    emails: World, eager: None, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    world = emails
    with django_capture_on_commit_callbacks(execute=True):
        referral = world.submit()  # mailed to the department
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "acknowledge")
    event = last_event(referral)
    assert event.action == "acknowledge"
    assert recipients(event) == {"referrer"}
    assert mail.outbox == []
    # Nor by the sweep, however late.
    later = timezone.now() + timedelta(minutes=30)
    assert notifications.notification_email_sweep(now=later) == 0
    assert mail.outbox == []
    # Other actions still mail (the accept that follows).
    with django_capture_on_commit_callbacks(execute=True):
        world.act(referral, "accept")
    assert [m.to for m in mail.outbox] == [["referrer@example.org"]]
