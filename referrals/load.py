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
- ``department_load_rebuild`` recomputes the rows from the referrals (bulk-written data,
  repairs); ``department_load_matches`` compares both (tests; operations).
- Rows older than ``DEPARTMENT_LOAD_KEEP_DAYS`` are pruned by the response-times beat job.

Invariant (tested): for every department and day, ``assigned`` equals
``COUNT(*) FROM referral WHERE assigned_department = d AND local_date(assigned_at) = day``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
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


def load_slot(referral: Referral) -> Slot:
    return referral.assigned_department_id, referral.assigned_at


def department_load_move(*, before: Slot, after: Slot, referral_id: int) -> None:
    """Move one referral's unit of load from ``before`` to ``after`` (department, assigned
    at), in the shard of ``referral_id``; nothing when they are equal or unassigned."""
    if before == after:
        return
    shard = referral_id % SHARDS
    deltas: Counter[tuple[int, date]] = Counter()
    for (department_id, at), sign in ((before, -1), (after, +1)):
        if department_id is not None and at is not None:
            deltas[(department_id, timezone.localdate(at))] += sign
    rows = [(dep, day, shard, delta) for (dep, day), delta in sorted(deltas.items()) if delta]
    if rows:
        with connection.cursor() as cursor:
            cursor.executemany(_UPSERT, rows)


def department_load_today(department_ids: Iterable[int], now: datetime) -> dict[int, int]:
    ids = list(department_ids)
    return dict(
        DepartmentDayLoad.objects.filter(day=timezone.localdate(now), department_id__in=ids)
        .values("department_id")
        .annotate(total=Sum("assigned"))
        .values_list("department_id", "total")
    )


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
