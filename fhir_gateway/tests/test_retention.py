"""Retention of the outbox, the pull feed and the records of applied Task updates (real
PostgreSQL): what goes, what stays, what a member replaying pruned events is told, and what
a Task update sent again after its record went is answered."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from fhir_gateway.feed import feed_last_number, feed_number, feed_pruned_through, feed_record
from fhir_gateway.models import (
    AppliedUpdate,
    CreateKey,
    FeedEvent,
    FeedHorizon,
    FhirResource,
    OutboxMessage,
)
from fhir_gateway.retention import retention_prune
from fhir_gateway.subscriptions import EVENT_NUMBER_EXTENSION, OLDEST_EVENT_EXTENSION
from fhir_gateway.tasks import RETENTION_BEAT_SECONDS, retention_prune_task
from fhir_gateway.tests.conftest import FHIR_R4, FHIR_R5, outcome_issue
from fhir_gateway.tests.referral_world import (
    World,
    accepted,
    body,
    case_file,
    read_task,
    submit,
    task_of,
    update_task,
)
from fhir_gateway.tests.referral_world import transaction as submission_bundle
from fhir_gateway.tests.test_subscriptions import _accept, _numbers, _subscribe
from fhir_gateway.versions import model_class
from referrals.models import Attachment, Referral, ReferralEvent, ReferralState
from registry.models import Endpoint
from tests.factories import EndpointFactory

pytestmark = pytest.mark.django_db

Status = OutboxMessage.Status
OLD = timedelta(days=31)  # older than the default 30 days
RECENT = timedelta(days=29)


# --------------------------------------------------------------------------- outbox


def _message(
    endpoint: Endpoint, status: str, age: timedelta, *, aggregate: str = "", **fields: Any
) -> OutboxMessage:
    at = timezone.now() - age
    aggregate = aggregate or f"referral:{status}-{age.days}"
    seq = OutboxMessage.objects.filter(aggregate_key=aggregate).count() + 1
    return OutboxMessage.objects.create(
        endpoint=endpoint,
        aggregate_key=aggregate,
        seq=seq,
        resource_type="Task",
        logical_id=f"T-{aggregate}-{seq}",
        version_id=1,
        idempotency_key=f"{aggregate}-{seq}",
        status=status,
        created_at=at,
        next_attempt_at=at,
        claimed_at=at if status == Status.IN_FLIGHT else None,
        delivered_at=at if status == Status.DELIVERED else None,
        **fields,
    )


def test_only_delivered_messages_older_than_the_retention_are_deleted(db):
    endpoint = EndpointFactory.create()
    old = {status: _message(endpoint, status, OLD) for status in Status.values}
    ancient = {status: _message(endpoint, status, timedelta(days=400)) for status in Status.values}
    recent_delivered = _message(endpoint, Status.DELIVERED, RECENT)
    # Created long ago (a long outage), delivered yesterday: kept 30 days from delivery.
    late = _message(endpoint, Status.DELIVERED, OLD, aggregate="referral:late")
    OutboxMessage.objects.filter(pk=late.pk).update(delivered_at=timezone.now() - RECENT)

    report = retention_prune()

    assert report.outbox_deleted == 2
    assert report.finished
    kept = set(OutboxMessage.objects.values_list("pk", flat=True))
    assert kept == {
        *(m.pk for s, m in old.items() if s != Status.DELIVERED),
        *(m.pk for s, m in ancient.items() if s != Status.DELIVERED),
        recent_delivered.pk,
        late.pk,
    }
    # Pending, in flight, failed and dead stay, whatever their age, untouched.
    for status in (Status.PENDING, Status.IN_FLIGHT, Status.FAILED, Status.DEAD):
        assert OutboxMessage.objects.get(pk=ancient[status].pk).status == status


def test_dead_messages_are_never_pruned_and_still_hold_their_aggregate(db):
    endpoint = EndpointFactory.create()
    first = _message(endpoint, Status.DELIVERED, OLD, aggregate="referral:9")
    dead = _message(endpoint, Status.DEAD, OLD, aggregate="referral:9")
    behind = _message(endpoint, Status.PENDING, OLD, aggregate="referral:9")

    retention_prune(now=timezone.now() + timedelta(days=3650))

    assert set(OutboxMessage.objects.values_list("pk", "status")) == {
        (dead.pk, Status.DEAD),
        (behind.pk, Status.PENDING),
    }
    assert not OutboxMessage.objects.filter(pk=first.pk).exists()


def test_a_replay_outlives_its_pruned_original(db):
    endpoint = EndpointFactory.create()
    original = _message(endpoint, Status.DELIVERED, OLD, aggregate="referral:R")
    replay = _message(
        endpoint, Status.DELIVERED, RECENT, aggregate="referral:R", replay_of=original
    )

    assert retention_prune().outbox_deleted == 1

    replay.refresh_from_db()
    assert replay.replay_of_id is None
    assert not OutboxMessage.objects.filter(pk=original.pk).exists()


def test_batches_loop_until_done_and_stop_at_the_time_budget(db):
    endpoint = EndpointFactory.create()
    for n in range(12):
        _message(endpoint, Status.DELIVERED, OLD, aggregate=f"referral:{n}")
    pending = _message(endpoint, Status.PENDING, OLD, aggregate="referral:p")

    cut_short = retention_prune(batch_size=5, max_seconds=0)
    assert (cut_short.outbox_deleted, cut_short.finished) == (5, False)

    rest = retention_prune(batch_size=5)
    assert (rest.outbox_deleted, rest.finished) == (7, True)
    assert list(OutboxMessage.objects.values_list("pk", flat=True)) == [pending.pk]


def test_a_retention_of_zero_days_keeps_everything(db, settings):
    settings.FHIR_OUTBOX_RETENTION_DAYS = 0
    settings.FHIR_FEED_RETENTION_DAYS = 0
    settings.FHIR_INTAKE_RETENTION_DAYS = 0
    settings.FHIR_UPDATE_REPLAY_DAYS = 0
    endpoint = EndpointFactory.create()
    _message(endpoint, Status.DELIVERED, timedelta(days=4000))
    _feed_rows(facility=5, count=3, age=timedelta(days=4000))
    _applied_updates(count=2, age=timedelta(days=4000))

    report = retention_prune()

    assert (report.outbox_deleted, report.feed_deleted, report.batches) == (0, 0, 0)
    assert report.applied_updates_deleted == 0
    assert OutboxMessage.objects.count() == 1
    assert FeedEvent.objects.count() == 3
    assert AppliedUpdate.objects.count() == 2


@pytest.mark.parametrize("days", [0, -1])
def test_an_update_replay_retention_of_zero_or_less_keeps_every_record(db, settings, days):
    settings.FHIR_UPDATE_REPLAY_DAYS = days
    _applied_updates(count=3, age=timedelta(days=4000))

    report = retention_prune(now=timezone.now() + timedelta(days=3650))

    assert (report.applied_updates_deleted, report.finished) == (0, True)
    assert AppliedUpdate.objects.count() == 3


# --------------------------------------------------------------------------- applied updates

UPDATE_OLD = timedelta(days=8)  # older than the default 7 days (FHIR_UPDATE_REPLAY_DAYS)
UPDATE_RECENT = timedelta(days=6)


def _applied_updates(*, count: int, age: timedelta, task: str = "T-old") -> list[int]:
    at = timezone.now() - age
    start = AppliedUpdate.objects.filter(logical_id=task).count() + 1
    rows = AppliedUpdate.objects.bulk_create(
        AppliedUpdate(
            resource_type="Task",
            logical_id=task,
            base_version=n,
            result_version=n + 1,
            digest=f"{n:064x}",
            at=at,
        )
        for n in range(start, start + count)
    )
    return [row.pk for row in rows]


def test_only_update_records_older_than_the_replay_retention_are_deleted(db):
    old = _applied_updates(count=3, age=UPDATE_OLD)
    ancient = _applied_updates(count=2, age=timedelta(days=400), task="T-ancient")
    recent = _applied_updates(count=2, age=UPDATE_RECENT, task="T-recent")

    report = retention_prune()

    assert (report.applied_updates_deleted, report.finished) == (5, True)
    assert set(AppliedUpdate.objects.values_list("pk", flat=True)) == set(recent)
    assert not AppliedUpdate.objects.filter(pk__in=old + ancient).exists()


def test_update_records_go_in_batches_and_stop_at_the_time_budget(db):
    _applied_updates(count=12, age=UPDATE_OLD)
    kept = _applied_updates(count=1, age=UPDATE_RECENT, task="T-recent")

    cut_short = retention_prune(batch_size=5, max_seconds=0)
    assert (cut_short.applied_updates_deleted, cut_short.finished) == (5, False)
    assert AppliedUpdate.objects.count() == 8

    rest = retention_prune(batch_size=5)
    assert (rest.applied_updates_deleted, rest.finished) == (7, True)
    assert list(AppliedUpdate.objects.values_list("pk", flat=True)) == kept


def _accept_task(world: World) -> tuple[str, dict[str, Any], str, Any]:
    """A submitted referral accepted by the consultant system's PUT: the Task id, the PUT's
    body and If-Match, and its answer."""
    task_id = str(task_of(submit(world))["id"])
    read = read_task(world.r5, task_id, FHIR_R5)
    accept = {**read, "status": "accepted"}
    if_match = f'W/"{read["meta"]["versionId"]}"'
    first = _put_task(world, accept, if_match)
    assert first.status_code == 200, first.content
    return task_id, accept, if_match, first


def _put_task(world: World, task: dict[str, Any], if_match: str) -> Any:
    return world.r5.put(
        f"/fhir/Task/{task['id']}",
        task,
        content_type=FHIR_R5,
        Accept=FHIR_R5,
        **{"If-Match": if_match},
    )


def _task_state(task_id: str) -> tuple[Any, ...]:
    referral = Referral.objects.get(filler_id=task_id)
    return (
        referral.state,
        referral.version,
        ReferralEvent.objects.filter(referral=referral).count(),
        FhirResource.objects.count(),
        OutboxMessage.objects.count(),
        AppliedUpdate.objects.count(),
    )


def test_a_retry_inside_the_replay_window_is_still_answered_as_the_first(world: World):
    task_id, accept, if_match, first = _accept_task(world)
    AppliedUpdate.objects.update(at=timezone.now() - UPDATE_RECENT)

    assert retention_prune().applied_updates_deleted == 0
    before = _task_state(task_id)
    again = _put_task(world, accept, if_match)

    assert again.status_code == 200, again.content
    assert again.json() == first.json()
    assert (again["ETag"], again["Location"]) == (first["ETag"], first["Location"])
    assert _task_state(task_id) == before


def test_a_retry_after_the_replay_window_is_answered_as_any_stale_update(world: World):
    task_id, accept, if_match, _first = _accept_task(world)
    AppliedUpdate.objects.update(at=timezone.now() - UPDATE_OLD)

    assert retention_prune().applied_updates_deleted == 1
    before = _task_state(task_id)
    again = _put_task(world, accept, if_match)

    # What the same PUT from anyone else gets: its If-Match is no longer current.
    assert again.status_code == 412, again.content
    assert outcome_issue(again)["code"] == "conflict"
    assert _task_state(task_id) == before
    assert Referral.objects.get(filler_id=task_id).state == ReferralState.ACCEPTED
    # With If-Match: * it is a new change from the current state, as from anyone: this
    # body (the businessStatus of the version it was read from) is refused, and nothing
    # is applied twice either.
    star = _put_task(world, accept, "*")
    assert star.status_code == 422, star.content
    assert outcome_issue(star)["expression"] == ["Task.businessStatus"]
    assert _task_state(task_id) == before


# --------------------------------------------------------------------------- feed


def _feed_rows(*, facility: int, count: int, age: timedelta) -> None:
    at = timezone.now() - age
    rows = [
        FhirResource(resource_type="Task", logical_id=f"T{n}", version_id=n + 1, last_updated=at)
        for n in range(count)
    ]
    with transaction.atomic():
        feed_record(facility_ids=[facility], rows=rows, referral_id=None)


def test_old_feed_events_go_and_numbering_continues_above_them(db):
    _feed_rows(facility=7, count=3, age=OLD)
    assert feed_number(7) == 3
    _feed_rows(facility=7, count=2, age=OLD)  # never numbered: nobody polled
    _feed_rows(facility=8, count=2, age=RECENT)

    report = retention_prune(batch_size=2)

    assert (report.feed_numbered, report.feed_deleted, report.finished) == (4, 5, True)
    assert not FeedEvent.objects.filter(facility_id=7).exists()
    assert list(
        FeedEvent.objects.filter(facility_id=8).order_by("number").values_list("number", flat=True)
    ) == [1, 2]
    assert feed_pruned_through(7) == 5
    assert feed_pruned_through(8) == 0
    # Every row of facility 7 is gone: its numbers still go on from 6, never from 1 again.
    assert feed_last_number(7) == 5
    _feed_rows(facility=7, count=1, age=timedelta(0))
    feed_number(7)
    assert list(FeedEvent.objects.filter(facility_id=7).values_list("number", flat=True)) == [6]


def test_the_horizon_never_goes_down(db):
    _feed_rows(facility=3, count=4, age=OLD)
    feed_number(3)
    FeedHorizon.objects.create(facility_id=3, pruned_through=10)  # an earlier, larger prune

    retention_prune()

    assert feed_pruned_through(3) == 10


@pytest.mark.parametrize(
    ("model", "sql", "index"),
    [
        (
            OutboxMessage,
            "SELECT id FROM {t} WHERE status = 'delivered' AND created_at < now() "
            "AND delivered_at < now() ORDER BY created_at LIMIT 5000",
            "outbox_status_created",
        ),
        (
            FeedEvent,
            "SELECT id, facility_id, number FROM {t} WHERE number IS NOT NULL "
            "AND occurred_at < now() ORDER BY occurred_at LIMIT 5000",
            "feed_numbered_occurred",
        ),
        (
            AppliedUpdate,
            "SELECT id FROM {t} WHERE at < now() ORDER BY at LIMIT 5000",
            "fhir_applied_update_at",
        ),
    ],
)
def test_prune_scans_walk_an_index(db, model: Any, sql: str, index: str):
    """The batch queries' shape (as the ORM writes them) can walk an index in order, so a
    batch at millions of rows reads what it deletes, not the table (the tables here are
    tiny, so the planner is told to avoid sequential and bitmap scans when it has a choice:
    with a usable index it then walks it in order, no Sort)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        cursor.execute("EXPLAIN " + sql.format(t=model._meta.db_table))
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert index in plan, plan
    assert "Sort" not in plan, plan


def test_conditional_create_keys_are_never_pruned(world: World):
    """A key is what keeps a late resubmission from posting a message twice: retention
    leaves every key, however old, and a resubmission long after the referral closed is
    answered with the first message (not refused as a new message on a closed referral)."""
    task_id = accepted(world)
    message = {
        "resourceType": "Communication",
        "status": "completed",
        "partOf": [{"reference": f"Task/{task_id}"}],
        "payload": [{"contentString": "Weight today?"}],
    }
    key = {"If-None-Exist": "identifier=https://codao.example.org/sid/message|M-7"}
    first = world.r4.post("/fhir/Communication", message, **key)
    assert first.status_code == 201, first.content
    cancelled = update_task(
        world.r4,
        task_id,
        lambda t: t.update(status="cancelled", statusReason={"text": "Seen locally."}),
    )
    assert cancelled.status_code == 200, cancelled.content
    CreateKey.objects.update(created_at=timezone.now() - timedelta(days=4000))

    retention_prune(now=timezone.now() + timedelta(days=3650))

    assert CreateKey.objects.count() == 1
    messages = FhirResource.objects.filter(resource_type="Communication", is_current=True)
    before = messages.count()
    again = world.r4.post("/fhir/Communication", message, **key)
    assert again.status_code == 200, again.content
    assert body(again)["id"] == body(first)["id"]
    assert messages.count() == before
    # Without the key it is a new message, which a closed referral refuses.
    assert world.r4.post("/fhir/Communication", message).status_code == 409


def test_a_bundle_resent_after_its_referral_closed_is_answered_by_its_file_key(world: World):
    """Why keys of closed referrals are kept too: an offline site's resent transaction
    Bundle is answered with the referral and the file its key names (decision 5); without
    the key the file would be a new one on a closed referral, and the whole Bundle 409."""
    bundle = submission_bundle(world)
    bundle["entry"].append(
        {
            "fullUrl": "urn:uuid:doc-3",
            "request": {
                "method": "POST",
                "url": "DocumentReference",
                "ifNoneExist": "identifier=https://codao.example.org/sid/file|F-1",
            },
            "resource": case_file(None, "letter"),
        }
    )
    first = world.r4.post("/fhir", bundle)
    assert first.status_code == 200, first.content
    task_id = str(task_of(body(first))["id"])
    cancelled = update_task(
        world.r4,
        task_id,
        lambda t: t.update(status="cancelled", statusReason={"text": "Seen locally."}),
    )
    assert cancelled.status_code == 200, cancelled.content
    CreateKey.objects.update(created_at=timezone.now() - timedelta(days=4000))
    retention_prune(now=timezone.now() + timedelta(days=3650))

    again = world.r4.post("/fhir", bundle)

    assert again.status_code == 200, again.content
    assert [e["response"]["status"] for e in body(again)["entry"]] == ["200 OK"] * 4
    assert (
        body(again)["entry"][3]["response"]["location"]
        == (body(first)["entry"][3]["response"]["location"])
    )
    assert Attachment.objects.count() == 1
    # Had retention dropped the key: refused, nothing stored.
    CreateKey.objects.all().delete()
    refused = world.r4.post("/fhir", bundle)
    assert refused.status_code == 409, refused.content
    assert Attachment.objects.count() == 1


# --------------------------------------------------------------------------- replay beyond


def _age_feed(facility_id: int, numbers: range) -> None:
    FeedEvent.objects.filter(facility_id=facility_id, number__in=list(numbers)).update(
        occurred_at=timezone.now() - OLD
    )


@pytest.mark.parametrize("version", [FHIR_R4, FHIR_R5])
def test_replaying_a_subscription_from_a_pruned_number_is_410_with_the_oldest_kept(
    world: World, version: str
):
    client = world.r4 if version == FHIR_R4 else world.r5
    facility = world.network.spoke.pk if version == FHIR_R4 else world.network.hub.pk
    sub = _subscribe(client, version)
    for n in range(2):
        _accept(world, str(task_of(submit(world, f"SR-{n}"))["id"]))  # 4 events each
    feed_number(facility)
    _age_feed(facility, range(1, 5))

    assert retention_prune().feed_deleted >= 4
    assert feed_pruned_through(facility) == 4

    gone = client.get(f"/fhir/Subscription/{sub}/$events?eventsSinceNumber=3", Accept=version)
    assert gone.status_code == 410
    issue = outcome_issue(gone)
    assert issue["code"] == "deleted"
    assert issue["extension"] == [{"url": OLDEST_EVENT_EXTENSION, "valueString": "5"}]
    assert "eventsSinceNumber=5" in issue["diagnostics"]
    model_class("OperationOutcome", version[-3:]).model_validate(json.loads(gone.content))
    bounded = client.get(
        f"/fhir/Subscription/{sub}/$events?eventsSinceNumber=1&eventsUntilNumber=2",
        Accept=version,
    )
    assert bounded.status_code == 410

    kept = client.get(f"/fhir/Subscription/{sub}/$events?eventsSinceNumber=5", Accept=version)
    assert kept.status_code == 200
    assert _numbers(body(kept), version) == [5, 6, 7, 8]
    # No number asked for: from the oldest event still kept.
    default = client.get(f"/fhir/Subscription/{sub}/$events", Accept=version)
    assert _numbers(body(default), version) == [5, 6, 7, 8]
    # The count since the Subscription started still counts the pruned events.
    status = body(client.get(f"/fhir/Subscription/{sub}/$status", Accept=version))
    resource = status["entry"][0]["resource"]
    since_start = (
        resource["eventsSinceSubscriptionStart"]
        if version == FHIR_R5
        else next(
            p["valueString"]
            for p in resource["parameter"]
            if p["name"] == "events-since-subscription-start"
        )
    )
    assert since_start == "8"


@pytest.mark.parametrize("until", [2, 4])
def test_events_until_a_pruned_number_without_a_since_is_410(world: World, until: int):
    """Review: eventsUntilNumber alone (from the Subscription's start) answered an empty
    page once every event up to it was pruned: a silent gap, not the 410 an
    eventsSinceNumber there gets."""
    sub = _subscribe(world.r4)
    facility = world.network.spoke.pk
    for n in range(2):
        _accept(world, str(task_of(submit(world, f"SR-{n}"))["id"]))  # 4 events each
    feed_number(facility)
    _age_feed(facility, range(1, 5))
    retention_prune()
    assert feed_pruned_through(facility) == 4

    gone = world.r4.get(f"/fhir/Subscription/{sub}/$events?eventsUntilNumber={until}")

    assert gone.status_code == 410, gone.content
    issue = outcome_issue(gone)
    assert issue["code"] == "deleted"
    assert issue["extension"] == [{"url": OLDEST_EVENT_EXTENSION, "valueString": "5"}]
    kept = world.r4.get(f"/fhir/Subscription/{sub}/$events?eventsUntilNumber=6")
    assert _numbers(body(kept), FHIR_R4) == [5, 6]  # the default start: the oldest kept


def test_facility_feed_cursor_behind_the_retention_is_410(world: World):
    _accept(world, str(task_of(submit(world))["id"]))  # events 1-4 for the spoke
    spoke = world.network.spoke.pk
    feed_number(spoke)
    _age_feed(spoke, range(1, 3))
    retention_prune()

    def numbers(response: Any) -> list[int]:
        return [
            int(x["valueString"])
            for e in json.loads(response.content).get("entry", [])
            for x in e["extension"]
            if x["url"] == EVENT_NUMBER_EXTENSION
        ]

    for since in (0, 1):
        gone = world.r4.get(f"/fhir/$events?since={since}")
        assert gone.status_code == 410, since
        issue = outcome_issue(gone)
        assert issue["extension"][0]["valueString"] == "3"
        assert "since=2" in issue["diagnostics"]
    assert numbers(world.r4.get("/fhir/$events?since=2")) == [3, 4]
    assert numbers(world.r4.get("/fhir/$events")) == [3, 4]  # no cursor: the oldest kept
    posted = world.r4.post(  # as every operation may be: its parameters in a Parameters
        "/fhir/$events",
        {"resourceType": "Parameters", "parameter": [{"name": "since", "valueInteger": 3}]},
    )
    assert posted.status_code == 200 and numbers(posted) == [4]
    empty = world.r4.post("/fhir/$events", b"", content_type="application/fhir+json")
    assert numbers(empty) == [3, 4]  # an empty body: no parameters, as a GET without any
    # Another facility's feed was not touched.
    assert world.r5.get("/fhir/$events?since=0").status_code == 200


# --------------------------------------------------------------------------- beat


def test_beat_runs_the_registered_retention_task_hourly_with_expires(settings):
    from config.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["fhir-retention"]
    assert entry["task"] == "fhir_gateway.retention_prune" == retention_prune_task.name
    assert entry["schedule"] == 3600.0
    assert 0 < entry["options"]["expires"] < entry["schedule"]
    assert app.tasks["fhir_gateway.retention_prune"].name == retention_prune_task.name
    assert 0 < RETENTION_BEAT_SECONDS < entry["options"]["expires"]


def test_the_task_prunes_every_table(db):
    endpoint = EndpointFactory.create()
    _message(endpoint, Status.DELIVERED, OLD)
    _feed_rows(facility=4, count=2, age=OLD)
    _applied_updates(count=1, age=UPDATE_OLD)

    assert retention_prune_task() == {
        "outbox_deleted": 1,
        "intake_deleted": 0,
        "applied_updates_deleted": 1,
        "feed_numbered": 2,
        "feed_deleted": 2,
        "finished": 1,
    }
    assert retention_prune_task()["outbox_deleted"] == 0  # safe to run twice
