"""Upkeep of the report tables from the referral event log.

Decision (docs/metrics.md, "Upkeep"): a **watermark job**, not a hook in the referral
transaction. Ingest pays nothing; the job (Celery beat, every REPORTS_UPKEEP_INTERVAL
seconds, and ``manage.py rebuild_reports --catch-up``) applies events with id above the
watermark in batches, with a handful of set-based statements per batch. Events whose id
was skipped (their transaction had not committed when a later id was read) are remembered
as gaps and applied when they appear; gaps older than REPORTS_GAP_TIMEOUT are dropped
(their transaction rolled back).

Applying an event is order-independent across referrals (within a referral events arrive
in seq order: the row lock serialises them), which is what makes the rebuild give the same
tables as the job, which walks the log by id: on PostgreSQL the rebuild is set-based SQL
(``reports.rebuild``), elsewhere it walks the log referral by referral through the same
``_apply_event``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Q

from referrals.models import ReferralEvent
from registry.geo import haversine_km
from registry.models import Department
from reports.histogram import bucket_of
from reports.models import (
    ACCEPT,
    ADVICE,
    COUNTERS,
    FOLLOWUP,
    FOLLOWUP_MAX_DAYS,
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

logger = logging.getLogger(__name__)

# Which counter an action adds one to (close_local adds more, see _apply_event).
ACTION_COUNTERS: dict[str, str] = {
    "submit": "submitted",
    "accept": "accepted",
    "decline": "declined",
    "forward": "forwarded",
    "reroute": "forwarded",
    "cancel": "cancelled",
    "expire": "expired",
    "advise": "advised",
    "finish_conference": "advised",
    "close_local": "closed_local",
    "request_transfer": "transfer_requested",
    "complete": "transfer_completed",
    "counter_refer": "counter_referrals",
}
ADVICE_ACTIONS = frozenset({"advise", "finish_conference"})
# Actions that hand the case to another department (counted against the previous one).
REASSIGNING = frozenset({"forward", "reroute"})
SLA_ANSWERS = frozenset({"accept", "decline"})
SLA_DUE = frozenset({"accept", "decline", "expire"})

EVENT_FIELDS = (
    "id",
    "referral_id",
    "seq",
    "at",
    "action",
    "department_id",
    "payload",
    "referral__requester_facility_id",
    "referral__specialty_id",
    "referral__campaign",
    "referral__patient_ref",
    "referral__requester_facility__country_id",
    "referral__requester_facility__province_id",
    "referral__requester_facility__tier",
    "referral__requester_facility__latitude",
    "referral__requester_facility__longitude",
)

# Every table derived from the log (emptied and refilled by a rebuild).
REPORT_TABLES = (
    DailyRollup,
    MonthlyRollup,
    NationalMonthlyRollup,
    SegmentRollup,
    DurationHistogram,
    NationalHistogram,
    ReferralFact,
)

FACT_UPDATE_FIELDS = [f.name for f in ReferralFact._meta.concrete_fields if f.name != "referral_id"]


def report_time_zone() -> ZoneInfo:
    return ZoneInfo(getattr(settings, "REPORTS_TIME_ZONE", "") or settings.TIME_ZONE)


@dataclass(frozen=True)
class DepartmentInfo:
    facility_id: int
    sla_hours: int
    country_id: int
    latitude: float | None
    longitude: float | None


@dataclass
class Batch:
    """What one pass over a list of events changes, before it is written."""

    zone: ZoneInfo
    departments: dict[int, DepartmentInfo]
    facts: dict[int, ReferralFact]
    rollups: dict[tuple[Any, ...], dict[str, Any]] = field(default_factory=dict)
    # (requester facility, patient_ref, specialty) whose verification must be recomputed.
    patient_keys: set[tuple[int, str, int]] = field(default_factory=set)
    touched: set[int] = field(default_factory=set)


def _day(batch: Batch, at: datetime) -> date:
    return at.astimezone(batch.zone).date()


def _new_fact(ev: dict[str, Any]) -> ReferralFact:
    return ReferralFact(
        referral_id=ev["referral_id"],
        requester_facility_id=ev["referral__requester_facility_id"],
        country_id=ev["referral__requester_facility__country_id"],
        province_id=ev["referral__requester_facility__province_id"] or 0,
        tier=ev["referral__requester_facility__tier"],
        specialty_id=ev["referral__specialty_id"],
        campaign=ev["referral__campaign"] or "",
        patient_ref=ev["referral__patient_ref"] or "",
    )


# Distances are kept in multiples of 1/1024 km (~1 m): sums of such numbers are exact in
# binary floating point (far below 2**43 km), so a rollup's travel_km is the same whatever
# the order and batching of the additions -- the job, the Python and the SQL rebuild give
# bit-identical tables.
KM_QUANTUM = 1024


def travel_round_trip_km(ev: dict[str, Any], department: DepartmentInfo | None) -> float:
    return round_trip_km(
        ev["referral__requester_facility__latitude"],
        ev["referral__requester_facility__longitude"],
        department,
    )


def round_trip_km(lat: float | None, lon: float | None, department: DepartmentInfo | None) -> float:
    """2 x great-circle km from the requester to the department's facility (0 when a
    coordinate is missing), rounded to 1/KM_QUANTUM km."""
    if department is None or department.latitude is None or department.longitude is None:
        return 0.0
    if lat is None or lon is None:
        return 0.0
    km = 2 * haversine_km(lat, lon, department.latitude, department.longitude)
    return round(km * KM_QUANTUM) / KM_QUANTUM


def _rollup_row(batch: Batch, ev: dict[str, Any], department_id: int) -> dict[str, Any]:
    department = batch.departments.get(department_id)
    country_id = ev["referral__requester_facility__country_id"]
    key = (
        _day(batch, ev["at"]),
        ev["referral__requester_facility_id"],
        department_id,
        ev["referral__specialty_id"],
        ev["referral__campaign"] or "",
    )
    row = batch.rollups.get(key)
    if row is None:
        row = dict(zip(ROLLUP_KEY, key, strict=True))
        row.update(
            country_id=country_id,
            province_id=ev["referral__requester_facility__province_id"] or 0,
            tier=ev["referral__requester_facility__tier"],
            hub_facility_id=department.facility_id if department else 0,
            cross_border=bool(department and department.country_id != country_id),
            travel_km=0.0,
        )
        row.update(dict.fromkeys(COUNTERS, 0))
        batch.rollups[key] = row
    return row


def _apply_event(batch: Batch, ev: dict[str, Any]) -> None:
    """Apply one event to its referral's fact row and to the day's rollup row."""
    action: str = ev["action"]
    at: datetime = ev["at"]
    payload: dict[str, Any] = ev["payload"] or {}
    fact = batch.facts.get(ev["referral_id"])
    if fact is None:
        fact = batch.facts[ev["referral_id"]] = _new_fact(ev)
    batch.touched.add(fact.referral_id)

    # The department the event is counted against: the one that acted (a forward or
    # reroute is counted against the department that had the case).
    department_id = int(ev["department_id"] or 0)
    if action in REASSIGNING:
        department_id = int(payload.get("from_department_id") or department_id)
    department = batch.departments.get(department_id)

    if ev["department_id"]:
        current = batch.departments.get(ev["department_id"])
        fact.department_id = ev["department_id"]
        fact.hub_facility_id = current.facility_id if current else 0
        fact.cross_border = bool(current and current.country_id != fact.country_id)

    counter = ACTION_COUNTERS.get(action)
    row = _rollup_row(batch, ev, department_id) if counter or action in SLA_DUE else None
    if row is not None and counter:
        row[counter] += 1

    if action == "submit":
        if fact.submitted_at is None:
            fact.submitted_at = at
            batch.patient_keys.add(
                (fact.requester_facility_id, fact.patient_ref, fact.specialty_id)
            )
        fact.assigned_at = at
    elif action in REASSIGNING:
        fact.assigned_at = at
        # The new department has not accepted it: the time to accept is its own, when it
        # does (the earlier acceptance still counts in ``accepted``, against its department).
        fact.accepted_at = fact.accepted_day = fact.accept_seconds = None
    elif action == "accept":
        fact.accepted_at = at
        fact.accepted_day = _day(batch, at)
        start = fact.assigned_at or fact.submitted_at or at
        fact.accept_seconds = (at - start).total_seconds()
    elif action in ADVICE_ACTIONS and fact.advised_at is None:
        fact.advised_at = at
        fact.advised_day = _day(batch, at)
        fact.advice_seconds = (at - (fact.submitted_at or at)).total_seconds()
    elif action == "close_local":
        fact.closed_at = at
        fact.closed_day = _day(batch, at)
        considered = bool(payload.get("transfer_originally_considered"))
        assert row is not None
        if considered:
            row["transfer_considered"] += 1
            if payload.get("outcome") == "avoided":
                km = travel_round_trip_km(ev, department)
                row["avoided"] += 1
                row["travel_km"] += km
                fact.avoided = True
                fact.travel_km = km
                batch.patient_keys.add(
                    (fact.requester_facility_id, fact.patient_ref, fact.specialty_id)
                )
    elif action == "request_transfer" and fact.transfer_requested_at is None:
        fact.transfer_requested_at = at
        batch.patient_keys.add((fact.requester_facility_id, fact.patient_ref, fact.specialty_id))

    if action in SLA_DUE:
        assert row is not None
        row["sla_due"] += 1
        if action in SLA_ANSWERS and department is not None:
            start = fact.assigned_at or fact.submitted_at or at
            if (at - start).total_seconds() <= department.sla_hours * 3600:
                row["sla_met"] += 1


def _load_departments(ids: Iterable[int]) -> dict[int, DepartmentInfo]:
    wanted = {i for i in ids if i}
    if not wanted:
        return {}
    rows = Department.objects.filter(pk__in=wanted).values_list(
        "id",
        "facility_id",
        "sla_hours",
        "facility__country_id",
        "facility__latitude",
        "facility__longitude",
    )
    return {r[0]: DepartmentInfo(*r[1:]) for r in rows}


def _departments_of(events: list[dict[str, Any]]) -> set[int]:
    ids: set[int] = set()
    for ev in events:
        if ev["department_id"]:
            ids.add(ev["department_id"])
        if ev["action"] in REASSIGNING and ev["payload"]:
            previous = ev["payload"].get("from_department_id")
            if previous:
                ids.add(int(previous))
    return ids


def _upsert(
    table: str,
    key: tuple[str, ...],
    columns: list[str],
    sums: list[str],
    rows: list[list[Any]],
    *,
    replace: bool = False,
    returning: Sequence[str] = (),
) -> list[tuple[Any, ...]] | None:
    """INSERT ... ON CONFLICT (key) DO UPDATE SET c = c + EXCLUDED.c for each of ``sums``
    (``replace``: c = EXCLUDED.c). ``rows`` must have distinct keys. On PostgreSQL one
    statement over unnest() arrays (a statement per row, or Django's multi-row VALUES,
    cost several times more at a 5,000-event batch), which gives back the ``returning``
    columns of the rows as stored; elsewhere None (executemany returns no rows)."""
    if not rows:
        return [] if connection.vendor == "postgresql" else None
    qn = connection.ops.quote_name
    assignments = [
        f"{qn(c)} = EXCLUDED.{qn(c)}"
        if replace
        else f"{qn(c)} = {qn(table)}.{qn(c)} + EXCLUDED.{qn(c)}"
        for c in sums
    ]
    conflict = (
        f"ON CONFLICT ({', '.join(qn(c) for c in key)}) DO UPDATE SET {', '.join(assignments)}"
    )
    into = f"INSERT INTO {qn(table)} ({', '.join(qn(c) for c in columns)}) "
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            types = _column_types(table)
            arrays = ", ".join(f"%s::{types[c]}[]" for c in columns)
            back = f" RETURNING {', '.join(qn(c) for c in returning)}" if returning else ""
            cursor.execute(
                f"{into} SELECT * FROM unnest({arrays}) {conflict}{back}",  # noqa: S608
                [list(values) for values in zip(*rows, strict=True)],
            )
            return cursor.fetchall() if returning else []
        placeholders = ", ".join(["%s"] * len(columns))
        cursor.executemany(f"{into} VALUES ({placeholders}) {conflict}", rows)
        return None


_TYPES: dict[str, dict[str, str]] = {}


def _column_types(table: str) -> dict[str, str]:
    """Column -> PostgreSQL type of a report table (for the unnest() casts)."""
    if table not in _TYPES:
        model = next(m for m in REPORT_TABLES if m._meta.db_table == table)
        _TYPES[table] = {f.column: str(f.db_type(connection)) for f in model._meta.concrete_fields}
    return _TYPES[table]


def _summed(
    rows: Iterable[dict[str, Any]], key: tuple[str, ...], sums: list[str]
) -> list[dict[str, Any]]:
    """``rows`` summed by ``key`` (columns of the rows)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        values = tuple(row[c] for c in key)
        total = out.get(values)
        if total is None:
            total = out[values] = dict(zip(key, values, strict=True))
            total.update(dict.fromkeys(sums, 0))
        for c in sums:
            total[c] += row[c]
    return list(out.values())


def _keep_stored_attributes(rows: list[dict[str, Any]], stored: Iterable[Sequence[Any]]) -> None:
    """A day row keeps the attributes (province, tier, hub...) it was first written with
    (the upsert adds counters only); ``stored`` (key and attribute columns of the day rows
    as stored) puts them on ``rows``, so counters added later go to the month, national
    and segment rows under those same attributes, even when the registry changed
    meanwhile: the coarser rows always equal the day rows summed."""
    width = len(ROLLUP_KEY)
    attributes = {tuple(values[:width]): values[width:] for values in stored}
    for row in rows:
        found = attributes.get(tuple(row[c] for c in ROLLUP_KEY))
        if found is not None:
            row.update(zip(ROLLUP_ATTRIBUTES, found, strict=True))


def _write_rollups(rollups: Iterable[dict[str, Any]]) -> None:
    """The day rows, and the same counters summed into the month, national month and
    segment rows (same transaction)."""
    rows = list(rollups)
    if not rows:
        return
    sums = [*COUNTERS, "travel_km"]
    columns = [*ROLLUP_KEY, *ROLLUP_ATTRIBUTES, *sums]
    kept = [*ROLLUP_KEY, *ROLLUP_ATTRIBUTES]
    stored = _upsert(
        DailyRollup._meta.db_table,
        ROLLUP_KEY,
        columns,
        sums,
        [[r[c] for c in columns] for r in rows],
        returning=kept,
    )
    if stored is None:  # SQLite (make run): the batch's days and facilities, read back
        stored = list(
            DailyRollup.objects.filter(
                day__in={r["day"] for r in rows},
                requester_facility_id__in={r["requester_facility_id"] for r in rows},
            ).values_list(*kept)
        )
    _keep_stored_attributes(rows, stored)
    months: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = (row["day"].replace(day=1), *(row[c] for c in MONTHLY_KEY[1:]))
        month = months.get(key)
        if month is None:
            month = months[key] = dict(zip(MONTHLY_KEY, key, strict=True))
            month.update(dict.fromkeys(sums, 0))
        for c in sums:
            month[c] += row[c]
    monthly_columns = [*MONTHLY_KEY, *sums]
    _upsert(
        MonthlyRollup._meta.db_table,
        MONTHLY_KEY,
        monthly_columns,
        sums,
        [[m[c] for c in monthly_columns] for m in months.values()],
    )
    national_columns = [*NATIONAL_KEY, *sums]
    _upsert(
        NationalMonthlyRollup._meta.db_table,
        NATIONAL_KEY,
        national_columns,
        sums,
        [[m[c] for c in national_columns] for m in _summed(months.values(), NATIONAL_KEY, sums)],
    )
    segments: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = (segment_of(row["day"]), *(row[c] for c in SEGMENT_KEY[1:]))
        segment = segments.get(key)
        if segment is None:
            segment = segments[key] = dict(zip(SEGMENT_KEY, key, strict=True))
            segment.update(dict.fromkeys(sums, 0))
        for c in sums:
            segment[c] += row[c]
    segment_columns = [*SEGMENT_KEY, *sums]
    _upsert(
        SegmentRollup._meta.db_table,
        SEGMENT_KEY,
        segment_columns,
        sums,
        [[m[c] for c in segment_columns] for m in segments.values()],
    )


FACT_COLUMNS = [f.column for f in ReferralFact._meta.concrete_fields]


def _write_facts(facts: list[ReferralFact]) -> None:
    """Insert or overwrite these fact rows."""
    if connection.vendor != "postgresql":
        ReferralFact.objects.bulk_create(
            facts,
            update_conflicts=True,
            unique_fields=["referral_id"],
            update_fields=FACT_UPDATE_FIELDS,
            batch_size=1000,
        )
        return
    _upsert(
        ReferralFact._meta.db_table,
        ("referral_id",),
        FACT_COLUMNS,
        [c for c in FACT_COLUMNS if c != "referral_id"],
        [[getattr(fact, c) for c in FACT_COLUMNS] for fact in facts],
        replace=True,
    )


def _histogram_keys(fact: ReferralFact) -> list[tuple[Any, ...]]:
    """The DurationHistogram cells (HISTOGRAM_KEY without n) this fact row counts in."""
    dimensions = (
        fact.country_id,
        fact.province_id,
        fact.tier,
        fact.hub_facility_id,
        fact.specialty_id,
        fact.campaign,
        fact.cross_border,
    )
    keys = []
    if fact.accept_seconds is not None and fact.accepted_day is not None:
        month = fact.accepted_day.replace(day=1)
        keys.append((month, ACCEPT, *dimensions, bucket_of(fact.accept_seconds)))
    if fact.advice_seconds is not None and fact.advised_day is not None:
        month = fact.advised_day.replace(day=1)
        keys.append((month, ADVICE, *dimensions, bucket_of(fact.advice_seconds)))
    followup = _followup_key(fact)
    if followup is not None:
        keys.append(followup)
    return keys


def _followup_key(fact: ReferralFact) -> tuple[Any, ...] | None:
    """An avoided transfer that can be followed, by closed month and whole days to the
    follow-up (0 = none): followed within W days <=> 0 < bucket <= W, exactly."""
    if not fact.avoided or not fact.patient_ref or fact.closed_at is None:
        return None
    if fact.closed_day is None:
        return None
    days = 0
    if fact.followup_at is not None:
        gap = (fact.followup_at - fact.closed_at).total_seconds()
        days = min(max(1, math.ceil(gap / 86400)), FOLLOWUP_MAX_DAYS)
    return (
        fact.closed_day.replace(day=1),
        FOLLOWUP,
        fact.country_id,
        fact.province_id,
        fact.tier,
        fact.hub_facility_id,
        fact.specialty_id,
        fact.campaign,
        fact.cross_border,
        days,
    )


# Positions in HISTOGRAM_KEY of the NATIONAL_HISTOGRAM_KEY columns.
_NATIONAL_CELL = tuple(HISTOGRAM_KEY.index(c) for c in NATIONAL_HISTOGRAM_KEY)


def _write_histograms(delta: Counter[tuple[Any, ...]]) -> None:
    """Add the count changes to the cells and to the national cells they sum into (cells
    that drop to 0 stay, with n = 0)."""
    columns = [*HISTOGRAM_KEY, "n"]
    _upsert(
        DurationHistogram._meta.db_table,
        HISTOGRAM_KEY,
        columns,
        ["n"],
        [[*key, n] for key, n in sorted(delta.items(), key=repr) if n],
    )
    national: Counter[tuple[Any, ...]] = Counter()
    for key, n in delta.items():
        national[tuple(key[i] for i in _NATIONAL_CELL)] += n
    _upsert(
        NationalHistogram._meta.db_table,
        NATIONAL_HISTOGRAM_KEY,
        [*NATIONAL_HISTOGRAM_KEY, "n"],
        ["n"],
        [[*key, n] for key, n in sorted(national.items(), key=repr) if n],
    )


def _resolve_followups(keys: set[tuple[int, str, int]]) -> None:
    """Recompute ``followup_at`` of the avoided transfers of these patients: the earliest
    new referral (first submission) or transfer request of the same patient and specialty
    after the close-out. A pure function of the fact rows, so order does not matter."""
    keys = {k for k in keys if k[1]}  # no patient_ref: cannot be followed (never verified)
    if not keys:
        return
    facts: Iterable[ReferralFact]
    if connection.vendor == "postgresql":
        # Exactly these keys (three IN lists would select their cross product).
        ordered = sorted(keys)
        facts = ReferralFact.objects.raw(
            f"SELECT f.* FROM {ReferralFact._meta.db_table} f"  # noqa: S608
            " JOIN unnest(%s::bigint[], %s::text[], %s::bigint[]) AS k (fac, ref, spec)"
            " ON f.requester_facility_id = k.fac AND f.patient_ref = k.ref"
            " AND f.specialty_id = k.spec",
            [[k[0] for k in ordered], [k[1] for k in ordered], [k[2] for k in ordered]],
        )
    else:
        facts = ReferralFact.objects.filter(
            requester_facility_id__in={k[0] for k in keys},
            patient_ref__in={k[1] for k in keys},
            specialty_id__in={k[2] for k in keys},
        )
    by_patient: dict[tuple[int, str, int], list[ReferralFact]] = {}
    for fact in facts:
        key = (fact.requester_facility_id, fact.patient_ref, fact.specialty_id)
        if key in keys:
            by_patient.setdefault(key, []).append(fact)
    changed: list[ReferralFact] = []
    delta: Counter[tuple[Any, ...]] = Counter()
    for group in by_patient.values():
        moments = [
            moment
            for f in group
            for moment in (f.submitted_at, f.transfer_requested_at)
            if moment is not None
        ]
        for fact in group:
            if not fact.avoided or fact.closed_at is None:
                continue
            closed_at = fact.closed_at
            later = [m for m in moments if m > closed_at]
            followup = min(later) if later else None
            if followup != fact.followup_at:
                delta.subtract([k for k in [_followup_key(fact)] if k is not None])
                fact.followup_at = followup
                delta.update([k for k in [_followup_key(fact)] if k is not None])
                changed.append(fact)
    if not changed:
        return
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {ReferralFact._meta.db_table} f SET followup_at = u.at"  # noqa: S608
                " FROM unnest(%s::bigint[], %s::timestamptz[]) AS u (id, at)"
                " WHERE f.referral_id = u.id",
                [[f.referral_id for f in changed], [f.followup_at for f in changed]],
            )
    else:
        ReferralFact.objects.bulk_update(changed, ["followup_at"], batch_size=1000)
    _write_histograms(delta)


def _apply_events(events: list[dict[str, Any]], zone: ZoneInfo) -> int:
    """Apply events (ordered by seq within each referral) and write the results."""
    if not events:
        return 0
    referral_ids = {ev["referral_id"] for ev in events}
    batch = Batch(
        zone=zone,
        departments=_load_departments(_departments_of(events)),
        facts=ReferralFact.objects.in_bulk(list(referral_ids)),
    )
    # Histogram cells before the batch (the fact rows are changed in place).
    histogram: Counter[tuple[Any, ...]] = Counter()
    for fact in batch.facts.values():
        histogram.subtract(_histogram_keys(fact))
    for ev in events:
        _apply_event(batch, ev)
    for fact in batch.facts.values():
        histogram.update(_histogram_keys(fact))
    _write_facts([batch.facts[i] for i in sorted(batch.touched)])
    _write_rollups(batch.rollups.values())
    _write_histograms(histogram)
    _resolve_followups(batch.patient_keys)
    return len(events)


def _setting(name: str, default: int) -> int:
    return int(getattr(settings, name, default))


def _state_for_update() -> UpkeepState:
    UpkeepState.objects.get_or_create(pk=1)
    return UpkeepState.objects.select_for_update().get(pk=1)


def reports_catch_up_batch(*, batch_size: int | None = None, now: float | None = None) -> int:
    """Apply the next batch of events above the watermark (and any gaps that appeared).
    Returns the number of events applied. Safe to run concurrently: the state row lock
    serialises runners."""
    batch_size = batch_size or _setting("REPORTS_UPKEEP_BATCH", 5000)
    now = now if now is not None else time.time()
    zone = report_time_zone()
    with transaction.atomic():
        state = _state_for_update()
        gaps: dict[str, float] = dict(state.gaps or {})
        events = list(
            ReferralEvent.objects.filter(id__gt=state.watermark)
            .order_by("id")
            .values(*EVENT_FIELDS)[:batch_size]
        )
        late: list[dict[str, Any]] = []
        if gaps:
            late = list(
                ReferralEvent.objects.filter(id__in=[int(i) for i in gaps])
                .order_by("id")
                .values(*EVENT_FIELDS)
            )
            for ev in late:
                gaps.pop(str(ev["id"]), None)
        timeout = _setting("REPORTS_GAP_TIMEOUT", 300)
        gaps = {i: seen for i, seen in gaps.items() if now - seen < timeout}
        if events:
            seen_ids = [ev["id"] for ev in events]
            missing_ids = sorted(set(range(state.watermark + 1, seen_ids[-1])) - set(seen_ids))
            if len(missing_ids) <= 10_000:
                gaps.update({str(i): now for i in missing_ids})
            else:
                logger.warning("reports upkeep: %d skipped event ids ignored", len(missing_ids))
            state.watermark = seen_ids[-1]
        applied = _apply_events(late + events, zone)
        state.gaps = gaps
        state.events_applied += applied
        state.save()
    return applied


def reports_catch_up(*, batch_size: int | None = None, max_batches: int | None = None) -> int:
    """Apply every event above the watermark, batch by batch (the Celery beat task)."""
    total = 0
    batches = 0
    while True:
        applied = reports_catch_up_batch(batch_size=batch_size)
        total += applied
        batches += 1
        if applied == 0 or (max_batches is not None and batches >= max_batches):
            return total


def reports_rebuild(*, chunk_referrals: int = 5000, method: str = "auto") -> int:
    """Recompute every report table from the event log.

    ``method``: "sql" (PostgreSQL: set-based, ``reports.rebuild``), "python" (the log
    walked referral by referral through ``_apply_event``; SQLite), "auto" (sql on
    PostgreSQL). Both give identical tables (tested). Holds the upkeep lock, so the job
    waits; events committed after the rebuild read its high mark are picked up by the
    next catch-up, as are in-flight ids (recorded as gaps).
    """
    if method == "auto":
        method = "sql" if connection.vendor == "postgresql" else "python"
    if method not in ("sql", "python"):
        raise ValueError(f"unknown rebuild method {method!r}")
    if method == "sql" and connection.vendor != "postgresql":
        raise ValueError("the SQL rebuild needs PostgreSQL; use method='python'")
    zone = report_time_zone()
    applied = 0
    with transaction.atomic():
        state = _state_for_update()
        high = ReferralEvent.objects.aggregate(m=Max("id"))["m"] or 0
        if method == "sql":
            from reports.rebuild import rebuild_in_sql

            with connection.cursor() as cursor:
                for model in REPORT_TABLES:
                    cursor.execute(f"TRUNCATE {connection.ops.quote_name(model._meta.db_table)}")
            departments = _load_departments(Department.objects.values_list("id", flat=True))
            applied = rebuild_in_sql(
                high=high,
                zone=zone,
                km_of=lambda lat, lon, department_id: round_trip_km(
                    lat, lon, departments.get(department_id)
                ),
            )
        else:
            for model in REPORT_TABLES:
                model.objects.all().delete()
            applied = _rebuild_in_python(high, zone, chunk_referrals)
        # Ids just below the high mark may belong to transactions still in flight.
        recent = set(range(max(1, high - 1000), high + 1))
        present = set(ReferralEvent.objects.filter(id__in=recent).values_list("id", flat=True))
        now = time.time()
        state.watermark = high
        state.gaps = {str(i): now for i in sorted(recent - present)}
        state.events_applied = applied
        state.save()
    return applied


def _rebuild_in_python(high: int, zone: ZoneInfo, chunk_referrals: int) -> int:
    applied = 0
    referral_ids = list(
        ReferralEvent.objects.filter(id__lte=high)
        .order_by("referral_id")
        .values_list("referral_id", flat=True)
        .distinct()
    )
    for start in range(0, len(referral_ids), chunk_referrals):
        chunk = referral_ids[start : start + chunk_referrals]
        events = list(
            ReferralEvent.objects.filter(
                Q(referral_id__gte=chunk[0], referral_id__lte=chunk[-1]), id__lte=high
            )
            .order_by("referral_id", "seq")
            .values(*EVENT_FIELDS)
        )
        applied += _apply_events(events, zone)
    return applied
