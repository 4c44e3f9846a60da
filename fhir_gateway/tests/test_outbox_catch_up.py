"""Every member hears of every change, whatever happened meanwhile: a drain after an outage
(the followers of failed heads), an Endpoint suspended then active again, a facility that
becomes a party by a forward (sent what it was never told), a payload message replayed
from the admin. Each was a defect a review found (the tests failed before the fixes).

Stub member servers are real HTTP servers on 127.0.0.1 (``stub_member``), as in
``test_outbox.py``; the referral network is ``referral_world``'s.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from fhir_gateway.delivery import outbox_enqueue
from fhir_gateway.models import FeedEvent, OutboxMessage
from fhir_gateway.tasks import deliver_outbox, outbox_drain_task
from fhir_gateway.tests.conftest import FHIR_R5
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    consult_note,
    submit,
    task_of,
)
from referrals.models import Referral
from referrals.services import referral_transition
from registry.models import Endpoint
from tests.factories import (
    DepartmentFactory,
    EndpointFactory,
    FacilityFactory,
    SupportLinkFactory,
)

pytestmark = pytest.mark.django_db

Status = OutboxMessage.Status


@pytest.fixture(autouse=True)
def _fast_retries(settings: Any) -> None:
    settings.FHIR_OUTBOX_BACKOFF_BASE_SECONDS = 0
    settings.FHIR_OUTBOX_MAX_ATTEMPTS = 4
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 0.5


def _drain() -> int:
    """What beat does every 10 s: the drain task's body, run in this process."""
    return outbox_drain_task()


def _sink_other_endpoints(world: World, stub_member: Any) -> None:
    """Point the network's endpoints at a stub member too (no DNS look-ups, no dead
    messages of unreachable example.org hosts in the log)."""
    sink = stub_member()
    Endpoint.objects.filter(pk__in=[world.spoke_endpoint.pk, world.hub_endpoint.pk]).update(
        base_url=sink.base_url
    )


def _received(stub: Any) -> list[str]:
    """``<METHOD> <path after /fhir/>`` of every request the stub member saw."""
    return [f"{r['method']} {r['path'].removeprefix('/fhir/')}" for r in stub.requests]


def _message(endpoint: Endpoint, key: Any, seq: int = 1, **fields: Any) -> OutboxMessage:
    """An unsaved payload message (a Communication) of aggregate ``referral:<key>``."""
    return OutboxMessage(
        endpoint=endpoint,
        aggregate_key=f"referral:{key}:endpoint:{endpoint.pk}",
        seq=seq,
        resource_type="Communication",
        logical_id=f"c{key}-{seq}",
        payload=json.dumps({"resourceType": "Communication", "status": "completed"}),
        payload_fhir_version="4.0",
        http_method="POST",
        idempotency_key=f"k-{key}-{seq}",
        **fields,
    )


# --------------------------------------------------------------------------- 1. admin replay


def test_replaying_a_delivered_payload_message_from_the_admin_does_not_crash(
    admin_client: Any, stub_member: Any
) -> None:
    """``outbox_replay`` filters ``version_id__gt=original.version_id``; a payload message
    (the outbox's documented second kind: "or a fixed payload + its version") has
    ``version_id`` None, and Django raises ``ValueError: Cannot use None as a query
    value``: the admin's Replay action answers 500 and nothing is replayed."""
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    with transaction.atomic():
        message = outbox_enqueue(
            endpoint=endpoint,
            aggregate_key="referral:1:endpoint:1",
            resource_type="Communication",
            logical_id="n1",
            payload={"resourceType": "Communication", "status": "completed"},
            payload_fhir_version="4.0",
            http_method="POST",
            schedule=False,
        )
    assert deliver_outbox(message.pk) == "delivered"

    response = admin_client.post(
        "/admin/fhir_gateway/outboxmessage/",
        {"action": "replay_messages", "_selected_action": [message.pk]},
    )

    assert response.status_code == 302
    replay = OutboxMessage.objects.get(replay_of=message)
    assert json.loads(replay.payload) == json.loads(message.payload)
    _drain()
    assert _received(stub) == ["POST Communication", "POST Communication"]


# --------------------------------------------------------------------------- 2. suspended endpoint


def test_changes_made_while_an_endpoint_is_suspended_reach_it_once_it_is_active_again(
    world: World, stub_member: Any
) -> None:
    """docs/fhir.md (Outbox): "Messages to endpoints that are not active wait (not counted
    as attempts)". But ``publish.member_endpoints`` queues only for endpoints that are
    active *at the time of the change* (``_active_endpoints``: ``status = 'active'``): a
    member whose Endpoint a steward suspends for an hour gets no message at all for what
    happened in that hour, and never gets it once active again. Here the requester's
    system never receives the consult note (the advice), though its facility's pull
    feed has it (decision 1: nothing lost)."""
    _sink_other_endpoints(world, stub_member)
    stub = stub_member()
    Endpoint.objects.filter(pk=world.spoke_endpoint.pk).update(base_url=stub.base_url)
    task_id = accepted(world)
    _drain()
    before = _received(stub)
    assert f"PUT Task/{task_id}" in before

    Endpoint.objects.filter(pk=world.spoke_endpoint.pk).update(status=Endpoint.Status.SUSPENDED)
    note = world.r5.post(
        "/fhir/DocumentReference", consult_note(task_id), content_type=FHIR_R5, Accept=FHIR_R5
    )
    assert note.status_code == 201, note.content
    note_id = body(note)["id"]
    # The requester facility's feed has the note: the change is one its members must hear of.
    assert FeedEvent.objects.filter(
        facility_id=world.network.spoke.pk, resource_type="DocumentReference", logical_id=note_id
    ).exists()

    Endpoint.objects.filter(pk=world.spoke_endpoint.pk).update(status=Endpoint.Status.ACTIVE)
    _drain()

    after = _received(stub)[len(before) :]
    assert any(r.startswith("POST DocumentReference") or r.endswith(note_id) for r in after), after


# --------------------------------------------------------------------------- 3. forward


def test_the_department_a_case_is_forwarded_to_receives_its_patient_and_files(
    world: World, stub_member: Any
) -> None:
    """A forward to a department of another facility queues only the versions the forward
    itself stored (ServiceRequest v2, Task v2) for the new party's Endpoint and feed
    (``publish._enqueue`` of ``rows``): the Patient (unchanged, still v1) and the case
    files sent before the forward never go to the new party, although the Task and
    ServiceRequest it receives name that Patient. A push-only member of the new
    department gets a Task for a patient it was never sent, and never hears of the files."""
    _sink_other_endpoints(world, stub_member)
    other = FacilityFactory.create(country=world.network.spoke.country, tier=1)
    department = DepartmentFactory.create(
        facility=other, specialty=world.network.pediatrics.specialty
    )
    SupportLinkFactory.create(
        hub=other, spoke=world.network.spoke, specialties=[department.specialty]
    )
    stub = stub_member()
    EndpointFactory.create(facility=other, base_url=stub.base_url)
    task_id = str(task_of(submit(world))["id"])
    made = world.r4.post("/fhir/DocumentReference", case_file(task_id, "a"))
    assert made.status_code == 201, made.content
    file_id = body(made)["id"]

    referral = Referral.objects.get(filler_id=task_id)
    referral_transition(
        actor=world.consultant,
        referral_id=referral.pk,
        action="forward",
        department=department.pk,
        reason="Their cardiologist.",
    )
    _drain()

    received = _received(stub)
    assert f"PUT Task/{task_id}" in received  # the forward itself went out
    assert any(r.endswith(f"Patient/{task_id}") for r in received), received
    assert any(r.endswith(f"DocumentReference/{file_id}") for r in received), received
    feed = set(
        FeedEvent.objects.filter(facility_id=other.pk).values_list("resource_type", flat=True)
    )
    assert {"Patient", "DocumentReference"} <= feed, feed


# --------------------------------------------------------------------------- 5. drain stall


def test_followers_ordered_before_their_retried_heads_do_not_stall_the_drain(
    stub_member: Any, settings: Any
) -> None:
    """A message queued behind a failed head is due since its creation, *before* its
    head's retry time. ``_claim_batch`` once scanned every due message in
    ``next_attempt_at`` order, up to ``limit``: after a member outage, with ``limit`` such
    followers (500: e.g. 250 referrals with two messages queued behind a failed one),
    it held no head, claimed nothing, and the drain (beat's, the only retry of a failed
    message) stopped for good, for every member. Now it scans heads first."""
    # The stub's listen backlog is small: fewer senders and a longer connect timeout than
    # the file's defaults, so the stub itself refuses nothing.
    settings.FHIR_OUTBOX_CONCURRENCY = 4
    settings.FHIR_OUTBOX_TIMEOUT_SECONDS = 5
    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    now = timezone.now()
    created = now - timedelta(hours=1)
    rows = [
        _message(
            endpoint,
            referral,
            seq,
            created_at=created,
            # The heads failed during the outage; their last backoff just ran out.
            status=Status.FAILED if seq == 1 else Status.PENDING,
            attempts=5 if seq == 1 else 0,
            next_attempt_at=now - timedelta(seconds=1) if seq == 1 else created,
        )
        for referral in range(250)  # 250 heads, 500 followers: the default limit is 500
        for seq in (1, 2, 3)
    ]
    OutboxMessage.objects.bulk_create(rows)

    for _beat in range(3):  # three beat runs, 10 s apart in production
        _drain()

    assert stub.requests  # the member is back: something must be sent
    assert not OutboxMessage.objects.exclude(status=Status.DELIVERED).exists()


def test_an_expired_lease_is_reclaimed_behind_a_backlog_of_due_heads(stub_member: Any) -> None:
    """A worker died holding a message (``in_flight``, lease expired) while ``limit`` other
    due heads wait: the next batch reclaims it first, instead of after the backlog."""
    from fhir_gateway.delivery import _claim_batch, lease

    stub = stub_member()
    endpoint = EndpointFactory.create(base_url=stub.base_url)
    now = timezone.now()
    backlog = [_message(endpoint, n, next_attempt_at=now - timedelta(minutes=1)) for n in range(5)]
    stranded = _message(
        endpoint,
        99,
        status=Status.IN_FLIGHT,
        claimed_at=now - lease() - timedelta(seconds=1),
        claim_token="a-worker-that-died",
        next_attempt_at=now - timedelta(hours=1),
    )
    OutboxMessage.objects.bulk_create([*backlog, stranded])

    runs, _dead = _claim_batch(5, now, "next-worker")

    claimed = {claim.message_id for run in runs for claim, _status in run}
    assert stranded.pk in claimed
    assert len(claimed) == 5


def test_the_admin_deletes_only_dead_and_delivered_messages(admin_client: Any) -> None:
    """Deleting a message still to be sent loses it: the admin refuses (no delete page, a
    bulk delete selecting one deletes nothing); dead ones (which hold their aggregate) and
    delivered ones go."""
    endpoint = EndpointFactory.create()
    made = {
        status: _message(
            endpoint, status, status=status, next_attempt_at=timezone.now() + timedelta(hours=1)
        )
        for status in Status.values
    }
    OutboxMessage.objects.bulk_create(made.values())
    pending = made[Status.PENDING]
    assert (
        admin_client.get(f"/admin/fhir_gateway/outboxmessage/{pending.pk}/delete/").status_code
        == 403
    )

    def bulk_delete(chosen: list[OutboxMessage]) -> int:
        response = admin_client.post(
            "/admin/fhir_gateway/outboxmessage/",
            {
                "action": "delete_selected",
                "_selected_action": [m.pk for m in chosen],
                "post": "yes",
            },
        )
        return int(response.status_code)

    assert bulk_delete(list(made.values())) == 403  # any message still to be sent: none
    assert OutboxMessage.objects.count() == len(made)
    assert bulk_delete([made[Status.DEAD], made[Status.DELIVERED]]) == 302
    left = set(OutboxMessage.objects.values_list("status", flat=True))
    assert left == {Status.PENDING, Status.IN_FLIGHT, Status.FAILED}
