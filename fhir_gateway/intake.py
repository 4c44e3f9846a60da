"""Asynchronous transaction intake: FHIR's asynchronous interaction request pattern.

A member that sends a transaction Bundle with ``Prefer: respond-async`` gets ``202
Accepted`` as soon as the Bundle is stored (``intake_accept``: authentication, a JSON and
size check, one INSERT), with ``Content-Location: [base]/_async/<job id>``. A worker then
applies it exactly as the synchronous request would have (``intake_process``, as the same
user), and polling that location answers ``202`` until it is done, then ``200`` with a
``batch-response`` Bundle whose one entry carries the answer the synchronous request would
have had: the transaction-response Bundle, or the OperationOutcome of a refusal with its
status (FHIR R5 async-bundle; the same wrapper in R4). ``DELETE`` on the location cancels a
job not yet applied, or forgets a finished one.

Nothing is lost or applied twice:
- the job row commits before the 202 is sent; a member that never saw the 202 and sends
  again gets a second job, which the placer identifier makes idempotent like any resend
  (the second answer is ``200 OK`` with the same referral);
- a worker applies a job inside one database transaction that also marks it done, holding
  the row (``SELECT ... FOR UPDATE SKIP LOCKED``): a second worker skips it, and a worker
  killed half-way rolls everything back, leaving the job pending for the next;
- the on-commit hand-off (task ``fhir_gateway.intake_process``) can be lost with the
  broker; beat's ``fhir_gateway.intake_drain`` (every 10 s) applies every pending job;
- an unexpected error (a bug) leaves the job pending with ``attempts`` counted; after
  ``FHIR_INTAKE_MAX_ATTEMPTS`` it is finished with a 500 OperationOutcome.

Retention: finished jobs (done or cancelled) go ``FHIR_INTAKE_RETENTION_DAYS`` after they
finished (``intake_prune``, part of beat's hourly retention); pending ones never do.

This moves the work of a Bundle off the request; it does not remove it. The rate at which
jobs are applied is that of the synchronous path (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from core.dispatch import send_later
from fhir_gateway import handlers
from fhir_gateway.models import IntakeJob
from fhir_gateway.outcomes import FhirError, fhir_error_for, outcome_body

if TYPE_CHECKING:
    from accounts.models import User

logger = logging.getLogger(__name__)

Status = IntakeJob.Status
POLL_PATH = "_async"
RETRY_AFTER_SECONDS = 1


def max_attempts() -> int:
    return int(getattr(settings, "FHIR_INTAKE_MAX_ATTEMPTS", 5))


def retention_days() -> int:
    return int(getattr(settings, "FHIR_INTAKE_RETENTION_DAYS", 7))


def poll_url(base: str, job: IntakeJob) -> str:
    return f"{base}/{POLL_PATH}/{job.pk}"


# --------------------------------------------------------------------------- accept


def intake_accept(
    *, user: User, body: str, fhir_version: str, answer_version: str, base: str
) -> IntakeJob:
    """Store a transaction Bundle to be applied later; the caller checked that ``body`` is
    a JSON Bundle. Refusals that need nothing but the caller come now (no facility: 403;
    not a transaction: 422, as the synchronous answer would be); the rest at processing."""
    if user.facility_id is None:
        raise FhirError(403, "forbidden", "Your account belongs to no facility.")
    with transaction.atomic():
        job = IntakeJob.objects.create(
            user=user,
            body=body,
            fhir_version=fhir_version,
            answer_version=answer_version,
            base=base,
        )
        transaction.on_commit(lambda: send_later(schedule_intake, str(job.pk)))
    return job


def schedule_intake(job_id: str) -> None:
    """Hand a job to a worker now; if the broker is down beat's drain applies it later."""
    from fhir_gateway.tasks import intake_process_task

    try:
        intake_process_task.apply_async((job_id,), retry=False)
    except (BrokerError, OSError):
        logger.warning("broker unavailable; the beat drain will apply it", extra={"id": job_id})


# --------------------------------------------------------------------------- process


def _apply(job: IntakeJob) -> tuple[int, str]:
    """The answer the synchronous request would have had: (status, JSON text)."""
    transaction_func = handlers.SYSTEM_INTERACTIONS["transaction"]
    try:
        bundle = json.loads(job.body)
        with transaction.atomic():  # a refusal rolls back the Bundle's writes, not the job
            text = transaction_func(
                job.user, bundle, job.fhir_version, job.answer_version, job.base
            )
    except Exception as exc:
        error = fhir_error_for(exc)
        if error is None:
            raise
        return error.status, json.dumps(outcome_body(error), ensure_ascii=False)
    return 200, text


def intake_process(*, job_id: str | uuid.UUID) -> str:
    """Apply one pending job and finish it, in one transaction; safe to run twice and
    concurrently (a job another worker holds is skipped). Returns what happened."""
    try:
        with transaction.atomic():
            job = (
                IntakeJob.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("user")
                .filter(pk=job_id, status=Status.PENDING)
                .first()
            )
            if job is None:
                return "skipped"
            result_status, result = _apply(job)
            IntakeJob.objects.filter(pk=job.pk).update(
                status=Status.DONE,
                result_status=result_status,
                result=result,
                finished_at=timezone.now(),
            )
    except Exception as exc:
        logger.exception("intake job failed", extra={"id": str(job_id)})
        return _record_crash(job_id, exc)
    return "done" if result_status == 200 else "refused"


def _record_crash(job_id: str | uuid.UUID, exc: Exception) -> str:
    with transaction.atomic():
        job = (
            IntakeJob.objects.select_for_update(skip_locked=True)
            .filter(pk=job_id, status=Status.PENDING)
            .first()
        )
        if job is None:
            return "skipped"
        job.attempts += 1
        job.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        fields = ["attempts", "last_error"]
        if job.attempts >= max_attempts():
            error = FhirError(
                500,
                "exception",
                f"Internal error after {job.attempts} attempts; quote intake job {job.pk}.",
            )
            job.status, job.result_status = Status.DONE, 500
            job.result = json.dumps(outcome_body(error))
            job.finished_at = timezone.now()
            fields += ["status", "result_status", "result", "finished_at"]
        job.save(update_fields=fields)
    return "failed" if job.status == Status.DONE else "error"


def intake_drain(*, limit: int = 100, max_seconds: float | None = None) -> int:
    """Apply pending jobs, oldest first, until none is left, ``limit`` per batch, or
    ``max_seconds`` passed (checked between jobs). Beat's path for lost hand-offs and
    retries after an unexpected error; returns how many jobs it finished."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    finished = 0
    tried: set[uuid.UUID] = set()
    while True:
        batch = [
            job_id
            for job_id in IntakeJob.objects.filter(status=Status.PENDING)
            .order_by("created_at")
            .values_list("pk", flat=True)[: limit + len(tried)]
            if job_id not in tried
        ][:limit]
        if not batch:
            return finished
        for job_id in batch:
            tried.add(job_id)  # one try per drain: a job that keeps failing waits for the next
            if intake_process(job_id=job_id) in ("done", "refused", "failed"):
                finished += 1
            if deadline is not None and time.monotonic() >= deadline:
                return finished


# --------------------------------------------------------------------------- poll / cancel


@dataclass(frozen=True)
class PollAnswer:
    status: int
    body: str  # empty: no body
    version: str
    headers: dict[str, str]


def _job_of(user: User, job_id: str) -> IntakeJob:
    """The caller's own job; anyone else's, a malformed id or a forgotten job: 404."""
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        key = None
    job = IntakeJob.objects.filter(pk=key, user=user).first() if key else None
    if job is None or job.status == Status.CANCELLED:
        raise FhirError(404, "not-found", f"No asynchronous request {job_id!r} of yours.")
    return job


def intake_poll(*, user: User, job_id: str) -> PollAnswer:
    job = _job_of(user, job_id)
    if job.status == Status.PENDING:
        return PollAnswer(
            202,
            "",
            job.answer_version,
            {"Retry-After": str(RETRY_AFTER_SECONDS), "X-Progress": "queued"},
        )
    return PollAnswer(200, batch_response(job), job.answer_version, {})


def batch_response(job: IntakeJob) -> str:
    """The R5 async-bundle answer: a batch-response Bundle of one entry holding the
    synchronous answer (the resource on success, ``response.outcome`` on a refusal)."""
    status = int(job.result_status or 500)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    response = json.dumps({"status": f"{status} {phrase}".strip()})
    if status == 200:
        entry = '{"resource":' + job.result + ',"response":' + response + "}"
    else:  # {"response": {"status": ..., "outcome": <OperationOutcome>}}
        entry = '{"response":' + response[:-1] + ',"outcome":' + job.result + "}}"
    finished = (job.finished_at or timezone.now()).astimezone(UTC)
    return (
        '{"resourceType":"Bundle","type":"batch-response","timestamp":'
        + json.dumps(finished.isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        + ',"entry":['
        + entry
        + "]}"
    )


def intake_cancel(*, user: User, job_id: str) -> str:
    """Cancel a pending job (it will never be applied) or forget a finished one. A job a
    worker is applying right now cannot be cancelled (409)."""
    job = _job_of(user, job_id)
    with transaction.atomic():
        locked = IntakeJob.objects.select_for_update(skip_locked=True).filter(pk=job.pk).first()
        if locked is None:
            raise FhirError(
                409, "conflict", "The request is being applied now; poll for its answer."
            )
        if locked.status == Status.PENDING:
            locked.status = Status.CANCELLED
            locked.finished_at = timezone.now()
            locked.save(update_fields=["status", "finished_at"])
            return "cancelled"
        locked.delete()
        return "forgotten"


def intake_prune(*, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` finished jobs that finished before ``before``."""
    with transaction.atomic():
        ids = list(
            IntakeJob.objects.select_for_update(skip_locked=True)
            .filter(finished_at__lt=before)
            .exclude(status=Status.PENDING)
            .order_by("finished_at")
            .values_list("pk", flat=True)[:limit]
        )
        if not ids:
            return 0
        deleted, _ = IntakeJob.objects.filter(pk__in=ids).delete()
    return deleted
