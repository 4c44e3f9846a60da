"""Rebuild == the watermark job, exactly, row for row.

- 300 simulated referrals driven through ``referrals.services`` (forwards, declines,
  expiries, transfers, repeat patients), the job run in small random batches during
  ingest; then the SQL rebuild and the Python rebuild must both give the job's tables.
- The issue's acceptance check: 50,000 referrals written by the bulk simulation
  (``referrals.simulation.simulate_bulk``: COPY, the lifecycle model of
  ``manage.py simulate_referrals --bulk``), the watermark job run between the written
  batches as production runs it, then ``reports_rebuild``; daily, monthly, national
  monthly and segment rollups, facts, histogram and national histogram cells compared in
  SQL (``EXCEPT ALL`` both ways, floats exactly).
- SQL rebuild == Python rebuild on 3,000 bulk referrals.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from referrals import routing, simulation
from referrals.models import ReferralEvent
from referrals.tests.conftest import world  # noqa: F401  (the fixture)
from reports import rebuild
from reports.histogram import bucket_of
from reports.models import (
    COUNTERS,
    FOLLOWUP,
    HISTOGRAM_KEY,
    MONTHLY_KEY,
    NATIONAL_HISTOGRAM_KEY,
    NATIONAL_KEY,
    ROLLUP_ATTRIBUTES,
    ROLLUP_KEY,
    SEGMENT_KEY,
    DailyRollup,
    DurationHistogram,
    MonthlyRollup,
    NationalHistogram,
    NationalMonthlyRollup,
    ReferralFact,
    SegmentRollup,
    UpkeepState,
    segment_of,
)
from reports.services import (
    _histogram_keys,
    reports_catch_up,
    reports_catch_up_batch,
    reports_rebuild,
)
from reports.tests import bulk
from reports.tests.scenario import Driver, Network, at, build_network

pytestmark = pytest.mark.django_db


def simulate(net: Network, count: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    d = Driver(net)
    patients = [f"sim-{i}" for i in range(max(count // 3, 1))]
    for number in range(1000, 1000 + count):
        facility = rng.choice([net.d1, net.c1, net.l1])
        cardio = facility.pk != net.l1.pk and rng.random() < 0.25
        specialty = net.cardio if cardio else net.paeds
        department = net.h1c if cardio else rng.choice([net.h1p, net.h1p, net.h2p])
        if facility.pk == net.l1.pk:
            department = net.h1p
        t = at("2025-01-01", rng.uniform(0, 24 * 150))
        d.submit(
            number,
            facility,
            specialty,
            department,
            rng.choice(patients),
            t,
            campaign=rng.choice(["", "", "heart-2025"]),
        )

        def step(hours: float) -> Any:
            nonlocal t
            t = t + timedelta(hours=hours)
            return t

        roll = rng.random()
        if roll < 0.08:
            d.act(number, "decline", step(rng.uniform(0.5, 30)), reason_code="no_capacity")
            continue
        if roll < 0.12:
            d.act(number, "cancel", step(rng.uniform(0.5, 10)), reason="Improved.")
            continue
        if roll < 0.16:
            d.act(number, "expire", step(department.sla_hours + 1))
            continue
        # Forwarded to the provincial hub, which routing allows for Vietnamese requesters
        # (not across the border: h2 has no data-sharing agreement with Laos).
        if roll < 0.24 and department.pk == net.h1p.pk and facility.pk != net.l1.pk:
            d.act(
                number,
                "forward",
                step(rng.uniform(0.5, 8)),
                department=net.h2p.pk,
                reason="Closer.",
            )
        d.act(number, "accept", step(rng.uniform(0.2, 60)))
        d.advise(number, step(rng.uniform(0.5, 48)))
        roll = rng.random()
        if roll < 0.15:
            d.act(number, "request_transfer", step(1), reason="Needs surgery.")
            d.act(number, "accept_transfer", step(1))
            if rng.random() < 0.7:
                d.act(number, "depart", step(2))
                d.act(number, "arrive", step(4))
                d.act(number, "complete", step(24))
        elif roll < 0.9:
            considered = rng.random() < 0.7
            outcome = (
                rng.choice(["avoided", "avoided", "still_needed"])
                if considered
                else ("not_applicable")
            )
            d.close(number, step(rng.uniform(1, 72)), considered, outcome)
        if rng.random() < 0.3:
            # Incremental upkeep runs while ingest goes on, in uneven batches.
            reports_catch_up_batch(batch_size=rng.randint(1, 60))
    reports_catch_up()


# --- exact comparison of the report tables (in SQL: fast at 50,000 referrals) -------------

# (model, the columns that identify a row); every other column is compared too.
TABLES: tuple[tuple[Any, tuple[str, ...]], ...] = (
    (DailyRollup, ROLLUP_KEY),
    (ReferralFact, ("referral_id",)),
    (MonthlyRollup, MONTHLY_KEY),
    (NationalMonthlyRollup, NATIONAL_KEY),
    (SegmentRollup, SEGMENT_KEY),
    (DurationHistogram, HISTOGRAM_KEY),
    (NationalHistogram, NATIONAL_HISTOGRAM_KEY),
)


def _columns(model: Any) -> list[str]:
    return [f.column for f in model._meta.concrete_fields if f.name != "id"]


def _source(model: Any) -> str:
    # Histogram cells that fell to n = 0 are ignored by every query (a rebuild drops them).
    where = " WHERE n > 0" if model in (DurationHistogram, NationalHistogram) else ""
    return f"SELECT {', '.join(_columns(model))} FROM {model._meta.db_table}{where}"  # noqa: S608


def _keep(tag: str) -> None:
    """Copy the report tables aside (temp tables snap_<tag>_<table>)."""
    with connection.cursor() as cursor:
        for model, _ in TABLES:
            name = f"snap_{tag}_{model._meta.model_name}"
            cursor.execute(f"DROP TABLE IF EXISTS {name}")
            cursor.execute(f"CREATE TEMP TABLE {name} AS {_source(model)}")


def _differences(tag: str) -> dict[str, list[tuple[Any, ...]]]:
    """Rows in the kept copy and not in the table, or the other way round (EXCEPT ALL:
    duplicates count; floats compare exactly). Empty lists = identical tables."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with connection.cursor() as cursor:
        for model, _key in TABLES:
            name = f"snap_{tag}_{model._meta.model_name}"
            columns = ", ".join(_columns(model))
            kept = f"SELECT {columns} FROM {name}"  # noqa: S608
            now = _source(model)
            both_ways = (
                f"(SELECT 'kept', * FROM ({kept} EXCEPT ALL {now}) a LIMIT 5) UNION ALL "  # noqa: S608
                f"(SELECT 'now', * FROM ({now} EXCEPT ALL {kept}) b LIMIT 5)"
            )
            cursor.execute(both_ways)
            out[model._meta.model_name] = cursor.fetchall()
    return out


def _counts() -> dict[str, int]:
    with connection.cursor() as cursor:
        out = {}
        for model, _ in TABLES:
            cursor.execute(f"SELECT count(*) FROM ({_source(model)}) t")  # noqa: S608
            out[model._meta.model_name] = cursor.fetchone()[0]
        return out


def _assert_identical(tag: str) -> None:
    assert _differences(tag) == {model._meta.model_name: [] for model, _ in TABLES}


def _assert_derived_tables_consistent() -> None:
    """Month and segment rows = day rows summed; national month rows = month rows summed;
    histogram cells = a GROUP BY of the facts (the Python definition,
    ``services._histogram_keys``); national cells = histogram cells summed."""
    sums = [*COUNTERS, "travel_km"]
    expected: dict[tuple[Any, ...], list[Any]] = {}
    for row in DailyRollup.objects.values(*ROLLUP_KEY, *ROLLUP_ATTRIBUTES, *sums):
        key = (row["day"].replace(day=1), *(row[c] for c in MONTHLY_KEY[1:]))
        totals = expected.setdefault(key, [0] * len(sums))
        for i, c in enumerate(sums):
            totals[i] += row[c]
    actual = {
        tuple(row[c] for c in MONTHLY_KEY): [row[c] for c in sums]
        for row in MonthlyRollup.objects.values(*MONTHLY_KEY, *sums)
    }
    assert actual == expected  # exact: km are multiples of 1/1024
    expected = {}
    for row in DailyRollup.objects.values(*ROLLUP_KEY, *ROLLUP_ATTRIBUTES, *sums):
        key = (segment_of(row["day"]), *(row[c] for c in SEGMENT_KEY[1:]))
        totals = expected.setdefault(key, [0] * len(sums))
        for i, c in enumerate(sums):
            totals[i] += row[c]
    actual = {
        tuple(row[c] for c in SEGMENT_KEY): [row[c] for c in sums]
        for row in SegmentRollup.objects.values(*SEGMENT_KEY, *sums)
    }
    assert actual == expected
    expected = {}
    for row in MonthlyRollup.objects.values(*MONTHLY_KEY, *sums):
        totals = expected.setdefault(tuple(row[c] for c in NATIONAL_KEY), [0] * len(sums))
        for i, c in enumerate(sums):
            totals[i] += row[c]
    actual = {
        tuple(row[c] for c in NATIONAL_KEY): [row[c] for c in sums]
        for row in NationalMonthlyRollup.objects.values(*NATIONAL_KEY, *sums)
    }
    assert actual == expected
    cells: Counter[tuple[Any, ...]] = Counter()
    for fact in ReferralFact.objects.all().iterator(chunk_size=5000):
        cells.update(_histogram_keys(fact))
    stored = {
        tuple(row[c] for c in HISTOGRAM_KEY): row["n"]
        for row in DurationHistogram.objects.filter(n__gt=0).values(*HISTOGRAM_KEY, "n")
    }
    assert stored == dict(cells)
    assert not DurationHistogram.objects.filter(n__lt=0).exists()
    national: Counter[tuple[Any, ...]] = Counter()
    for key, n in stored.items():
        national[tuple(key[HISTOGRAM_KEY.index(c)] for c in NATIONAL_HISTOGRAM_KEY)] += n
    assert {
        tuple(row[c] for c in NATIONAL_HISTOGRAM_KEY): row["n"]
        for row in NationalHistogram.objects.filter(n__gt=0).values(*NATIONAL_HISTOGRAM_KEY, "n")
    } == dict(national)
    assert not NationalHistogram.objects.filter(n__lt=0).exists()


def _submitted() -> int:
    return DailyRollup.objects.aggregate(n=Sum("submitted"))["n"] or 0


# --- driven through referrals.services ----------------------------------------------------


@pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="compares with PostgreSQL's EXCEPT ALL and runs the SQL rebuild (PostgreSQL only)",
)
def test_rebuild_equals_incremental_on_a_simulated_network(report_settings: Any) -> None:
    """Forwards, declines, expiries, transfers and follow-ups through the real services;
    the job's tables == the SQL rebuild's == the Python rebuild's, exactly."""
    count = int(os.environ.get("REPORTS_SIM_SUITE", "300"))
    simulate(build_network(), count)
    assert _submitted() == count
    assert ReferralFact.objects.filter(followup_at__isnull=False).exists()
    assert DailyRollup.objects.filter(forwarded__gt=0).exists()
    _assert_derived_tables_consistent()
    _keep("job")

    assert reports_rebuild(method="sql") > 0
    _assert_identical("job")

    reports_rebuild(method="python")
    _assert_identical("job")

    # The comparison sees a one-ulp-sized change (km are multiples of 1/1024).
    row = DailyRollup.objects.filter(avoided__gt=0).first()
    assert row is not None
    DailyRollup.objects.filter(pk=row.pk).update(travel_km=row.travel_km + 1 / 1024)
    assert _differences("job")["dailyrollup"] != []


# --- bulk: the 50,000 --------------------------------------------------------------

bulk_simulation = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the bulk simulation path writes with COPY"
)


def _run_bulk(count: int, *, seed: int) -> int:
    """Write ``count`` referrals with the bulk simulation (COPY), running the watermark job
    as production does between the written batches: ``reports_catch_up`` (batches of
    REPORTS_UPKEEP_BATCH) after some, a few uneven single batches after others, so events
    are applied in many different increments. Returns the number of referrals written."""
    routing.routing_cache_clear()
    rng = random.Random(seed)

    def upkeep_while_inserting(_written: int) -> None:
        if rng.random() < 0.5:
            reports_catch_up()
        else:
            for _ in range(rng.randint(1, 3)):
                reports_catch_up_batch(batch_size=rng.randint(500, 8000))

    written = simulation.simulate_bulk(
        count=count,
        seed=seed,
        days=400,
        batch=2500,
        now=timezone.now(),
        progress=upkeep_while_inserting,
    )
    reports_catch_up()
    assert ReferralEvent.objects.filter(id__gt=UpkeepState.objects.get().watermark).count() == 0
    return written


@bulk_simulation
def test_rebuild_equals_incremental_on_50000_bulk_simulated_referrals(
    report_settings: Any,
) -> None:
    """The issue's acceptance check: 50,000 referrals (``reports.tests.bulk``, SQL) applied
    by the watermark job between the written chunks, as production runs it (whole
    catch-ups, and single batches of uneven size that stop mid-referral), then
    ``reports_rebuild``: every table identical, row for row. Local days in UTC+7, so
    day attribution differs from the UTC date."""
    report_settings.REPORTS_TIME_ZONE = "Asia/Ho_Chi_Minh"
    facilities, departments = bulk.extend_network(build_network())
    rng = random.Random(50)

    def upkeep(_written: int) -> None:
        if rng.random() < 0.5:
            reports_catch_up()
        else:
            for _ in range(rng.randint(1, 3)):
                reports_catch_up_batch(batch_size=rng.randint(500, 8000))

    events = bulk.write_referrals(
        count=50_000, facilities=facilities, departments=departments, after_chunk=upkeep
    )
    reports_catch_up()
    assert UpkeepState.objects.get().events_applied == events
    counts = _counts()
    assert counts["referralfact"] == 50_000
    assert _submitted() == 50_000
    assert MonthlyRollup.objects.values("month").distinct().count() > 12
    assert ReferralFact.objects.filter(followup_at__isnull=False).exists()
    assert DurationHistogram.objects.filter(metric=FOLLOWUP, bucket__gt=0, n__gt=0).exists()
    totals = DailyRollup.objects.aggregate(*(Sum(c) for c in COUNTERS))
    assert (
        all(totals[f"{c}__sum"] > 0 for c in COUNTERS if c != "forwarded")
        and totals["forwarded__sum"] > 0
    )
    _keep("job")

    assert reports_rebuild() == events

    assert _counts() == counts
    _assert_identical("job")


@bulk_simulation
def test_sql_rebuild_equals_python_rebuild_on_bulk_simulated_referrals(
    world: Any,  # noqa: F811
    report_settings: Any,
) -> None:
    """The two rebuild paths (set-based SQL; Python event by event, which SQLite uses)
    give identical tables, and those satisfy the tables' own identities."""
    _run_bulk(3_000, seed=3)
    _keep("job")
    reports_rebuild(method="python")
    _assert_identical("job")
    _assert_derived_tables_consistent()

    reports_rebuild(method="sql")

    _assert_identical("job")


def test_sql_histogram_buckets_equal_bucket_of_at_every_boundary() -> None:
    """width_bucket over bucket_thresholds() is bucket_of, bit for bit, at each threshold,
    the double just below it, and ordinary durations."""
    thresholds = rebuild.bucket_thresholds()
    assert thresholds[0] == 60.0 and len(thresholds) > 8000
    probes = [-1.0, 0.0, 59.999, 3600.0, 86400.5, 1e7]
    for t in thresholds[:400]:
        probes += [t, math.nextafter(t, 0.0)]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT width_bucket(x, %s::float8[]) FROM unnest(%s::float8[]) WITH ORDINALITY"
            " AS p (x, i) ORDER BY i",
            [list(thresholds), probes],
        )
        buckets = [row[0] for row in cursor.fetchall()]
    assert buckets == [bucket_of(x) for x in probes]


def test_the_sql_rebuild_refuses_sqlite_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "vendor", "sqlite")
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        reports_rebuild(method="sql")
