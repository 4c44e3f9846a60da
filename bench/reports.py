"""Report benchmark (issue 5): query p95 per slice on N bulk-generated referrals, the
rebuild rate, and the cost of rollup upkeep relative to ingest.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/consilium_bench \\
    DJANGO_SETTINGS_MODULE=config.settings.test \\
        .venv/bin/python bench/reports.py --referrals 1000000

The database must be migrated and is WIPED of referrals and reports (never point it at
real data). Referrals and events are generated in SQL (INSERT ... SELECT
generate_series) with realistic lifecycles; ``reports_rebuild`` derives the report tables
from them; queries run through the selectors as a ministry user (suppression included,
no HTTP). The upkeep cost is measured on the real intake path: referrals driven through
referrals.services, then the watermark job applying their events.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")

import django

django.setup()

from django.contrib.auth.models import Group  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from accounts.models import User  # noqa: E402
from accounts.roles import Role  # noqa: E402
from referrals import services  # noqa: E402
from referrals.models import Referral, ReferralEvent  # noqa: E402
from registry.models import (  # noqa: E402
    AdministrativeArea,
    AreaLevel,
    Country,
    Department,
    Facility,
    Specialty,
    Tier,
)
from reports.models import (  # noqa: E402
    DailyRollup,
    DurationHistogram,
    MonthlyRollup,
    NationalHistogram,
    NationalMonthlyRollup,
    ReferralFact,
    SegmentRollup,
    UpkeepState,
)
from reports.selectors import (  # noqa: E402
    filters_parse,
    report_capacity,
    report_counts,
    report_response_times,
    report_summary,
)
from reports.services import REPORT_TABLES, reports_catch_up, reports_rebuild  # noqa: E402

SPECIALTIES = ["394537008", "394579002", "394591006", "394585009", "394609007"]
START = date(2024, 1, 1)
DAYS = 730


def wipe() -> None:
    with connection.cursor() as cursor:
        for model in (*REPORT_TABLES, UpkeepState):
            cursor.execute(f"TRUNCATE {model._meta.db_table}")
        cursor.execute(
            f"TRUNCATE {ReferralEvent._meta.db_table}, {Referral._meta.db_table} CASCADE"
        )


def network() -> tuple[list[Facility], list[Department]]:
    """63 provinces, 26 hubs (5 departments each), 1,000 lower-tier facilities."""
    if Facility.objects.filter(code__startswith="BENCH-").exists():
        return (
            list(Facility.objects.filter(code__startswith="BENCH-L")),
            list(Department.objects.filter(facility__code__startswith="BENCH-H")),
        )
    vn, _ = Country.objects.get_or_create(code="VN", defaults={"name": "Viet Nam"})
    la, _ = Country.objects.get_or_create(code="LA", defaults={"name": "Lao PDR"})
    provinces = [
        AdministrativeArea.objects.create(
            country=vn if i < 60 else la, level=AreaLevel.PROVINCE, code=f"BP{i}", name=f"P{i}"
        )
        for i in range(63)
    ]
    specialties = [
        Specialty.objects.get_or_create(code=c, defaults={"display": f"Specialty {c}"})[0]
        for c in SPECIALTIES
    ]
    hubs = Facility.objects.bulk_create(
        Facility(
            code=f"BENCH-H{i}",
            name=f"Hub {i}",
            country=vn,
            province=provinces[i % 60],
            area=provinces[i % 60],
            tier=Tier.CENTRAL if i < 6 else Tier.PROVINCIAL,
            latitude=10 + (i % 13),
            longitude=104 + (i % 5),
        )
        for i in range(26)
    )
    lower = Facility.objects.bulk_create(
        Facility(
            code=f"BENCH-L{i}",
            name=f"District {i}",
            country=provinces[i % 63].country,
            province=provinces[i % 63],
            area=provinces[i % 63],
            tier=Tier.DISTRICT if i % 3 else Tier.COMMUNE,
            latitude=9 + (i % 140) / 10,
            longitude=102 + (i % 60) / 10,
        )
        for i in range(1000)
    )
    departments = Department.objects.bulk_create(
        Department(facility=h, specialty=s, name=f"{s.code} {h.code}", sla_hours=24 + 24 * (j % 2))
        for h in hubs
        for j, s in enumerate(specialties)
    )
    return lower, departments


def generate(
    count: int,
    lower: list[Facility],
    departments: list[Department],
    chunk: int = 500_000,
    progress: Callable[[int], None] | None = None,
) -> None:
    """``count`` referrals and their events, in SQL, ``chunk`` referrals per statement
    group (one transaction each, so a long generation shows progress). Submission times
    are a permutation of the 2-year span (g * 1000003 mod count), so every chunk covers
    the whole span: a generation stopped early is a smaller uniform network."""
    params: dict[str, Any] = {
        "n": count,
        "facs": [f.pk for f in lower],
        "depts": [d.pk for d in departments],
        "specs": [d.specialty_id for d in departments],
        "start": datetime(START.year, START.month, START.day, tzinfo=UTC),
        "span": DAYS * 86400,
        "patients": max(count // 3, 1),
    }
    r, e = Referral._meta.db_table, ReferralEvent._meta.db_table
    # Lifecycles by id mod 20: 0 decline, 1 cancel, 2 expire, 3-4 transfer, else close.
    steps = [
        (1, "submit", "draft", "submitted", "TRUE", 0, "'{}'"),
        (2, "decline", "submitted", "declined", "id % 20 = 0", 5, "'{}'"),
        (2, "cancel", "submitted", "cancelled", "id % 20 = 1", 3, "'{}'"),
        (2, "expire", "submitted", "expired", "id % 20 = 2", 49, "'{}'"),
        (2, "accept", "submitted", "accepted", "id % 20 >= 3", 1 + 0, "'{}'"),
        (3, "advise", "accepted", "advised", "id % 20 >= 3", 8, "'{}'"),
        (4, "request_transfer", "advised", "transfer_requested", "id % 20 IN (3, 4)", 9, "'{}'"),
        (5, "complete", "transfer_requested", "completed", "id % 20 IN (3, 4)", 30, "'{}'"),
        (
            4,
            "close_local",
            "advised",
            "closed_local",
            "id % 20 >= 5",
            30,
            """jsonb_build_object('transfer_originally_considered', id % 3 <> 0,
            'outcome', CASE WHEN id % 4 <> 0 THEN 'avoided' ELSE 'still_needed' END)""",
        ),
    ]
    for first in range(1, count + 1, chunk):
        last = min(first + chunk - 1, count)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"SELECT coalesce(max(id), 0) FROM {r}")
            (low,) = cursor.fetchone()
            cursor.execute(
                f"""
                INSERT INTO {r} (placer_system, placer_value, filler_id, patient_ref,
                    patient_sex, mode, priority, clinical_question, campaign, state, version,
                    conference_url, created_at, updated_at, requester_facility_id,
                    specialty_id, assigned_department_id)
                SELECT 'urn:bench', g::text, 'BENCH-' || g, 'p' || (g %% %(patients)s),
                    'unknown', 'async', 4, 'q',
                    CASE WHEN g %% 10 = 0 THEN 'campaign-a' ELSE '' END,
                    'submitted', 1, '',
                    %(start)s + make_interval(
                        secs => ((g::bigint * 1000003) %% %(n)s)::float8 / %(n)s * %(span)s),
                    now(),
                    (%(facs)s::bigint[])[1 + (g::bigint * 7919) %% cardinality(%(facs)s::bigint[])],
                    (%(specs)s::bigint[])[1 + (g::bigint * 104729) %% cardinality(%(depts)s::bigint[])],
                    (%(depts)s::bigint[])[1 + (g::bigint * 104729) %% cardinality(%(depts)s::bigint[])]
                FROM generate_series(%(first)s, %(last)s) AS g
                """,
                {**params, "first": first, "last": last},
            )
            for seq, action, source, target, where, hours, payload in steps:
                # Hours vary per referral so percentiles are not degenerate.
                cursor.execute(
                    f"""
                    INSERT INTO {e} (referral_id, seq, actor_side, at, action, from_state,
                        to_state, department_id, reason, payload)
                    SELECT id, {seq}, 'system',
                        created_at + make_interval(secs => ({hours} + (id % 37)) * 3600.0),
                        '{action}', '{source}', '{target}', assigned_department_id, '',
                        {payload}
                    FROM {r} WHERE id > {int(low)} AND {where}
                    """
                )
        if progress:
            progress(last)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {r}; ANALYZE {e}")


def p95(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[max(0, round(0.95 * len(samples)) - 1)]


def ministry() -> User:
    user, _ = User.objects.get_or_create(username="bench-ministry")
    user.groups.add(Group.objects.get_or_create(name=Role.MINISTRY.value)[0])
    return User.objects.get(pk=user.pk)


def query_bench(repeat: int) -> list[tuple[str, float, float]]:
    user = ministry()
    province = AdministrativeArea.objects.filter(code="BP7").values_list("id", flat=True)[0]
    facility = Facility.objects.filter(code="BENCH-L42").values_list("id", flat=True)[0]
    hub = Facility.objects.filter(code="BENCH-H3").values_list("id", flat=True)[0]
    year = {"from": "2025-01-01", "to": "2025-12-31"}
    slices: list[tuple[str, Callable[[], Any]]] = [
        ("headline counts, national, all time", lambda: report_counts(user, filters_parse({}))),
        (
            "headlines incl. percentiles, national, 1 year",
            lambda: report_summary(user, filters_parse(year)),
        ),
        (
            "trend by month, national, 2 years",
            lambda: report_counts(user, filters_parse({"by": "period"})),
        ),
        (
            "by province, 1 year",
            lambda: report_counts(user, filters_parse({**year, "by": "province"})),
        ),
        (
            "by hub, 1 quarter",
            lambda: report_counts(
                user, filters_parse({"from": "2025-01-01", "to": "2025-03-31", "by": "hub"})
            ),
        ),
        (
            "one province by week, 1 year",
            lambda: report_counts(
                user,
                filters_parse({**year, "province": province, "by": "period", "period": "week"}),
            ),
        ),
        (
            "one facility, all time",
            lambda: report_counts(user, filters_parse({"facility": facility})),
        ),
        (
            "one hub by specialty, 1 year",
            lambda: report_counts(user, filters_parse({**year, "hub": hub, "by": "specialty"})),
        ),
        (
            "response times by specialty, 1 month",
            lambda: report_response_times(
                user, filters_parse({"from": "2025-06-01", "to": "2025-06-30", "by": "specialty"})
            ),
        ),
        (
            "response times by specialty, 1 year",
            lambda: report_response_times(user, filters_parse({**year, "by": "specialty"})),
        ),
        (
            "capacity, one province, by quarter",
            lambda: report_capacity(
                user, filters_parse({"province": province, "period": "quarter"})
            ),
        ),
    ]
    return [(name, *p95(fn, repeat)) for name, fn in slices]


def upkeep_bench(count: int) -> dict[str, float]:
    """Ingest through referrals.services (submit, accept, advise, close: 4 events each):
    (a) without upkeep, then the watermark job over those events; (b) with the job run
    inline every 50 referrals. Upkeep cost = job time / ingest time."""
    from referrals.services import referral_transition
    from registry.models import SupportLink  # noqa: F401  (routing reads it)

    vn = Country.objects.get(code="VN")
    province = AdministrativeArea.objects.filter(country=vn).first()
    spec = Specialty.objects.get(code=SPECIALTIES[0])
    spoke = Facility.objects.create(
        code=f"BENCH-S{time.time_ns()}",
        name="Spoke",
        country=vn,
        province=province,
        tier=Tier.DISTRICT,
        latitude=11.0,
        longitude=106.0,
    )
    department = Department.objects.filter(specialty=spec, facility__tier=Tier.CENTRAL).first()
    assert department is not None
    referrer = User.objects.create_user(username=f"bench-ref-{spoke.pk}", facility=spoke)
    referrer.groups.add(Group.objects.get_or_create(name=Role.REFERRER.value)[0])
    consultant = User.objects.create_user(username=f"bench-con-{spoke.pk}")
    consultant.groups.add(Group.objects.get_or_create(name=Role.CONSULTANT.value)[0])
    consultant.departments.add(department)
    referrer = User.objects.get(pk=referrer.pk)
    consultant = User.objects.get(pk=consultant.pk)
    from unittest import mock

    def ingest(n: int, tag: str, upkeep_every: int | None) -> tuple[float, float]:
        upkeep = 0.0
        started = time.perf_counter()
        for i in range(n):
            referral, _ = services.referral_submit(
                actor=referrer,
                requester_facility=spoke,
                placer_system=f"urn:{tag}",
                placer_value=str(i),
                specialty=spec,
                clinical_question="q",
                patient_ref=f"u{i}",
                department=department,
            )
            referral_transition(actor=consultant, referral_id=referral.pk, action="accept")
            referral_transition(
                actor=consultant,
                referral_id=referral.pk,
                action="advise",
                disposition="manage_locally",
                text="a",
            )
            referral_transition(
                actor=referrer,
                referral_id=referral.pk,
                action="close_local",
                transfer_originally_considered=True,
                outcome="avoided",
            )
            if upkeep_every and (i + 1) % upkeep_every == 0:
                t = time.perf_counter()
                reports_catch_up()
                upkeep += time.perf_counter() - t
        return time.perf_counter() - started, upkeep

    # Notifications after commit would go to the broker; not part of this measurement.
    with mock.patch("referrals.services.notify_transition_later", lambda event_id: None):
        reports_catch_up()
        plain, _ = ingest(count, f"a{spoke.pk}", None)
        t = time.perf_counter()
        reports_catch_up()
        job = time.perf_counter() - t
        total, upkeep = ingest(count, f"b{spoke.pk}", 50)
    return {
        "referrals": count,
        "ingest_s": plain,
        "ingest_per_s": count / plain,
        "events_per_s": 4 * count / plain,
        "job_s": job,
        "job_events_per_s": 4 * count / job,
        "inline_total_s": total,
        "inline_upkeep_s": upkeep,
        "with_upkeep_per_s": count / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--referrals", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--ingest", type=int, default=300)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--skip-rebuild", action="store_true")
    parser.add_argument(
        "--pid-file", help="append this process's and its PostgreSQL backend's pids here"
    )
    args = parser.parse_args()

    if args.pid_file:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (backend,) = cursor.fetchone()
        with open(args.pid_file, "a") as pids:
            pids.write(f"{os.getpid()}\n{backend}\n")
    lower, departments = network()
    if not args.skip_generate:
        wipe()
        t = time.perf_counter()

        def progress(done: int) -> None:
            print(f"  {done:,} referrals, {time.perf_counter() - t:.0f} s", flush=True)

        generate(args.referrals, lower, departments, progress=progress)
        print(f"generated {args.referrals:,} referrals in {time.perf_counter() - t:.0f} s")
        if args.generate_only:
            return
    if not args.skip_rebuild:
        t = time.perf_counter()
        applied = reports_rebuild()
        rebuild = time.perf_counter() - t
        print(
            f"rebuild_reports: {applied:,} events in {rebuild:.0f} s "
            f"({applied / rebuild:,.0f} events/s)"
        )
    with connection.cursor() as cursor:
        # What autovacuum does after a rebuild (statistics, and the visibility map that
        # index-only scans need).
        for model in REPORT_TABLES:
            cursor.execute(f"VACUUM ANALYZE {model._meta.db_table}")
    rollups = DailyRollup.objects.count()
    monthly = MonthlyRollup.objects.count()
    segments = SegmentRollup.objects.count()
    cells = DurationHistogram.objects.count()
    national = NationalMonthlyRollup.objects.count()
    national_cells = NationalHistogram.objects.count()
    facts = ReferralFact.objects.count()
    events = ReferralEvent.objects.count()
    print(
        f"\n{events:,} events, {facts:,} fact rows, {rollups:,} daily rollup rows, "
        f"{monthly:,} monthly rollup rows, {segments:,} segment rollup rows, "
        f"{cells:,} histogram cells, {national:,} national monthly rollup rows, "
        f"{national_cells:,} national histogram cells\n"
    )
    print(f"{'slice (ministry, suppressed)':50} {'median ms':>10} {'p95 ms':>10}")
    for name, med, p in query_bench(args.repeat):
        print(f"{name:50} {med:10.1f} {p:10.1f}")
    u = upkeep_bench(args.ingest)
    print("\nUpkeep (ingest through referrals.services; 4 events per referral)")
    print(
        f"{'ingest without upkeep':50} {u['ingest_per_s']:10.1f} referrals/s "
        f"({u['events_per_s']:.0f} events/s)"
    )
    print(
        f"{'watermark job over those events':50} {u['job_events_per_s']:10.0f} events/s "
        f"= {100 * u['job_s'] / u['ingest_s']:.1f} % of the ingest time"
    )
    print(
        f"{'ingest with the job inline every 50 referrals':50} "
        f"{u['with_upkeep_per_s']:10.1f} referrals/s "
        f"(upkeep {100 * u['inline_upkeep_s'] / u['inline_total_s']:.1f} % of the time)"
    )


if __name__ == "__main__":
    main()
