"""The set-based rebuild on PostgreSQL: every report table recomputed from the event log
with a handful of ``INSERT ... SELECT ... GROUP BY`` statements (docs/metrics.md, "Tables
and upkeep").

It computes what ``services._apply_event`` computes event by event, with the same
definitions, and must give identical tables (``reports/tests/test_rebuild.py`` compares
it with the watermark job and with the Python rebuild, which SQLite still uses):

- an event's "before" state (the last submit/forward/reroute and the first submit before
  it, by ``seq``) comes from one window over the referral's events;
- the registry is read as the Python path reads it (department -> facility, country, SLA);
- ``payload.from_department_id`` of a forward/reroute is the JSON number
  ``referrals.services`` writes (a non-numeric value falls back to the event's department,
  where Python's ``int()`` would also accept a numeric string);
- the two things computed in Python are the ones whose floating-point results must match
  bit for bit: the travel distance of each (requester facility, department) pair
  (``services.travel_round_trip_km``) and the histogram bucket boundaries
  (``histogram.bucket_of``, turned into ``width_bucket`` thresholds).
"""

from __future__ import annotations

import math
import struct
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from django.db import connection

from referrals.models import Referral, ReferralEvent
from registry.models import Department, Facility
from reports.histogram import MAX_BUCKET, bucket_of
from reports.models import (
    ACCEPT,
    ADVICE,
    COUNTERS,
    FOLLOWUP,
    FOLLOWUP_MAX_DAYS,
    NATIONAL_HISTOGRAM_KEY,
    NATIONAL_KEY,
    SEGMENT_KEY,
    DailyRollup,
    DurationHistogram,
    MonthlyRollup,
    NationalHistogram,
    NationalMonthlyRollup,
    ReferralFact,
    SegmentRollup,
)
from reports.services import ACTION_COUNTERS, SLA_ANSWERS, SLA_DUE

_EVENTS = ReferralEvent._meta.db_table
_REFERRALS = Referral._meta.db_table
_FACILITIES = Facility._meta.db_table
_DEPARTMENTS = Department._meta.db_table
_DROP_TEMPS = "DROP TABLE IF EXISTS _rep_km, _rep_ev, _rep_fact, _rep_fact2"


def _float_order(x: float) -> int:
    """Map a non-negative double to an integer with the same order (its bit pattern)."""
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _float_of(i: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", i))[0])


@cache
def bucket_thresholds() -> tuple[float, ...]:
    """T[b - 1] = the smallest double s with ``bucket_of(s) >= b``, for b = 1, 2, ...:
    ``width_bucket(s, T)`` then equals ``bucket_of(s)`` for every double (bucket_of is
    non-decreasing), so SQL and Python put a duration in the same bucket bit for bit."""
    top = _float_order(math.inf)
    thresholds: list[float] = []
    low = 0
    for b in range(1, MAX_BUCKET + 1):
        if bucket_of(_float_of(top - 1)) < b:
            break  # no finite duration reaches bucket b
        high = top - 1
        while low < high:  # smallest double whose bucket is >= b
            middle = (low + high) // 2
            if bucket_of(_float_of(middle)) >= b:
                high = middle
            else:
                low = middle + 1
        thresholds.append(_float_of(low))
    return tuple(thresholds)


def _travel_pairs(high: int, km_of: Any) -> None:
    """Temp table _rep_km (requester facility, department, km) for every pair with an
    avoided close-out, km from the same Python function the job uses."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT DISTINCT r.requester_facility_id, COALESCE(e.department_id, 0),
                   f.latitude, f.longitude
            FROM {_EVENTS} e
            JOIN {_REFERRALS} r ON r.id = e.referral_id
            JOIN {_FACILITIES} f ON f.id = r.requester_facility_id
            WHERE e.id <= %s AND e.action = 'close_local'
            """,  # noqa: S608
            [high],
        )
        pairs = cursor.fetchall()
        cursor.execute(
            "CREATE TEMP TABLE _rep_km (facility_id bigint, department_id bigint, km float8,"
            " PRIMARY KEY (facility_id, department_id)) ON COMMIT DROP"
        )
        if pairs:
            rows = [(f, d, km_of(lat, lon, d)) for f, d, lat, lon in pairs]
            cursor.execute(
                "INSERT INTO _rep_km SELECT * FROM unnest(%s::bigint[], %s::bigint[],"
                " %s::float8[])",
                [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]],
            )
        cursor.execute("ANALYZE _rep_km")


# Python truthiness of a jsonb value (bool(payload.get(key))).
def _truthy(value: str) -> str:
    return (
        f"CASE jsonb_typeof({value}) WHEN 'boolean' THEN {value} = 'true'::jsonb"
        f" WHEN 'number' THEN {value} <> '0'::jsonb"
        f" WHEN 'string' THEN {value} <> '\"\"'::jsonb"
        f" WHEN 'array' THEN {value} <> '[]'::jsonb"
        f" WHEN 'object' THEN {value} <> '{{}}'::jsonb ELSE false END"
    )


def rebuild_in_sql(*, high: int, zone: ZoneInfo, km_of: Any) -> int:
    """Fill the (emptied) report tables from the events with id <= ``high``; returns the
    number of events read. Runs inside the caller's transaction."""
    qn = connection.ops.quote_name
    daily = DailyRollup._meta.db_table
    monthly = MonthlyRollup._meta.db_table
    national = NationalMonthlyRollup._meta.db_table
    segments = SegmentRollup._meta.db_table
    histograms = DurationHistogram._meta.db_table
    national_histograms = NationalHistogram._meta.db_table
    facts = ReferralFact._meta.db_table
    considered = _truthy("e.payload -> 'transfer_originally_considered'")
    avoided = "e.payload -> 'outcome' = '\"avoided\"'::jsonb"
    with connection.cursor() as cursor:
        # ON COMMIT DROP alone is not enough: under a savepoint (tests, callers' atomic
        # blocks) a second rebuild in the same transaction would find them.
        cursor.execute(_DROP_TEMPS)
        cursor.execute("SET LOCAL work_mem = '256MB'")
        # Filling empty tables: build the secondary indexes once at the end (a sort each)
        # instead of maintaining them row by row (several times slower). The unique keys
        # stay. DROP/CREATE INDEX are transactional: a failed rebuild keeps them.
        cursor.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename = ANY(%s) AND indexname NOT IN (SELECT conname FROM pg_constraint)",
            [[daily, monthly, national, segments, histograms, national_histograms, facts]],
        )
        indexes = cursor.fetchall()
        for name, _definition in indexes:
            cursor.execute(f"DROP INDEX {qn(name)}")
        _travel_pairs(high, km_of)
        # One row per event with the state before it (window over the referral, by seq)
        # and the department it is counted against.
        cursor.execute(
            f"""
            CREATE TEMP TABLE _rep_ev ON COMMIT DROP AS
            SELECT e.referral_id, e.seq, e.at, e.action,
                (e.at AT TIME ZONE %(zone)s)::date AS day,
                COALESCE(e.department_id, 0) AS event_department,
                CASE WHEN e.action IN ('forward', 'reroute')
                      AND jsonb_typeof(e.payload -> 'from_department_id') = 'number'
                      AND e.payload -> 'from_department_id' <> '0'::jsonb
                    THEN (e.payload ->> 'from_department_id')::bigint
                    ELSE COALESCE(e.department_id, 0) END AS department,
                e.action = 'close_local' AND {considered} AS considered,
                COALESCE(e.action = 'close_local' AND {considered} AND {avoided}, false)
                    AS avoided,
                (array_agg(e.at) FILTER (WHERE e.action IN ('submit', 'forward', 'reroute'))
                    OVER w)[count(*) FILTER (WHERE e.action IN ('submit', 'forward',
                    'reroute')) OVER w] AS assigned_before,
                (array_agg(e.at) FILTER (WHERE e.action = 'submit') OVER w)[1]
                    AS submitted_before
            FROM {_EVENTS} e
            WHERE e.id <= %(high)s
            WINDOW w AS (PARTITION BY e.referral_id ORDER BY e.seq
                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
            """,  # noqa: S608
            {"zone": str(zone.key), "high": high},
        )
        cursor.execute("SELECT count(*) FROM _rep_ev")
        (applied,) = cursor.fetchone()

        counter_sql = []
        for name in COUNTERS:
            actions = sorted(a for a, c in ACTION_COUNTERS.items() if c == name)
            if name == "sla_due":
                actions = sorted(SLA_DUE)
            if actions:
                listed = ", ".join(f"'{a}'" for a in actions)
                counter_sql.append(f"count(*) FILTER (WHERE x.action IN ({listed}))")
            elif name == "transfer_considered":
                counter_sql.append("count(*) FILTER (WHERE x.considered)")
            elif name == "avoided":
                counter_sql.append("count(*) FILTER (WHERE x.avoided)")
            elif name == "sla_met":
                answers = ", ".join(f"'{a}'" for a in sorted(SLA_ANSWERS))
                counter_sql.append(
                    f"count(*) FILTER (WHERE x.action IN ({answers})"
                    " AND d.id IS NOT NULL AND extract(epoch FROM x.at"
                    " - COALESCE(x.assigned_before, x.at)) <= d.sla_hours * 3600)"
                )
            else:  # pragma: no cover - a new counter must be defined here too
                raise AssertionError(f"no SQL for counter {name}")
        counted = ", ".join(f"'{a}'" for a in sorted({*ACTION_COUNTERS, *SLA_DUE}))
        counters = ", ".join(qn(c) for c in COUNTERS)
        cursor.execute(
            f"""
            INSERT INTO {daily} (day, requester_facility_id, department_id, specialty_id,
                campaign, country_id, province_id, tier, hub_facility_id, cross_border,
                {counters}, travel_km)
            SELECT x.day, r.requester_facility_id, x.department, r.specialty_id,
                COALESCE(r.campaign, ''), min(f.country_id), min(COALESCE(f.province_id, 0)),
                min(f.tier), COALESCE(min(d.facility_id), 0),
                COALESCE(bool_or(hf.country_id <> f.country_id), false),
                {", ".join(counter_sql)},
                COALESCE(sum(k.km) FILTER (WHERE x.avoided), 0)
            FROM _rep_ev x
            JOIN {_REFERRALS} r ON r.id = x.referral_id
            JOIN {_FACILITIES} f ON f.id = r.requester_facility_id
            LEFT JOIN {_DEPARTMENTS} d ON d.id = x.department
            LEFT JOIN {_FACILITIES} hf ON hf.id = d.facility_id
            LEFT JOIN _rep_km k ON x.avoided AND k.facility_id = r.requester_facility_id
                AND k.department_id = x.department
            WHERE x.action IN ({counted})
            GROUP BY 1, 2, 3, 4, 5
            ORDER BY 1, 2, 3, 4, 5
            """  # noqa: S608
        )
        cursor.execute(
            f"""
            INSERT INTO {monthly} (month, country_id, province_id, tier, hub_facility_id,
                specialty_id, campaign, cross_border, {counters}, travel_km)
            SELECT date_trunc('month', day)::date, country_id, province_id, tier,
                hub_facility_id, specialty_id, campaign, cross_border,
                {", ".join(f"sum({qn(c)})" for c in COUNTERS)}, sum(travel_km)
            FROM {daily}
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
            ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
            """  # noqa: S608
        )
        # The national month rows: the month rows summed over province and hub.
        national_key = ", ".join(NATIONAL_KEY)
        cursor.execute(
            f"""
            INSERT INTO {national} ({national_key}, {counters}, travel_km)
            SELECT {national_key},
                {", ".join(f"sum({qn(c)})" for c in COUNTERS)}, sum(travel_km)
            FROM {monthly}
            GROUP BY {national_key}
            ORDER BY {national_key}
            """  # noqa: S608
        )
        segment_key = ", ".join(SEGMENT_KEY[1:])
        cursor.execute(
            f"""
            INSERT INTO {segments} (segment, {segment_key}, {counters}, travel_km)
            SELECT greatest(date_trunc('week', day), date_trunc('month', day))::date,
                {segment_key},
                {", ".join(f"sum({qn(c)})" for c in COUNTERS)}, sum(travel_km)
            FROM {daily}
            GROUP BY 1, {segment_key}
            ORDER BY 1, {segment_key}
            """  # noqa: S608
        )
        # One fact row per referral: first/last milestones by seq.
        cursor.execute(
            """
            CREATE TEMP TABLE _rep_fact ON COMMIT DROP AS
            SELECT x.referral_id,
                (array_agg(x.event_department ORDER BY x.seq DESC)
                    FILTER (WHERE x.event_department <> 0))[1] AS department_id,
                (array_agg(x.at ORDER BY x.seq) FILTER (WHERE x.action = 'submit'))[1]
                    AS submitted_at,
                (array_agg(x.at ORDER BY x.seq DESC)
                    FILTER (WHERE x.action IN ('submit', 'forward', 'reroute')))[1]
                    AS assigned_at,
                max(x.seq) FILTER (WHERE x.action IN ('submit', 'forward', 'reroute'))
                    AS assigned_seq,
                max(x.seq) FILTER (WHERE x.action = 'accept') AS accepted_seq,
                (array_agg(x.at ORDER BY x.seq DESC) FILTER (WHERE x.action = 'accept'))[1]
                    AS accepted_at,
                (array_agg(extract(epoch FROM x.at - COALESCE(x.assigned_before, x.at))::float8
                    ORDER BY x.seq DESC) FILTER (WHERE x.action = 'accept'))[1]
                    AS accept_seconds,
                (array_agg(x.at ORDER BY x.seq)
                    FILTER (WHERE x.action IN ('advise', 'finish_conference')))[1]
                    AS advised_at,
                (array_agg(extract(epoch FROM x.at - COALESCE(x.submitted_before, x.at))::float8
                    ORDER BY x.seq) FILTER (WHERE x.action IN ('advise', 'finish_conference'))
                    )[1] AS advice_seconds,
                (array_agg(x.at ORDER BY x.seq DESC)
                    FILTER (WHERE x.action = 'close_local'))[1] AS closed_at,
                bool_or(x.avoided) AS avoided,
                (array_agg(x.department ORDER BY x.seq DESC) FILTER (WHERE x.avoided))[1]
                    AS avoided_department,
                (array_agg(x.at ORDER BY x.seq)
                    FILTER (WHERE x.action = 'request_transfer'))[1] AS transfer_requested_at
            FROM _rep_ev x
            GROUP BY x.referral_id
            """
        )
        cursor.execute(
            f"""
            CREATE TEMP TABLE _rep_fact2 ON COMMIT DROP AS
            SELECT p.referral_id, r.requester_facility_id, f.country_id,
                COALESCE(f.province_id, 0) AS province_id, f.tier, r.specialty_id,
                COALESCE(r.campaign, '') AS campaign,
                COALESCE(r.patient_ref, '') AS patient_ref,
                COALESCE(p.department_id, 0) AS department_id,
                COALESCE(d.facility_id, 0) AS hub_facility_id,
                COALESCE(hf.country_id <> f.country_id, false) AS cross_border,
                p.submitted_at, p.assigned_at,
                -- an acceptance before the last forward/reroute is not the current
                -- department's: no time to accept until it accepts
                CASE WHEN p.accepted_seq > p.assigned_seq THEN p.accepted_at END
                    AS accepted_at,
                CASE WHEN p.accepted_seq > p.assigned_seq
                    THEN (p.accepted_at AT TIME ZONE %(zone)s)::date END AS accepted_day,
                CASE WHEN p.accepted_seq > p.assigned_seq THEN p.accept_seconds END
                    AS accept_seconds,
                p.advised_at,
                (p.advised_at AT TIME ZONE %(zone)s)::date AS advised_day,
                p.advice_seconds, p.closed_at,
                (p.closed_at AT TIME ZONE %(zone)s)::date AS closed_day,
                p.avoided,
                CASE WHEN p.avoided THEN COALESCE(k.km, 0) ELSE 0 END AS travel_km,
                p.transfer_requested_at
            FROM _rep_fact p
            JOIN {_REFERRALS} r ON r.id = p.referral_id
            JOIN {_FACILITIES} f ON f.id = r.requester_facility_id
            LEFT JOIN {_DEPARTMENTS} d ON d.id = p.department_id
            LEFT JOIN {_FACILITIES} hf ON hf.id = d.facility_id
            LEFT JOIN _rep_km k ON k.facility_id = r.requester_facility_id
                AND k.department_id = p.avoided_department
            """,  # noqa: S608
            {"zone": str(zone.key)},
        )
        # followup_at: the earliest first submission or transfer request of the same
        # patient (requester facility, patient_ref) and specialty after the close-out.
        cursor.execute(
            f"""
            INSERT INTO {facts} (referral_id, requester_facility_id, country_id, province_id,
                tier, specialty_id, campaign, patient_ref, department_id, hub_facility_id,
                cross_border, submitted_at, assigned_at, accepted_at, accepted_day,
                accept_seconds, advised_at, advised_day, advice_seconds, closed_at,
                closed_day, avoided, travel_km, transfer_requested_at, followup_at)
            SELECT p.*, u.followup_at
            FROM _rep_fact2 p
            LEFT JOIN (
                SELECT a.referral_id, min(m.at) AS followup_at
                FROM _rep_fact2 a
                JOIN (
                    SELECT requester_facility_id, patient_ref, specialty_id, submitted_at AS at
                    FROM _rep_fact2 WHERE patient_ref <> '' AND submitted_at IS NOT NULL
                    UNION ALL
                    SELECT requester_facility_id, patient_ref, specialty_id,
                        transfer_requested_at
                    FROM _rep_fact2
                    WHERE patient_ref <> '' AND transfer_requested_at IS NOT NULL
                ) m USING (requester_facility_id, patient_ref, specialty_id)
                WHERE a.avoided AND a.patient_ref <> '' AND a.closed_at IS NOT NULL
                    AND m.at > a.closed_at
                GROUP BY a.referral_id
            ) u USING (referral_id)
            ORDER BY p.referral_id
            """  # noqa: S608
        )
        dimensions = (
            "country_id, province_id, tier, hub_facility_id, specialty_id, campaign, cross_border"
        )
        cursor.execute(
            f"""
            INSERT INTO {histograms} (month, metric, {dimensions}, bucket, n)
            SELECT month, metric, {dimensions}, bucket, count(*)
            FROM (
                SELECT date_trunc('month', accepted_day)::date AS month, {ACCEPT} AS metric,
                    {dimensions}, width_bucket(accept_seconds, %(t)s::float8[]) AS bucket
                FROM {facts} WHERE accept_seconds IS NOT NULL AND accepted_day IS NOT NULL
                UNION ALL
                SELECT date_trunc('month', advised_day)::date, {ADVICE}, {dimensions},
                    width_bucket(advice_seconds, %(t)s::float8[])
                FROM {facts} WHERE advice_seconds IS NOT NULL AND advised_day IS NOT NULL
                UNION ALL
                SELECT date_trunc('month', closed_day)::date, {FOLLOWUP}, {dimensions},
                    CASE WHEN followup_at IS NULL THEN 0 ELSE least(greatest(1, ceil(
                        extract(epoch FROM followup_at - closed_at)::float8 / 86400
                    )), {FOLLOWUP_MAX_DAYS}) END
                FROM {facts}
                WHERE avoided AND patient_ref <> '' AND closed_at IS NOT NULL
                    AND closed_day IS NOT NULL
            ) cells
            GROUP BY month, metric, {dimensions}, bucket
            ORDER BY month, metric, {dimensions}, bucket
            """,  # noqa: S608
            {"t": list(bucket_thresholds())},
        )
        national_cell = ", ".join(NATIONAL_HISTOGRAM_KEY)
        cursor.execute(
            f"""
            INSERT INTO {national_histograms} ({national_cell}, n)
            SELECT {national_cell}, sum(n)
            FROM {histograms}
            GROUP BY {national_cell}
            ORDER BY {national_cell}
            """  # noqa: S608
        )
        cursor.execute(_DROP_TEMPS)
        for _name, definition in indexes:
            cursor.execute(definition)
    return int(applied)
