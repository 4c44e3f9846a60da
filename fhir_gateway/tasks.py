"""Celery tasks of the gateway: they take ids, call one service and are safe to run twice."""

from __future__ import annotations

from celery import shared_task

from fhir_gateway.delivery import (
    outbox_deliver,
    outbox_drain,
    outbox_due_ids,
    schedule_delivery,
)
from fhir_gateway.registry_projection import project_registry_incremental


@shared_task(name="fhir_gateway.deliver_outbox", ignore_result=True)
def deliver_outbox(message_id: int) -> str:
    return outbox_deliver(message_id=message_id)


@shared_task(name="fhir_gateway.outbox_sweep", ignore_result=True)
def outbox_sweep() -> int:
    """Hand every due message to a worker (retries, lost schedules, expired leases)."""
    due = outbox_due_ids()
    for message_id in due:
        schedule_delivery(message_id)
    return len(due)


@shared_task(name="fhir_gateway.outbox_drain", ignore_result=True)
def outbox_drain_task(limit: int = 500) -> int:
    """Bulk path: claim batches across aggregates, send concurrently (keep-alive pool),
    record outcomes in bulk, until nothing is due. For backlogs (after an outage)."""
    return outbox_drain(limit=limit).delivered


@shared_task(name="fhir_gateway.project_registry", ignore_result=True)
def project_registry_task() -> dict[str, dict[str, int]]:
    report = project_registry_incremental()
    return {"created": report.created, "updated": report.updated, "deleted": report.deleted}
