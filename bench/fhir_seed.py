"""Seed a bench database with many referrals and their current Task rows, for the Task
search bench at scale (issue 4: p95 with 1,000,000 referrals).

    DATABASE_URL=… .venv/bin/python bench/fhir_seed.py --referrals 1000000 --departments 1000
    DATABASE_URL=… .venv/bin/python bench/fhir.py --only search --search-department <printed id>

Referrals are INSERTed set-wise (``generate_series``), spread evenly over ``--departments``
new departments (one hub facility each), states mixed like a live network (30 % submitted, the rest
accepted / completed / declined / cancelled); each gets a current Task ``FhirResource`` with
the stored R4/R5 bytes of a real Task (so the rows have realistic width). The first new
department gets a member-system user (its worklist is what the bench searches).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

from django.contrib.auth.models import Group  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from accounts.models import User  # noqa: E402
from accounts.roles import Role  # noqa: E402
from fhir_gateway import storage  # noqa: E402
from registry.models import Country, Department, Facility, Specialty  # noqa: E402

PEDIATRICS = "394537008"

SQL = """
INSERT INTO referrals_referral (placer_system, placer_value, filler_id, patient_ref, patient_sex,
    patient_birth_year, mode, priority, clinical_question, campaign, state, version,
    conference_url, created_at, updated_at, assigned_department_id, requester_facility_id,
    specialty_id, assigned_at, deadline)
SELECT 'https://seed.example.org/sid/referral', %(run)s || '-' || g,
    'CSL-' || upper(md5(%(run)s || g::text)), '', 'female', 2020, 'async', 1 + g %% 3,
    'Seeded question', '',
    (ARRAY['submitted','submitted','submitted','accepted','accepted','completed','completed',
           'completed','declined','cancelled'])[1 + g %% 10],
    1, '', now() - (g || ' seconds')::interval, now(),
    (%(departments)s)[1 + (g / 10) %% %(n_departments)s], %(spoke)s, %(specialty)s,
    now() - (g || ' seconds')::interval, now() + interval '2 days'
FROM generate_series(%(start)s, %(stop)s - 1) AS g
RETURNING id, filler_id
"""
TASKS = """
INSERT INTO fhir_gateway_fhirresource (resource_type, logical_id, version_id, last_updated,
    fhir_version, json_r4, json_r5, content_hash, is_current, deleted, source_pk)
SELECT 'Task', r.filler_id, 1, now(), '4.0', %(r4)s, %(r5)s, '', true, false, r.id
FROM referrals_referral r WHERE r.placer_value LIKE %(prefix)s AND r.id BETWEEN %(lo)s AND %(hi)s
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--referrals", type=int, default=1_000_000)
    parser.add_argument("--departments", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=100_000)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    call_command("migrate", verbosity=0)
    template = storage.current_rows("Task").first()
    if template is None:
        raise SystemExit("run bench/fhir.py --only ingest once first (a real Task to copy)")
    run = uuid.uuid4().hex[:8]
    country, _ = Country.objects.get_or_create(code="VN", defaults={"name": "Viet Nam"})
    specialty, _ = Specialty.objects.get_or_create(
        system=Specialty.SNOMED, code=PEDIATRICS, defaults={"display": "Pediatric specialty"}
    )
    spoke = Facility.objects.create(
        code=f"SEEDSPOKE-{run}", name="Seed spoke", country=country, tier=3
    )
    hubs = Facility.objects.bulk_create(
        Facility(code=f"SEEDHUB-{run}-{i}", name=f"Seed hub {i}", country=country, tier=1)
        for i in range(args.departments)
    )  # one department per facility and specialty
    departments = Department.objects.bulk_create(
        Department(facility=f, specialty=specialty, name=f"Seed {i}", offers_async=True,
                   accepting=True, daily_capacity=10**6)
        for i, f in enumerate(hubs)
    )  # fmt: skip
    user = User.objects.create(username=f"seed-con-{run}", facility=hubs[0])
    user.groups.add(Group.objects.get_or_create(name=str(Role.MEMBER_SYSTEM))[0])
    user.departments.add(departments[0])
    ids = [d.pk for d in departments]
    started = time.perf_counter()
    for start in range(0, args.referrals, args.chunk):
        stop = min(args.referrals, start + args.chunk)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                SQL,
                {"run": run, "departments": ids, "n_departments": len(ids), "spoke": spoke.pk,
                 "specialty": specialty.pk, "start": start, "stop": stop},
            )  # fmt: skip
            rows = cursor.fetchall()
            cursor.execute(
                TASKS,
                {"r4": template.json_r4, "r5": template.json_r5, "prefix": f"{run}-%",
                 "lo": min(r[0] for r in rows), "hi": max(r[0] for r in rows)},
            )  # fmt: skip
        print(f"{stop} referrals ({time.perf_counter() - started:.0f} s)")
    # What autovacuum does after a bulk load (PostgreSQL 13+ vacuums after inserts too):
    # statistics, and the visibility map that lets the search read the current-Task
    # index alone (``fhir_resource_live_source`` INCLUDEs the logical id). Without it the
    # first minutes after a seed measured every Task row's heap page too.
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE referrals_referral")
        cursor.execute("VACUUM ANALYZE fhir_gateway_fhirresource")
    print(f"search department: {departments[0].pk} (user {user.username})")


if __name__ == "__main__":
    main()
