"""Referrals and their event logs written in SQL (INSERT ... SELECT), for the rebuild ==
incremental check at the issue's 50,000 referrals: ~25 s where the Python lifecycle
model (``referrals.simulation.simulate_bulk``) takes minutes.

Deterministic (``hashint8`` of the referral id and a salt, no random()), and it covers
what the report definitions distinguish: declines, cancellations, expiries, forwards and
reroutes (counted against the department that had the case), a second forward after
acceptance with a second acceptance, repeated advice, conferences, transfers (requested,
accepted, completed or not), close-outs with every shape of answer (considered or not,
avoided or not, non-boolean "considered" values, missing keys), counter-referrals,
referrals never routed, an acceptance timestamped before its assignment (clock skew),
repeat patients of the same facility and specialty (follow-ups that fail a verified
avoided transfer), referrals without a patient reference, campaigns, and facilities
without coordinates or province. Events are inserted step by step across a chunk, so a
referral's events are far apart in id order, as in production.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction

from referrals.models import Referral, ReferralEvent
from registry.models import AreaLevel, Department, Facility, Tier
from reports.tests.scenario import Network

START = datetime(2024, 6, 1, tzinfo=UTC)
SPAN_DAYS = 400


def extend_network(net: Network) -> tuple[list[int], list[int]]:
    """The scenario network plus 30 lower-tier facilities and 3 more departments; returns
    (requester facility ids, department ids)."""
    provinces = [net.ha_noi, net.quang_ninh, net.lao_cai, net.vientiane]
    extra = Facility.objects.bulk_create(
        Facility(
            code=f"BULK-{i}",
            name=f"Bulk facility {i}",
            country=provinces[i % 4].country,
            area=provinces[i % 4],
            province=provinces[i % 4] if i % 11 else None,
            tier=Tier.DISTRICT if i % 3 else Tier.COMMUNE,
            latitude=None if i % 13 == 5 else 17.5 + i * 0.21,
            longitude=None if i % 13 == 5 else 102.3 + i * 0.13,
        )
        for i in range(30)
    )
    assert net.vientiane.level == AreaLevel.PROVINCE
    lao_hub = Facility.objects.create(
        code="BULK-LH",
        name="Lao hub",
        country=net.la,
        area=net.vientiane,
        province=net.vientiane,
        tier=Tier.CENTRAL,
        latitude=17.97,
        longitude=102.6,
    )
    no_coordinates = Facility.objects.create(
        code="BULK-NC",
        name="Hub without coordinates",
        country=net.vn,
        area=net.ha_noi,
        province=net.ha_noi,
        tier=Tier.PROVINCIAL,
    )
    more = [
        Department.objects.create(
            facility=lao_hub, specialty=net.paeds, name="Lao paeds", sla_hours=6
        ),
        Department.objects.create(
            facility=no_coordinates, specialty=net.cardio, name="NC cardio", sla_hours=72
        ),
        Department.objects.create(
            facility=net.h2, specialty=net.cardio, name="H2 cardio", sla_hours=1
        ),
    ]
    facilities = [net.d1.pk, net.c1.pk, net.l1.pk, *(f.pk for f in extra)]
    departments = [net.h1p.pk, net.h1c.pk, net.h2p.pk, net.d1p.pk, *(d.pk for d in more)]
    return facilities, departments


def _h(salt: int) -> str:
    """A deterministic pseudo-random number 0..99 per referral (column ``id``)."""
    return f"mod(hashint8(p.id * 16 + {salt})::bigint + 2147483648, 100)"


# (seq, action, condition, hours after created_at, department, payload); ``cur`` is the
# department that has the case after the forward/reroute steps.
_CUR = "CASE WHEN p.kind BETWEEN 12 AND 26 THEN p.d1 ELSE p.d0 END"
_STEPS: list[tuple[int, str, str, str, str, str]] = [
    (1, "submit", "TRUE", "0", "p.d0", "'{}'"),
    (2, "decline", "p.kind < 6", "5 + p.j", "p.d0", "'{}'"),
    (2, "cancel", "p.kind BETWEEN 6 AND 8 OR p.kind = 99", "3 + p.j", "p.d0", "'{}'"),
    (2, "expire", "p.kind BETWEEN 9 AND 11", "60", "p.d0", "'{}'"),
    (
        3,
        "forward",
        "p.kind BETWEEN 12 AND 19",
        "2 + p.j",
        "p.d1",
        "jsonb_build_object('from_department_id', p.d0, 'department_id', p.d1)",
    ),
    (
        3,
        "reroute",
        "p.kind BETWEEN 20 AND 23",
        "50",
        "p.d1",
        "jsonb_build_object('from_department_id', p.d0, 'department_id', p.d1)",
    ),
    (
        4,
        "accept",
        "p.kind BETWEEN 12 AND 98",
        "CASE WHEN p.flavour = 99 THEN -0.5 WHEN p.kind BETWEEN 24 AND 26 THEN 1 "
        "ELSE 3 + 2 * p.j END",
        "CASE WHEN p.kind BETWEEN 12 AND 23 THEN p.d1 ELSE p.d0 END",
        "'{}'",
    ),
    (
        5,
        "forward",
        "p.kind BETWEEN 24 AND 26",
        "2",
        "p.d1",
        "jsonb_build_object('from_department_id', p.d0, 'department_id', p.d1)",
    ),
    (6, "accept", "p.kind BETWEEN 24 AND 26", "4 + p.j", "p.d1", "'{}'"),
    (7, "advise", "p.kind BETWEEN 12 AND 98 AND p.tail < 95", "10 + p.j", _CUR, "'{}'"),
    (
        7,
        "finish_conference",
        "p.kind BETWEEN 12 AND 98 AND p.tail >= 95",
        "12 + p.j",
        _CUR,
        "'{}'",
    ),
    (8, "advise", "p.kind BETWEEN 12 AND 98 AND mod(p.tail, 7) = 0", "14 + p.j", _CUR, "'{}'"),
    (9, "request_transfer", "p.kind BETWEEN 12 AND 98 AND p.tail < 15", "20", _CUR, "'{}'"),
    (10, "accept_transfer", "p.kind BETWEEN 12 AND 98 AND p.tail < 15", "21", _CUR, "'{}'"),
    (11, "complete", "p.kind BETWEEN 12 AND 98 AND p.tail < 10", "50 + p.j", _CUR, "'{}'"),
    (
        9,
        "close_local",
        "p.kind BETWEEN 12 AND 98 AND p.tail BETWEEN 15 AND 84",
        "30 + 3 * p.j",
        _CUR,
        """CASE
            WHEN p.flavour < 50 THEN '{"transfer_originally_considered": true,
                "outcome": "avoided"}'::jsonb
            WHEN p.flavour < 65 THEN '{"transfer_originally_considered": true,
                "outcome": "still_needed"}'::jsonb
            WHEN p.flavour < 80 THEN '{"transfer_originally_considered": false,
                "outcome": "not_applicable"}'::jsonb
            WHEN p.flavour < 85 THEN '{"transfer_originally_considered": "yes",
                "outcome": "avoided"}'::jsonb
            WHEN p.flavour < 90 THEN '{"transfer_originally_considered": 0,
                "outcome": "avoided"}'::jsonb
            WHEN p.flavour < 95 THEN '{"outcome": "avoided"}'::jsonb
            ELSE '{"transfer_originally_considered": true}'::jsonb END""",
    ),
    (
        10,
        "counter_refer",
        "p.kind BETWEEN 12 AND 98 AND p.tail BETWEEN 85 AND 89",
        "40",
        _CUR,
        "'{}'",
    ),
]


def write_referrals(
    *,
    count: int,
    facilities: list[int],
    departments: list[int],
    chunk: int = 5000,
    patients: int = 300,
    after_chunk: Callable[[int], Any] | None = None,
) -> int:
    """Write ``count`` referrals and their events in chunks (a transaction each), calling
    ``after_chunk(written)`` after each. Returns the number of events written."""
    r, e = Referral._meta.db_table, ReferralEvent._meta.db_table
    specialties = dict(Department.objects.filter(pk__in=departments).values_list("id", "specialty"))
    params: dict[str, Any] = {
        "facs": facilities,
        "depts": departments,
        "specs": [specialties[d] for d in departments],
        "start": START,
        "span": SPAN_DAYS * 86400,
        "n": count,
        "patients": patients,
    }
    events = 0
    for first in range(1, count + 1, chunk):
        last = min(first + chunk - 1, count)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SELECT coalesce(max(id), 0) FROM {r}")  # noqa: S608
            (low,) = cursor.fetchone()
            cursor.execute(
                f"""
                INSERT INTO {r} (placer_system, placer_value, filler_id, patient_ref,
                    patient_sex, mode, priority, clinical_question, campaign, state, version,
                    conference_url, created_at, updated_at, requester_facility_id,
                    specialty_id, assigned_department_id)
                SELECT 'urn:bulk', g::text, 'BULK-' || g,
                    CASE WHEN g %% 10 = 0 THEN ''
                        ELSE 'pt' || mod(hashint8(g * 16 + 3)::bigint + 2147483648, %(patients)s) END,
                    'unknown', 'async', 4, 'q',
                    CASE WHEN g %% 5 = 0 THEN 'heart' ELSE '' END, 'submitted', 1, '',
                    %(start)s + make_interval(secs => (g::float8 / %(n)s) * %(span)s
                        + mod(hashint8(g * 16 + 4)::bigint + 2147483648, 86400)),
                    now(),
                    (%(facs)s::bigint[])[1 + mod(hashint8(g * 16 + 1)::bigint + 2147483648,
                        cardinality(%(facs)s::bigint[]))],
                    (%(specs)s::bigint[])[1 + mod(hashint8(g * 16 + 2)::bigint + 2147483648,
                        cardinality(%(depts)s::bigint[]))],
                    (%(depts)s::bigint[])[1 + mod(hashint8(g * 16 + 2)::bigint + 2147483648,
                        cardinality(%(depts)s::bigint[]))]
                FROM generate_series(%(first)s, %(last)s) AS g
                """,  # noqa: S608
                {**params, "first": first, "last": last},
            )
            steps = " UNION ALL ".join(
                f"SELECT p.id, {seq}, '{action}', p.created_at + make_interval(secs => "  # noqa: S608
                f"({hours}) * 3600.0), {department}, ({payload})::jsonb FROM plan p WHERE {where}"
                for seq, action, where, hours, department, payload in _STEPS
            )
            cursor.execute(
                f"""
                WITH plan AS (
                    SELECT q.id, q.created_at,
                        CASE WHEN {_h(5).replace("p.id", "q.id")} = 99 THEN NULL
                            ELSE q.assigned_department_id END AS d0,
                        (%(depts)s::bigint[])[1 + mod(hashint8(q.id * 16 + 6)::bigint + 2147483648,
                            cardinality(%(depts)s::bigint[]))] AS d1,
                        {_h(5).replace("p.id", "q.id")} AS kind,
                        {_h(7).replace("p.id", "q.id")} AS tail,
                        {_h(8).replace("p.id", "q.id")} AS flavour,
                        mod(hashint8(q.id * 16 + 9)::bigint + 2147483648, 7200) / 3600.0 AS j
                    FROM {r} q WHERE q.id > %(low)s
                )
                INSERT INTO {e} (referral_id, seq, actor_side, at, action, from_state,
                    to_state, department_id, reason, payload)
                SELECT s.id, s.seq, 'system', s.at, s.action, '', '', s.department, '',
                    s.payload
                FROM ({steps}) AS s (id, seq, action, at, department, payload)
                ORDER BY s.seq, s.id
                """,  # noqa: S608
                {**params, "low": low},
            )
            events += cursor.rowcount
        if after_chunk is not None:
            after_chunk(last)
    return events
