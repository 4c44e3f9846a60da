"""Notifications to the people involved in a referral: in-app list + e-mail.

Flow (nothing is lost when the broker or a process fails):

1. ``services._apply`` writes the ``ReferralEvent`` and, in the same transaction,
   ``notify_in_transaction`` works out the audience from ``AUDIENCES`` and writes one
   ``Notification`` per recipient (unique per recipient and event). The in-app list is
   therefore exactly as durable as the transition: both commit or neither does.
2. After the commit, ``notify_transition_later(event.pk)`` queues the Celery task
   ``referrals.notify_transition(event_id)``, which e-mails the event's notifications not
   yet e-mailed (``emailed_at``; rows locked with SKIP LOCKED, so two concurrent runs never
   send twice).
3. When that hand-off is lost (broker down at commit, process killed before the
   background sender ran, task failed five times), the beat job
   ``referrals.notification_email_sweep`` sends what is still pending and older than
   ``NOTIFICATION_EMAIL_GRACE_SECONDS``, up to ``NOTIFICATION_EMAIL_MAX_AGE_HOURS`` old
   (older notices stay in-app only: a day-old e-mail about a deadline helps nobody).

Delivery of e-mail is at least once: a process killed between the SMTP hand-off and the
``emailed_at`` update sends that one e-mail again.

Texts carry the filler id, the action and the new state only: no patient data goes into
e-mail or the in-app list (the referral itself is behind the scoped getter).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import User
from accounts.roles import Role
from core.dispatch import send_later
from core.errors import NotFound
from core.pagination import Pagination
from core.rows import prepared_cursor
from referrals.models import Notification, Referral, ReferralEvent, ReferralState
from referrals.selectors import referral_reach_departments
from registry.models import Department, Facility, SupportLink

logger = logging.getLogger(__name__)

# Audiences: who hears about each action (the actor never notifies themselves).
#   assignee  = staff of the department assigned after the event (the new one on forward)
#   requester = the user who submitted + the referrers of the requesting facility
#   experts   = the experts invited to the live case conference, while its data may reach
#               them (selectors.referral_reach_departments: their reads end then too)
ASSIGNEE = "assignee"
REQUESTER = "requester"
EXPERTS = "experts"

AUDIENCES: dict[str, tuple[str, ...]] = {
    "submit": (ASSIGNEE,),
    "forward": (ASSIGNEE, REQUESTER),
    # Deadline job: the department is warned first; re-routing tells both sides.
    "escalation_notify": (ASSIGNEE,),
    "reroute": (ASSIGNEE, REQUESTER),
    "expire": (REQUESTER,),
    "acknowledge": (REQUESTER,),
    "accept": (REQUESTER,),
    "decline": (REQUESTER,),
    "request_info": (REQUESTER,),
    "provide_info": (ASSIGNEE,),
    "schedule": (REQUESTER, EXPERTS),
    "start_conference": (REQUESTER, EXPERTS),
    "finish_conference": (REQUESTER, EXPERTS),
    "advise": (REQUESTER,),
    "cancel": (ASSIGNEE, EXPERTS),
    "close_local": (ASSIGNEE,),
    "request_transfer": (ASSIGNEE,),
    "accept_transfer": (REQUESTER,),
    "depart": (ASSIGNEE,),
    "arrive": (REQUESTER,),
    "complete": (REQUESTER,),
    "counter_refer": (REQUESTER,),
}
# Shown in the in-app list only, never e-mailed: an acknowledgement would otherwise mean
# an e-mail per referral to every referrer of the requesting facility.
IN_APP_ONLY: frozenset[str] = frozenset({"acknowledge"})
# An action added to the workflow later and not listed above: tell both sides.
DEFAULT_AUDIENCE: tuple[str, ...] = (ASSIGNEE, REQUESTER)


def audience_for(action: str) -> tuple[str, ...]:
    return AUDIENCES.get(action, DEFAULT_AUDIENCE)


def _tells_assignee(event: ReferralEvent, audience: tuple[str, ...]) -> bool:
    """The department hears of an action when it is in the audience and the referral was
    sent to it: a draft (even one naming its department) is its requester's alone until
    the ``submit`` that sends it."""
    unsent = event.from_state == ReferralState.DRAFT and event.action != "submit"
    return ASSIGNEE in audience and event.department_id is not None and not unsent


def _recipients_query(event: ReferralEvent, referral: Referral | None = None) -> QuerySet[User]:
    referral = referral if referral is not None else event.referral
    audience = audience_for(event.action)
    who = Q(pk__in=[])
    if _tells_assignee(event, audience):
        who |= Q(departments=event.department_id)
    if REQUESTER in audience:
        who |= Q(facility_id=referral.requester_facility_id, groups__name=Role.REFERRER.value)
        if referral.requester_id is not None:
            who |= Q(pk=referral.requester_id)
    if EXPERTS in audience:
        # Only while the case's data may reach them, as their reads (docs/permissions.md)
        reach = referral_reach_departments(referral).values("pk")
        who |= Q(conference_referrals=referral.pk, departments__in=reach)
    recipients = (
        User.objects.filter(who, is_active=True)
        # Ministry officials never receive anything about a single referral.
        .exclude(groups__name=Role.MINISTRY.value)
        .distinct()
    )
    if event.actor_id is not None:
        recipients = recipients.exclude(pk=event.actor_id)
    return recipients


def notification_recipients(event: ReferralEvent) -> list[User]:
    """The audience of ``event`` through the ORM: what ``_recipients_sql`` writes by hand
    (a test holds the two equal)."""
    return list(_recipients_query(event).order_by("pk"))


_USERS = User._meta.db_table
_USER_GROUPS = User.groups.through._meta.db_table
_GROUPS = User.groups.field.related_model._meta.db_table  # type: ignore[union-attr]
_USER_DEPARTMENTS = User.departments.through._meta.db_table
_EXPERTS = Referral.conference_experts.through._meta.db_table
# Names from the models, values bound (S608).
_IN_GROUP = (
    f"EXISTS (SELECT 1 FROM {_USER_GROUPS} ug JOIN {_GROUPS} g ON g.id = ug.group_id "  # noqa: S608
    "WHERE ug.user_id = u.id AND g.name = %s)"
)
_IN_DEPARTMENT = (
    f"EXISTS (SELECT 1 FROM {_USER_DEPARTMENTS} ud "  # noqa: S608
    "WHERE ud.user_id = u.id AND ud.department_id = %s)"
)
_IN_CONFERENCE = (
    f"EXISTS (SELECT 1 FROM {_EXPERTS} ce "  # noqa: S608
    "WHERE ce.user_id = u.id AND ce.referral_id = %s)"
)
_DEPARTMENTS = Department._meta.db_table
_FACILITIES = Facility._meta.db_table
_LINKS = SupportLink._meta.db_table


def _in_reach_sql(referral: Referral) -> tuple[str, list[Any]]:
    """``selectors.referral_reach_departments`` by hand, for the user ``u``: one of their
    departments is at home (the requester's country) or at the hub of a data-sharing
    support link to the requester in effect today (allowing identifiable data when the
    case has a patient reference)."""
    today = connection.ops.adapt_datefield_value(timezone.localdate())
    identifiable = " AND l.identifiable_data_allowed" if referral.patient_ref else ""
    sql = (
        f"EXISTS (SELECT 1 FROM {_USER_DEPARTMENTS} ud JOIN {_DEPARTMENTS} d "  # noqa: S608
        "ON d.id = ud.department_id WHERE ud.user_id = u.id AND ("
        f"d.facility_id IN (SELECT f.id FROM {_FACILITIES} f WHERE f.country_id = "
        f"(SELECT h.country_id FROM {_FACILITIES} h WHERE h.id = %s)) "
        f"OR d.facility_id IN (SELECT l.hub_id FROM {_LINKS} l WHERE l.spoke_id = %s "
        "AND l.active AND l.valid_from <= %s AND (l.valid_to IS NULL OR l.valid_to >= %s) "
        f"AND l.agreement_reference <> ''{identifiable})))"
    )
    facility = referral.requester_facility_id
    return sql, [facility, facility, today, today]


def _recipients_sql(event: ReferralEvent, referral: Referral) -> tuple[str, list[Any]] | None:
    """``_recipients_query`` as hand-written SQL (one EXISTS per way of being in the
    audience, so no DISTINCT): every transition runs it, and compiling the ORM version
    took ~1 ms of a submission's ~9. None: an audience of nobody."""
    audience = audience_for(event.action)
    ways: list[str] = []
    params: list[Any] = []
    if _tells_assignee(event, audience):
        ways.append(_IN_DEPARTMENT)
        params.append(event.department_id)
    if REQUESTER in audience:
        ways.append(f"(u.facility_id = %s AND {_IN_GROUP})")
        params += [referral.requester_facility_id, Role.REFERRER.value]
        if referral.requester_id is not None:
            ways.append("u.id = %s")
            params.append(referral.requester_id)
    if EXPERTS in audience:
        reach, reach_params = _in_reach_sql(referral)
        ways.append(f"({_IN_CONFERENCE} AND {reach})")
        params += [referral.pk, *reach_params]
    if not ways:
        return None
    # Ministry officials never receive anything about a single referral.
    sql = f"SELECT u.id FROM {_USERS} u WHERE ({' OR '.join(ways)}) AND u.is_active AND NOT {_IN_GROUP}"  # noqa: S608 (names from the models, values bound)
    params.append(Role.MINISTRY.value)
    if event.actor_id is not None:
        sql += " AND u.id <> %s"
        params.append(event.actor_id)
    return sql, params


def notification_text(event: ReferralEvent, referral: Referral | None = None) -> str:
    referral = referral if referral is not None else event.referral
    action = event.action.replace("_", " ")
    state = ReferralState(event.to_state).label if event.to_state else event.to_state
    return f"Referral {referral.filler_id}: {action} — now {state}."


def notify_in_transaction(event: ReferralEvent, referral: Referral) -> int:
    """Write the in-app notifications of ``event`` (call inside the transition's
    transaction). Returns how many rows were written; a second call writes none.

    One ``INSERT … SELECT`` over the audience query: no round trip to read the recipients
    and no model instance per row (every transition pays this)."""
    audience = _recipients_sql(event, referral)
    if audience is None:  # an audience of nobody (e.g. no department assigned yet)
        return 0
    recipients, recipient_params = audience
    table = connection.ops.quote_name(Notification._meta.db_table)
    sql = (
        f"INSERT INTO {table} (recipient_id, referral_id, event_id, kind, text, created, "  # noqa: S608 (table from the model, the audience from _recipients_sql, values bound)
        "read_at, emailed_at) "
        f"SELECT r.id, %s, %s, %s, %s, %s, NULL, NULL FROM ({recipients}) r "
        # WHERE: SQLite's parser needs it before ON CONFLICT after a SELECT.
        "WHERE true ON CONFLICT (recipient_id, event_id) DO NOTHING"
    )
    params = [
        referral.pk,
        event.pk,
        event.action,
        notification_text(event, referral),
        connection.ops.adapt_datetimefield_value(event.at),
        *recipient_params,
    ]
    if connection.vendor == "postgresql":
        # Prepared (one per shape of audience and the integer widths psycopg picks for the
        # ids): planning this statement took ~0.5 ms and running it ~0.1 ms, on every
        # transition.
        with prepared_cursor() as cursor:
            cursor.execute(sql, params, prepare=True)
            return max(cursor.rowcount, 0)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return max(cursor.rowcount, 0)


def notify_event(*, event_id: int) -> int:
    """Make sure the notifications of one event exist, and e-mail those not yet e-mailed.
    Safe to run twice and concurrently: returns the number of e-mails sent by this run."""
    try:
        event = ReferralEvent.objects.select_related("referral").get(pk=event_id)
    except ReferralEvent.DoesNotExist:
        logger.warning("notify: no event %s", event_id)
        return 0
    if not Notification.objects.filter(event_id=event.pk).exists():
        # Events written before notifications moved into the transaction, or by a path
        # that bypassed ``services._apply``: derive them now (idempotent).
        notify_in_transaction(event, event.referral)
    return _email_pending(event)


def _email_pending(event: ReferralEvent) -> int:
    if event.action in IN_APP_ONLY:
        return 0
    sent = 0
    with transaction.atomic():
        pending = (
            Notification.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(event=event, emailed_at__isnull=True)
            .exclude(recipient__email="")
            .select_related("recipient")
            .order_by("pk")
        )
        for notification in pending:
            send_mail(
                subject=f"[Consilium] {event.referral.filler_id}: {event.action.replace('_', ' ')}",
                message=f"{notification.text}\n\n/api/v1/referrals/{event.referral_id}/\n",
                from_email=settings.DEFAULT_FROM_EMAIL,
                recipient_list=[notification.recipient.email],
            )
            # Marked one by one: a failure later retries only the rest.
            Notification.objects.filter(pk=notification.pk).update(emailed_at=timezone.now())
            sent += 1
    return sent


@shared_task(
    name="referrals.notify_transition",
    bind=True,
    autoretry_for=(Exception,),
    retry_backoff=True,
    max_retries=5,
    acks_late=True,
)
def notify_transition(self: Any, event_id: int) -> int:
    return notify_event(event_id=event_id)


def _queue_notifications(event_id: int) -> None:
    try:
        notify_transition.delay(event_id)
    except Exception:  # the broker is down; the event stays the record
        logger.exception("could not queue notifications for event %s", event_id)


def notify_transition_later(event_id: int) -> None:
    """Queue the task (called from ``transaction.on_commit``), off the request thread
    (``core.dispatch``: the caller does not wait for the broker). The transition has
    committed already: a broker outage must not turn it into an error for the caller."""
    send_later(_queue_notifications, event_id)


def notification_email_sweep(*, now: datetime | None = None, limit: int = 500) -> int:
    """E-mail the notifications whose after-commit hand-off was lost: pending, with an
    address, older than the grace period and younger than the maximum age. Returns the
    number of e-mails sent."""
    now = now or timezone.now()
    grace = timedelta(seconds=float(getattr(settings, "NOTIFICATION_EMAIL_GRACE_SECONDS", 60)))
    max_age = timedelta(hours=float(getattr(settings, "NOTIFICATION_EMAIL_MAX_AGE_HOURS", 24)))
    event_ids = list(
        Notification.objects.filter(
            emailed_at__isnull=True, created__lte=now - grace, created__gte=now - max_age
        )
        .exclude(recipient__email="")
        .exclude(event__action__in=IN_APP_ONLY)
        .order_by("event_id")
        .values_list("event_id", flat=True)
        .distinct()[:limit]
    )
    sent = 0
    for event in ReferralEvent.objects.filter(pk__in=event_ids).select_related("referral"):
        sent += _email_pending(event)
    if sent:
        logger.info("notification e-mail sweep sent %s", sent, extra={"sent": sent})
    return sent


@shared_task(name="referrals.notification_email_sweep", ignore_result=True)
def notification_email_sweep_task() -> int:
    return notification_email_sweep()


# --- reads and the in-app API ------------------------------------------------------------


def notification_list(user: User, *, unread: bool | None = None) -> QuerySet[Notification]:
    """The user's own notifications, newest first."""
    queryset = Notification.objects.filter(recipient_id=user.pk)
    if unread is True:
        queryset = queryset.filter(read_at__isnull=True)
    elif unread is False:
        queryset = queryset.filter(read_at__isnull=False)
    return queryset.select_related("referral").order_by("-created", "-id")


def notification_mark_read(*, user: User, notification_id: int) -> Notification:
    """Mark one of the user's own notifications read (idempotent: keeps the first time)."""
    try:
        notification = Notification.objects.select_related("referral").get(
            pk=notification_id, recipient_id=user.pk
        )
    except Notification.DoesNotExist as exc:
        raise NotFound("No such notification.") from exc
    if notification.read_at is None:
        notification.read_at = timezone.now()
        notification.save(update_fields=["read_at"])
    return notification


class NotificationSerializer(serializers.ModelSerializer[Notification]):
    filler_id = serializers.CharField(source="referral.filler_id")

    class Meta:
        model = Notification
        fields = ["id", "referral", "filler_id", "kind", "text", "created", "read_at"]


class NotificationQuerySerializer(serializers.Serializer[Any]):
    unread = serializers.BooleanField(required=False, allow_null=True, default=None)


def _user(request: Request) -> User:
    assert isinstance(request.user, User)
    return request.user


class NotificationListApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="notifications_list",
        parameters=[NotificationQuerySerializer],
        responses=NotificationSerializer(many=True),
        description="Your own notifications, newest first; ?unread=true for unread only.",
    )
    def get(self, request: Request) -> Response:
        query = NotificationQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        paginator = Pagination()
        page = paginator.paginate_queryset(
            notification_list(_user(request), unread=query.validated_data.get("unread")),
            request,
            view=self,
        )
        assert page is not None
        return paginator.get_paginated_response(NotificationSerializer(page, many=True).data)


class NotificationReadApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(
        operation_id="notifications_read",
        request=None,
        responses={200: NotificationSerializer, 404: OpenApiResponse(description="not yours")},
    )
    def post(self, request: Request, pk: int) -> Response:
        notification = notification_mark_read(user=_user(request), notification_id=pk)
        return Response(NotificationSerializer(notification).data)
