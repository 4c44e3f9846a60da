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
- a worker first leases jobs, up to ``FHIR_INTAKE_BATCH`` (``SELECT ... FOR UPDATE SKIP
  LOCKED``; their attempt counted, ``next_attempt_at`` moved past the backoff, committed),
  then applies them inside one database transaction that also marks them done, holding
  their rows, each job in a savepoint of its own: a second worker skips them, a refusal
  or a bug rolls back only its own job's writes, and a worker killed half-way rolls
  everything back, leaving the jobs pending for a retry after the backoff; a job tried
  before is leased alone (a Bundle that kills every worker, or its database session, is
  given up like a bug after costing the jobs beside it one attempt);
- the hand-off to the workers is task ``fhir_gateway.intake_drain``, which applies every
  due job (each member's most urgent, then oldest, the members in turn; workers share
  them with ``SKIP LOCKED``); each web process sends it at most every ``KICK_SECONDS``
  after the commits it serves (``core.dispatch.Coalesced``), so a burst costs one broker
  message per 50 ms per web process, not one per Bundle. Hand-offs lost with the broker
  are made up by beat, which runs the same task every 10 s;
- an unexpected error (a bug) leaves the job pending (``last_error``), retried after the
  backoff (10 s, 20 s, ...); after ``FHIR_INTAKE_MAX_ATTEMPTS`` attempts it is finished
  with a 500 OperationOutcome; a job's first transient database error gives its attempt
  back (a second one counts), and an apply past ``APPLY_TIMEOUT`` is ended by PostgreSQL
  and counts;
- one account may have ``FHIR_INTAKE_MAX_PENDING_PER_USER`` jobs waiting (more: 429), and
  a job whose sender was deactivated meanwhile is refused (403) when applied.

Retention: finished jobs (done or cancelled) go ``FHIR_INTAKE_RETENTION_DAYS`` after they
finished (``intake_prune``, part of beat's hourly retention); pending ones never do.

This moves the work of a Bundle off the request; it does not remove it: a batch saves each
job's lease, lock, commit and role lookup, not its validation, routing, storage and
projection (docs/performance.md).
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
from itertools import takewhile
from typing import TYPE_CHECKING, Any

import psycopg
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from core.atomic import unit_atomic
from core.dispatch import Coalesced
from core.memo import memo_scope
from core.rows import fetch_prepared
from fhir_gateway import handlers
from fhir_gateway.audit import audit_referral
from fhir_gateway.models import IntakeJob
from fhir_gateway.outcomes import FhirError, fhir_error_for, outcome_body, outcome_text
from referrals.attachments import files_removed_on_failure
from referrals.load import department_load_deferred
from referrals.models import AuditAction, Priority

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
    *,
    user: User,
    body: str,
    fhir_version: str,
    answer_version: str,
    base: str,
    priority: int = Priority.ROUTINE.value,
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
        priority=priority,
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


_PRIORITY_RANKS = {str(p.label): int(p.value) for p in Priority}


def priority_of(bundle: dict[str, Any]) -> int:
    """The referral's priority as a rank (1 stat ... 4 routine): the most urgent valid
    ``priority`` of the Bundle's ServiceRequest entries, routine when none. Read from the
    parsed Bundle at accept (its validation comes when it is applied: an invalid Bundle is
    refused then, whatever its rank); it orders a member's own jobs."""
    ranks = [
        _PRIORITY_RANKS.get(str(entry["resource"].get("priority")), Priority.ROUTINE.value)
        for entry in bundle.get("entry") or []
        if isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and entry["resource"].get("resourceType") == "ServiceRequest"
    ]
    return int(min(ranks, default=Priority.ROUTINE.value))


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
        # A refusal rolls back the Bundle's writes (and deletes its case files), not the job.
        # The job's savepoint is the Bundle's own too (core.atomic).
        with files_removed_on_failure(), unit_atomic():
            answer = transaction_func(
                job.user, bundle, job.fhir_version, job.answer_version, job.base
            )
            # Recorded as the synchronous request is, with the job's own transaction;
            # applied outside any request, so without an address or user agent.
            action = AuditAction.CREATE if answer.wrote else AuditAction.READ
            audit_referral(
                HttpRequest(), job.user, action, answer.referral_pk, "fhir transaction (async)"
            )
            text = answer.text
    except Exception as exc:
        error = fhir_error_for(exc)
        if error is None:
            raise
        return error.status, outcome_text(error)
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
APPLY_TIMEOUT_SECONDS = 60
APPLY_TIMEOUT = f"{APPLY_TIMEOUT_SECONDS}s"
# A lease outlives the longest apply: a batch still running when its jobs fall due again
# would hold their row locks while other claims picked them first and found them locked
# (every drain then ended empty behind it).
LEASE_MIN_SECONDS = APPLY_TIMEOUT_SECONDS + 30


def batch_size() -> int:
    """Jobs per lease; 1 when a job has a single attempt (a batch that dies would give its
    untouched neighbours their last one)."""
    if max_attempts() < 2:
        return 1
    return max(1, int(getattr(settings, "FHIR_INTAKE_BATCH", 20)))


def _tried(job: IntakeJob) -> bool:
    """Tried before: an attempt was counted (its worker died, or it raised) or given back
    (a transient error)."""
    return job.attempts > 0 or bool(job.last_error)


def _claim(due: Q | None, limit: int = 1) -> list[IntakeJob]:
    """Lease up to ``limit`` jobs (``_due_jobs``: those ``due`` selects, or the members'
    most urgent then oldest due ones in turn; ``SKIP LOCKED``), in a short transaction of
    its own: their attempt is counted and ``next_attempt_at`` moves past the backoff before
    anything is applied, so no other drain takes them meanwhile, and a worker that dies
    while applying them (killed, out of memory) leaves jobs that are retried after the
    backoff and finally given up, instead of claimed first again and again. A job tried
    before (``_tried``) is leased alone (``_due_jobs_in_turn`` picks it alone; otherwise a
    batch ends before one): a Bundle that kills its worker or its session costs the jobs
    beside it one attempt at most, and then meets its end alone. Jobs of one account share
    one user object (its roles are read once)."""
    with transaction.atomic():
        jobs = _due_jobs(due, limit)
        if not jobs:
            return []
        first = jobs[0]
        jobs = [first] if _tried(first) else list(takewhile(lambda job: not _tried(job), jobs))
        attempts = jobs[0].attempts  # the same for all of a batch (0)
        if attempts < max_attempts():
            IntakeJob.objects.filter(pk__in=[job.pk for job in jobs]).update(
                attempts=attempts + 1,
                next_attempt_at=timezone.now()
                + timedelta(seconds=max(backoff_seconds(attempts + 1), LEASE_MIN_SECONDS)),
            )
    users: dict[int, User] = {}
    for job in jobs:
        job.user = users.setdefault(job.user_id, job.user)
    return jobs


def _due_jobs(due: Q | None, limit: int) -> list[IntakeJob]:
    """Lock (``SKIP LOCKED``) and return up to ``limit`` jobs ``due`` selects, most urgent
    (``priority``) then oldest first; ``due`` None: the jobs due now, and on PostgreSQL
    member by member: each account's most urgent then oldest, taken in turn (its 1st, the
    next account's 1st, ..., then its 2nd ...), so a member uploading a backlog of
    thousands of Bundles does not hold back another member's one, and a member's urgent
    Bundle does not wait behind its own backlog. A member's priorities choose which of its
    jobs fills each of its turns, not how many turns it gets (``_due_jobs_in_turn``).
    (SQLite, ``make run``: most urgent then oldest of all.)"""
    if due is None and connection.vendor == "postgresql":
        return _due_jobs_in_turn(limit)
    if due is None:
        due = Q(status=Status.PENDING, next_attempt_at__lte=timezone.now())
    return list(
        IntakeJob.objects.select_for_update(skip_locked=True, of=("self",))
        .select_related("user")
        .filter(due)
        .order_by("priority", "next_attempt_at", "pk")[:limit]
    )


def _due_jobs_in_turn(limit: int) -> list[IntakeJob]:
    """Rank first, without locks: each account's ``CANDIDATES * limit`` most urgent then
    oldest due jobs, taken in turn. Then lock in that order only the jobs leased, skipping
    rows another claim holds (a claim running at the same time takes the next ones). A job
    tried before among the first ``limit`` is leased alone (``_claim``), ahead of the batch
    it would have been in; the jobs ranked with it wait one claim, not until it comes
    first."""
    now = timezone.now()
    for _ in range(3):  # all candidates held by another claim until its lease commits
        with connection.cursor() as cursor:
            cursor.execute(_FAIR_DUE_SQL, {"now": now, "per_account": CANDIDATES * limit})
            rows: list[tuple[uuid.UUID, int, int, datetime, bool]] = cursor.fetchall()
        if not rows:
            return []
        # Within a turn the members go by the age of the job each puts forward (its most
        # urgent): a stat Bundle goes at its own age, not ahead of other members' older
        # jobs. (Ranked by its oldest job instead, a member's newer stat Bundles would fill
        # its turns while that old job kept its place for ever, holding the others back.)
        turns: dict[int, int] = {}
        ranked = []
        for pk, user_id, _priority, at, tried in sorted(
            rows, key=lambda row: (row[1], row[2], row[3], row[0])
        ):
            turns[user_id] = turns.get(user_id, -1) + 1
            ranked.append((turns[user_id], at, user_id, pk, tried))
        ranked.sort()
        first_tried = next((pk for _t, _w, _u, pk, tried in ranked[:limit] if tried), None)
        if first_tried is not None:
            order, take = [first_tried], 1
        else:
            order, take = [pk for _t, _w, _u, pk, tried in ranked if not tried], limit
        with connection.cursor() as cursor:
            cursor.execute(_LOCK_IN_ORDER_SQL, {"ids": order, "now": now, "take": take})
            locked = [row[0] for row in cursor.fetchall()]
        if locked:
            jobs = IntakeJob.objects.select_related("user").in_bulk(locked)  # locked above
            return [jobs[pk] for pk in locked]
        time.sleep(0.005)
        now = timezone.now()
    return []


CANDIDATES = 2
_JOB_TABLE = IntakeJob._meta.db_table
# The accounts with pending jobs (a loose index scan: one probe of the partial index per
# account), then each one's most urgent then oldest due jobs; whether each was tried before
# (``_tried``).
_FAIR_DUE_SQL = f"""
WITH RECURSIVE accounts(user_id) AS (
    (SELECT user_id FROM {_JOB_TABLE} WHERE status = 'pending' ORDER BY user_id LIMIT 1)
  UNION ALL
    SELECT (SELECT j.user_id FROM {_JOB_TABLE} j
            WHERE j.status = 'pending' AND j.user_id > a.user_id ORDER BY j.user_id LIMIT 1)
    FROM accounts a WHERE a.user_id IS NOT NULL
)
SELECT due.id, due.user_id, due.priority, due.next_attempt_at, due.tried
FROM accounts a CROSS JOIN LATERAL (
    SELECT id, user_id, priority, next_attempt_at, (attempts > 0 OR last_error <> '') AS tried
    FROM {_JOB_TABLE}
    WHERE user_id = a.user_id AND status = 'pending' AND next_attempt_at <= %(now)s
    ORDER BY priority, next_attempt_at, id LIMIT %(per_account)s
) due
"""  # noqa: S608 (the table name comes from the model; values are bound)
# Lock the first ``take`` of ``ids`` still due, in their order, skipping rows held.
_LOCK_IN_ORDER_SQL = f"""
SELECT id FROM {_JOB_TABLE}
WHERE id = ANY(%(ids)s) AND status = 'pending' AND next_attempt_at <= %(now)s
ORDER BY array_position(%(ids)s, id) LIMIT %(take)s
FOR UPDATE SKIP LOCKED
"""  # noqa: S608 (the table name comes from the model; values are bound)


def _limit_apply_time() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                f"SET LOCAL statement_timeout = '{APPLY_TIMEOUT}'; "
                f"SET LOCAL idle_in_transaction_session_timeout = '{APPLY_TIMEOUT}'"
            )


def _failed(job: IntakeJob, exc: Exception) -> str:
    """Record an attempt that raised (its writes rolled back); the job is retried after the
    backoff (counted from now), or given up after its last attempt. A deadlock, failover or
    lost connection is not the Bundle's fault: the job's first such error gives the attempt
    back; a second one counts (a Bundle that breaks its session every time is given up,
    not retried for ever). A statement that ran past APPLY_TIMEOUT counts (it would time
    out again), and so does anything else."""
    logger.error("intake job failed", exc_info=exc, extra={"id": str(job.pk)})
    transient = (
        not job.last_error  # as the job was leased
        and isinstance(exc, OperationalError)
        and not isinstance(exc.__cause__, psycopg.errors.QueryCanceled)
    )
    if transient:
        job.attempts -= 1
    IntakeJob.objects.filter(pk=job.pk, status=Status.PENDING).update(
        last_error=f"{type(exc).__name__}: {exc}"[:2000],
        next_attempt_at=timezone.now() + timedelta(seconds=backoff_seconds(job.attempts)),
        **({"attempts": job.attempts} if transient else {}),
    )
    return _give_up(job) if job.attempts >= max_attempts() else "error"


def _process(jobs: list[IntakeJob]) -> list[str]:
    """Apply leased jobs in one transaction, each in a savepoint of its own (``_apply``: a
    refusal or a bug rolls back that job's writes only), and finish them with one UPDATE;
    what happened to each. One commit and one lock query for the batch instead of one
    each. The routing counters are written at the end, in the order every transition
    writes them (``department_load_deferred``): a batch holding them until its commit
    deadlocks with no transition and no other batch over them. (Two batches holding
    resends of the same placer identifiers in opposite orders can deadlock on that unique
    index: PostgreSQL ends one job's statement, which is then a transient error of that
    job alone.) Anything that breaks the transaction itself rolls the whole batch back:
    each job then fails with that error (``_failed``) and is retried alone. A job whose
    earlier attempts all died without a word (it comes alone: ``_claim``) is given up."""
    if len(jobs) == 1 and jobs[0].attempts >= max_attempts():
        return [_give_up(jobs[0])]
    leased = {job.pk: job.attempts + 1 for job in jobs}  # the attempt the lease counted
    outcomes: dict[uuid.UUID, str] = {}
    try:
        # files_removed_on_failure: a job's case files go if the batch rolls back after it.
        with (
            files_removed_on_failure(),
            memo_scope(),
            transaction.atomic(),
            department_load_deferred(),
        ):
            _limit_apply_time()
            locked = set(
                IntakeJob.objects.select_for_update()
                .filter(pk__in=list(leased), status=Status.PENDING)
                .values_list("pk", flat=True)
            )
            finished: list[IntakeJob] = []
            for job in jobs:
                job.attempts = leased[job.pk]
                if job.pk not in locked:  # applied or cancelled meanwhile
                    outcomes[job.pk] = "skipped"
                    continue
                try:
                    job.result_status, job.result = _apply(job)
                except Exception as exc:
                    if connection.needs_rollback:  # the savepoint could not be rolled back
                        raise
                    outcomes[job.pk] = _failed(job, exc)
                    continue
                if connection.needs_rollback:  # a refusal answered over a broken savepoint
                    raise OperationalError("The batch's transaction can no longer be used.")
                job.status, job.finished_at = Status.DONE, timezone.now()
                outcomes[job.pk] = "done" if job.result_status == 200 else "refused"
                finished.append(job)
            _finish_all(finished)
    except Exception as exc:  # noqa: BLE001 (recorded on the jobs, retried)
        for job in jobs:
            if outcomes.get(job.pk) != "skipped":
                job.attempts = leased[job.pk]
                outcomes[job.pk] = _failed(job, exc)
    return [outcomes[job.pk] for job in jobs]


# The batch's answers in one statement whose text never changes (prepared once per
# connection): ``bulk_update``'s CASE per row cost ~1 ms of Python per job and a new
# statement per batch size.
_FINISH_SQL = (
    f"UPDATE {IntakeJob._meta.db_table} AS j SET status = %s, "  # noqa: S608 (names from the model)
    "result_status = v.result_status, result = v.result, finished_at = v.finished_at "
    "FROM unnest(%s::uuid[], %s::int[], %s::text[], %s::timestamptz[]) "
    "AS v(id, result_status, result, finished_at) WHERE j.id = v.id"
)


def _finish_all(jobs: list[IntakeJob]) -> None:
    """Record the applied jobs' answers (status, result) in the batch's transaction."""
    if not jobs:
        return
    if connection.vendor != "postgresql":
        IntakeJob.objects.bulk_update(jobs, ["status", "result_status", "result", "finished_at"])
        return
    fetch_prepared(
        _FINISH_SQL,
        [
            Status.DONE.value,
            [job.pk for job in jobs],
            [job.result_status for job in jobs],
            [job.result for job in jobs],
            [job.finished_at for job in jobs],
        ],
        returning=False,
    )


def intake_process(*, job_id: str | uuid.UUID) -> str:
    """Apply one pending job now (even before its backoff ran out) and finish it; safe to
    run twice and concurrently (a job another worker holds is skipped)."""
    jobs = _claim(Q(pk=job_id, status=Status.PENDING))
    return _process(jobs)[0] if jobs else "skipped"


def intake_process_next(*, limit: int = 1) -> list[tuple[IntakeJob, str]]:
    """Apply the next due jobs no one else holds (up to ``limit``, in one transaction; the
    members' most urgent then oldest in turn); each job with what happened to it, none
    when no job is due."""
    jobs = _claim(None, limit)
    return list(zip(jobs, _process(jobs), strict=True)) if jobs else []


def intake_drain(*, max_jobs: int | None = None, max_seconds: float | None = None) -> int:
    """Apply due jobs in batches of ``FHIR_INTAKE_BATCH`` until none is due, ``max_jobs``
    were tried or ``max_seconds`` passed (checked between batches). Workers running it at
    once share the work (each claims with ``SKIP LOCKED``). Returns how many jobs it
    finished. A job that fails is due again only after its backoff, so a drain ends."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    finished = tried = 0
    while max_jobs is None or tried < max_jobs:
        limit = batch_size() if max_jobs is None else min(batch_size(), max_jobs - tried)
        batch = intake_process_next(limit=limit)
        if not batch:
            break
        tried += len(batch)
        finished += sum(outcome in ("done", "refused", "failed") for _job, outcome in batch)
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
        if locked.status == Status.CANCELLED:  # another DELETE cancelled it meanwhile
            raise FhirError(404, "not-found", f"No asynchronous request {job_id!r} of yours.")
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
