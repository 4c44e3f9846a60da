"""Celery tasks for referrals. The deadline job ``referrals_escalate`` runs every minute
(CELERY_BEAT_SCHEDULE); ``referrals_expire_overdue`` is the older name of its overdue pass,
kept so that a message queued under that name still runs, through the escalation (notify
first, then re-route or expire) like the job."""

from __future__ import annotations

from celery import shared_task

from referrals.escalation import referral_escalate_overdue, referral_reroute_declined
from referrals.load import department_load_prune
from referrals.routing import response_times_refresh


@shared_task(bind=True, max_retries=5, retry_backoff=True, acks_late=True)
def referrals_expire_overdue(self: object) -> int:
    """The deadline job's overdue pass under its old name: it used to expire at once,
    skipping the department's notice and the re-routing. Returns how many expired."""
    return len(referral_escalate_overdue().expired)


@shared_task(bind=True, max_retries=5, retry_backoff=True, acks_late=True)
def referrals_escalate(self: object) -> dict[str, int]:
    """Notify, then re-route or expire overdue referrals; re-route recent declines.
    Safe to run twice, also at the same time (SKIP LOCKED, re-checked under the lock)."""
    result = referral_escalate_overdue()
    return {
        "notified": len(result.notified),
        "rerouted": len(result.rerouted),
        "expired": len(result.expired),
        "routed": len(result.routed),
    }


@shared_task(bind=True, max_retries=5, retry_backoff=True, acks_late=True)
def referrals_reroute_declined(self: object, referral_id: int) -> bool:
    # Safe to run twice: a referral that is no longer declined is skipped.
    return referral_reroute_declined(referral_id=referral_id)


@shared_task(name="referrals.response_times_refresh", ignore_result=True)
def referrals_response_times_refresh() -> int:
    """Routing's median response times (one grouped query over 30 days of events); also
    prunes the load counters of past days."""
    department_load_prune()
    return response_times_refresh()
