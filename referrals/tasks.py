"""Celery tasks for referrals. Not yet in CELERY_BEAT_SCHEDULE (config is the lead's):
add {"referrals-expire-overdue": {"task": "referrals.tasks.referrals_expire_overdue",
"schedule": 60.0}} to wire the deadline job."""

from __future__ import annotations

from celery import shared_task

from referrals.services import referral_expire_overdue


@shared_task(bind=True, max_retries=5, retry_backoff=True, acks_late=True)
def referrals_expire_overdue(self: object) -> int:
    # Safe to run twice: an expired or accepted referral is skipped by the transition check.
    return len(referral_expire_overdue())
