"""core.rows: the hand-written reads and inserts of the write path load and store what the
ORM would."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection, models
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.rows import fetch_models, insert_many, insert_rows
from fhir_gateway.models import FeedEvent, OutboxMessage
from registry.models import Department, Endpoint, Specialty
from tests.factories import DepartmentFactory, EndpointFactory

pytestmark = pytest.mark.django_db


def _fields(instance: models.Model) -> dict[str, Any]:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_fetch_models_loads_every_field_as_the_orm_does() -> None:
    department = DepartmentFactory.create(languages=["vi", "en"])
    EndpointFactory.create(facility=department.facility)
    EndpointFactory.create(facility=department.facility, status=Endpoint.Status.SUSPENDED)
    for model, where, params, orm in (
        (Department, "id = %s", [department.pk], Department.objects.filter(pk=department.pk)),
        (
            Specialty,
            "code IN (%s) ORDER BY id",
            [department.specialty.code],
            Specialty.objects.filter(code__in=[department.specialty.code]).order_by("pk"),
        ),
        (
            Endpoint,
            "facility_id IN (%s) AND status = %s ORDER BY id",
            [department.facility_id, "active"],
            Endpoint.objects.filter(facility=department.facility, status="active").order_by("pk"),
        ),
    ):
        found = fetch_models(model, where, params)
        expected = list(orm)
        assert [_fields(f) for f in found] == [_fields(e) for e in expected], model
        assert found and all(not f._state.adding for f in found)
    assert fetch_models(Department, "id = %s", [department.pk])[0].languages == ["vi", "en"]


def test_insert_rows_stores_what_bulk_create_would_and_answers_ids_in_row_order() -> None:
    endpoint = EndpointFactory.create()
    now = timezone.now()
    given = [
        {
            "endpoint_id": endpoint.pk,
            "aggregate_key": "referral:1",
            "seq": n,
            "resource_type": "Task",
            "logical_id": f"t{9 - n}",  # row order is not id or text order
            "version_id": n if n % 2 else None,
            "idempotency_key": f"k{n}",
            "next_attempt_at": now,
            "created_at": now,
        }
        for n in range(1, 6)
    ]
    ids = insert_rows(OutboxMessage, given, returning_ids=True)
    by_orm = OutboxMessage.objects.bulk_create(
        OutboxMessage(**{**row, "aggregate_key": "referral:2", "idempotency_key": f"o{n}"})
        for n, row in enumerate(given)
    )

    stored = {m.pk: m for m in OutboxMessage.objects.filter(pk__in=ids)}
    assert [stored[pk].logical_id for pk in ids] == [row["logical_id"] for row in given]
    for mine, theirs in zip((stored[pk] for pk in ids), by_orm, strict=True):
        theirs.refresh_from_db()
        differ = {"id", "aggregate_key", "idempotency_key"}
        assert {k: v for k, v in _fields(mine).items() if k not in differ} == {
            k: v for k, v in _fields(theirs).items() if k not in differ
        }
    assert insert_rows(FeedEvent, []) == []


def test_insert_rows_fills_callable_defaults_per_row() -> None:
    ids = insert_rows(
        FeedEvent,
        [{"facility_id": 7, "resource_type": "Task", "logical_id": "t", "version_id": 1}] * 2,
        returning_ids=True,
    )
    stored = list(FeedEvent.objects.filter(pk__in=ids))
    assert all(e.number is None and e.referral_id is None for e in stored)
    assert all(e.occurred_at is not None for e in stored)


def _outbox(endpoint: Endpoint, key: str, count: int) -> list[dict[str, Any]]:
    now = timezone.now()
    return [
        {
            "endpoint_id": endpoint.pk,
            "aggregate_key": key,
            "seq": n,
            "resource_type": "Task",
            "logical_id": f"t{9 - n}",
            "version_id": n,
            "idempotency_key": f"{key}-{n}",
            "next_attempt_at": now,
            "created_at": now,
        }
        for n in range(1, count + 1)
    ]


def _feed(logical_id: str, count: int) -> list[dict[str, Any]]:
    return [
        {"facility_id": n, "resource_type": "Task", "logical_id": logical_id, "version_id": 1}
        for n in range(count)
    ]


def test_insert_many_stores_what_insert_rows_would_in_one_statement() -> None:
    endpoint = EndpointFactory.create()
    with CaptureQueriesContext(connection) as queries:
        outbox_ids, none, feed_ids, nothing = insert_many(
            [
                (OutboxMessage, _outbox(endpoint, "many", 3), True),
                (FeedEvent, _feed("many", 2), False),
                (FeedEvent, _feed("many-ids", 2), True),
                (OutboxMessage, [], True),
            ]
        )
    assert len(queries.captured_queries) == 0  # prepared statements, past Django's log
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    (one,) = [p for p in prepared if p.startswith("WITH i0 AS (INSERT")]
    assert (one.count("INSERT INTO"), "i1" in one, "i3" in one) == (3, True, False)
    assert (none, nothing) == ([], [])
    one_by_one = insert_rows(OutboxMessage, _outbox(endpoint, "one", 3), returning_ids=True)
    insert_rows(FeedEvent, _feed("one", 2))

    mine = [OutboxMessage.objects.get(pk=pk) for pk in outbox_ids]
    theirs = [OutboxMessage.objects.get(pk=pk) for pk in one_by_one]
    assert [m.logical_id for m in mine] == ["t8", "t7", "t6"]  # ids in row order
    differ = {"id", "aggregate_key", "idempotency_key", "created_at", "next_attempt_at"}
    for a, b in zip(mine, theirs, strict=True):
        assert {k: v for k, v in _fields(a).items() if k not in differ} == {
            k: v for k, v in _fields(b).items() if k not in differ
        }
    assert FeedEvent.objects.filter(logical_id="many").count() == 2
    assert sorted(FeedEvent.objects.filter(logical_id="many-ids").values_list("pk", flat=True)) == (
        feed_ids
    )
    # Nothing to return: the statement still runs every insert.
    assert insert_many(
        [(FeedEvent, _feed("quiet", 1), False), (FeedEvent, _feed("q2", 1), False)]
    ) == [
        [],
        [],
    ]
    assert FeedEvent.objects.filter(logical_id__in=["quiet", "q2"]).count() == 2


def test_insert_many_is_all_or_nothing() -> None:
    """A unique violation in one insert is Django's IntegrityError (as with insert_rows)
    and leaves none of the others' rows."""
    from django.db import IntegrityError, transaction

    endpoint = EndpointFactory.create()
    insert_rows(OutboxMessage, _outbox(endpoint, "taken", 1))
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_many(
            [
                (FeedEvent, _feed("lost", 2), False),
                (OutboxMessage, _outbox(endpoint, "taken", 1), True),
            ]
        )
    assert not FeedEvent.objects.filter(logical_id="lost").exists()


def test_the_specialty_lookup_picks_what_the_orm_first_picked() -> None:
    """``Specialty`` orders by display: with two known codes, the ORM's ``.first()`` took
    the one whose name sorts first (found by a review: the statement took the lower id)."""
    from fhir_gateway.referral_resources import _specialty_by_codes

    zeta = Specialty.objects.create(system=Specialty.SNOMED, code="1001", display="Zeta")
    alpha = Specialty.objects.create(system=Specialty.SNOMED, code="1002", display="Alpha")
    orm = Specialty.objects.filter(system=Specialty.SNOMED, code__in=["1001", "1002"]).first()

    assert orm == alpha and zeta.pk < alpha.pk
    assert _specialty_by_codes(["1001", "1002"]) == orm
