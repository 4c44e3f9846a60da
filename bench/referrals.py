"""Referral benchmarks: intake throughput, worklist page latency, routing latency.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/consilium_bench_ref \\
        .venv/bin/python bench/referrals.py [--referrals 1000000]

Needs the national demo network (``seed_demo --scale national``); generates the stored
referrals with ``simulate_referrals``' bulk path when fewer than ``--referrals`` exist
(reused otherwise). Prints a table; targets: worklist p95 <= 10 ms, routing p95 <= 2 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
# As in production: DEBUG off (Django's debug cursor formats and keeps every statement).
os.environ.setdefault("DEBUG", "0")
os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret-" + "x" * 32)
os.environ.setdefault("ALLOWED_HOSTS", "testserver")
# A real broker, as in production (the embedded SQLite default lives under var/): the
# after-commit hand-offs of the submits go to it; the queue is purged at the end.
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")

import django

django.setup()

from django.contrib.auth.models import Group  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.test import Client  # noqa: E402

from accounts.models import User  # noqa: E402
from accounts.roles import Role  # noqa: E402
from accounts.services import api_token_issue  # noqa: E402
from referrals import routing, selectors, services, simulation  # noqa: E402
from referrals.models import Referral  # noqa: E402
from referrals.serializers import (  # noqa: E402
    ReferralListSerializer,
    referral_list_data,
)
from registry.models import Department, Facility, Specialty, SupportLink  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def raw_insert_baseline(n: int) -> float:
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw_insert (id bigserial PRIMARY KEY, doc jsonb)"
        )
    start = time.perf_counter()
    for i in range(n):
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bench_raw_insert (doc) VALUES (%s::jsonb)",
                [f'{{"n": {i}, "question": "Fever for 5 days."}}'],
            )
    return n / (time.perf_counter() - start)


def submit_throughput(threads: int, per_thread: int) -> float:
    user = User.objects.select_related("facility").get(username="demo-referrer")
    assert user.facility is not None
    facility = user.facility
    specialty = Specialty.objects.get(code="394537008")
    barrier = threading.Barrier(threads + 1)

    errors: list[Exception] = []

    def work() -> None:
        me = User.objects.get(pk=user.pk)
        barrier.wait()
        try:
            for _ in range(per_thread):
                services.referral_submit(
                    actor=me,
                    requester_facility=facility,
                    placer_system="urn:bench",
                    placer_value=uuid.uuid4().hex,
                    specialty=specialty,
                    clinical_question="Fever for 5 days.",
                )
        except Exception as exc:  # noqa: BLE001 - a failed submit fails the bench
            errors.append(exc)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} submit thread(s) failed: {errors[0]!r}")
    return threads * per_thread / elapsed


def worklist_user() -> tuple[User, int]:
    department_id = (
        Referral.objects.filter(state__in=selectors.OPEN_STATES)
        .values_list("assigned_department_id", flat=True)
        .order_by("assigned_department_id")
        .first()
    )
    busiest = max(
        Department.objects.values_list("id", flat=True),
        key=lambda d: Referral.objects.filter(
            assigned_department_id=d, state__in=selectors.OPEN_STATES
        ).count()
        if d == department_id
        else 0,
    )
    department = Department.objects.get(pk=busiest)
    user, _ = User.objects.get_or_create(
        username="bench-consultant", defaults={"facility_id": department.facility_id}
    )
    user.groups.add(Group.objects.get_or_create(name=Role.CONSULTANT.value)[0])
    user.departments.set([department])
    return User.objects.get(pk=user.pk), department.pk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--referrals", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        raise SystemExit("Run against PostgreSQL (DATABASE_URL=postgres://...).")
    facilities = Facility.objects.count()
    stored = Referral.objects.count()
    if stored < args.referrals:
        print(f"generating {args.referrals - stored} referrals (bulk path)...", file=sys.stderr)
        simulation.simulate_bulk(count=args.referrals - stored, seed=args.seed + stored)
        stored = Referral.objects.count()

    rows: list[tuple[str, str, str]] = []
    baseline = raw_insert_baseline(1000)
    rows.append(("raw PostgreSQL INSERT (1 client)", f"{baseline:,.0f}/s", ""))
    one = submit_throughput(1, 300)
    rows.append(("referral_submit, 1 thread", f"{one:,.0f}/s", "incl. routing"))
    eight = submit_throughput(8, 60)
    rows.append(("referral_submit, 8 threads", f"{eight:,.0f}/s", "incl. routing"))

    user, department_id = worklist_user()
    open_rows = Referral.objects.filter(
        assigned_department_id=department_id, state__in=selectors.OPEN_STATES
    ).count()

    def page() -> object:
        # A fresh user per page, as per request: its roles and departments are read (one
        # query for both, by the scope check).
        rows = selectors.referral_worklist_rows(User.objects.get(pk=user.pk), department_id)
        return referral_list_data(rows[0:50])

    page()
    samples = timed(page, 1000)
    rows.append(
        (
            f"worklist page (50 rows; {open_rows:,} open in dept)",
            f"p50 {statistics.median(samples):.2f} ms",
            f"p95 {pct(samples, 0.95):.2f} ms (target 10)",
        )
    )

    def page_serializer() -> object:  # the generic DRF path, for comparison
        queryset = selectors.referral_worklist(User.objects.get(pk=user.pk), department_id)
        return ReferralListSerializer(list(queryset[:50]), many=True).data

    samples = timed(page_serializer, 300)
    rows.append(
        (
            "  same page through ReferralListSerializer",
            f"p50 {statistics.median(samples):.2f} ms",
            f"p95 {pct(samples, 0.95):.2f} ms",
        )
    )

    token = api_token_issue(user=user).raw
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    url = f"/api/v1/referrals/worklist/?department={department_id}"

    def api_page() -> object:
        response = client.get(url)
        assert response.status_code == 200, response.content
        return response

    api_page()
    samples = timed(api_page, 1000)
    rows.append(
        (
            "  GET /api/v1/referrals/worklist/ (in-process: token, count, audit, JSON)",
            f"p50 {statistics.median(samples):.2f} ms",
            f"p95 {pct(samples, 0.95):.2f} ms",
        )
    )

    rng = random.Random(args.seed)
    sample_ids = list(
        Referral.objects.filter(state="submitted").values_list("pk", flat=True)[:5000]
    )
    referrals = list(Referral.objects.filter(pk__in=rng.sample(sample_ids, 500)))
    t = time.perf_counter()
    departments_with_median = routing.response_times_refresh()
    refresh_ms = (time.perf_counter() - t) * 1000
    routing.routing_cache_clear()
    routing.suggest_departments(referrals[0])  # warm the registry snapshot and medians
    it = iter(referrals * 4)
    samples = timed(lambda: routing.suggest_departments(next(it)), 2000)
    rows.append(
        (
            "routing suggest_departments (national)",
            f"p50 {statistics.median(samples):.2f} ms",
            f"p95 {pct(samples, 0.95):.2f} ms (target 2)",
        )
    )
    t = time.perf_counter()
    routing.routing_cache_clear()
    routing.suggest_departments(referrals[0])
    cold = (time.perf_counter() - t) * 1000
    rows.append(("routing cold (registry snapshot rebuilt)", f"{cold:,.0f} ms", "once per TTL"))
    rows.append(
        (
            "response-time medians (beat job, not in requests)",
            f"{refresh_ms:,.0f} ms",
            f"{departments_with_median} departments",
        )
    )

    print(
        f"\nReferrals bench: {stored:,} referrals stored, {facilities:,} facilities, "
        f"{Department.objects.count()} departments, {SupportLink.objects.count():,} links\n"
    )
    from config.celery import app as celery_app

    celery_app.control.purge()  # the notification and delivery tasks nobody consumed
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>14}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
