"""Registry benchmarks: bulk import and distance search on a dedicated database.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/consilium_bench .venv/bin/python bench/registry.py

The bench works in a database of its own, named after DATABASE_URL's with "_registry"
appended (consilium_bench -> consilium_bench_registry), dropped, recreated and migrated on
every run: other benches sharing DATABASE_URL are never disturbed. The name must contain
"bench". Each import runs in a child process (the same management
command an operator runs), which reports its own wall time and peak RSS; the baseline is
a raw psycopg ``executemany`` INSERT of as many rows into a temporary table, so the import
figure can be read as a ratio of what the database alone costs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
KENYA_CSV = Path(
    os.environ.get("KENYA_CSV", ROOT.parent / "shared" / "data" / "kenya_kmhfl_2020-05.csv")
)
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/consilium_bench"

SUFFIX = "_registry"

# Run as a script, Python puts bench/ first on sys.path, where sibling scripts (bench/fhir.py,
# bench/registry.py itself) would shadow packages of the same name: import from the root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")


def dedicated_url(url: str) -> str:
    """DATABASE_URL with "_registry" appended to the database name (once)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name.endswith(SUFFIX):
        name += SUFFIX
    return urlunsplit(parts._replace(path=f"/{name}"))


# Before Django reads the settings; child processes inherit the dedicated URL.
os.environ["DATABASE_URL"] = dedicated_url(os.environ.get("DATABASE_URL", DEFAULT_URL))


@dataclass(frozen=True)
class Figure:
    """One line of the printed table."""

    case: str
    rows: int
    seconds: float
    cpu_seconds: float | None = None  # CPU of the importing process (not the database's)
    peak_rss_mb: float | None = None  # peak resident memory of the importing process
    growth_mb: float | None = None  # peak minus the RSS once Django and modules are loaded
    baseline_seconds: float | None = None  # raw INSERT of the same number of rows

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


# --- database -------------------------------------------------------------------------------


def database_name() -> str:
    import environ  # django-environ, already a dependency

    name = str(environ.Env.db_url_config(os.environ["DATABASE_URL"])["NAME"])
    if "bench" not in name:
        raise SystemExit(f"refusing to drop database {name!r}: its name must contain 'bench'")
    return name


def prepare_database() -> None:
    """Drop, create and migrate the bench database (a clean registry every run)."""
    import django
    import psycopg
    from django.conf import settings

    name = database_name()
    django.setup()
    db = settings.DATABASES["default"]
    admin = psycopg.connect(
        dbname="postgres",
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
        autocommit=True,
    )
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def clear_registry() -> None:
    """Empty the facility tables between runs (specialties stay: a migration loads them)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE registry_facility, registry_administrativearea, registry_country "
            "RESTART IDENTITY CASCADE"
        )


# --- data ------------------------------------------------------------------------------------

LEVELS = [("Level 2", 70), ("Level 3", 20), ("Level 4", 8), ("Level 5", 1.5), ("Level 6", 0.5)]
OWNERS = [
    "Ministry of Health",
    "Private Practice",
    "Faith Based Organization",
    "Non-Governmental Organizations",
]
SERVICES = [
    "Outpatient",
    "Focused Antenatal Care",
    "HIV Testing Services",
    "Integrated Child Immunization",
    "Basic dental services",
    "Tuberculosis Treatment",
    "Short Term",
    "General X-ray",
]


def generate_csv(path: Path, rows: int, seed: int = 42) -> Path:
    """A synthetic master facility list in the KMHFL layout (read with the kenya_kmhfl
    mapping): 47 counties, ~300 sub-counties, ~1,500 wards, levels spread as in Kenya,
    random coordinates inside Kenya's bounding box, a few services each."""
    import csv

    rng = random.Random(seed)
    header = KENYA_CSV.open(encoding="utf-8").readline().strip().split(",")
    levels, weights = zip(*LEVELS, strict=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, header, lineterminator="\n")
        writer.writeheader()
        for n in range(rows):
            county = rng.randrange(47)
            sub_county = county * 7 + rng.randrange(7)
            ward = sub_county * 5 + rng.randrange(5)
            has_position = rng.random() > 0.12
            writer.writerow(
                {
                    **dict.fromkeys(header, ""),
                    "code": str(100_000 + n),
                    "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "name": f"Synthetic {n}",
                    "officialname": f"Synthetic Health Facility {n:06d}",
                    "keph_level_name": rng.choices(levels, weights)[0],
                    "facility_type_name": "Dispensary",
                    "owner_type_name": rng.choice(OWNERS),
                    "operation_status_name": "Operational",
                    "beds": str(rng.randrange(0, 40)),
                    "county_name": f"County {county:02d}",
                    "sub_county_name": f"Sub-county {sub_county:03d}",
                    "ward_name": f"Ward {ward:04d}",
                    "latitude(src:long)": f"{rng.uniform(-4.6, 5.0):.6f}" if has_position else "",
                    "longitude(src:lat)": f"{rng.uniform(33.9, 41.9):.6f}" if has_position else "",
                    "service_names": ";".join(rng.sample(SERVICES, rng.randrange(0, 5))),
                }
            )
    return path


# --- measurements ------------------------------------------------------------------------------


def child_import(path: str, mapping: str, batch_size: str) -> None:
    """Runs in the child process: import once, print seconds and memory as JSON."""
    import resource

    import django

    django.setup()
    from django.core.management import call_command

    def rss_mb(key: str = "VmHWM") -> float:
        """VmHWM: this process's peak RSS. Not ru_maxrss: Linux folds the parent's peak
        into it at exec, so every child would report at least the bench's own size."""
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    import registry.management.commands.import_facilities  # noqa: F401  (modules: not data)

    started_rss = rss_mb("VmRSS")
    started_cpu = cpu()
    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        call_command(
            "import_facilities",
            path,
            "--mapping",
            mapping,
            "--skip-invalid",
            "--no-progress",
            *(["--batch-size", batch_size] if batch_size != "default" else []),
            stdout=devnull,
        )
    seconds = time.perf_counter() - started
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu() - started_cpu,
        "peak_rss_mb": rss_mb(),
        "startup_rss_mb": started_rss,
    }
    print(json.dumps(result))


REPEAT = int(os.environ.get("BENCH_REPEAT", "2"))  # best of N: the machine is shared


def measure_import(
    case: str, path: Path, rows: int, *, clear: bool = True, batch_size: int | None = None
) -> Figure:
    """Best of REPEAT runs; ``clear``: each run starts from an empty registry."""
    runs = []
    for _ in range(REPEAT):
        if clear:
            clear_registry()
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-import",
                str(path),
                "kenya_kmhfl",
                str(batch_size or "default"),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ.copy(),
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda run: run["seconds"])
    return Figure(
        case=case,
        rows=rows,
        seconds=best["seconds"],
        cpu_seconds=min(run["cpu_seconds"] for run in runs),
        peak_rss_mb=max(run["peak_rss_mb"] for run in runs),
        growth_mb=max(run["peak_rss_mb"] - run["startup_rss_mb"] for run in runs),
        baseline_seconds=min(raw_insert_seconds(rows) for _ in range(REPEAT)),
    )


def raw_insert_seconds(rows: int) -> float:
    """psycopg executemany of ``rows`` facility-like rows into a temporary table, one commit."""
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    rng = random.Random(7)
    values = [
        (
            f"KE-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            f"Synthetic Health Facility {n:06d}",
            f"synthetic health facility {n:06d}",
            rng.randrange(1, 5),
            "Dispensary",
            "public",
            "active",
            rng.uniform(-4.6, 5.0),
            rng.uniform(33.9, 41.9),
            rng.randrange(0, 40),
        )
        for n in range(rows)
    ]
    with psycopg.connect(
        dbname=db["NAME"], user=db["USER"] or None, host=db["HOST"] or None, port=db["PORT"] or None
    ) as conn:
        conn.execute(
            "CREATE TEMP TABLE bench_facility (id bigserial primary key, code varchar(64) unique, "
            "name varchar(255), search_name varchar(520), tier smallint, facility_type varchar(100), "
            "ownership varchar(20), operational_status varchar(20), latitude double precision, "
            "longitude double precision, beds integer)"
        )
        conn.commit()
        started = time.perf_counter()
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO bench_facility (code, name, search_name, tier, facility_type, ownership, "
                "operational_status, latitude, longitude, beds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                values,
            )
        conn.commit()
        return time.perf_counter() - started


def count_rows(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for _ in handle) - 1


def import_figures(workdir: Path) -> list[Figure]:
    figures = []
    if KENYA_CSV.exists():
        kenya_rows = count_rows(KENYA_CSV)
        figures.append(measure_import("Kenya KMHFL (new)", KENYA_CSV, kenya_rows))
        figures.append(
            measure_import("Kenya KMHFL (re-import, unchanged)", KENYA_CSV, kenya_rows, clear=False)
        )
    for rows in (10_000, 100_000):
        path = generate_csv(workdir / f"synthetic_{rows}.csv", rows)
        figures.append(measure_import(f"synthetic {rows:,} (new)", path, rows))
    # The batch size trades memory for round trips (settings.REGISTRY_IMPORT_BATCH_SIZE).
    figures.append(
        measure_import("synthetic 100,000 (new, batch 5,000)", path, rows, batch_size=5000)
    )
    return figures


# --- output ------------------------------------------------------------------------------------


def print_table(title: str, figures: list[Figure]) -> None:
    print(f"\n{title}")
    header = f"{'case':<38} {'rows':>8} {'seconds':>8} {'rows/s':>8} {'CPU s':>6} {'peak RSS':>9} {'growth':>7} {'raw INSERT s':>12} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for f in figures:
        rss = f"{f.peak_rss_mb:.0f} MB" if f.peak_rss_mb is not None else "-"
        growth = f"{f.growth_mb:.0f} MB" if f.growth_mb is not None else "-"
        base = f"{f.baseline_seconds:.2f}" if f.baseline_seconds is not None else "-"
        ratio = f"{f.seconds / f.baseline_seconds:.1f}x" if f.baseline_seconds else "-"
        cpu = f"{f.cpu_seconds:.1f}" if f.cpu_seconds is not None else "-"
        print(
            f"{f.case:<38} {f.rows:>8,} {f.seconds:>8.2f} {f.rate:>8,.0f} {cpu:>6} {rss:>9} {growth:>7} {base:>12} {ratio:>6}"
        )


# --- distance search ------------------------------------------------------------------------

SEARCH_QUERIES = int(os.environ.get("BENCH_SEARCH_QUERIES", "500"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def search_figures() -> None:
    """Departments offering a specialty within R km of a lower-tier facility, nearest first,
    on the national-scale demo network; beside a raw primary-key SELECT (the floor of any
    query) measured in the same run."""
    import psycopg
    from django.conf import settings
    from django.test import Client

    from accounts.models import User
    from accounts.services import api_token_issue
    from registry.demo import demo_seed
    from registry.models import Facility, Tier
    from registry.selectors import departments_near

    clear_registry()
    started = time.perf_counter()
    demo_seed(scale="national")
    seeded = time.perf_counter() - started
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # fresh statistics after the bulk load, as autovacuum would
    facilities = Facility.objects.count()
    rng = random.Random(7)
    origins = [
        (pk, float(lat), float(lon))
        for pk, lat, lon in Facility.objects.filter(
            tier__gte=Tier.DISTRICT, latitude__isnull=False
        ).values_list("id", "latitude", "longitude")
        if lat is not None and lon is not None
    ]
    sample = [rng.choice(origins) for _ in range(SEARCH_QUERIES)]
    specialties = ["394537008", "394579002", "394802001", "394609007"]

    db = settings.DATABASES["default"]
    raw = psycopg.connect(
        dbname=db["NAME"], user=db["USER"] or None, host=db["HOST"] or None, port=db["PORT"] or None
    )
    raw_times: list[float] = []
    with raw:
        for pk, _, _ in sample:
            t = time.perf_counter()
            raw.execute("SELECT id, name FROM registry_facility WHERE id = %s", [pk]).fetchone()
            raw_times.append((time.perf_counter() - t) * 1000)

    for _, lat, lon in sample[:50]:  # warm-up: connection, query compilation, caches
        departments_near(specialty_code=specialties[0], latitude=lat, longitude=lon, radius_km=150)

    rows: list[tuple[str, float, float, float]] = []
    for radius in (50.0, 150.0, 400.0):
        times: list[float] = []
        found = 0
        for n, (_, lat, lon) in enumerate(sample):
            t = time.perf_counter()
            result = departments_near(
                specialty_code=specialties[n % len(specialties)],
                latitude=lat,
                longitude=lon,
                radius_km=radius,
            )
            times.append((time.perf_counter() - t) * 1000)
            found += len(result)
        rows.append(
            (
                f"selector, radius {radius:.0f} km",
                _percentile(times, 0.5),
                _percentile(times, 0.95),
                found / len(sample),
            )
        )

    user = User.objects.create_user(username="bench-search")
    token = api_token_issue(user=user).raw
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    times = []
    for n, (pk, _, _) in enumerate(sample):
        t = time.perf_counter()
        response = client.get(
            "/api/v1/departments/nearby/",
            {
                "specialty": specialties[n % len(specialties)],
                "facility": str(pk),
                "radius_km": "150",
            },
        )
        times.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200, response.content
    rows.append(
        (
            "API GET /departments/nearby/, 150 km (in-process)",
            _percentile(times, 0.5),
            _percentile(times, 0.95),
            float("nan"),
        )
    )

    print(
        f"\nDistance search at national scale ({facilities:,} facilities, seeded in "
        f"{seeded:.1f} s; {SEARCH_QUERIES} queries from lower-tier facilities)"
    )
    print("| case | p50 ms | p95 ms | departments found (mean) | p95 / raw PK SELECT p95 |")
    print("|---|---:|---:|---:|---:|")
    raw_p95 = _percentile(raw_times, 0.95)
    print(
        f"| raw psycopg PK SELECT (baseline) | {_percentile(raw_times, 0.5):.3f} | "
        f"{raw_p95:.3f} | - | 1.0 |"
    )
    for case, p50, p95, mean_found in rows:
        found_text = "-" if mean_found != mean_found else f"{mean_found:.1f}"
        print(f"| {case} | {p50:.3f} | {p95:.3f} | {found_text} | {p95 / raw_p95:.1f} |")


SECTIONS: list[tuple[str, Callable[[Path], list[Figure]]]] = [
    (
        "Facility import (manage.py import_facilities --mapping kenya_kmhfl --skip-invalid)",
        import_figures,
    ),
]


def main() -> None:
    prepare_database()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="consilium-bench-") as tmp:
        if os.environ.get("BENCH_SKIP_IMPORT") != "1":
            for title, section in SECTIONS:
                print_table(title, section(Path(tmp)))
    search_figures()
    print(
        f"\n{os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after; best of {REPEAT} runs (BENCH_REPEAT)."
    )
    print(
        "seconds: the import command alone (no process start-up); rows/s = rows / seconds; "
        "CPU s: CPU time of the importing process (the database server's is not included); "
        "peak RSS (VmHWM) of the importing process, growth = peak minus RSS once Django and the command's modules are loaded; "
        "raw INSERT: psycopg executemany of as many facility-like rows into a temp table, "
        "one commit (the import also writes identifiers, areas, departments and revisions)."
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child-import":
        child_import(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
