"""Departments' live load for routing: referrals currently assigned to a department, by
the local day they were assigned to it (``DepartmentDayLoad``).

Routing used to COUNT today's assigned referrals per candidate department in every call.
Today's rows are the newest and most often updated ones, so that count read the heap for
most of them (their pages are not yet all-visible) and its cost grew with the day's
traffic. The counter gives the same number by primary-key reads:

- ``department_load_move`` runs in the transition's transaction whenever a referral's
  ``(assigned_department, assigned_at)`` changes (submit with a department, forward,
  re-route): -1 on the old (department, day), +1 on the new one. It is called last in the
  transition, so the counter row's lock is held only until the commit. Its rows are
  written in (department, day) order, so two concurrent moves (A→B and B→A) lock them in
  the same order and cannot deadlock; every transition runs in its own transaction. Each
  (department, day) is ``SHARDS`` rows (by referral id), so concurrent submissions to one
  busy department rarely wait for each other's commit.
- A transaction that makes many moves (the asynchronous intake applies a batch of
  submissions in one) collects them instead (``department_load_deferred``) and writes them
  at its end, summed, in (department, day) order, in one shard picked at random: its
  counter rows are locked only from then until its commit, and in the same order as every
  transition's, so it cannot deadlock with them or with another batch. Readers in the
  transaction (routing) count the collected moves; moves rolled back with a savepoint are
  dropped. A unit may so leave a shard other than the one it entered (a row may go
  negative); readers sum the shards, and the sums stay exact.
- ``department_load_rebuild`` recomputes the rows from the referrals (bulk-written data,
  repairs); ``department_load_matches`` compares both (tests; operations).
- Rows older than ``DEPARTMENT_LOAD_KEEP_DAYS`` are pruned by the response-times beat job.

Invariant (tested): for every department and day, ``assigned`` equals
``COUNT(*) FROM referral WHERE assigned_department = d AND local_date(assigned_at) = day``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import date, datetime, timedelta

from django.db import connection, transaction
from django.db.models import Count, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from referrals.models import DepartmentDayLoad, Referral

DEPARTMENT_LOAD_KEEP_DAYS = 7
_TABLE = DepartmentDayLoad._meta.db_table
# One statement on PostgreSQL and SQLite (3.24+): add ``delta`` to the (department, day) row.
# A department's counter for a day is SHARDS rows (a referral moves its unit within the
# shard of its id): one hot department's concurrent submissions lock different rows.
# Measured with 8 threads submitting to one department: 19/s with one row, 36/s without
# any counter (bench/referrals.py machine, load ~2).
SHARDS = 16
_UPSERT = (
    f"INSERT INTO {_TABLE} (department_id, day, shard, assigned) "  # noqa: S608
    "VALUES (%s, %s, %s, %s) "
    f"ON CONFLICT (department_id, day, shard) DO UPDATE SET assigned = {_TABLE}.assigned + "
    "excluded.assigned"
)

Slot = tuple[int | None, datetime | None]


class _Deferred:
    """Moves collected by ``department_load_deferred``. Each registers a marker with
    ``transaction.on_commit``; Django drops the markers of a savepoint that is rolled back,
    so a move whose writes were undone (a refused submission inside a batch) is forgotten
    with them, however deep the savepoint."""

    def __init__(self) -> None:
        self.moves: list[tuple[Callable[[], None], Counter[tuple[int, date]]]] = []

    def add(self, deltas: Counter[tuple[int, date]]) -> None:
        def marker() -> None:  # runs after the commit, and does nothing
            return None

        transaction.on_commit(marker)
        self.moves.append((marker, deltas))

    def totals(self) -> Counter[tuple[int, date]]:
        kept = {id(entry[1]) for entry in connection.run_on_commit}  # (savepoints, func, robust)
        total: Counter[tuple[int, date]] = Counter()
        for marker, deltas in self.moves:
            if id(marker) in kept:
                total.update(deltas)
        return total


_deferred: ContextVar[_Deferred | None] = ContextVar("department_load_deferred", default=None)


@contextmanager
def department_load_deferred() -> Iterator[None]:
    """Inside (within one ``transaction.atomic``), moves are collected instead of written,
    and written when the block ends without an error: summed, in (department, day) order,
    in one shard picked at random. See the module's docstring. Readers inside the block
    (``department_load_today``, routing) count the collected moves."""
    if not connection.in_atomic_block:
        raise RuntimeError("department_load_deferred() must run inside a transaction.")
    deferred = _Deferred()
    token = _deferred.set(deferred)
    try:
        yield
    finally:
        _deferred.reset(token)
    shard = random.randrange(SHARDS)  # noqa: S311 (spreading load, not secrecy)
    _write([(dep, day, shard, n) for (dep, day), n in sorted(deferred.totals().items()) if n])


def department_load_add_pending(
    load: dict[int, int], department_ids: Iterable[int], day: date
) -> None:
    """Add to ``load`` (per department, what the counter rows say for ``day``) the moves to
    ``day`` the enclosing ``department_load_deferred`` block collected for those departments
    (none outside one)."""
    deferred = _deferred.get()
    if deferred is None:
        return
    wanted = set(department_ids)
    for (department_id, on), n in deferred.totals().items():
        if on == day and department_id in wanted:
            load[department_id] = load.get(department_id, 0) + n


def _write(rows: list[tuple[int, date, int, int]]) -> None:
    if rows:
        with connection.cursor() as cursor:
            cursor.executemany(_UPSERT, rows)


def load_slot(referral: Referral) -> Slot:
    return referral.assigned_department_id, referral.assigned_at


def department_load_move(*, before: Slot, after: Slot, referral_id: int) -> None:
    """Move one referral's unit of load from ``before`` to ``after`` (department, assigned
    at), in the shard of ``referral_id``; nothing when they are equal or unassigned. Inside
    ``department_load_deferred``: collected, written at the block's end."""
    if before == after:
        return
    deltas: Counter[tuple[int, date]] = Counter()
    for (department_id, at), sign in ((before, -1), (after, +1)):
        if department_id is not None and at is not None:
            deltas[(department_id, timezone.localdate(at))] += sign
    if (deferred := _deferred.get()) is not None:
        deferred.add(deltas)
        return
    shard = referral_id % SHARDS
    _write([(dep, day, shard, delta) for (dep, day), delta in sorted(deltas.items()) if delta])


def department_load_today(department_ids: Iterable[int], now: datetime) -> dict[int, int]:
    ids = list(department_ids)
    day = timezone.localdate(now)
    load = dict(
        DepartmentDayLoad.objects.filter(day=day, department_id__in=ids)
        .values("department_id")
        .annotate(total=Sum("assigned"))
        .values_list("department_id", "total")
    )
    department_load_add_pending(load, ids, day)
    return load


def _counted(since: date | None) -> dict[tuple[int, date], int]:
    queryset = Referral.objects.filter(assigned_department__isnull=False, assigned_at__isnull=False)
    if since is not None:
        start = timezone.make_aware(datetime.combine(since, datetime.min.time()))
        queryset = queryset.filter(assigned_at__gte=start)
    rows = (
        queryset.annotate(day=TruncDate("assigned_at"))
        .values_list("assigned_department_id", "day")
        .annotate(n=Count("id"))
        .order_by()
    )
    return {(dep, day): n for dep, day, n in rows}


def department_load_rebuild(*, days: int | None = DEPARTMENT_LOAD_KEEP_DAYS) -> int:
    """Recompute the counters of the last ``days`` local days (None: all) from the
    referrals; returns the number of rows written."""
    since = timezone.localdate() - timedelta(days=days) if days is not None else None
    counted = _counted(since)
    with transaction.atomic():
        stale = DepartmentDayLoad.objects.all()
        if since is not None:
            stale = stale.filter(day__gte=since)
        stale.delete()
        DepartmentDayLoad.objects.bulk_create(
            [
                DepartmentDayLoad(department_id=dep, day=day, assigned=n)
                for (dep, day), n in counted.items()
            ],
            batch_size=5000,
        )
    return len(counted)


def department_load_matches(*, days: int | None = None) -> bool:
    """Do the counters equal a fresh count (zero rows ignored)?"""
    since = timezone.localdate() - timedelta(days=days) if days is not None else None
    stored = DepartmentDayLoad.objects.all()
    if since is not None:
        stored = stored.filter(day__gte=since)
    sums = (
        stored.values("department_id", "day")
        .annotate(total=Sum("assigned"))
        .values_list("department_id", "day", "total")
    )
    return _counted(since) == {(dep, day): n for dep, day, n in sums if n}


def department_load_prune(*, keep_days: int = DEPARTMENT_LOAD_KEEP_DAYS) -> int:
    deleted, _ = DepartmentDayLoad.objects.filter(
        day__lt=timezone.localdate() - timedelta(days=keep_days)
    ).delete()
    return deleted
