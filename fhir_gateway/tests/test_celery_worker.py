"""Delivery through a real broker (Redis from settings) and a real Celery worker."""

from __future__ import annotations

import time
import uuid

import pytest
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from django.db import connections, transaction

from config.celery import app
from fhir_gateway.delivery import outbox_enqueue
from fhir_gateway.models import IntakeJob, OutboxMessage
from fhir_gateway.storage import store_version
from fhir_gateway.tasks import deliver_outbox, intake_drain_task, outbox_drain_task
from fhir_gateway.tests.referral_world import World, body
from fhir_gateway.tests.referral_world import transaction as referral_bundle
from referrals.models import Referral
from tests.factories import EndpointFactory


def _route(routes: object) -> None:
    # Celery builds its router once per process, from the routes of that moment: an earlier
    # test that sent any task would otherwise keep this queue out of the router.
    app.conf.task_routes = routes
    app.amqp.flush_routes()  # type: ignore[attr-defined]
    app.amqp.__dict__.pop("router", None)


def _close_worker_connections(**kwargs: object) -> None:
    # The worker thread's own connection would outlive the test and block DB teardown.
    connections.close_all()


@pytest.mark.django_db(transaction=True)
def test_committed_change_is_delivered_in_order_by_a_real_worker(stub_member, settings):
    stub = stub_member([500])  # the first attempt fails: beat's drain retries it
    settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS = 0
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    # A queue of our own, so the worker takes no one else's tasks from the shared Redis.
    queue = f"fhir-test-{uuid.uuid4().hex}"
    routes = app.conf.task_routes
    _route({task.name: {"queue": queue} for task in (deliver_outbox, outbox_drain_task)})
    task_postrun.connect(_close_worker_connections, weak=False)
    try:
        with start_worker(app, pool="solo", queues=[queue], perform_ping_check=False):
            with transaction.atomic():
                messages = []
                for n in range(3):
                    row = store_version(
                        resource_type="Communication",
                        logical_id=f"w{n}",
                        resource={"resourceType": "Communication", "status": "completed"},
                        fhir_version="4.0",
                    )
                    messages.append(
                        outbox_enqueue(
                            endpoint=endpoint,
                            aggregate_key="referral:worker",
                            resource_type="Communication",
                            logical_id=row.logical_id,
                            version_id=row.version_id,
                        )
                    )
            # Only the on-commit hand-off runs by itself; the retry of the failed first
            # message is beat's job: act as beat (its task, through the broker, to the
            # worker) once it failed, or every 10 s as beat would under a slow hand-over.
            started = time.monotonic()
            deadline = started + 60
            beat_at = started + 10
            while time.monotonic() < deadline:
                statuses = list(
                    OutboxMessage.objects.order_by("seq").values_list("status", flat=True)
                )
                if statuses == ["delivered"] * 3:
                    break
                now = time.monotonic()
                # At most one drain a second after a failure; every 10 s otherwise.
                if (statuses[0] == "failed" and now > beat_at - 9) or now > beat_at:
                    outbox_drain_task.delay()
                    beat_at = now + 10
                time.sleep(0.2)
    finally:
        task_postrun.disconnect(_close_worker_connections)  # type: ignore[attr-defined]
        _route(routes)
    assert statuses == ["delivered"] * 3
    keys = [m.idempotency_key for m in messages]
    assert stub.applied == keys
    assert [r["path"] for r in stub.requests] == [
        "/fhir/Communication/w0",
        "/fhir/Communication/w0",
        "/fhir/Communication/w1",
        "/fhir/Communication/w2",
    ]


@pytest.mark.django_db(transaction=True)
def test_async_bundle_is_applied_by_a_real_worker(world: World) -> None:
    """Prefer: respond-async end to end: the kick-off's on-commit hand-off goes through the
    broker to a worker, which applies the Bundle; polling then answers it."""
    queue = f"fhir-test-{uuid.uuid4().hex}"
    routes = app.conf.task_routes
    _route({intake_drain_task.name: {"queue": queue}})
    task_postrun.connect(_close_worker_connections, weak=False)
    try:
        with start_worker(app, pool="solo", queues=[queue], perform_ping_check=False):
            kick_off = world.r4.post("/fhir", referral_bundle(world), Prefer="respond-async")
            assert kick_off.status_code == 202, kick_off.content
            path = str(kick_off["Content-Location"]).removeprefix("http://testserver")
            deadline = time.monotonic() + 60
            while (poll := world.r4.get(path)).status_code == 202:
                assert time.monotonic() < deadline, "the worker did not apply the Bundle"
                time.sleep(0.1)
    finally:
        task_postrun.disconnect(_close_worker_connections)  # type: ignore[attr-defined]
        _route(routes)
    assert poll.status_code == 200, poll.content
    (entry,) = body(poll)["entry"]
    assert [e["response"]["status"] for e in entry["resource"]["entry"]] == ["201 Created"] * 3
    assert Referral.objects.count() == 1
    assert IntakeJob.objects.get().status == IntakeJob.Status.DONE
