"""Asynchronous transaction intake: FHIR's asynchronous interaction request pattern.

A member that sends a transaction Bundle with ``Prefer: respond-async`` gets ``202
Accepted`` as soon as the Bundle is stored (``intake_accept``: authentication, a JSON and
size check, one INSERT), with ``Content-Location: [base]/_async/<job id>``. A worker then
applies it exactly as the synchronous request would have (task ``fhir_gateway.intake_drain``,
as the same user), and polling that location answers ``202`` until it is done, then ``200``
with a ``batch-response`` Bundle whose one entry carries the answer the synchronous request
would have had: the transaction-response Bundle, or the OperationOutcome of a refusal with its
status (FHIR R5 async-bundle; the same wrapper in R4). ``DELETE`` on the location cancels a
job not yet applied (202), or forgets a finished one (200 with its answer, once more).

Nothing is lost or applied twice:
- the job row commits before the 202 is sent; a member that never saw the 202 and sends
  again gets a second job, which the placer identifier makes idempotent like any resend
  (the second answer is ``200 OK`` with the same referral);
- a worker first leases a job (``SELECT ... FOR UPDATE SKIP LOCKED``; its attempt counted,
  ``next_attempt_at`` moved past the backoff, committed), then applies it inside one
  database transaction that also marks it done, holding the row: a second worker skips
  it, and a worker killed half-way rolls everything back, leaving the job pending for a
  retry after the backoff (a Bundle that kills every worker is given up like a bug);
- the hand-off to the workers is task ``fhir_gateway.intake_drain``, which applies every
  due job (oldest first; workers share them with ``SKIP LOCKED``); each web process sends
  it at most every ``KICK_SECONDS`` after the commits it serves (``core.dispatch.Coalesced``),
  so a burst costs one broker message per 50 ms per web process, not one per Bundle. Hand-offs lost with
  the broker are made up by beat, which runs the same task every 10 s;
- an unexpected error (a bug) leaves the job pending (``last_error``), retried after the
  backoff (10 s, 20 s, ...); after ``FHIR_INTAKE_MAX_ATTEMPTS`` attempts it is finished
  with a 500 OperationOutcome; a transient database error gives its attempt back, and an
  apply past ``APPLY_TIMEOUT`` is ended by PostgreSQL and counts;
- one account may have ``FHIR_INTAKE_MAX_PENDING_PER_USER`` jobs waiting (more: 429), and
  a job whose sender was deactivated meanwhile is refused (403) when applied.

Retention: finished jobs (done or cancelled) go ``FHIR_INTAKE_RETENTION_DAYS`` after they
finished (``intake_prune``, part of beat's hourly retention); pending ones never do.

This moves the work of a Bundle off the request; it does not remove it. The rate at which
jobs are applied is that of the synchronous path (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING

import psycopg
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from core.dispatch import Coalesced
from core.rows import fetch_prepared
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


def max_pending_per_user() -> int:
    return int(getattr(settings, "FHIR_INTAKE_MAX_PENDING_PER_USER", 5000))


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
    not a transaction: 422, as the synchronous answer would be); the rest at processing.

    One INSERT, committed by itself (no BEGIN/COMMIT round trips), then the coalesced
    hand-off to the workers."""
    if user.facility_id is None:
        raise FhirError(403, "forbidden", "Your account belongs to no facility.")
    if _over_cap(user):
        raise FhirError(
            429,
            "throttled",
            f"You have {max_pending_per_user()} asynchronous requests waiting to be applied; "
            "send more once they are (poll them), or send synchronously.",
            headers={"Retry-After": "60"},
        )
    job = IntakeJob(
        user=user,
        body=body,
        fhir_version=fhir_version,
        answer_version=answer_version,
        base=base,
    )
    if connection.vendor == "postgresql":
        # The hot path of a burst: a prepared statement (no ORM compile, no re-planning).
        fetch_prepared(
            _INSERT_SQL, [getattr(job, f.attname) for f in _INSERT_FIELDS], returning=False
        )
        job._state.adding, job._state.db = False, connection.alias
    else:
        job.save(force_insert=True)
    _accepted(user)
    transaction.on_commit(_kick.request)  # at once unless the caller holds a transaction
    return job


_INSERT_FIELDS = list(IntakeJob._meta.concrete_fields)
_INSERT_SQL = (
    f"INSERT INTO {IntakeJob._meta.db_table} "  # noqa: S608 (names from the model, values bound)
    f"({', '.join(f.column for f in _INSERT_FIELDS)}) "
    f"VALUES ({', '.join(['%s'] * len(_INSERT_FIELDS))})"
)

# The per-account cap, soft and cheap: each process counts an account's pending jobs at
# most once per CAP_COUNT_SECONDS (a count of up to the cap's index entries) and adds what
# it accepted since; between counts, nothing is read. Several processes together may pass
# the cap by what they accept in that second.
CAP_COUNT_SECONDS = 1.0
_pending_seen: dict[int, tuple[float, int]] = {}  # account -> (when counted, count + since)
_pending_lock = threading.Lock()


def _over_cap(user: User) -> bool:
    cap = max_pending_per_user()
    now = time.monotonic()
    with _pending_lock:
        if len(_pending_seen) > 10_000:  # entries past their second tell nothing
            for key in [k for k, (t, _n) in _pending_seen.items() if now - t >= CAP_COUNT_SECONDS]:
                del _pending_seen[key]
        seen = _pending_seen.get(user.pk)
    if seen is None or now - seen[0] >= CAP_COUNT_SECONDS:
        count = IntakeJob.objects.filter(user=user, status=Status.PENDING)[:cap].count()
        seen = (now, count)
        with _pending_lock:
            _pending_seen[user.pk] = seen
    return seen[1] >= cap


def _accepted(user: User) -> None:
    with _pending_lock:
        seen = _pending_seen.get(user.pk)
        if seen is not None:
            _pending_seen[user.pk] = (seen[0], seen[1] + 1)


def _send_drain() -> None:
    """Ask a worker to drain the intake; if the broker is down beat's drain does it."""
    from fhir_gateway.tasks import intake_drain_task

    try:
        # A kick left queued longer than this is moot: beat's run has drained by then.
        intake_drain_task.apply_async(retry=False, expires=30)
    except (BrokerError, OSError):
        logger.warning("broker unavailable; the beat drain will apply pending Bundles")


# One broker message per KICK_SECONDS at most per web process, sent after the commits it
# serves: under a burst, each drain task applies many jobs.
KICK_SECONDS = 0.05
_kick = Coalesced(_send_drain, min_interval=KICK_SECONDS)


# --------------------------------------------------------------------------- process


def backoff_seconds(attempts: int) -> float:
    """The lease of an attempt, and the wait after it failed: 10 s, 20 s, 40 s ... (at most
    an hour)."""
    return float(min(3600, 10 * 2 ** max(0, attempts - 1)))


def _apply(job: IntakeJob) -> tuple[int, str]:
    """The answer the synchronous request would have had: (status, JSON text)."""
    transaction_func = handlers.SYSTEM_INTERACTIONS["transaction"]
    try:
        if not job.user.is_active:
            raise FhirError(
                403, "forbidden", "The account that sent this Bundle is no longer active."
            )
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


def _finish(job_id: uuid.UUID, status: int, result: str) -> None:
    IntakeJob.objects.filter(pk=job_id).update(
        status=Status.DONE, result_status=status, result=result, finished_at=timezone.now()
    )


def _give_up(job: IntakeJob) -> str:
    """No more attempts: the job is answered 500 (in a transaction of its own)."""
    error = FhirError(
        500,
        "exception",
        f"Internal error after {job.attempts} attempts; quote intake job {job.pk}.",
    )
    with transaction.atomic():
        if not _lock_pending(job.pk):
            return "skipped"
        _finish(job.pk, 500, json.dumps(outcome_body(error)))
    return "failed"


def _lock_pending(job_id: uuid.UUID) -> bool:
    """Lock the job's row if it is still pending (waits: another worker's claim may hold
    it for an instant while it re-checks it; a job applied or cancelled meanwhile is then
    skipped). Reads no columns (the body can be megabytes)."""
    return IntakeJob.objects.select_for_update().filter(pk=job_id, status=Status.PENDING).exists()


# A worker stuck inside a job's transaction (a statement that never ends, a hang in Python
# with the transaction open) is ended by PostgreSQL after this: the row lock goes, and the
# job is retried after its lease like any failed attempt.
APPLY_TIMEOUT = "60s"


def _claim(due: Q) -> IntakeJob | None:
    """Lease the first job ``due`` selects (``SKIP LOCKED``), in a short transaction of its
    own: its attempt is counted and ``next_attempt_at`` moves past the backoff before
    anything is applied, so no other drain takes it meanwhile, and a worker that dies while
    applying it (killed, out of memory) leaves a job that is retried after the backoff and
    finally given up, instead of one claimed first again and again. The returned job keeps
    the ``next_attempt_at`` it was claimed at (the drain's keyset)."""
    with transaction.atomic():
        job = (
            IntakeJob.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("user")
            .filter(due)
            .order_by("next_attempt_at", "pk")
            .first()
        )
        if job is None:
            return None
        if job.attempts < max_attempts():
            IntakeJob.objects.filter(pk=job.pk).update(
                attempts=job.attempts + 1,
                next_attempt_at=timezone.now()
                + timedelta(seconds=backoff_seconds(job.attempts + 1)),
            )
    return job


def _process(job: IntakeJob) -> str:
    """Apply a leased job and finish it in one transaction; what happened."""
    if job.attempts >= max_attempts():  # the earlier attempts died without a word
        return _give_up(job)
    job.attempts += 1
    try:
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"SET LOCAL statement_timeout = '{APPLY_TIMEOUT}'; "
                        f"SET LOCAL idle_in_transaction_session_timeout = '{APPLY_TIMEOUT}'"
                    )
            if not _lock_pending(job.pk):
                return "skipped"
            result_status, result = _apply(job)
            _finish(job.pk, result_status, result)
    except Exception as exc:
        logger.exception("intake job failed", extra={"id": str(job.pk)})
        # Deadlock, failover, lost connection: not the Bundle's fault. A statement that ran
        # past APPLY_TIMEOUT is (it would time out again): that attempt counts.
        transient = isinstance(exc, OperationalError) and not isinstance(
            exc.__cause__, psycopg.errors.QueryCanceled
        )
        if transient:  # not the Bundle's fault: the attempt is given back
            job.attempts -= 1
        IntakeJob.objects.filter(pk=job.pk, status=Status.PENDING).update(
            last_error=f"{type(exc).__name__}: {exc}"[:2000],
            **({"attempts": job.attempts} if transient else {}),
        )
        return _give_up(job) if job.attempts >= max_attempts() else "error"
    return "done" if result_status == 200 else "refused"


def intake_process(*, job_id: str | uuid.UUID) -> str:
    """Apply one pending job now (even before its backoff ran out) and finish it; safe to
    run twice and concurrently (a job another worker holds is skipped)."""
    job = _claim(Q(pk=job_id, status=Status.PENDING))
    return "skipped" if job is None else _process(job)


def intake_process_next(
    after: tuple[datetime, uuid.UUID] | None = None,
) -> tuple[IntakeJob | None, str]:
    """Apply the oldest due job no one else holds (after ``after``, the (next_attempt_at,
    id) of the previous claim, when given); (None, "skipped") when there is none."""
    due = Q(status=Status.PENDING, next_attempt_at__lte=timezone.now())
    if after is not None:
        # Keyset: a drain does not walk again over the index entries of the jobs it (and
        # others) finished, which stay in the partial index until vacuum. The ``>=`` is
        # the index range; the OR only breaks ties.
        due &= Q(next_attempt_at__gte=after[0]) & (
            Q(next_attempt_at__gt=after[0]) | Q(pk__gt=after[1])
        )
    job = _claim(due)
    return (None, "skipped") if job is None else (job, _process(job))


def intake_drain(*, max_jobs: int | None = None, max_seconds: float | None = None) -> int:
    """Apply due jobs, oldest first, until none is due, ``max_jobs`` were tried or
    ``max_seconds`` passed (checked between jobs). Workers running it at once share the
    work (each claims with ``SKIP LOCKED``). Returns how many jobs it finished."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    finished = tried = 0
    after: tuple[datetime, uuid.UUID] | None = None
    while max_jobs is None or tried < max_jobs:
        job, outcome = intake_process_next(after)
        if job is None:
            break
        after = (job.next_attempt_at, job.pk)
        tried += 1
        finished += outcome in ("done", "refused", "failed")
        if deadline is not None and time.monotonic() >= deadline:
            break
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


def intake_cancel(*, user: User, job_id: str) -> PollAnswer:
    """Cancel a pending job (202: it will never be applied) or forget a finished one (200
    with its answer, once more: a cancel that came too late says what was done). A job a
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
            return PollAnswer(202, "", locked.answer_version, {})
        answer = PollAnswer(200, batch_response(locked), locked.answer_version, {})
        locked.delete()
        return answer


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
