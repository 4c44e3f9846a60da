"""Celery tasks of the gateway: they take ids, call one service and are safe to run twice."""

from __future__ import annotations

from celery import shared_task

from fhir_gateway.delivery import outbox_deliver, outbox_drain
from fhir_gateway.intake import intake_drain
from fhir_gateway.registry_projection import project_registry_incremental
from fhir_gateway.retention import retention_prune

# One beat run of the drain stops starting batches after this long, so it ends before the
# next one is due (config/settings/base.py schedules it every 10 s).
DRAIN_BEAT_SECONDS = 8.0
# One hourly retention run stops starting batches after this long (the next run goes on).
RETENTION_BEAT_SECONDS = 120.0


@shared_task(name="fhir_gateway.deliver_outbox", ignore_result=True)
def deliver_outbox(message_id: int) -> str:
    """The on-commit hand-off: one message, right after its change committed (each
    delivery schedules the next of its aggregate). Everything it misses, beat drains."""
    return outbox_deliver(message_id=message_id)


@shared_task(name="fhir_gateway.outbox_drain", ignore_result=True)
def outbox_drain_task(limit: int = 500, max_seconds: float | None = DRAIN_BEAT_SECONDS) -> int:
    """Beat's outbox task: claim batches of due messages across aggregates (retries, lost
    hand-offs, expired leases), send them concurrently on keep-alive connections, record
    outcomes in bulk (backoff, dead-lettering), until nothing is due or ``max_seconds``."""
    return outbox_drain(limit=limit, max_seconds=max_seconds).delivered


@shared_task(name="fhir_gateway.intake_drain", ignore_result=True)
def intake_drain_task(max_seconds: float | None = DRAIN_BEAT_SECONDS) -> int:
    """Apply due asynchronous Bundles (``Prefer: respond-async``), the members in turn, until
    none is due or ``max_seconds``: the web processes' coalesced hand-off, and beat's run
    every 10 s for hand-offs lost with the broker and retries after an unexpected error."""
    return intake_drain(max_seconds=max_seconds)


@shared_task(name="fhir_gateway.project_registry", ignore_result=True)
def project_registry_task() -> dict[str, dict[str, int]] | None:
    """Beat's registry projection; skipped (None) while an earlier run still holds the
    lock (``registry_projection.projection_lock``)."""
    report = project_registry_incremental()
    if report is None:
        return None
    return {"created": report.created, "updated": report.updated, "deleted": report.deleted}


@shared_task(name="fhir_gateway.retention_prune", ignore_result=True)
def retention_prune_task(max_seconds: float | None = RETENTION_BEAT_SECONDS) -> dict[str, int]:
    """Beat's hourly retention: delivered outbox messages, feed events, finished intake jobs
    and applied Task update records older than their retention, in batches, until done or
    ``max_seconds``. Safe to run twice (each batch skips rows another run holds)."""
    report = retention_prune(max_seconds=max_seconds)
    return {
        "outbox_deleted": report.outbox_deleted,
        "intake_deleted": report.intake_deleted,
        "applied_updates_deleted": report.applied_updates_deleted,
        "feed_numbered": report.feed_numbered,
        "feed_deleted": report.feed_deleted,
        "finished": int(report.finished),
    }
