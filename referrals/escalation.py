"""Deadlines and re-routing: the job that keeps every referral moving.

Every minute (Celery beat, ``referrals.tasks.referrals_escalate``):

1. a ``submitted`` referral past its deadline gets an ``escalation_notify`` event (the state
   does not change; the notifications hook tells the department);
2. when ``REFERRAL_ESCALATION_GRACE_MINUTES`` have passed since that notice, the system
   ``reroute``s it to the next routing candidate (departments already tried are excluded),
   or ``expire``s it when none is left or ``REFERRAL_ESCALATION_AUTO_FORWARD`` is off;
3. a ``declined`` referral is offered to the next candidate the same way (``reroute``), right
   after the decline commits (a task) and, as a safety net, by this job for declines of the
   last ``REFERRAL_DECLINE_REROUTE_WINDOW_MINUTES``; with no candidate it stays declined.
   ``REFERRAL_DECLINE_AUTO_REROUTE`` off keeps declines final;
4. a ``submitted`` referral routing could not place at intake (no candidate then) is tried
   again, the nearest deadline first, until that deadline
   (``REFERRAL_UNROUTED_DEADLINE_HOURS``, capped by its priority); then it expires, and the
   requester is told.

Each referral is handled in its own transaction under ``SELECT ... FOR UPDATE SKIP LOCKED``
and re-checked after locking, so two runs at once never act twice on one referral, and a
consultant accepting at that moment wins cleanly (the job skips the row).
All functions take ``now`` so tests control time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from referrals.models import Referral, ReferralEvent, ReferralState
from referrals.routing import ASSIGNING_ACTIONS, best_department
from referrals.services import referral_system_transition
from registry.models import Department

logger = logging.getLogger(__name__)
S = ReferralState
# The reason of a reroute that places a referral routing could not place at intake.
ROUTED_LATE = "Routed when a candidate became available."


@dataclass
class EscalationResult:
    notified: list[int] = field(default_factory=list)
    rerouted: list[int] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)
    routed: list[int] = field(default_factory=list)


def _grace() -> timedelta:
    return timedelta(minutes=settings.REFERRAL_ESCALATION_GRACE_MINUTES)


def _locked(referral_id: int, **conditions: object) -> Referral | None:
    """The referral, locked, if it still meets ``conditions``; None when another worker
    holds it or it moved on."""
    return (
        Referral.objects.select_for_update(skip_locked=True)
        .filter(pk=referral_id, **conditions)
        .first()
    )


def _reroute(referral: Referral, *, now: datetime, why: str) -> bool:
    """Hand a locked referral to the best remaining candidate. False when none is left."""
    best = best_department(referral, now=now)
    if best is None:
        return False
    referral_system_transition(
        referral=referral,
        action="reroute",
        now=now,
        department=Department.objects.get(pk=best.department_id),
        reason=why,
        routing=best.as_payload(),
    )
    return True


def referral_escalate_one(*, referral_id: int, now: datetime) -> str | None:
    """Escalate one overdue ``submitted`` referral: 'notified', 'rerouted', 'expired' or
    None (nothing due, or someone else holds it)."""
    with transaction.atomic():
        referral = _locked(referral_id, state=S.SUBMITTED, deadline__lte=now)
        if referral is None:
            return None
        if referral.assigned_department_id is None:
            # Routing found no department since intake: no one to notify; a last try, or
            # it expires and the requester is told (it must not wait unseen for ever).
            if _reroute(referral, now=now, why=ROUTED_LATE):
                return "rerouted"
            referral_system_transition(referral=referral, action="expire", now=now)
            return "expired"
        # The last notice or assignment (an acknowledgement in between changes neither).
        last = (
            ReferralEvent.objects.filter(
                referral_id=referral.pk, action__in=("escalation_notify", *ASSIGNING_ACTIONS)
            )
            .order_by("-seq")
            .values_list("action", "at")
            .first()
        )
        if last is None or last[0] != "escalation_notify":
            referral_system_transition(referral=referral, action="escalation_notify", now=now)
            return "notified"
        # The department gets the full grace after the notice, even if the job was late.
        if last[1] + _grace() > now:
            return None
        if settings.REFERRAL_ESCALATION_AUTO_FORWARD and _reroute(
            referral, now=now, why="Not accepted by the deadline: routed to the next candidate."
        ):
            return "rerouted"
        referral_system_transition(referral=referral, action="expire", now=now)
        return "expired"


def referral_reroute_declined(*, referral_id: int, now: datetime | None = None) -> bool:
    """Offer a declined referral to the next candidate; False when it stays declined."""
    now = now or timezone.now()
    if not settings.REFERRAL_DECLINE_AUTO_REROUTE:
        return False
    with transaction.atomic():
        referral = _locked(referral_id, state=S.DECLINED)
        if referral is None:
            return False
        return _reroute(referral, now=now, why="Declined: routed to the next candidate.")


def referral_route_unassigned(*, referral_id: int, now: datetime | None = None) -> bool:
    """Route a submitted referral that had no candidate at intake."""
    now = now or timezone.now()
    with transaction.atomic():
        referral = _locked(referral_id, state=S.SUBMITTED, assigned_department__isnull=True)
        if referral is None:
            return False
        return _reroute(referral, now=now, why=ROUTED_LATE)


def reroute_declined_later(referral_id: int) -> None:
    """After a decline commits: queue the re-routing (the job's sweep is the safety net)."""
    if not settings.REFERRAL_DECLINE_AUTO_REROUTE:
        return
    from referrals.tasks import referrals_reroute_declined

    try:
        referrals_reroute_declined.delay(referral_id)
    except Exception:  # noqa: BLE001 - broker down: the next sweep picks it up
        logger.warning("could not queue the re-routing of referral %s", referral_id)


def referral_escalate_overdue(*, now: datetime | None = None, limit: int = 500) -> EscalationResult:
    """One run of the deadline job (safe to run twice, also concurrently)."""
    now = now or timezone.now()
    result = EscalationResult()
    overdue = Referral.objects.filter(state=S.SUBMITTED, deadline__lte=now).order_by("deadline")
    for referral_id in overdue.values_list("pk", flat=True)[:limit]:
        outcome = referral_escalate_one(referral_id=referral_id, now=now)
        if outcome is not None:
            getattr(result, outcome).append(referral_id)

    if settings.REFERRAL_DECLINE_AUTO_REROUTE:
        window = timedelta(minutes=settings.REFERRAL_DECLINE_REROUTE_WINDOW_MINUTES)
        declined = Referral.objects.filter(state=S.DECLINED, updated_at__gte=now - window).order_by(
            "updated_at"
        )
        for referral_id in declined.values_list("pk", flat=True)[:limit]:
            if referral_reroute_declined(referral_id=referral_id, now=now):
                result.rerouted.append(referral_id)

    unassigned = Referral.objects.filter(
        state=S.SUBMITTED, assigned_department__isnull=True
    ).order_by("deadline", "pk")
    for referral_id in unassigned.values_list("pk", flat=True)[:limit]:
        if referral_route_unassigned(referral_id=referral_id, now=now):
            result.routed.append(referral_id)
    return result
