"""The transactional outbox (decision 1): what members must hear, delivered reliably.

``outbox_enqueue`` is called inside the caller's ``transaction.atomic``, with the state
change, so a message exists if and only if the change committed. ``outbox_deliver`` claims
one message (``SELECT ... FOR UPDATE SKIP LOCKED``), sends it outside any transaction and
records the outcome; a message whose worker died stays ``in_flight`` until its lease expires
and is then claimed again. Messages of one aggregate go out in ``seq`` order; each carries
its idempotency key, so a member that saw a request whose answer we lost applies it once.
An aggregate is what one endpoint hears about one subject (``endpoint_aggregate``): each
member gets a referral's updates in order, and one member's outage or dead message never
holds the other member's.

Two paths claim messages: ``outbox_deliver`` (task ``deliver_outbox``), the on-commit
hand-off of one message; and ``outbox_drain`` (task ``outbox_drain``, run by beat every
10 s), which claims batches of every due message — retries, lost hand-offs, expired
leases — and is the only thing that retries a failed message.

Retention (``outbox_prune``, beat task ``fhir_gateway.retention_prune``): delivered
messages are deleted once delivered more than ``FHIR_OUTBOX_RETENTION_DAYS`` ago. Nothing
else is: pending, in-flight and failed messages are work still to do, and a dead message
holds its aggregate until a person retries it (deleting it would let the messages behind
it go out as if it had been sent).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import heapq
import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import urllib3
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, Max, OuterRef, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from config.env import env_secret
from core.dispatch import send_later
from core.rows import insert_rows
from fhir_gateway.conversion import render_for_version
from fhir_gateway.models import FhirResource, OutboxMessage
from fhir_gateway.storage import validate_resource
from fhir_gateway.versions import SUPPORTED_VERSIONS, media_type_for
from registry.models import Endpoint
from registry.validators import fhir_base_url_problem

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

logger = logging.getLogger(__name__)

Status = OutboxMessage.Status
_RETRYABLE_4XX = frozenset({408, 425, 429})


class _OneWrite:
    """Headers and body in one ``send()``: urllib3 writes them separately, which costs a
    second syscall and wake-up of the member per request (~15 % of a delivery's time)."""

    _hold = False
    _held: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, *args: Any, **kw: Any) -> None:
        self._hold = isinstance(body, bytes) and bool(body)
        try:
            super().request(method, url, body, *args, **kw)  # type: ignore[misc]
        finally:
            self._hold = False
            if self._held is not None:  # the body was never sent: send the headers alone
                held, self._held = self._held, None
                super().send(held)  # type: ignore[misc]

    def send(self, data: Any) -> None:
        if self._hold:
            if self._held is None:
                self._held = bytes(data)
                return
            data, self._held, self._hold = self._held + data, None, False
        super().send(data)  # type: ignore[misc]


class _Watchdog:
    """Shuts down the socket of a send that passes its deadline.

    Socket timeouts bound each receive, not the answer: a member trickling its status line
    or headers a byte per receive would hold a send (and its lease) for ever, and the
    message would be sent again by the next drain. A send arms its deadline when it starts
    waiting for the answer (``_Deadlined.getresponse``); the pool disarms it when the
    connection comes back (``_Disarming._put_conn``: urllib3 returns it as soon as the body
    has been read, before ``_send`` ends), so a deadline never outlives its send onto a
    connection another send has taken. A socket shut down here makes the blocked read end
    at once. One thread per process, started on first use; a forked child starts afresh."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._armed: set[int] = set()
        self._fired: set[int] = set()
        self._numbers = itertools.count(1)
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, sock: socket.socket) -> int:
        with self._cond:
            number = next(self._numbers)
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (deadline, number, sock))
            self._armed.add(number)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="outbox-watchdog", daemon=True
                )
                self._thread.start()
            elif earliest is None or deadline < earliest:
                self._cond.notify()  # it sleeps until a later deadline (or for ever)
            return number

    def fired(self, number: int) -> bool:
        with self._cond:
            return number in self._fired

    def disarm(self, number: int) -> bool:
        """Disarm; True when the deadline had passed and the socket was shut down."""
        with self._cond:
            self._armed.discard(number)
            if number in self._fired:
                self._fired.discard(number)
                return True
            return False

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed in time
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, number, sock = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                self._armed.discard(number)
                self._fired.add(number)
                with contextlib.suppress(OSError):  # already closed
                    # The plain socket's shutdown, also for TLS: SSLSocket.shutdown unwraps
                    # the TLS object under the reading thread's feet.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


def _new_watchdog() -> None:
    """In a forked child: the parent's heap names the parent's sockets, and its lock may
    have been held at the fork."""
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


os.register_at_fork(after_in_child=_new_watchdog)


class _SendDeadline(threading.local):
    at: float | None = None  # monotonic; set by _send around its request
    armed: int | None = None


_DEADLINE = _SendDeadline()


class _Deadlined:
    """Arms the send's deadline (``_DEADLINE``) on the socket while the answer is read."""

    sock: socket.socket | None
    _armed: int | None = None

    def getresponse(self) -> Any:
        if _DEADLINE.at is not None and self.sock is not None:
            self._armed = _DEADLINE.armed = _WATCHDOG.arm(_DEADLINE.at, self.sock)
        response = super().getresponse()  # type: ignore[misc]
        if self._armed is not None and _WATCHDOG.fired(self._armed):
            # Cut off in the status line or headers: what was parsed is not an answer.
            response.close()
            raise urllib3.exceptions.ProtocolError("the answer's head was cut off")
        return response

    def disarm(self) -> bool:
        """True when the watchdog shut this connection's socket down."""
        armed, self._armed = self._armed, None
        return armed is not None and _WATCHDOG.disarm(armed)


class _Disarming:
    """A connection coming back to the pool is disarmed first; one whose socket the
    watchdog shut down is closed, not kept for the next send."""

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:  # urllib3's signature
        if isinstance(conn, _Deadlined) and conn.disarm():
            conn.close()
            conn = None
        super()._put_conn(conn)  # type: ignore[misc]


class _Connection(_Deadlined, _OneWrite, urllib3.connection.HTTPConnection):
    pass


class _TlsConnection(_Deadlined, _OneWrite, urllib3.connection.HTTPSConnection):
    pass


class _Pool(_Disarming, urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(_Disarming, urllib3.HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


# One pool per process: keep-alive connections per member host, reused by every send
# (batch senders run up to ``FHIR_OUTBOX_CONCURRENCY`` threads against one host).
_POOL = urllib3.PoolManager(num_pools=64, maxsize=64, retries=False)
_POOL.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
_JITTER = secrets.SystemRandom()


def _setting(name: str) -> float:
    value: float = getattr(settings, name)  # config/settings/base.py, from the environment
    return float(value)


def max_attempts() -> int:
    return int(_setting("FHIR_OUTBOX_MAX_ATTEMPTS"))


def lease() -> timedelta:
    return timedelta(seconds=_setting("FHIR_OUTBOX_LEASE_SECONDS"))


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    base = _setting("FHIR_OUTBOX_BACKOFF_BASE_SECONDS")
    cap = _setting("FHIR_OUTBOX_BACKOFF_CAP_SECONDS")
    return _JITTER.uniform(0, min(cap, base * 2 ** max(0, attempt - 1)))


# --------------------------------------------------------------------------- enqueue


def outbox_enqueue(
    *,
    endpoint: Endpoint,
    aggregate_key: str,
    resource_type: str,
    logical_id: str,
    version_id: int | None = None,
    payload: dict[str, Any] | None = None,
    payload_fhir_version: str = "",
    http_method: str = OutboxMessage.Method.PUT,
    idempotency_key: str | None = None,
    schedule: bool = True,
) -> OutboxMessage:
    """Add a message at the end of its aggregate. Must run inside the caller's transaction.

    Either a stored resource version (``version_id``) or a fixed ``payload`` is sent.
    ``schedule=False`` when the caller already scheduled an earlier message of the same
    aggregate in this transaction: each delivery schedules the next of its aggregate, so
    one task per aggregate and transaction is enough (beat's drain is the safety net).
    """
    if not connection.in_atomic_block:
        raise RuntimeError("outbox_enqueue must run inside the transaction of the change.")
    if (version_id is None) == (payload is None):
        raise ValueError("give exactly one of version_id and payload")
    if payload is not None and payload_fhir_version not in SUPPORTED_VERSIONS:
        raise ValueError("a payload needs payload_fhir_version 4.0 or 5.0")
    _lock_aggregates([aggregate_key])  # callers usually hold the row lock too
    last = (
        OutboxMessage.objects.filter(aggregate_key=aggregate_key)
        .order_by("-seq")
        .values_list("seq", flat=True)
        .first()
    )
    message = OutboxMessage.objects.create(
        endpoint=endpoint,
        aggregate_key=aggregate_key,
        seq=(last or 0) + 1,
        resource_type=resource_type,
        logical_id=logical_id,
        version_id=version_id,
        payload=json.dumps(payload, ensure_ascii=False) if payload is not None else "",
        payload_fhir_version=payload_fhir_version,
        http_method=http_method,
        idempotency_key=idempotency_key or uuid.uuid4().hex,
    )
    if schedule:
        transaction.on_commit(lambda: schedule_delivery(message.pk))
    return message


def endpoint_aggregate(subject: str, endpoint_id: int) -> str:
    """The ordering key of what one endpoint hears about one subject (``referral:12``):
    order is kept per receiver, so one member's outage never holds another's updates."""
    return f"{subject}:endpoint:{endpoint_id}"


def _lock_aggregates(keys: list[str]) -> None:
    """Serialise seq assignment per aggregate (one round trip, keys in one order: no
    deadlock between two writers of the same keys)."""
    if connection.vendor == "postgresql" and keys:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('outbox:' || k, 0)) "
                "FROM unnest(%s::text[]) AS k ORDER BY k",
                [sorted(set(keys))],
            )


def outbox_enqueue_versions(
    *,
    aggregate_key: str,
    items: list[tuple[Endpoint, FhirResource]],
    new_aggregate: bool = False,
) -> list[int]:
    """Several stored versions at the end of their aggregates, in order: one lock, one seq
    query, one INSERT, one scheduled task per aggregate (each delivery schedules the next
    of its aggregate); returns the new messages' ids. ``aggregate_key`` names the subject
    (``referral:12``); each endpoint's messages are an aggregate of their own
    (``endpoint_aggregate``). Same contract as ``outbox_enqueue``; idempotency key
    ``<type>-<id>-<version>-<endpoint>``. ``new_aggregate=True`` when the subject was
    created in this transaction (seq starts at 1: no lock, no seq query; the unique
    (aggregate, seq) constraint still guards)."""
    if not connection.in_atomic_block:
        raise RuntimeError("outbox_enqueue must run inside the transaction of the change.")
    if not items:
        return []
    last: dict[str, int] = {}
    if not new_aggregate:
        keys = sorted({endpoint_aggregate(aggregate_key, e.pk) for e, _row in items})
        _lock_aggregates(keys)
        last = dict(
            OutboxMessage.objects.filter(aggregate_key__in=keys)
            .values("aggregate_key")
            .annotate(last=Max("seq"))
            .values_list("aggregate_key", "last")
        )
    rows = outbox_rows(aggregate_key, items, last)
    # One multi-row INSERT (core.rows.insert_rows): bulk_create built a model instance per
    # message and compiled its statement each time (~0.5 ms of a submission's ~9).
    ids = insert_rows(OutboxMessage, rows, returning_ids=True)
    outbox_scheduled(ids, rows)
    return ids


def outbox_rows(
    aggregate_key: str,
    items: list[tuple[Endpoint, FhirResource]],
    last: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The messages ``outbox_enqueue_versions`` inserts, each endpoint's after its
    aggregate's ``last`` seq (none: a new subject), for a caller inserting them with other
    rows (``core.rows.insert_many``), which then calls ``outbox_scheduled`` with their ids.
    Inside the transaction of the change."""
    if not connection.in_atomic_block:
        raise RuntimeError("outbox_enqueue must run inside the transaction of the change.")
    now = timezone.now()
    seqs = dict(last or {})
    rows = []
    for endpoint, row in items:
        key = endpoint_aggregate(aggregate_key, endpoint.pk)
        seqs[key] = seqs.get(key, 0) + 1
        rows.append(
            {
                "endpoint_id": endpoint.pk,
                "aggregate_key": key,
                "seq": seqs[key],
                "resource_type": row.resource_type,
                "logical_id": row.logical_id,
                "version_id": row.version_id,
                "idempotency_key": f"{row.resource_type}-{row.logical_id}-{row.version_id}-{endpoint.pk}",
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    return rows


def outbox_scheduled(ids: list[int], rows: list[dict[str, Any]]) -> None:
    """Hand the first new message of each aggregate (``rows``, in the order of their
    ``ids``) to a worker once committed (each delivery schedules the next of its
    aggregate)."""
    heads: dict[str, int] = {}
    for pk, row in zip(ids, rows, strict=True):
        heads.setdefault(row["aggregate_key"], pk)
    for head in heads.values():
        # Off the request thread (core.dispatch): the caller does not wait for the broker.
        transaction.on_commit(functools.partial(send_later, schedule_delivery, head))


def schedule_delivery(message_id: int) -> None:
    """Hand a message to a worker now; if the broker is down beat's drain finds it later."""
    from fhir_gateway.tasks import deliver_outbox

    try:
        deliver_outbox.apply_async((message_id,), retry=False)
    except (BrokerError, OSError):
        logger.warning("broker unavailable; the beat drain will deliver", extra={"id": message_id})


# --------------------------------------------------------------------------- deliver


@dataclass(frozen=True)
class Claim:
    message_id: int
    token: str
    method: str
    url: str
    body: bytes
    headers: dict[str, str]


class PermanentFailure(Exception):
    """The message can never be sent as it is (no rendering, unsupported version)."""


def _earlier_undelivered(message: OutboxMessage) -> bool:
    return (
        OutboxMessage.objects.filter(aggregate_key=message.aggregate_key, seq__lt=message.seq)
        .exclude(status=Status.DELIVERED)
        .exists()
    )


_RowKey = tuple[str, str, int]


def _render(
    message: OutboxMessage, version: str, rows: dict[_RowKey, FhirResource] | None = None
) -> str:
    if version not in SUPPORTED_VERSIONS:
        raise PermanentFailure(f"the endpoint speaks FHIR {version}, which we do not send")
    if message.payload:
        if message.payload_fhir_version == version:
            return message.payload
        converted = render_for_version(
            json.loads(message.payload), message.payload_fhir_version, version
        )
        if converted is None:
            raise PermanentFailure(f"no FHIR {version} rendering of {message.resource_type}")
        return validate_resource(converted, version).model_dump_json(exclude_none=True)
    key = (message.resource_type, message.logical_id, message.version_id or 0)
    if rows is not None:
        row = rows.get(key)
    else:
        row = FhirResource.objects.filter(
            resource_type=key[0], logical_id=key[1], version_id=key[2]
        ).first()
    if row is None or row.deleted:
        raise PermanentFailure(
            f"{message.resource_type}/{message.logical_id}/_history/{message.version_id} "
            "is not stored"
        )
    text = row.json_for(version)
    if not text:
        raise PermanentFailure(f"no FHIR {version} rendering of {row}")
    return text


def _auth_headers(endpoint: Endpoint) -> dict[str, str]:
    """The endpoint's authentication headers; PermanentFailure when it cannot be sent to
    (also a base URL with a query or fragment: the resource path cannot follow it). The
    URL rule is the registry's, which refuses such a URL before it is stored; rows stored
    before it, or written around it, still end here."""
    problem = fhir_base_url_problem(endpoint.base_url)
    if problem:  # retrying would not make it one
        raise PermanentFailure(f"base URL {endpoint.base_url[:200]!r} {problem}")
    if endpoint.auth_type == Endpoint.AuthType.NONE:
        return {}
    try:
        secret = env_secret(endpoint.auth_secret_ref) if endpoint.auth_secret_ref else None
    except (OSError, UnicodeError) as exc:  # <NAME>_FILE missing, unreadable, not UTF-8
        raise PermanentFailure(
            f"secret {endpoint.auth_secret_ref!r} cannot be read: {type(exc).__name__}"
        ) from exc
    if not secret:
        raise PermanentFailure(f"secret {endpoint.auth_secret_ref!r} is not configured")
    if endpoint.auth_type == Endpoint.AuthType.BEARER:
        # A header value is Latin-1 without line breaks (http.client refuses the rest).
        if not secret.isprintable() or not secret.isascii():
            raise PermanentFailure(
                f"secret {endpoint.auth_secret_ref!r} is not a printable ASCII token"
            )
        return {"Authorization": f"Bearer {secret}"}
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode("ascii")}


def _claim(message_id: int, now: datetime) -> Claim | None:
    with transaction.atomic():
        message = (
            OutboxMessage.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("endpoint")
            .filter(pk=message_id)
            .first()
        )
        if message is None:  # gone, or another worker holds it right now
            return None
        if message.status in (Status.PENDING, Status.FAILED):
            if message.next_attempt_at > now:
                return None
        elif not (
            message.status == Status.IN_FLIGHT
            and message.claimed_at is not None
            and message.claimed_at < now - lease()
        ):
            return None
        endpoint = message.endpoint
        if endpoint.status != Endpoint.Status.ACTIVE or _earlier_undelivered(message):
            return None
        message.attempts += 1
        try:
            body = _render(message, endpoint.fhir_version)
            auth = _auth_headers(endpoint)
        except PermanentFailure as exc:
            message.status = Status.DEAD
            message.last_error = str(exc)
            message.claim_token = ""
            message.save(update_fields=["status", "last_error", "attempts", "claim_token"])
            logger.error("outbox message dead", extra=_log_fields(message))
            return None
        token = uuid.uuid4().hex
        message.status = Status.IN_FLIGHT
        message.claimed_at = now
        message.claim_token = token
        message.save(update_fields=["status", "claimed_at", "claim_token", "attempts"])
    return _request_for(message, endpoint, token, body, auth)


def _request_for(
    message: OutboxMessage, endpoint: Endpoint, token: str, body: str, auth: dict[str, str]
) -> Claim:
    base = endpoint.base_url.rstrip("/")
    url = f"{base}/{message.resource_type}"
    if message.http_method == OutboxMessage.Method.PUT:
        url += f"/{message.logical_id}"
    media = media_type_for(endpoint.fhir_version)
    headers = {
        "Content-Type": media,
        "Accept": media,
        "Idempotency-Key": message.idempotency_key,
        "X-Request-ID": message.idempotency_key,
        **auth,
    }
    return Claim(message.pk, token, message.http_method, url, body.encode(), headers)


# Of a member's answer, this much is read (its status is what counts; the start of the
# text is kept in last_error), and no longer than the timeout in all.
MAX_ANSWER_BYTES = 64 * 1024
# A Retry-After longer than this is taken as this.
MAX_RETRY_AFTER_SECONDS = 3600


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (connection error, timeout)
    detail: str
    retry_after: float | None = None  # seconds, from a 429 / 503 Retry-After

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """RFC 9110 10.2.3: delay-seconds or an HTTP-date; None when absent or invalid,
    clamped to 0..MAX_RETRY_AFTER_SECONDS."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        seconds = float(digits) if len(digits) <= 10 else float(MAX_RETRY_AFTER_SECONDS)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # asctime carries no zone; HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _disarm() -> bool:
    """End this thread's send deadline; True when the watchdog had to shut the socket (and
    the pool had not already disarmed it: then the answer's head had come whole)."""
    armed, _DEADLINE.at, _DEADLINE.armed = _DEADLINE.armed, None, None
    return armed is not None and _WATCHDOG.disarm(armed)


def _send(claim: Claim) -> Answer:
    """One request, bounded in time as a whole: the connect by min(timeout, 5 s), the
    whole answer (status line, headers, body) by the connect bound plus the timeout (the
    watchdog), the body also by MAX_ANSWER_BYTES: a member that trickles its answer must
    not outlast the lease and be sent the message again. Any error is this message's
    outcome, never the batch's."""
    seconds = _setting("FHIR_OUTBOX_TIMEOUT_SECONDS")
    # The answer (status, headers, body) must be in by this: past it the watchdog shuts the
    # socket down, however slowly the member trickles.
    allowed = min(seconds, 5) + seconds
    deadline = time.monotonic() + allowed
    _DEADLINE.at, _DEADLINE.armed = deadline, None
    try:
        response = _POOL.request(
            claim.method,
            claim.url,
            body=claim.body,
            headers=claim.headers,
            timeout=urllib3.Timeout(connect=min(seconds, 5), read=seconds),
            redirect=False,
            preload_content=False,
        )
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if _disarm():
            return Answer(None, f"no answer within {allowed:g} s (status line or headers)")
        return Answer(None, f"{type(exc).__name__}: {exc}"[:2000])
    except Exception as exc:
        _disarm()
        logger.exception("outbox send failed", extra={"id": claim.message_id})
        return Answer(None, f"{type(exc).__name__}: {exc}"[:2000])
    head, read, whole = bytearray(), 0, False
    try:
        while True:
            chunk = response.read1(8192)  # what one receive brings (read() waits for all)
            if not chunk:
                whole = True
                break
            head += chunk[: max(0, 2000 - len(head))]
            read += len(chunk)
            if read > MAX_ANSWER_BYTES or time.monotonic() > deadline:
                break
    except (urllib3.exceptions.HTTPError, OSError):
        pass  # the status came; the rest of the body did not
    except Exception:  # any error of the body is this message's, never the batch's
        logger.exception("outbox answer body unreadable", extra={"id": claim.message_id})
    finally:
        if _disarm():  # the socket was shut down: an end of the body that is not one
            whole = False
        if not whole:  # not reusable: close it rather than read on
            response.close()
        response.release_conn()  # back to the pool (a closed one reconnects)
    retry_after = (
        retry_after_seconds(response.headers.get("Retry-After"), timezone.now())
        if response.status in (429, 503)
        else None
    )
    return Answer(response.status, bytes(head).decode("utf-8", "replace"), retry_after)


def outbox_deliver(*, message_id: int) -> str:
    """Try to deliver one message. Safe to run twice: only the claimant records an outcome.

    Returns what happened: delivered, failed, dead, or skipped (not claimable now).
    """
    claim = _claim(message_id, timezone.now())
    if claim is None:
        return "skipped"
    answer = _send(claim)
    now = timezone.now()
    with transaction.atomic():
        message = (
            OutboxMessage.objects.select_for_update()
            .filter(pk=claim.message_id, status=Status.IN_FLIGHT, claim_token=claim.token)
            .first()
        )
        if message is None:
            # The lease expired and another worker took over: its outcome counts.
            logger.warning("outbox lease lost", extra={"id": claim.message_id})
            return "lease-lost"
        if answer.ok:
            message.last_status_code = answer.status
            message.claim_token = ""
            message.status = Status.DELIVERED
            message.delivered_at = now
            message.last_error = ""
            message.save()
            following = (
                OutboxMessage.objects.filter(
                    aggregate_key=message.aggregate_key,
                    seq__gt=message.seq,
                    status__in=(Status.PENDING, Status.FAILED),
                )
                .order_by("seq")
                .values_list("pk", flat=True)
                .first()
            )
            if following is not None:
                transaction.on_commit(lambda: schedule_delivery(following))
            return "delivered"
        return _record_failure(message, answer, now)


def _record_failure(message: OutboxMessage, answer: Answer, now: datetime) -> str:
    """A non-2xx answer or no answer: failed with backoff (at least the member's
    Retry-After), or dead. Saves the message."""
    status_code, detail = answer.status, answer.detail
    message.last_status_code = status_code
    message.claim_token = ""
    message.last_error = f"HTTP {status_code}: {detail}" if status_code is not None else detail
    permanent = (
        status_code is not None and 400 <= status_code < 500 and status_code not in _RETRYABLE_4XX
    )
    if permanent or message.attempts >= max_attempts():
        message.status = Status.DEAD
        outcome = "dead"
        logger.error("outbox message dead", extra=_log_fields(message))
    else:
        message.status = Status.FAILED
        delay = max(backoff_seconds(message.attempts), answer.retry_after or 0.0)
        message.next_attempt_at = now + timedelta(seconds=delay)
        outcome = "failed"
        logger.warning(
            "outbox delivery failed; will retry",
            extra={**_log_fields(message), "retry_in_seconds": round(delay, 1)},
        )
    message.save()
    return outcome


def _log_fields(message: OutboxMessage) -> dict[str, Any]:
    """What an operator needs from a delivery log line: which message, to which member,
    about what, after how many attempts, why."""
    return {
        "id": message.pk,
        "endpoint_id": message.endpoint_id,
        "aggregate": message.aggregate_key,
        "seq": message.seq,
        "resource": f"{message.resource_type}/{message.logical_id}/_history/{message.version_id}",
        "attempts": message.attempts,
        "error": message.last_error,
    }


# --------------------------------------------------------------------------- batch delivery


@dataclass
class BatchReport:
    claimed: int = 0
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    released: int = 0


def _stored_rows(messages: list[OutboxMessage]) -> dict[_RowKey, FhirResource]:
    keys = {(m.resource_type, m.logical_id, m.version_id or 0) for m in messages if not m.payload}
    if not keys:
        return {}
    condition = Q()
    for resource_type, logical_id, version_id in keys:
        condition |= Q(resource_type=resource_type, logical_id=logical_id, version_id=version_id)
    return {
        (r.resource_type, r.logical_id, r.version_id): r
        for r in FhirResource.objects.filter(condition).only(
            "resource_type", "logical_id", "version_id", "deleted", "json_r4", "json_r5"
        )
    }


def _claim_batch(
    limit: int, now: datetime, token: str
) -> tuple[list[list[tuple[Claim, str]]], int]:
    """Claim up to ``limit`` due messages of many aggregates in one transaction.

    Per aggregate, a run of consecutive messages is claimed from its head (every earlier
    seq delivered), so one sender can push them in order. Rows another worker holds are
    skipped (``SKIP LOCKED``); a run stops at the first seq not claimed here. Returns
    the runs (each a list of (claim, original status)) and the number marked dead.
    """
    # A head: no earlier message of its aggregate undelivered. Only heads are scanned
    # for, then the messages queued behind them: scanning every due message in
    # ``next_attempt_at`` order put the followers of heads that had failed (their
    # ``next_attempt_at`` their creation, older than the head's retry time) first, and
    # with ``limit`` of them the batch held no head, claimed nothing, and the drain
    # stopped for good (review).
    earlier_undelivered = OutboxMessage.objects.filter(
        aggregate_key=OuterRef("aggregate_key"), seq__lt=OuterRef("seq")
    ).exclude(status=Status.DELIVERED)
    dead = 0
    with transaction.atomic():
        # Two scans instead of one OR, each walking its partial index in order and stopping
        # at ``limit`` (an OR of both turns into bitmap scans over every due row). Expired
        # leases first: few (a worker died), and behind a backlog of ``limit`` due heads
        # they would otherwise wait until the backlog shrank.
        candidates: list[OutboxMessage] = []
        for due, order in (
            (Q(status=Status.IN_FLIGHT, claimed_at__lt=now - lease()), ("claimed_at", "pk")),
            (
                Q(status__in=(Status.PENDING, Status.FAILED), next_attempt_at__lte=now),
                ("next_attempt_at", "pk"),
            ),
        ):
            if len(candidates) >= limit:
                break
            candidates += list(
                OutboxMessage.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("endpoint")
                .filter(due, endpoint__status=Endpoint.Status.ACTIVE)
                .filter(~Exists(earlier_undelivered))
                .order_by(*order)[: limit - len(candidates)]
            )
        if candidates and len(candidates) < limit:
            # What is queued behind those heads, due, in order, up to the limit: a run
            # sends a head and its followers in one go.
            candidates += list(
                OutboxMessage.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("endpoint")
                .filter(
                    aggregate_key__in=[c.aggregate_key for c in candidates],
                    status__in=(Status.PENDING, Status.FAILED),
                    next_attempt_at__lte=now,
                    endpoint__status=Endpoint.Status.ACTIVE,
                )
                .exclude(pk__in=[c.pk for c in candidates])
                .order_by("aggregate_key", "seq")[: limit - len(candidates)]
            )
        if not candidates:
            return [], 0
        mine: dict[str, dict[int, OutboxMessage]] = {}
        for message in candidates:
            mine.setdefault(message.aggregate_key, {})[message.seq] = message
        # Every undelivered seq of those aggregates: a run is the prefix of it we hold.
        pending: dict[str, list[int]] = {}
        for key, seq in (
            OutboxMessage.objects.filter(aggregate_key__in=list(mine))
            .exclude(status=Status.DELIVERED)
            .order_by("aggregate_key", "seq")
            .values_list("aggregate_key", "seq")
        ):
            pending.setdefault(key, []).append(seq)
        rows = _stored_rows(candidates)
        runs: list[list[tuple[Claim, str]]] = []
        claimed: list[int] = []
        for key, held in mine.items():
            run: list[tuple[Claim, str]] = []
            for seq in pending.get(key, []):
                found = held.get(seq)
                if found is None:
                    break
                message = found
                endpoint = message.endpoint
                try:
                    body = _render(message, endpoint.fhir_version, rows)
                    auth = _auth_headers(endpoint)
                except PermanentFailure as exc:
                    message.attempts += 1
                    message.last_error = str(exc)
                    OutboxMessage.objects.filter(pk=message.pk).update(
                        status=Status.DEAD,
                        last_error=message.last_error,
                        attempts=message.attempts,
                        claim_token="",
                    )
                    logger.error("outbox message dead", extra=_log_fields(message))
                    dead += 1
                    break
                run.append((_request_for(message, endpoint, token, body, auth), message.status))
                claimed.append(message.pk)
            if run:
                runs.append(run)
        if claimed:
            OutboxMessage.objects.filter(pk__in=claimed).update(
                status=Status.IN_FLIGHT,
                claimed_at=now,
                claim_token=token,
                attempts=F("attempts") + 1,
            )
    return runs, dead


def _send_run(
    run: list[tuple[Claim, str]], stop_at: float | None = None
) -> list[tuple[Claim, str, Answer]]:
    """Send one aggregate's run in order; stop at the first failure, or when a request
    begun now could outlast the lease (``stop_at``, monotonic): the rest is released."""
    out: list[tuple[Claim, str, Answer]] = []
    for claim, original in run:
        if stop_at is not None and time.monotonic() > stop_at:
            break  # the first of a run too: a run the pool reaches late waits whole
        answer = _send(claim)
        out.append((claim, original, answer))
        if not answer.ok:
            break
    return out


def outbox_deliver_batch(
    *, limit: int = 500, concurrency: int | None = None, executor: Any = None
) -> BatchReport:
    """Claim a batch across aggregates, send concurrently, record outcomes in bulk.

    Same guarantees as ``outbox_deliver``: order per aggregate (one sender per aggregate,
    in seq order, stopping at the first failure), the lease protects against dead workers,
    only the claimant (the batch token) records an outcome, each message keeps its
    idempotency key. ``executor`` (a ``concurrent.futures`` executor) is reused when given.
    """
    from concurrent.futures import ThreadPoolExecutor

    now = timezone.now()
    claimed_at = time.monotonic()  # the lease runs from here (the claim's own time counts)
    token = uuid.uuid4().hex
    runs, dead = _claim_batch(limit, now, token)
    report = BatchReport(claimed=sum(len(r) for r in runs), dead=dead)
    if not runs:
        return report
    workers = concurrency or int(_setting("FHIR_OUTBOX_CONCURRENCY"))
    # A request takes at most ~2 timeouts (the connect, then the answer's deadline, which
    # the watchdog enforces); none starts when it could end after the lease, or another
    # drain would take the message over and send it again while it is still open.
    timeout = _setting("FHIR_OUTBOX_TIMEOUT_SECONDS")
    budget = lease().total_seconds() - 2 * timeout - 1
    if budget < timeout:  # too short to be a bound (no run would start): unbounded, warned
        logger.warning("FHIR_OUTBOX_LEASE_SECONDS should exceed 3 x the timeout + 1 s")
    stop_at = claimed_at + budget if budget >= timeout else None

    def send(run: list[tuple[Claim, str]]) -> list[tuple[Claim, str, Answer]]:
        return _send_run(run, stop_at)

    if executor is None and workers > 1 and len(runs) > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(runs))) as pool:
            results = list(pool.map(send, runs))
    elif executor is not None:
        results = list(executor.map(send, runs))
    else:
        results = [send(run) for run in runs]
    sent = {claim.message_id for result in results for claim, *_ in result}
    released: dict[str, list[int]] = {}
    for run in runs:
        for claim, original in run:
            if claim.message_id not in sent:
                released.setdefault(original, []).append(claim.message_id)
    delivered: dict[int, list[int]] = {}
    failures: list[tuple[int, Answer]] = []
    for result in results:
        for claim, _original, answer in result:
            if answer.ok:
                assert answer.status is not None
                delivered.setdefault(answer.status, []).append(claim.message_id)
            else:
                failures.append((claim.message_id, answer))
    done = timezone.now()
    mine = Q(status=Status.IN_FLIGHT, claim_token=token)
    with transaction.atomic():
        for status_code, ids in delivered.items():
            report.delivered += OutboxMessage.objects.filter(mine, pk__in=ids).update(
                status=Status.DELIVERED,
                delivered_at=done,
                last_error="",
                last_status_code=status_code,
                claim_token="",
            )
        for original, ids in released.items():
            # Not sent (an earlier message of the run failed): as before, attempt uncounted.
            report.released += OutboxMessage.objects.filter(mine, pk__in=ids).update(
                status=original if original != Status.IN_FLIGHT else Status.PENDING,
                claim_token="",
                attempts=F("attempts") - 1,
            )
        if failures:
            locked = {
                m.pk: m
                for m in OutboxMessage.objects.select_for_update().filter(
                    mine, pk__in=[pk for pk, _answer in failures]
                )
            }
            for pk, answer in failures:
                message = locked.get(pk)
                if message is None:
                    logger.warning("outbox lease lost", extra={"id": pk})
                    continue
                if _record_failure(message, answer, done) == "dead":
                    report.dead += 1
                else:
                    report.failed += 1
    return report


def outbox_drain(
    *,
    limit: int = 500,
    concurrency: int | None = None,
    max_batches: int = 1000,
    max_seconds: float | None = None,
) -> BatchReport:
    """Deliver batches until nothing is due now, ``max_batches`` ran, or ``max_seconds``
    passed (checked between batches); one thread pool for all of them.

    This is beat's path (``fhir_gateway.outbox_drain``): retries whose backoff ran out,
    messages whose on-commit hand-off was lost, and ``in_flight`` messages whose lease
    expired are all "due" to ``_claim_batch``; failures go through ``_record_failure``
    (backoff, dead after ``FHIR_OUTBOX_MAX_ATTEMPTS``) and unsendable messages are
    dead-lettered while claiming. ``max_seconds`` keeps one beat run from outliving the
    next, so drains do not pile up on the workers' slots under a steady backlog.
    """
    from concurrent.futures import ThreadPoolExecutor

    total = BatchReport()
    workers = concurrency or int(_setting("FHIR_OUTBOX_CONCURRENCY"))
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in range(max_batches):
            report = outbox_deliver_batch(limit=limit, executor=pool)
            for field in ("claimed", "delivered", "failed", "dead", "released"):
                setattr(total, field, getattr(total, field) + getattr(report, field))
            if not report.claimed and not report.dead:
                break
            if report.released == report.claimed and not report.dead:
                break  # nothing sent (every run waited for the lease): the next run retries
            if deadline is not None and time.monotonic() >= deadline:
                break
    return total


# --------------------------------------------------------------------------- operator actions


def outbox_retry(*, message_id: int) -> bool:
    """Put a dead or failed message back in the queue now, with a fresh attempt budget."""
    with transaction.atomic():
        count = OutboxMessage.objects.filter(
            pk=message_id, status__in=(Status.DEAD, Status.FAILED)
        ).update(status=Status.PENDING, attempts=0, next_attempt_at=timezone.now(), claim_token="")
        if count:
            transaction.on_commit(lambda: schedule_delivery(message_id))
    return bool(count)


def outbox_replay(*, message_id: int) -> OutboxMessage | None:
    """Send a delivered message again, as a new message at the end of its aggregate.

    It gets a new idempotency key (the member saw the old one and would ignore it). None
    (nothing queued) when the message was not delivered, when its endpoint is not active
    (the replay could not be sent, and would hold back the referral's later messages to
    that endpoint), or when a newer version of the resource was queued for that endpoint
    since (sent after it, the old version would set the member back).
    """
    with transaction.atomic():
        # Locked: retention (``outbox_prune``, SKIP LOCKED) deleting it meanwhile made the
        # replay's link to it fail the commit (review).
        original = (
            OutboxMessage.objects.select_for_update(of=("self",))
            .select_related("endpoint")
            .filter(pk=message_id, status=Status.DELIVERED)
            .first()
        )
        if original is None or original.endpoint.status != Endpoint.Status.ACTIVE:
            return None
        # A stored version is not replayed over a newer one; a payload message has no
        # version (Django refuses ``__gt=None``: the admin's Replay was a 500, review).
        if (
            original.version_id is not None
            and OutboxMessage.objects.filter(
                endpoint_id=original.endpoint_id,
                resource_type=original.resource_type,
                logical_id=original.logical_id,
                version_id__gt=original.version_id,
            ).exists()
        ):
            return None
        replay = outbox_enqueue(
            endpoint=original.endpoint,
            aggregate_key=original.aggregate_key,
            resource_type=original.resource_type,
            logical_id=original.logical_id,
            version_id=original.version_id,
            payload=json.loads(original.payload) if original.payload else None,
            payload_fhir_version=original.payload_fhir_version,
            http_method=original.http_method,
        )
        replay.replay_of = original
        replay.save(update_fields=["replay_of"])
    return replay


# --------------------------------------------------------------------------- retention


def outbox_prune(*, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` messages delivered before ``before``, oldest first, in one
    transaction. Returns how many (fewer than ``limit``: nothing older is left, apart from
    rows another transaction holds).

    Only ``delivered`` rows: the filter is in the SELECT (rows locked, ``SKIP LOCKED``)
    and again in the DELETE. The scan walks the index ``outbox_status_created``
    (status, created_at): ``delivered_at`` ≥ ``created_at``, so every row delivered before
    the cutoff was also created before it. Replays keep their row; their ``replay_of``
    link to a pruned original is cleared first (the FK is ``SET NULL`` in Django only).
    """
    with transaction.atomic():
        ids = list(
            OutboxMessage.objects.select_for_update(skip_locked=True)
            .filter(status=Status.DELIVERED, created_at__lt=before, delivered_at__lt=before)
            .order_by("created_at")
            .values_list("pk", flat=True)[:limit]
        )
        if not ids:
            return 0
        OutboxMessage.objects.filter(replay_of_id__in=ids).update(replay_of=None)
        table = connection.ops.quote_name(OutboxMessage._meta.db_table)
        marks = ", ".join(["%s"] * len(ids))
        with connection.cursor() as cursor:
            # Raw: the ORM's delete() would load every row to emulate SET NULL on replays.
            cursor.execute(
                f"DELETE FROM {table} WHERE status = %s AND id IN ({marks})",  # noqa: S608
                [Status.DELIVERED, *ids],
            )
            return int(cursor.rowcount)
