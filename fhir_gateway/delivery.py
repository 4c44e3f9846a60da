"""The transactional outbox (decision 1): what members must hear, delivered reliably.

``outbox_enqueue`` is called inside the caller's ``transaction.atomic``, with the state
change, so a message exists if and only if the change committed. ``outbox_deliver`` claims
one message (``SELECT ... FOR UPDATE SKIP LOCKED``), sends it outside any transaction and
records the outcome; a message whose worker died stays ``in_flight`` until its lease expires
and is then claimed again. Messages of one aggregate go out in ``seq`` order; each carries
its idempotency key, so a member that saw a request whose answer we lost applies it once.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import urllib3
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from config.env import env_secret
from fhir_gateway.conversion import render_for_version
from fhir_gateway.models import FhirResource, OutboxMessage
from fhir_gateway.storage import validate_resource
from fhir_gateway.versions import SUPPORTED_VERSIONS, media_type_for
from registry.models import Endpoint

logger = logging.getLogger(__name__)

Status = OutboxMessage.Status
_RETRYABLE_4XX = frozenset({408, 425, 429})
_POOL = urllib3.PoolManager(num_pools=64, maxsize=8, retries=False)
_JITTER = secrets.SystemRandom()


def _setting(name: str, default: float) -> float:
    return float(getattr(settings, name, default))


def max_attempts() -> int:
    return int(_setting("FHIR_OUTBOX_MAX_ATTEMPTS", 8))


def lease() -> timedelta:
    return timedelta(seconds=_setting("FHIR_OUTBOX_LEASE_SECONDS", 300))


def backoff_seconds(attempt: int) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(attempt-1)))."""
    base = _setting("FHIR_OUTBOX_BACKOFF_BASE_SECONDS", 2)
    cap = _setting("FHIR_OUTBOX_BACKOFF_CAP_SECONDS", 3600)
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
    one task per aggregate and transaction is enough (the sweep is the safety net).
    """
    if not connection.in_atomic_block:
        raise RuntimeError("outbox_enqueue must run inside the transaction of the change.")
    if (version_id is None) == (payload is None):
        raise ValueError("give exactly one of version_id and payload")
    if payload is not None and payload_fhir_version not in SUPPORTED_VERSIONS:
        raise ValueError("a payload needs payload_fhir_version 4.0 or 5.0")
    if connection.vendor == "postgresql":
        # Serialises seq assignment per aggregate (callers usually hold the row lock too).
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"outbox:{aggregate_key}"]
            )
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


def outbox_enqueue_versions(
    *,
    aggregate_key: str,
    items: list[tuple[Endpoint, FhirResource]],
) -> list[OutboxMessage]:
    """Several stored versions at the end of one aggregate, in order: one lock, one seq
    query, one INSERT, one scheduled task (each delivery schedules the next of its
    aggregate). Same contract as ``outbox_enqueue``; idempotency key
    ``<type>-<id>-<version>-<endpoint>``."""
    if not connection.in_atomic_block:
        raise RuntimeError("outbox_enqueue must run inside the transaction of the change.")
    if not items:
        return []
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"outbox:{aggregate_key}"]
            )
    last = (
        OutboxMessage.objects.filter(aggregate_key=aggregate_key)
        .order_by("-seq")
        .values_list("seq", flat=True)
        .first()
    ) or 0
    messages = OutboxMessage.objects.bulk_create(
        OutboxMessage(
            endpoint=endpoint,
            aggregate_key=aggregate_key,
            seq=last + offset,
            resource_type=row.resource_type,
            logical_id=row.logical_id,
            version_id=row.version_id,
            idempotency_key=f"{row.resource_type}-{row.logical_id}-{row.version_id}-{endpoint.pk}",
        )
        for offset, (endpoint, row) in enumerate(items, start=1)
    )
    head = messages[0].pk
    transaction.on_commit(lambda: schedule_delivery(head))
    return messages


def schedule_delivery(message_id: int) -> None:
    """Hand a message to a worker now; if the broker is down the sweep finds it later."""
    from fhir_gateway.tasks import deliver_outbox

    try:
        deliver_outbox.apply_async((message_id,), retry=False)
    except (BrokerError, OSError):
        logger.warning("broker unavailable; outbox sweep will deliver", extra={"id": message_id})


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


def _render(message: OutboxMessage, version: str) -> str:
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
    row = FhirResource.objects.filter(
        resource_type=message.resource_type,
        logical_id=message.logical_id,
        version_id=message.version_id or 0,
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
    if endpoint.auth_type == Endpoint.AuthType.NONE:
        return {}
    secret = env_secret(endpoint.auth_secret_ref) if endpoint.auth_secret_ref else None
    if not secret:
        raise PermanentFailure(f"secret {endpoint.auth_secret_ref!r} is not configured")
    if endpoint.auth_type == Endpoint.AuthType.BEARER:
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
            logger.error("outbox message dead", extra={"id": message.pk, "error": str(exc)})
            return None
        token = uuid.uuid4().hex
        message.status = Status.IN_FLIGHT
        message.claimed_at = now
        message.claim_token = token
        message.save(update_fields=["status", "claimed_at", "claim_token", "attempts"])
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


def _send(claim: Claim) -> tuple[int | None, str]:
    seconds = _setting("FHIR_OUTBOX_TIMEOUT_SECONDS", 10)
    try:
        response = _POOL.request(
            claim.method,
            claim.url,
            body=claim.body,
            headers=claim.headers,
            timeout=urllib3.Timeout(connect=min(seconds, 5), read=seconds),
            redirect=False,
            preload_content=True,
        )
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:2000]
    text = response.data[:2000].decode("utf-8", "replace")
    return response.status, text


def outbox_deliver(*, message_id: int) -> str:
    """Try to deliver one message. Safe to run twice: only the claimant records an outcome.

    Returns what happened: delivered, failed, dead, or skipped (not claimable now).
    """
    claim = _claim(message_id, timezone.now())
    if claim is None:
        return "skipped"
    status_code, detail = _send(claim)
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
        message.last_status_code = status_code
        message.claim_token = ""
        if status_code is not None and 200 <= status_code < 300:
            message.status = Status.DELIVERED
            message.delivered_at = now
            message.last_error = ""
            outcome = "delivered"
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
        else:
            message.last_error = (
                f"HTTP {status_code}: {detail}" if status_code is not None else detail
            )
            permanent = (
                status_code is not None
                and 400 <= status_code < 500
                and status_code not in _RETRYABLE_4XX
            )
            if permanent or message.attempts >= max_attempts():
                message.status = Status.DEAD
                outcome = "dead"
                logger.error(
                    "outbox message dead", extra={"id": message.pk, "error": message.last_error}
                )
            else:
                message.status = Status.FAILED
                message.next_attempt_at = now + timedelta(seconds=backoff_seconds(message.attempts))
                outcome = "failed"
        message.save()
    return outcome


def outbox_due_ids(*, limit: int = 500, now: datetime | None = None) -> list[int]:
    """Messages a worker may deliver now: due, head of their aggregate, endpoint active."""
    now = now or timezone.now()
    earlier = OutboxMessage.objects.filter(
        aggregate_key=OuterRef("aggregate_key"), seq__lt=OuterRef("seq")
    ).exclude(status=Status.DELIVERED)
    due = Q(status__in=(Status.PENDING, Status.FAILED), next_attempt_at__lte=now) | Q(
        status=Status.IN_FLIGHT, claimed_at__lt=now - lease()
    )
    return list(
        OutboxMessage.objects.filter(due, endpoint__status=Endpoint.Status.ACTIVE)
        .filter(~Exists(earlier))
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )


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

    It gets a new idempotency key (the member saw the old one and would ignore it).
    """
    with transaction.atomic():
        original = OutboxMessage.objects.filter(pk=message_id, status=Status.DELIVERED).first()
        if original is None:
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
