"""Outbox delivery to real stub member servers on 127.0.0.1 that fail, time out and recover."""

from __future__ import annotations

import importlib
import json
import types
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from fhir_gateway import delivery
from fhir_gateway.delivery import (
    backoff_seconds,
    outbox_enqueue,
    outbox_replay,
    outbox_retry,
)
from fhir_gateway.models import FhirResource, OutboxMessage
from fhir_gateway.storage import store_version
from fhir_gateway.tasks import deliver_outbox, outbox_drain_task
from registry.models import Endpoint
from tests.factories import EndpointFactory

Status = OutboxMessage.Status


@pytest.fixture(autouse=True)
def _fast_retries(settings):
    settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS = 0
    settings.FHIR_OUTBOX_MAX_ATTEMPTS = 4
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5


def _resource(logical_id: str, status: str = "completed") -> FhirResource:
    with transaction.atomic():
        return store_version(
            resource_type="Communication",
            logical_id=logical_id,
            resource={"resourceType": "Communication", "status": status},
            fhir_version="4.0",
        )


def _enqueue(
    endpoint: Endpoint, aggregate: str, row: FhirResource, *, schedule: bool = True
) -> OutboxMessage:
    """``schedule=False``: as if the on-commit hand-off was lost (beat's drain finds it)."""
    with transaction.atomic():
        return outbox_enqueue(
            endpoint=endpoint,
            aggregate_key=aggregate,
            resource_type=row.resource_type,
            logical_id=row.logical_id,
            version_id=row.version_id,
            schedule=schedule,
        )


def _drain() -> int:
    """What beat does every 10 s: the drain task's body, run in this process."""
    return outbox_drain_task()


@pytest.mark.django_db(transaction=True)
def test_enqueue_refuses_to_run_outside_a_transaction():
    endpoint = EndpointFactory.create()
    with pytest.raises(RuntimeError):
        outbox_enqueue(
            endpoint=endpoint,
            aggregate_key="referral:1",
            resource_type="Task",
            logical_id="1",
            version_id=1,
        )


def test_enqueue_is_rolled_back_with_the_change(db):
    endpoint = EndpointFactory.create()
    row = _resource("c1")
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        outbox_enqueue(
            endpoint=endpoint,
            aggregate_key="referral:1",
            resource_type="Communication",
            logical_id=row.logical_id,
            version_id=row.version_id,
        )
        raise ZeroDivisionError
    assert OutboxMessage.objects.count() == 0


def test_enqueue_schedules_delivery_on_commit_only(
    db, django_capture_on_commit_callbacks, monkeypatch
):
    scheduled: list[int] = []
    monkeypatch.setattr(delivery, "schedule_delivery", scheduled.append)
    endpoint = EndpointFactory.create()
    row = _resource("c1")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        message = _enqueue(endpoint, "referral:1", row)
        assert scheduled == []
    assert len(callbacks) == 1
    assert scheduled == [message.pk]
    assert (message.seq, message.status) == (1, Status.PENDING)


def test_delivery_puts_the_stored_bytes_with_version_and_idempotency_key(db, stub_member):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    row = _resource("c1")
    message = _enqueue(endpoint, "referral:1", row)
    assert deliver_outbox(message.pk) == "delivered"
    message.refresh_from_db()
    assert (message.status, message.attempts, message.last_status_code) == (
        Status.DELIVERED,
        1,
        200,
    )
    assert message.delivered_at is not None
    [request] = stub.requests
    assert request["method"] == "PUT"
    assert request["path"] == "/fhir/Communication/c1"
    assert request["content_type"] == "application/fhir+json; fhirVersion=4.0"
    assert request["key"] == message.idempotency_key
    assert request["body"] == row.json_r4.encode()
    # Running the task again changes nothing: it is not claimable any more.
    assert deliver_outbox(message.pk) == "skipped"
    assert len(stub.requests) == 1


def test_r5_endpoint_receives_the_r5_rendering(db, stub_member):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url, fhir_version="5.0")
    with transaction.atomic():
        row = store_version(
            resource_type="Communication",
            logical_id="c5",
            resource={"resourceType": "Communication", "status": "completed"},
            fhir_version="5.0",
        )
        message = outbox_enqueue(
            endpoint=endpoint,
            aggregate_key="a",
            resource_type="Communication",
            logical_id="c5",
            version_id=row.version_id,
        )
    assert deliver_outbox(message.pk) == "delivered"
    assert stub.requests[0]["content_type"] == "application/fhir+json; fhirVersion=5.0"
    assert stub.requests[0]["body"] == row.json_r5.encode()


def test_failures_and_a_timeout_then_recovery_lose_nothing_and_apply_once(db, stub_member):
    # 500, then a request that is applied but answered too late, then 503, then fine.
    stub = stub_member([500, ("slow", 1.5), 503])
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    _drain()
    message.refresh_from_db()
    assert message.status == Status.DELIVERED
    assert message.attempts == 4
    assert [r["key"] for r in stub.requests] == [message.idempotency_key] * 4
    # The member applied the change exactly once although it saw it three times.
    assert stub.applied == [message.idempotency_key]


def test_order_is_kept_per_aggregate_and_other_aggregates_proceed(db, stub_member):
    stub = stub_member([500, 500])  # the first two requests fail: both are A#1 (a0)
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    a = [_enqueue(endpoint, "referral:A", _resource(f"a{i}")) for i in range(3)]
    b = [_enqueue(endpoint, "referral:B", _resource(f"b{i}")) for i in range(2)]
    assert deliver_outbox(a[1].pk) == "skipped"  # not the head of its aggregate
    assert stub.requests == []
    assert deliver_outbox(a[0].pk) == "failed"
    assert deliver_outbox(a[0].pk) == "failed"
    assert deliver_outbox(b[0].pk) == "delivered"
    assert deliver_outbox(b[1].pk) == "delivered"  # B is not held up by A
    _drain()
    keys = {m.idempotency_key: m for m in a + b}
    applied_a = [keys[k].logical_id for k in stub.applied if keys[k].aggregate_key == "referral:A"]
    assert applied_a == ["a0", "a1", "a2"]
    sent_a = [
        keys[r["key"]].logical_id
        for r in stub.requests
        if keys[r["key"]].aggregate_key == "referral:A"
    ]
    assert sent_a == ["a0", "a0", "a0", "a1", "a2"]  # nothing after a0 went out before it
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}


def test_dead_letter_after_max_attempts_blocks_its_aggregate_until_retried(db, stub_member):
    stub = stub_member([500] * 4)
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    first = _enqueue(endpoint, "referral:1", _resource("c1"))
    second = _enqueue(endpoint, "referral:1", _resource("c2"))
    _drain()
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.attempts) == (Status.DEAD, 4)
    assert first.last_error.startswith("HTTP 500")
    assert second.status == Status.PENDING
    assert len(stub.requests) == 4
    assert _drain() == 0  # nothing is due: the dead head holds its aggregate
    assert len(stub.requests) == 4
    second.refresh_from_db()
    assert (second.status, second.attempts) == (Status.PENDING, 0)
    # The member is fixed; an operator retries.
    assert outbox_retry(message_id=first.pk) is True
    assert outbox_retry(message_id=second.pk) is False  # not dead or failed
    _drain()
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == (Status.DELIVERED, Status.DELIVERED)
    assert [r["path"] for r in stub.requests[4:]] == [
        "/fhir/Communication/c1",
        "/fhir/Communication/c2",
    ]


def test_permanent_4xx_is_dead_at_once(db, stub_member):
    stub = stub_member([422])
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    assert deliver_outbox(message.pk) == "dead"
    message.refresh_from_db()
    assert (message.status, message.attempts, message.last_status_code) == (Status.DEAD, 1, 422)


def test_unreachable_member_is_retried_with_backoff(db, settings):
    settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS = 60
    endpoint = EndpointFactory.create(base_url="http://127.0.0.1:9/fhir")  # discard port: refused
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    before = timezone.now()
    assert deliver_outbox(message.pk) == "failed"
    message.refresh_from_db()
    assert message.status == Status.FAILED
    assert "Error" in message.last_error
    assert before <= message.next_attempt_at <= before + timedelta(seconds=61)
    if message.next_attempt_at > timezone.now() + timedelta(seconds=1):
        _drain()  # not due yet: the drain leaves it alone
        message.refresh_from_db()
        assert (message.status, message.attempts) == (Status.FAILED, 1)
    # Its backoff ran out: beat's drain tries again (and is refused again).
    OutboxMessage.objects.filter(pk=message.pk).update(next_attempt_at=timezone.now())
    _drain()
    message.refresh_from_db()
    assert (message.status, message.attempts) == (Status.FAILED, 2)


def test_backoff_is_full_jitter_under_the_cap(settings):
    settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS = 2
    settings.FHIR_OUTBOX_BACKOFF_CAP_SECONDS = 100
    samples = [backoff_seconds(attempt) for attempt in (1, 3, 20) for _ in range(200)]
    assert all(0 <= s <= 100 for s in samples)
    assert max(backoff_seconds(1) for _ in range(200)) <= 2
    assert max(backoff_seconds(20) for _ in range(500)) > 50  # reaches towards the cap


def test_worker_killed_mid_delivery_loses_nothing(db, stub_member, settings):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    # A worker claims the message and dies before sending.
    assert delivery._claim(message.pk, timezone.now()) is not None
    message.refresh_from_db()
    assert message.status == Status.IN_FLIGHT
    assert deliver_outbox(message.pk) == "skipped"  # its lease still runs
    assert _drain() == 0
    assert stub.requests == []
    settings.FHIR_OUTBOX_LEASE_SECONDS = 0
    # The broker redelivers the dead worker's task (acks late): it takes the row over.
    assert deliver_outbox(message.pk) == "delivered"
    assert stub.applied == [message.idempotency_key]


def test_replay_sends_a_delivered_message_again_with_a_new_key(db, stub_member):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    original = _enqueue(endpoint, "referral:1", _resource("c1"))
    deliver_outbox(original.pk)
    assert outbox_replay(message_id=original.pk + 1000) is None
    replay = outbox_replay(message_id=original.pk)
    assert replay is not None
    assert (replay.seq, replay.replay_of_id) == (2, original.pk)
    assert replay.idempotency_key != original.idempotency_key
    _drain()
    assert stub.applied == [original.idempotency_key, replay.idempotency_key]
    assert stub.bodies[original.idempotency_key] == stub.bodies[replay.idempotency_key]


def test_inactive_endpoint_holds_messages(db, stub_member):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url, status=Endpoint.Status.SUSPENDED)
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    assert _drain() == 0
    assert deliver_outbox(message.pk) == "skipped"
    message.refresh_from_db()
    assert (message.status, message.attempts) == (Status.PENDING, 0)
    Endpoint.objects.filter(pk=endpoint.pk).update(status=Endpoint.Status.ACTIVE)
    assert deliver_outbox(message.pk) == "delivered"
    assert len(stub.requests) == 1


def test_unsupported_endpoint_version_is_dead_with_a_reason(db):
    endpoint = EndpointFactory.create(fhir_version="4.3")
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    assert deliver_outbox(message.pk) == "skipped"
    message.refresh_from_db()
    assert message.status == Status.DEAD
    assert message.last_error == "the endpoint speaks FHIR 4.3, which we do not send"


def test_bearer_secret_comes_from_the_environment(db, stub_member, monkeypatch):
    monkeypatch.setenv("CODAO_FHIR_TOKEN", "s3cret")
    stub = stub_member()
    endpoint = EndpointFactory.create(
        base_url=stub.base_url, auth_type="bearer", auth_secret_ref="CODAO_FHIR_TOKEN"
    )
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    deliver_outbox(message.pk)
    assert stub.requests[0]["authorization"] == "Bearer s3cret"


def test_payload_message_posts_the_payload(db, stub_member):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    payload = {"resourceType": "Communication", "status": "completed"}
    with transaction.atomic():
        message = outbox_enqueue(
            endpoint=endpoint,
            aggregate_key="x",
            resource_type="Communication",
            logical_id="n1",
            payload=payload,
            payload_fhir_version="4.0",
            http_method="POST",
        )
    deliver_outbox(message.pk)
    assert (stub.requests[0]["method"], stub.requests[0]["path"]) == ("POST", "/fhir/Communication")
    assert json.loads(stub.requests[0]["body"]) == payload


def test_beat_runs_the_registered_drain_task_and_no_sweep(settings):
    from config.celery import app

    tasks = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "fhir_gateway.outbox_drain" in tasks
    assert "fhir_gateway.outbox_sweep" not in tasks
    assert app.tasks["fhir_gateway.outbox_drain"].name == outbox_drain_task.name
    assert "fhir_gateway.outbox_sweep" not in app.tasks


def test_beat_drain_recovers_leases_retries_lost_handoffs_and_dead_letters(
    db, stub_member, settings
):
    ok = stub_member([500])  # F's first attempt, below
    broken = stub_member([500] * 10)
    good = EndpointFactory.create(base_url=ok.base_url)
    bad = EndpointFactory.create(base_url=broken.base_url)
    leased = _enqueue(good, "referral:L", _resource("l1"))
    assert delivery._claim(leased.pk, timezone.now()) is not None  # its worker dies
    failed = _enqueue(good, "referral:F", _resource("f1"))
    assert deliver_outbox(failed.pk) == "failed"
    lost = _enqueue(good, "referral:P", _resource("p1"))  # on-commit hand-off never ran
    doomed = _enqueue(bad, "referral:D", _resource("d1"))
    behind = _enqueue(bad, "referral:D", _resource("d2"))
    settings.FHIR_OUTBOX_LEASE_SECONDS = 0

    assert outbox_drain_task() == 3

    status = dict(OutboxMessage.objects.values_list("pk", "status"))
    assert status == {
        leased.pk: Status.DELIVERED,
        failed.pk: Status.DELIVERED,
        lost.pk: Status.DELIVERED,
        doomed.pk: Status.DEAD,
        behind.pk: Status.PENDING,
    }
    assert OutboxMessage.objects.get(pk=doomed.pk).attempts == 4
    assert sorted(ok.applied) == sorted(m.idempotency_key for m in (leased, failed, lost))
    assert [r["path"] for r in broken.requests] == ["/fhir/Communication/d1"] * 4


def test_a_drain_stops_starting_batches_after_its_time_budget(db, stub_member):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    for n in range(3):
        _enqueue(endpoint, f"referral:{n}", _resource(f"c{n}"))
    report = delivery.outbox_drain(limit=1, concurrency=1, max_seconds=0)
    assert (report.claimed, report.delivered) == (1, 1)
    assert OutboxMessage.objects.filter(status=Status.PENDING).count() == 2
    assert outbox_drain_task(limit=1, max_seconds=None) == 2


# --------------------------------------------------------------------------- batch path


def _batch_drain() -> delivery.BatchReport:
    return delivery.outbox_drain(limit=50, concurrency=4, max_batches=50)


def test_batch_keeps_order_per_aggregate_and_applies_once(db, stub_member):
    stub = stub_member([500, ("slow", 1.5), 503])  # the first three requests fail
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    messages = {
        agg: [_enqueue(endpoint, f"referral:{agg}", _resource(f"{agg}{i}")) for i in range(4)]
        for agg in "ABCDEF"
    }
    report = _batch_drain()
    assert report.delivered == 24
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}
    by_key = {m.idempotency_key: m for ms in messages.values() for m in ms}
    for agg in messages:
        sent = [by_key[r["key"]].logical_id for r in stub.requests if r["key"] in by_key]
        sent = [lid for lid in sent if lid.startswith(agg)]
        # Order kept: each message only after the previous one of its aggregate, even
        # when one failed and was retried (it is repeated, never overtaken).
        deduped = [lid for i, lid in enumerate(sent) if i == 0 or sent[i - 1] != lid]
        assert deduped == [f"{agg}{i}" for i in range(4)]
        applied = [
            by_key[k].logical_id for k in stub.applied if by_key[k].aggregate_key.endswith(agg)
        ]
        assert applied == [f"{agg}{i}" for i in range(4)]
    assert sorted(stub.applied) == sorted(by_key)  # each applied exactly once


def test_batch_failure_releases_the_rest_of_the_run_without_counting_attempts(db, stub_member):
    stub = stub_member([500])
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    first = _enqueue(endpoint, "referral:1", _resource("c1"))
    second = _enqueue(endpoint, "referral:1", _resource("c2"))
    report = delivery.outbox_deliver_batch(limit=10, concurrency=1)
    assert (report.claimed, report.failed, report.released, report.delivered) == (2, 1, 1, 0)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.attempts, first.claim_token) == (Status.FAILED, 1, "")
    assert (second.status, second.attempts, second.claim_token) == (Status.PENDING, 0, "")
    assert [r["path"] for r in stub.requests] == ["/fhir/Communication/c1"]
    _batch_drain()
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == (Status.DELIVERED, Status.DELIVERED)
    assert stub.applied == [first.idempotency_key, second.idempotency_key]


def test_batch_skips_held_aggregates_dead_heads_and_inactive_endpoints(db, stub_member):
    stub = stub_member([422])
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    dead_head = _enqueue(endpoint, "referral:1", _resource("c1"))
    behind = _enqueue(endpoint, "referral:1", _resource("c2"))
    suspended = EndpointFactory.create(base_url=stub.base_url, status=Endpoint.Status.SUSPENDED)
    waiting = _enqueue(suspended, "referral:2", _resource("c3"))
    after_waiting = _enqueue(endpoint, "referral:2", _resource("c4"))
    _batch_drain()
    statuses = {
        m.pk: OutboxMessage.objects.get(pk=m.pk).status
        for m in (dead_head, behind, waiting, after_waiting)
    }
    assert statuses == {
        dead_head.pk: Status.DEAD,
        behind.pk: Status.PENDING,
        waiting.pk: Status.PENDING,
        after_waiting.pk: Status.PENDING,
    }
    assert [r["path"] for r in stub.requests] == ["/fhir/Communication/c1"]


def test_batch_reclaims_an_expired_lease_and_only_the_claimant_records(db, stub_member, settings):
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    message = _enqueue(endpoint, "referral:1", _resource("c1"))
    assert delivery._claim(message.pk, timezone.now()) is not None  # a worker dies here
    assert delivery.outbox_deliver_batch(limit=10).claimed == 0  # lease still runs
    settings.FHIR_OUTBOX_LEASE_SECONDS = 0
    assert delivery.outbox_deliver_batch(limit=10).delivered == 1
    message.refresh_from_db()
    assert (message.status, message.attempts) == (Status.DELIVERED, 2)
    assert stub.applied == [message.idempotency_key]


def test_batch_unsupported_version_is_dead_and_r5_gets_its_rendering(db, stub_member):
    stub = stub_member()
    r5 = EndpointFactory.create(base_url=stub.base_url, fhir_version="5.0")
    old = EndpointFactory.create(base_url=stub.base_url, fhir_version="4.3")
    with transaction.atomic():
        row = store_version(
            resource_type="Communication",
            logical_id="c5",
            resource={"resourceType": "Communication", "status": "completed"},
            fhir_version="5.0",
        )
    good = _enqueue(r5, "referral:1", row)
    bad = _enqueue(old, "referral:2", row)
    report = _batch_drain()
    assert (report.delivered, report.dead) == (1, 1)
    bad.refresh_from_db()
    assert bad.status == Status.DEAD and "4.3" in bad.last_error
    assert stub.requests[0]["body"] == row.json_r5.encode()
    assert stub.applied == [good.idempotency_key]


# --------------------------------------------------------------------------- found by a review


@pytest.mark.django_db
def test_view_only_staff_may_neither_retry_nor_replay(client, django_user_model, stub_member):
    """The admin actions had no permissions: anyone who could open the list could re-send
    dead messages and push old versions to a member."""
    from django.contrib.auth.models import Permission

    endpoint = EndpointFactory.create(base_url=stub_member().base_url)
    dead = _enqueue(endpoint, "referral:1", _resource("c1"), schedule=False)
    OutboxMessage.objects.filter(pk=dead.pk).update(status=Status.DEAD, attempts=24)
    delivered = _enqueue(endpoint, "referral:2", _resource("c2"), schedule=False)
    OutboxMessage.objects.filter(pk=delivered.pk).update(
        status=Status.DELIVERED, delivered_at=timezone.now()
    )
    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    client.force_login(viewer)
    url = "/admin/fhir_gateway/outboxmessage/"
    client.post(url, {"action": "retry_messages", "_selected_action": [dead.pk]})
    client.post(url, {"action": "replay_messages", "_selected_action": [delivered.pk]})
    dead.refresh_from_db()
    assert dead.status == Status.DEAD
    assert not OutboxMessage.objects.filter(replay_of=delivered).exists()
    # With the change permission the same actions work.
    viewer.user_permissions.add(Permission.objects.get(codename="change_outboxmessage"))
    client.post(url, {"action": "retry_messages", "_selected_action": [dead.pk]})
    client.post(url, {"action": "replay_messages", "_selected_action": [delivered.pk]})
    dead.refresh_from_db()
    assert dead.status != Status.DEAD
    assert OutboxMessage.objects.filter(replay_of=delivered).exists()


@pytest.mark.django_db
def test_no_replay_to_an_endpoint_that_is_not_active(stub_member):
    """It was queued, could never be sent, and held back the referral's later messages to
    the other party for good."""
    stub = stub_member()
    party_a = EndpointFactory.create(base_url=stub.base_url)
    party_b = EndpointFactory.create(base_url=stub.base_url)
    first = _enqueue(party_a, "referral:1", _resource("c1"), schedule=False)
    _drain()
    Endpoint.objects.filter(pk=party_a.pk).update(status=Endpoint.Status.OFF)
    assert outbox_replay(message_id=first.pk) is None
    later = _enqueue(party_b, "referral:1", _resource("c2"), schedule=False)
    _drain()
    later.refresh_from_db()
    assert later.status == Status.DELIVERED


@pytest.mark.django_db
def test_no_replay_of_a_version_a_newer_one_followed(stub_member):
    """Queued at the end of the referral's messages, the old version set the member back."""
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    v1 = _enqueue(endpoint, "referral:1", _resource("c1", "in-progress"), schedule=False)
    v2 = _enqueue(endpoint, "referral:1", _resource("c1", "completed"), schedule=False)
    _drain()
    assert outbox_replay(message_id=v1.pk) is None
    replay = outbox_replay(message_id=v2.pk)  # the latest may be sent again
    assert replay is not None
    _drain()
    assert b"completed" in stub.bodies[stub.applied[-1]]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "base_url", ["ftp://127.0.0.1:9/fhir", "http://127.0.0.1:99999/fhir", "http:///fhir"]
)
def test_a_base_url_that_is_no_http_url_is_dead_at_once(base_url):
    """It was a connection error, retried for hours while the referral's later messages
    waited behind it."""
    endpoint = EndpointFactory.create(base_url=base_url)
    message = _enqueue(endpoint, "referral:1", _resource("c1"), schedule=False)
    _drain()
    message.refresh_from_db()
    assert message.status == Status.DEAD
    assert "is not an http(s) URL" in message.last_error


def test_one_members_dead_endpoint_holds_none_of_the_other_members_updates(db, stub_member):
    """Both parties of a referral hear each change; order is kept per receiver. The
    requester's endpoint answers 503 until its messages are dead: the consultant side's
    messages about the same referral all go out, in order; the requester's follow in
    order once a person retries the dead one (found by an operator: one hospital's outage
    held the other's updates)."""
    down = stub_member([503] * 4)
    up = stub_member()
    requester = EndpointFactory.create(base_url=down.base_url)
    consultant = EndpointFactory.create(base_url=up.base_url)
    rows = [_resource(f"c{i}") for i in range(3)]
    with transaction.atomic():
        delivery.outbox_enqueue_versions(
            aggregate_key="referral:9",
            items=[(e, row) for row in rows for e in (requester, consultant)],
        )

    _drain()  # four attempts at the requester's first message: dead
    _drain()

    by_endpoint = {
        e.pk: list(OutboxMessage.objects.filter(endpoint=e).order_by("seq"))
        for e in (requester, consultant)
    }
    assert [m.status for m in by_endpoint[consultant.pk]] == [Status.DELIVERED] * 3
    assert [m.status for m in by_endpoint[requester.pk]] == [Status.DEAD] + [Status.PENDING] * 2
    keys = {m.idempotency_key: m.logical_id for ms in by_endpoint.values() for m in ms}
    assert [keys[k] for k in up.applied] == ["c0", "c1", "c2"]
    assert down.applied == []

    assert outbox_retry(message_id=by_endpoint[requester.pk][0].pk)
    _drain()
    assert [keys[k] for k in down.applied] == ["c0", "c1", "c2"]
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {Status.DELIVERED}


@pytest.mark.django_db(transaction=True)
def test_enqueue_numbers_each_endpoints_messages_after_its_own(stub_member):
    """A second change about the same referral continues each endpoint's sequence."""
    first, second = EndpointFactory.create(), EndpointFactory.create()
    for batch in (["a0"], ["a1", "a2"]):
        rows = [_resource(n) for n in batch]
        with transaction.atomic():
            delivery.outbox_enqueue_versions(
                aggregate_key="referral:5",
                items=[(e, row) for row in rows for e in (first, second)],
                new_aggregate=batch == ["a0"],
            )
    for endpoint in (first, second):
        assert list(
            OutboxMessage.objects.filter(endpoint=endpoint)
            .order_by("seq")
            .values_list("aggregate_key", "seq", "logical_id")
        ) == [(f"referral:5:endpoint:{endpoint.pk}", n + 1, f"a{n}") for n in range(3)]


def test_migration_moves_stored_messages_to_their_endpoints_aggregates(db):
    """0010: messages stored under the old one-per-referral key are renumbered per endpoint
    in their old order; messages already under an endpoint's key are left alone."""
    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module("fhir_gateway.migrations.0010_outbox_order_per_endpoint")
    first, second = EndpointFactory.create(), EndpointFactory.create()
    rows = [_resource(f"m{i}") for i in range(4)]
    with transaction.atomic():
        for endpoint, row in [
            (first, rows[0]),
            (second, rows[0]),
            (first, rows[1]),
            (second, rows[2]),
        ]:
            outbox_enqueue(
                endpoint=endpoint,
                aggregate_key="referral:3",
                resource_type=row.resource_type,
                logical_id=row.logical_id,
                version_id=row.version_id,
                schedule=False,
            )
        kept = outbox_enqueue(
            endpoint=first,
            aggregate_key=f"referral:4:endpoint:{first.pk}",
            resource_type="Communication",
            logical_id=rows[3].logical_id,
            version_id=rows[3].version_id,
            schedule=False,
        )
    if connection.vendor == "postgresql":  # its SQL, through the migration's editor
        with connection.schema_editor() as editor:
            migration.split(apps, editor)
    else:  # SQLite's editor cannot open inside the test's transaction; its path uses none
        migration.split(apps, types.SimpleNamespace(connection=connection))

    assert sorted(
        OutboxMessage.objects.exclude(pk=kept.pk).values_list("aggregate_key", "seq", "logical_id")
    ) == sorted(
        [
            (f"referral:3:endpoint:{first.pk}", 1, "m0"),
            (f"referral:3:endpoint:{first.pk}", 2, "m1"),
            (f"referral:3:endpoint:{second.pk}", 1, "m0"),
            (f"referral:3:endpoint:{second.pk}", 2, "m2"),
        ]
    )
    kept_after = OutboxMessage.objects.get(pk=kept.pk)
    assert (kept_after.aggregate_key, kept_after.seq) == (kept.aggregate_key, 1)


def test_failed_and_dead_deliveries_are_logged_with_what_an_operator_needs(db, stub_member, caplog):
    """The dead-letter line carried only an id (and workers printed plain text without
    it); failed attempts were not logged at all (found by an operator)."""
    stub = stub_member([503] * 4)
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    message = _enqueue(endpoint, "referral:7:endpoint:x", _resource("c1"))
    with caplog.at_level("WARNING", logger="fhir_gateway.delivery"):
        _drain()
        _drain()
    records = [r for r in caplog.records if r.name == "fhir_gateway.delivery"]
    assert [r.getMessage() for r in records] == ["outbox delivery failed; will retry"] * 3 + [
        "outbox message dead"
    ]
    for attempt, record in enumerate(records, start=1):
        assert (record.id, record.endpoint_id, record.aggregate, record.attempts) == (
            message.pk,
            endpoint.pk,
            "referral:7:endpoint:x",
            attempt,
        )
        assert record.resource == "Communication/c1/_history/1"
        assert record.error.startswith("HTTP 503")


def test_celery_workers_log_through_the_json_logging_config():
    from config.celery import app

    assert app.conf.worker_hijack_root_logger is False


def test_a_message_beat_dead_letters_is_logged_with_its_error(db, caplog):
    """Beat's drain dead-letters what can never be sent (here an ftp:// base) by a bulk
    UPDATE: its log line carried no error and a stale attempt count (found by a review)."""
    endpoint = EndpointFactory.create(base_url="ftp://127.0.0.1:9/fhir")
    message = _enqueue(endpoint, "referral:1:endpoint:x", _resource("c1"), schedule=False)
    with caplog.at_level("ERROR", logger="fhir_gateway.delivery"):
        _drain()
    message.refresh_from_db()
    assert message.status == Status.DEAD
    [record] = [r for r in caplog.records if r.getMessage() == "outbox message dead"]
    assert record.attempts == message.attempts == 1
    assert record.error == message.last_error and "http(s)" in record.error
