"""The pull feed: what a facility's members would have been pushed, for members that poll.

Written by ``publish`` in the transaction of the change (``feed_record``: one row per stored
version and party facility, the outbox's messages without endpoints). Read by ``$events``
(``subscriptions``) as the facility's **event numbers**, 1, 2, 3 … with no gaps.

The hard part is the order. Ids are taken at INSERT and transactions commit out of order: a
reader paging by id could see id 11 before id 10 commits, move past it, and lose 10 for
good. Rows are therefore not served by id: ``feed_number`` gives the facility's unnumbered
rows their numbers **after** they committed (a reader sees only committed rows), each time
continuing from the facility's highest number, under a per-facility lock (PostgreSQL
advisory lock; SQLite runs the one UPDATE under its database write lock). A row that
commits later is numbered by a later call, so its number is higher than every number
already handed out, whatever its id: nothing can appear behind a number a member has seen,
and nothing is skipped. Rows numbered in the same call go in id order, which keeps each
referral's order (its transactions serialise on the referral's row lock, so a later
change's rows also have higher ids). A rolled-back change leaves no row and so no gap.

**Retention** (``feed_prune``, beat task ``fhir_gateway.retention_prune``): numbered rows
older than ``FHIR_FEED_RETENTION_DAYS`` are deleted in batches, and ``FeedHorizon`` keeps,
per facility, the highest number deleted. Numbering continues above it (a facility whose
rows were all pruned does not start again at 1), and a member asking for a number at or
below it is answered 410 by ``subscriptions`` rather than served the oldest kept events as
if nothing were missing. Unnumbered rows are numbered first, so nothing leaves unnumbered.

(The first design, a cursor ``"<txid>.<id>"`` over rows below
``pg_snapshot_xmin(pg_current_snapshot())``, gives the same guarantee without writes on
read, but no dense numbers: R5's ``eventNumber`` / ``eventsSinceNumber`` need them.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from core.rows import insert_rows
from fhir_gateway.models import FeedEvent, FeedHorizon, FhirResource

# An event number or cursor must fit PostgreSQL's bigint.
MAX_NUMBER = 2**63 - 1


def feed_record(
    *, facility_ids: Iterable[int], rows: list[FhirResource], referral_id: int | None
) -> None:
    """Append the stored versions for each party facility. Inside the change's transaction."""
    # One multi-row INSERT, no model instances (core.rows).
    insert_rows(FeedEvent, feed_rows(facility_ids=facility_ids, rows=rows, referral_id=referral_id))


def feed_rows(
    *, facility_ids: Iterable[int], rows: list[FhirResource], referral_id: int | None
) -> list[dict[str, Any]]:
    """The rows ``feed_record`` inserts (for a caller inserting them with others:
    ``core.rows.insert_many``). Inside the change's transaction."""
    if not connection.in_atomic_block:
        raise RuntimeError("feed_record must run inside the transaction of the change.")
    facilities = list(dict.fromkeys(int(f) for f in facility_ids))
    return [
        {
            "facility_id": facility,
            "resource_type": row.resource_type,
            "logical_id": row.logical_id,
            "version_id": row.version_id,
            "referral_id": referral_id,
            "occurred_at": row.last_updated,
        }
        for facility in facilities
        for row in rows
    ]


def feed_number(facility_id: int) -> int:
    """Number the facility's committed, unnumbered rows; returns how many."""
    if not FeedEvent.objects.filter(facility_id=facility_id, number__isnull=True).exists():
        return 0
    table = connection.ops.quote_name(FeedEvent._meta.db_table)
    horizon = connection.ops.quote_name(FeedHorizon._meta.db_table)
    # The larger of two values: GREATEST in PostgreSQL, the two-argument MAX in SQLite.
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # One numberer per facility at a time; the UPDATE's snapshot, taken after the
            # lock, sees the previous numberer's numbers.
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                [f"fhir-feed:{facility_id}"],
            )
        # Only table and function names are formatted in; the facility id is a parameter.
        # The base is the highest number handed out: the highest kept row's, or what
        # retention pruned through when that is higher (every row may be gone).
        cursor.execute(
            f"""
            UPDATE {table} SET number = todo.base + todo.rn
            FROM (
                SELECT id,
                       ROW_NUMBER() OVER (ORDER BY id) AS rn,
                       {greatest}(
                           (SELECT COALESCE(MAX(number), 0) FROM {table}
                            WHERE facility_id = %s AND number IS NOT NULL),
                           (SELECT COALESCE(MAX(pruned_through), 0) FROM {horizon}
                            WHERE facility_id = %s)
                       ) AS base
                FROM {table}
                WHERE facility_id = %s AND number IS NULL
            ) AS todo
            WHERE {table}.id = todo.id
            """,  # noqa: S608
            [facility_id, facility_id, facility_id],
        )
        return int(cursor.rowcount)


def feed_last_number(facility_id: int) -> int:
    """The highest number handed out (kept, or pruned: see ``feed_pruned_through``)."""
    last = FeedEvent.objects.filter(facility_id=facility_id, number__isnull=False).aggregate(
        last=Max("number")
    )["last"]
    return max(int(last or 0), feed_pruned_through(facility_id))


def feed_pruned_through(facility_id: int) -> int:
    """Events numbered up to this may have been pruned; the oldest kept is above it."""
    pruned = (
        FeedHorizon.objects.filter(facility_id=facility_id)
        .values_list("pruned_through", flat=True)
        .first()
    )
    return int(pruned or 0)


@dataclass(frozen=True)
class FeedItem:
    number: int
    resource_type: str
    logical_id: str
    version_id: int
    occurred_at: datetime


def feed_page(
    facility_id: int, *, first: int, last: int | None = None, count: int
) -> tuple[list[FeedItem], bool]:
    """Numbered events ``first`` ≤ number (≤ ``last``), at most ``count``; and whether more
    follow. Number first (``feed_number``) to include what committed since the last call."""
    rows: Any = FeedEvent.objects.filter(facility_id=facility_id, number__gte=first)
    if last is not None:
        rows = rows.filter(number__lte=last)
    found = [
        FeedItem(*values)
        for values in rows.order_by("number").values_list(
            "number", "resource_type", "logical_id", "version_id", "occurred_at"
        )[: count + 1]
    ]
    return found[:count], len(found) > count


# --------------------------------------------------------------------------- retention


def feed_number_all() -> int:
    """Number every facility's committed, unnumbered rows (retention deletes numbered rows
    only, so a facility nobody polls is numbered here before its rows can go). Returns
    how many rows were numbered."""
    facilities = list(
        FeedEvent.objects.filter(number__isnull=True)
        .order_by()
        .values_list("facility_id", flat=True)
        .distinct()
    )
    return sum(feed_number(facility) for facility in facilities)


def feed_prune(*, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` of the oldest numbered events that occurred before
    ``before``, and raise each touched facility's ``FeedHorizon`` to the highest number
    deleted, in one transaction. Returns how many rows were deleted (fewer than ``limit``:
    nothing older is left, apart from rows another pruner holds).

    Numbers are given in commit order and ``occurred_at`` is the version's time, so a
    batch may take number 8 and leave 7 (a change that committed a moment later): the
    horizon still says "up to 8 may be gone", which is what the 410 answers, and 7 goes
    with a later batch.
    """
    with transaction.atomic():
        doomed = list(
            FeedEvent.objects.select_for_update(skip_locked=True)
            .filter(number__isnull=False, occurred_at__lt=before)
            .order_by("occurred_at")
            .values_list("pk", "facility_id", "number")[:limit]
        )
        if not doomed:
            return 0
        highest: dict[int, int] = {}
        for _pk, facility, number in doomed:
            highest[facility] = max(highest.get(facility, 0), int(number or 0))
        FeedEvent.objects.filter(pk__in=[pk for pk, _f, _n in doomed]).delete()
        _raise_horizons(highest)
    return len(doomed)


def _raise_horizons(highest: dict[int, int]) -> None:
    """Upsert each facility's horizon to at least the given number (never lowers it:
    two pruners committing out of order both leave the higher one)."""
    table = connection.ops.quote_name(FeedHorizon._meta.db_table)
    greatest = "GREATEST" if connection.vendor == "postgresql" else "MAX"
    now = timezone.now()
    rows = sorted(highest.items())  # a fixed order: concurrent upserts do not deadlock
    values = ", ".join(["(%s, %s, %s)"] * len(rows))
    params: list[Any] = [value for facility, number in rows for value in (facility, number, now)]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} (facility_id, pruned_through, updated_at) VALUES {values}
            ON CONFLICT (facility_id) DO UPDATE SET
                pruned_through = {greatest}({table}.pruned_through, excluded.pruned_through),
                updated_at = excluded.updated_at
            """,  # noqa: S608
            params,
        )
