"""Retention of the outbox, the pull feed and intake jobs: what is finished and old enough goes.

``retention_prune`` is beat's hourly job (task ``fhir_gateway.retention_prune``). It
alternates batches of ``delivery.outbox_prune`` (delivered messages older than
``FHIR_OUTBOX_RETENTION_DAYS``) and ``feed.feed_prune`` (numbered feed events older than
``FHIR_FEED_RETENTION_DAYS``, after numbering every unnumbered row), each batch its own
short transaction of at most ``batch_size`` rows, until both are done or ``max_seconds``
passed (checked between batches: one run does not hold a worker slot for long, the next
hour's run goes on). A retention of 0 days or less keeps that table forever. Finished
asynchronous intake jobs (``intake.intake_prune``) go ``FHIR_INTAKE_RETENTION_DAYS`` after
they finished. Records of applied Task updates (``AppliedUpdate``, which answer the retry
of an update whose answer was lost as the first was;
``referral_resources.applied_update_prune``) go ``FHIR_UPDATE_REPLAY_DAYS`` after the
update; a retry after that gets what any request gets (docs/fhir.md).

Never deleted: outbox messages that are pending, in flight or failed (work to do), and
dead ones (they hold their aggregate until a person retries them; see docs/fhir.md); intake
jobs still pending; conditional-create keys (``CreateKey``): they are what keeps a
resubmission from making a message or a file twice, however late it comes (docs/fhir.md,
*Conditional create*).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from fhir_gateway.delivery import outbox_prune
from fhir_gateway.feed import feed_number_all, feed_prune
from fhir_gateway.intake import intake_prune
from fhir_gateway.intake import retention_days as intake_retention_days
from fhir_gateway.referral_resources import applied_update_prune, update_replay_days

BATCH_SIZE = 5000


def outbox_retention_days() -> int:
    return int(getattr(settings, "FHIR_OUTBOX_RETENTION_DAYS", 30))


def feed_retention_days() -> int:
    return int(getattr(settings, "FHIR_FEED_RETENTION_DAYS", 30))


@dataclass
class RetentionReport:
    outbox_deleted: int = 0
    feed_numbered: int = 0
    feed_deleted: int = 0
    intake_deleted: int = 0
    applied_updates_deleted: int = 0
    batches: int = 0
    finished: bool = False  # False: the time budget ran out first


def _cutoff(now: datetime, days: int) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


def retention_prune(
    *,
    batch_size: int = BATCH_SIZE,
    max_seconds: float | None = None,
    now: datetime | None = None,
) -> RetentionReport:
    """Prune the outbox, the feed, intake jobs and applied-update records together, in
    bounded batches (see the module)."""
    now = now or timezone.now()
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    outbox_before = _cutoff(now, outbox_retention_days())
    feed_before = _cutoff(now, feed_retention_days())
    intake_before = _cutoff(now, intake_retention_days())
    updates_before = _cutoff(now, update_replay_days())
    report = RetentionReport()
    if feed_before is not None:
        report.feed_numbered = feed_number_all()
    outbox_done = outbox_before is None
    feed_done = feed_before is None
    intake_done = intake_before is None
    updates_done = updates_before is None
    while not (outbox_done and feed_done and intake_done and updates_done):
        if outbox_before is not None and not outbox_done:
            deleted = outbox_prune(before=outbox_before, limit=batch_size)
            report.outbox_deleted += deleted
            report.batches += 1
            outbox_done = deleted < batch_size
        if feed_before is not None and not feed_done:
            deleted = feed_prune(before=feed_before, limit=batch_size)
            report.feed_deleted += deleted
            report.batches += 1
            feed_done = deleted < batch_size
        if intake_before is not None and not intake_done:
            deleted = intake_prune(before=intake_before, limit=batch_size)
            report.intake_deleted += deleted
            report.batches += 1
            intake_done = deleted < batch_size
        if updates_before is not None and not updates_done:
            deleted = applied_update_prune(before=updates_before, limit=batch_size)
            report.applied_updates_deleted += deleted
            report.batches += 1
            updates_done = deleted < batch_size
        if deadline is not None and time.monotonic() >= deadline:
            break
    report.finished = outbox_done and feed_done and intake_done and updates_done
    return report
