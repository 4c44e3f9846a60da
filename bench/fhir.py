"""FHIR gateway benchmarks, each printed beside the raw PostgreSQL insert rate of the run.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/consilium_bench_fhir \\
        .venv/bin/python bench/fhir.py [--bundles 200] [--clients 1,8,32] [--workers 4]

- ingest: transaction Bundles (Patient + ServiceRequest + Task) POSTed to gunicorn on
  127.0.0.1 by 1/8/32 client threads (one keep-alive session each): bundles/s, p50, p99;
  beside the raw rate of durable single-row JSONB INSERTs at the same concurrency. Each
  level runs ``--repeat`` rounds, each between two raw runs and held against their mean;
  the table gives the median round's ratio and the lowest.
- async: the same Bundles with ``Prefer: respond-async``: accepted/s, p50, p99 of the 202
  (the job stored), beside the raw rate; then the rate at which ``--drain-procs`` processes
  apply the stored jobs (``intake.intake_drain``, in batches of ``--intake-batch``), every one
  checked to have made its referral.
- search: ``GET /fhir/Task?owner=…&status=requested,received&_count=50`` (the worklist) p50/p95 over the referrals
  the ingest stored; at scale: seed with ``bench/fhir_seed.py --referrals 1000000`` and pass
  ``--only search --search-department <the id it prints>``; ``--search-extra '&_sort=priority'``
  times the same worklist sorted.
- projection: the cost the write path adds (``publish.referral_changed`` as stored, and
  the same renderings validated + serialised with fhir.resources, for decision 2).
- floor: the same Bundles and client against bench/floor_app.py under the same gunicorn,
  rung by rung (Django with nothing; + json.loads and 4 INSERTs in one transaction;
  + fhir.resources validation), then ``POST /fhir``, each beside the raw rate: where
  0.10 x lies, and what the gateway's own write set costs above it.
- outbound: ``--messages`` outbox messages delivered by ``--delivery-threads`` threads to a
  local stub member (bench/stub_member.py: asyncio, HTTP/1.1 keep-alive, in its own process)
  through ``delivery.outbox_drain`` in ``--delivery-procs`` processes: deliveries/s.

Migrates the database it is given and creates its own small network (two facilities, one
department, member-system accounts, endpoints pointing at the stub).
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file is named fhir.py: its own folder must not shadow the ``fhir`` package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

import psycopg  # noqa: E402
import requests  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from accounts.models import User  # noqa: E402
from accounts.roles import Role  # noqa: E402
from accounts.services import api_token_issue  # noqa: E402
from fhir_gateway import delivery, intake, publish, storage  # noqa: E402
from fhir_gateway.models import FhirResource, OutboxMessage  # noqa: E402
from referrals.models import Referral, ReferralEvent  # noqa: E402
from registry.models import Country, Department, Endpoint, Facility, Specialty  # noqa: E402

PEDIATRICS = "394537008"
FHIR_R4 = "application/fhir+json; fhirVersion=4.0"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_threads(n: int, work: Callable[[int], list[float]]) -> tuple[float, list[float]]:
    results: list[list[float]] = [[] for _ in range(n)]

    def run(i: int) -> None:
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    samples = [s for r in results for s in r]
    return len(samples) / elapsed, samples


# --------------------------------------------------------------------------- baseline


def raw_insert_rate(dsn: str, clients: int, per_client: int) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw_insert (id bigserial PRIMARY KEY, doc jsonb)"
        )
    doc = json.dumps({"resourceType": "Task", "status": "requested", "note": "x" * 200})

    def work(_i: int) -> list[float]:
        out = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(per_client):
                t = time.perf_counter()
                conn.execute("INSERT INTO bench_raw_insert (doc) VALUES (%s)", [doc])
                out.append((time.perf_counter() - t) * 1000)
        return out

    rate, _ = run_threads(clients, work)
    return rate


@dataclass
class Level:
    rate: float  # the median round's rate
    samples: list[float]  # every round's latencies
    raw: float  # the median raw rate
    ratio: float  # the median of the rounds' ratios
    lowest: float  # the lowest round's ratio


def interleaved(
    rounds: int,
    measure: Callable[[], tuple[float, list[float]]],
    baseline: Callable[[], float],
) -> Level:
    """``rounds`` measurements, each between two baseline runs (raw, measure, raw, measure,
    ..., raw) and held against the mean of the two around it: the machine's speed drifts
    (a shared VM), and a baseline taken once, minutes away, moved the ratio by ±30 %."""
    raws = [baseline()]
    rates: list[float] = []
    ratios: list[float] = []
    samples: list[float] = []
    for _ in range(rounds):
        rate, latencies = measure()
        raws.append(baseline())
        rates.append(rate)
        samples += latencies
        ratios.append(rate / ((raws[-2] + raws[-1]) / 2))
    return Level(
        rate=statistics.median(rates),
        samples=samples,
        raw=statistics.median(raws),
        ratio=statistics.median(ratios),
        lowest=min(ratios),
    )


# --------------------------------------------------------------------------- stub member


def start_stub(port: int) -> tuple[subprocess.Popen[str], str]:
    """The member stub in its own process (asyncio, HTTP/1.1 keep-alive): bench/stub_member.py."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench/stub_member.py"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise SystemExit("stub member did not start")
    return process, f"http://127.0.0.1:{port}/fhir"


def stop_stub(process: subprocess.Popen[str]) -> int:
    process.terminate()
    out, _ = process.communicate(timeout=10)
    return int(out.strip() or 0)


# --------------------------------------------------------------------------- network


def network(stub_url: str) -> tuple[User, User, Department, Facility]:
    from django.contrib.auth.models import Group

    run = uuid.uuid4().hex[:8]
    country, _ = Country.objects.get_or_create(code="VN", defaults={"name": "Viet Nam"})
    specialty, _ = Specialty.objects.get_or_create(
        system=Specialty.SNOMED, code=PEDIATRICS, defaults={"display": "Pediatric specialty"}
    )
    hub = Facility.objects.create(code=f"HUB-{run}", name="Bench hub", country=country, tier=1)
    spoke = Facility.objects.create(
        code=f"SPOKE-{run}", name="Bench spoke", country=country, tier=3, parent=hub
    )
    department = Department.objects.create(
        facility=hub, specialty=specialty, name="Bench pediatrics", offers_async=True,
        accepting=True, daily_capacity=10**6,
    )  # fmt: skip
    group, _ = Group.objects.get_or_create(name=str(Role.MEMBER_SYSTEM))
    submitter = User.objects.create(username=f"bench-sub-{run}", facility=spoke)
    consultant = User.objects.create(username=f"bench-con-{run}", facility=hub)
    for user in (submitter, consultant):
        user.groups.add(group)
    consultant.departments.add(department)
    for facility, version in ((spoke, "4.0"), (hub, "5.0")):
        Endpoint.objects.create(
            facility=facility, base_url=f"{stub_url}/{facility.code}", fhir_version=version
        )
    return submitter, consultant, department, spoke


def bundle(spoke: Facility, department: Department) -> dict[str, Any]:
    placer = uuid.uuid4().hex
    patient = {"resourceType": "Patient", "gender": "female", "birthDate": "2020"}
    order = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": "https://bench.example.org/sid/referral", "value": placer}],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "subject": {"reference": "urn:uuid:p"},
        "requester": {"reference": f"Organization/{spoke.pk}"},
        "performerType": {"coding": [{"system": "http://snomed.info/sct", "code": PEDIATRICS}]},
        "performer": [{"reference": f"HealthcareService/{department.pk}"}],
        "reasonCode": [{"text": "Bench question"}],
    }
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "focus": {"reference": "urn:uuid:s"},
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{k}", "resource": r, "request": {"method": "POST", "url": t}}
            for k, r, t in (("p", patient, "Patient"), ("s", order, "ServiceRequest"),
                            ("t", task, "Task"))
        ],
    }  # fmt: skip


# --------------------------------------------------------------------------- benches


def start_gunicorn(workers: int, port: int, threads: int = 1) -> subprocess.Popen[bytes]:
    """gunicorn as docs/operations.md runs it; ``threads`` > 1: the gthread worker, which
    keeps client connections alive (the sync worker closes each after its answer)."""
    env = {**os.environ, "DEBUG": "0", "SECRET_KEY": "bench-" + uuid.uuid4().hex,
           "ALLOWED_HOSTS": "127.0.0.1", "SECURE_HSTS_SECONDS": "0",
           # A real broker, as in production (tasks pile up unconsumed in db 15).
           "CELERY_BROKER_URL": os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/15")}  # fmt: skip
    threaded = ["--worker-class", "gthread", "--threads", str(threads)] if threads > 1 else []
    return _gunicorn("config.wsgi", workers, port, env, "/fhir/metadata", threaded)


def _gunicorn(
    app: str, workers: int, port: int, env: dict[str, str], probe: str, extra: list[str]
) -> subprocess.Popen[bytes]:
    """gunicorn serving ``app`` on 127.0.0.1:``port``, once ``probe`` answers."""
    process = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn"), app, "-w", str(workers), "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", *extra],
        cwd=ROOT, env=env,
    )  # fmt: skip
    for _ in range(100):
        try:
            requests.get(f"http://127.0.0.1:{port}{probe}", timeout=30)
            return process
        except requests.RequestException:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"gunicorn ({app}) did not start")


def start_floor(workers: int, port: int, conninfo: str) -> subprocess.Popen[bytes]:
    """bench/floor_app.py under gunicorn, as ``start_gunicorn`` runs Consilium."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_floor_resource "
            "(id bigserial PRIMARY KEY, doc jsonb NOT NULL)"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS bench_floor_event (id bigserial PRIMARY KEY, "
                     "kind text NOT NULL, at timestamptz NOT NULL DEFAULT now())")  # fmt: skip
    env = {**os.environ, "FLOOR_DSN": conninfo}
    return _gunicorn("bench.floor_app:application", workers, port, env, "/hello", [])


def ingest(
    base: str,
    token: str,
    clients: int,
    per_client: int,
    payload: Callable[[], dict],
    *,
    respond_async: bool = False,
    path: str = "/fhir",
) -> tuple[float, list[float]]:
    """POST transaction Bundles from ``clients`` threads, as a load generator does: each
    request is built before the clock starts (as the raw baseline's document is) and sent
    as prebuilt bytes on a connection of its own (``Connection: close``; gunicorn's sync
    workers close it anyway), the answer read to its end and its status checked. The
    clients share the two cores with the server: an HTTP library's per-request work
    (urllib3: ~0.33 ms of CPU per request, a sixth of an accept's) would be the bench's
    cost counted against the server. With ``respond_async`` (``Prefer: respond-async``)
    each answer is the 202 of a stored job, which ``drain_intake`` applies afterwards."""
    from urllib.parse import urlsplit

    expected = 202 if respond_async else 200
    where = urlsplit(base)
    address = (where.hostname or "127.0.0.1", where.port or 80)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {FHIR_R4}\r\nAccept: {FHIR_R4}\r\nConnection: close\r\n"
        + ("Prefer: respond-async\r\n" if respond_async else "")
    )
    requests_ = [
        [
            (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            for body in (json.dumps(payload()).encode() for _ in range(per_client))
        ]
        for _ in range(clients)
    ]

    def work(i: int) -> list[float]:
        out = []
        for request in requests_[i]:
            t = time.perf_counter()
            with socket.create_connection(address) as sock:
                sock.sendall(request)
                answer = bytearray()
                while chunk := sock.recv(65536):
                    answer += chunk
            out.append((time.perf_counter() - t) * 1000)
            status = int(answer[9:12]) if answer[:5] == b"HTTP/" else 0
            if status != expected:
                raise SystemExit(f"ingest failed: {status} {bytes(answer[:400])!r}")
        return out

    return run_threads(clients, work)


def warm_up(base: str, token: str, workers: int, payload: Callable[[], dict]) -> None:
    """Every gunicorn worker's first requests (imports, connection, prepared statements)
    are not what a running server costs: 20 Bundles per worker first, untimed, both ways."""
    for respond_async in (False, True):
        ingest(base, token, workers, 20, payload, respond_async=respond_async)


def search(
    base: str, token: str, department: Department, n: int, extra: str = ""
) -> tuple[list[float], list[float]]:
    """The worklist search ``n`` times by each client, alternating: ``requests`` (as the
    other sections and most Python member systems), and the standard library's
    ``http.client`` (a new connection each time, as gunicorn's sync worker closes it):
    requests' own Python costs ~1.5 ms a call on a 2-core machine (``/fhir/metadata``:
    3.4 ms with it, 2.0 ms without), time the server does not spend."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}", "Accept": FHIR_R4}
    path = (  # the worklist: awaiting an answer, acknowledged or not
        f"/fhir/Task?owner=HealthcareService/{department.pk}&status=requested,received&_count=50"
    )
    path += extra
    host, port = base.removeprefix("http://").split(":")
    with_requests: list[float] = []
    lean: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        response = session.get(base + path, headers=headers)
        with_requests.append((time.perf_counter() - t) * 1000)
        assert response.status_code == 200, response.text[:300]
        t = time.perf_counter()
        connection = http.client.HTTPConnection(host, int(port))
        connection.request("GET", path, headers=headers)
        answer = connection.getresponse()
        text = answer.read()
        connection.close()
        lean.append((time.perf_counter() - t) * 1000)
        assert answer.status == 200, text[:300]
    return with_requests, lean


def projection_cost(n: int) -> tuple[float, float]:
    """ms per referral_changed as stored vs. with fhir.resources validation + dumps."""
    referrals = list(Referral.objects.order_by("-pk")[:n])
    events = {e.referral_id: e for e in ReferralEvent.objects.filter(referral__in=referrals)}
    as_stored: list[float] = []
    validated: list[float] = []
    for referral in referrals:
        event = events[referral.pk]
        with transaction.atomic():
            # As at submission: nothing of the referral stored or queued yet (rolled back).
            FhirResource.objects.filter(source_pk=referral.pk).delete()
            OutboxMessage.objects.filter(
                aggregate_key__startswith=f"{publish.aggregate_key(referral)}:endpoint:"
            ).delete()
            t = time.perf_counter()
            publish.referral_changed(referral=referral, event=event, new=True)
            as_stored.append((time.perf_counter() - t) * 1000)
            transaction.set_rollback(True)
        from fhir_gateway import referral_mapping as m

        t = time.perf_counter()
        for build in (
            m.referral_to_patient(referral),
            m.referral_to_service_request(referral),
            m.referral_to_task(referral, m.TaskContext(last_modified=event.at)),
        ):
            for version, resource in build.items():
                storage.validate_resource(resource, version).model_dump_json(exclude_none=True)
        validated.append((time.perf_counter() - t) * 1000 + as_stored[-1])
    return statistics.median(as_stored), statistics.median(validated)


def in_processes(procs: int, work: Callable[[], object]) -> float:
    """Run ``work`` in ``procs`` forked processes at once (each with its own database
    connection); the seconds until all ended."""
    import multiprocessing

    from django.db import connections

    connections.close_all()  # a forked child must not share the parent's connection
    context = multiprocessing.get_context("fork")

    def run() -> None:
        work()
        connections.close_all()

    start = time.perf_counter()
    workers = [context.Process(target=run) for _ in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def outbound(stub_url: str, messages: int, threads: int, procs: int, batch: int) -> float:
    """Deliveries/s of the batch path (``delivery.outbox_drain``) in ``procs`` processes of
    ``threads`` sender threads each: every due message is delivered (the fresh batch plus
    what the ingest enqueued), and the fresh batch must all be delivered."""
    endpoint = Endpoint.objects.filter(base_url__startswith=stub_url).first()
    assert endpoint is not None
    row = storage.current_rows("Task").first()
    assert row is not None
    with transaction.atomic():
        ids = [
            m.pk
            for m in OutboxMessage.objects.bulk_create(
                OutboxMessage(
                    endpoint=endpoint,
                    aggregate_key=f"bench:{uuid.uuid4().hex}",
                    seq=1,
                    resource_type="Task",
                    logical_id=row.logical_id,
                    version_id=row.version_id,
                    idempotency_key=uuid.uuid4().hex,
                )
                for _ in range(messages)
            )
        ]
    before = OutboxMessage.objects.filter(status="delivered").count()
    elapsed = in_processes(procs, lambda: delivery.outbox_drain(limit=batch, concurrency=threads))
    done = OutboxMessage.objects.filter(status="delivered").count() - before
    delivered = OutboxMessage.objects.filter(pk__in=ids, status="delivered").count()
    assert delivered == messages, f"{delivered}/{messages} delivered"
    return done / elapsed


def drain_intake(procs: int) -> tuple[int, float]:
    """Apply every pending asynchronous job with ``intake.intake_drain`` (the work of the
    ``fhir_gateway.intake_drain`` task) in ``procs`` processes; all must end ``done`` with
    a 200 answer. Returns (jobs applied, jobs/s)."""
    from fhir_gateway.intake import intake_drain
    from fhir_gateway.models import IntakeJob

    pending = IntakeJob.objects.filter(status="pending").count()
    before = Referral.objects.count()
    elapsed = in_processes(procs, intake_drain)
    left = IntakeJob.objects.filter(status="pending").count()
    refused = IntakeJob.objects.exclude(result_status=200).exclude(status="pending").count()
    created = Referral.objects.count() - before
    assert (left, refused, created) == (0, 0, pending), (left, refused, created, pending)
    IntakeJob.objects.all().delete()
    return pending, pending / elapsed


def floor(
    args: argparse.Namespace,
    conninfo: str,
    base: str,
    token: str,
    payload: Callable[[], dict],
) -> None:
    """The same Bundles, the same client, the same gunicorn, at each concurrency level:
    bench/floor_app.py's rungs, then Consilium's ``POST /fhir``, each as a ratio to the raw
    INSERT rate measured around it (``interleaved``)."""
    floor_port = args.port + 2
    rungs = [
        ("Django, no middleware: read the body, fixed answer", f"http://127.0.0.1:{floor_port}", "/hello"),
        ("+ json.loads, 4 INSERTs in one transaction", f"http://127.0.0.1:{floor_port}", "/store"),
        ("+ fhir.resources R4B validation, once", f"http://127.0.0.1:{floor_port}", "/validate"),
        ("Consilium POST /fhir (synchronous)", base, "/fhir"),
    ]  # fmt: skip
    floor_server = start_floor(args.workers, floor_port, conninfo)
    server = start_gunicorn(args.workers, args.port, args.threads)
    try:
        for _label, url, path in rungs:  # every worker's first requests, untimed
            ingest(url, token, args.workers, 20, payload, path=path)
        print(f"ingest floor: {args.repeat} rounds per rung and level, gunicorn {args.workers} "
              "sync workers each, the same prebuilt Bundles and client")  # fmt: skip
        print(f"{'clients':>7}  {'rung':<52} {'req/s':>8} {'p50 ms':>7} "
              f"{'raw INSERT/s':>13} {'ratio':>6}")  # fmt: skip
        for clients in (int(c) for c in args.clients.split(",")):
            per = max(1, args.bundles // clients)
            for label, url, path in rungs:
                level = interleaved(
                    args.repeat,
                    functools.partial(ingest, url, token, clients, per, payload, path=path),
                    functools.partial(raw_insert_rate, conninfo, clients, max(50, per * 4)),
                )
                print(f"{clients:>7}  {label:<52} {level.rate:>8.1f} "
                      f"{pct(level.samples, 0.5):>7.2f} {level.raw:>13.0f} {level.ratio:>6.3f}")  # fmt: skip
    finally:
        for process in (server, floor_server):
            process.terminate()
            process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundles", type=int, default=200, help="per concurrency level and round")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds per ingest level, each between two raw-rate runs",
    )
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers")
    parser.add_argument("--threads", type=int, default=1,
                        help="gunicorn threads per worker (> 1: gthread, keep-alive)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--delivery-threads", type=int, default=16, help="per process")
    parser.add_argument("--delivery-procs", type=int, default=2)
    parser.add_argument("--delivery-batch", type=int, default=500)
    parser.add_argument("--stub-port", type=int, default=8766)
    parser.add_argument("--search-department", type=int, default=0,
                        help="search this department's worklist (e.g. after bench/fhir_seed.py)")  # fmt: skip
    parser.add_argument("--search-extra", default="",
                        help="appended to the search's query, e.g. '&_sort=priority'")  # fmt: skip
    parser.add_argument("--drain-procs", type=int, default=2,
                        help="processes applying asynchronous Bundles (--only async)")  # fmt: skip
    parser.add_argument("--intake-batch", type=int, default=0,
                        help="jobs per transaction when applying (default: FHIR_INTAKE_BATCH)")  # fmt: skip
    parser.add_argument("--only", default="",
                        help="comma list: ingest,async,search,projection,outbound,floor")  # fmt: skip
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    if args.intake_batch:
        from django.conf import settings

        settings.FHIR_INTAKE_BATCH = args.intake_batch  # the forked drain processes inherit it
    call_command("migrate", verbosity=0)
    dsn = connection.get_connection_params()
    conninfo = psycopg.conninfo.make_conninfo(
        **{k: v for k, v in dsn.items() if k in ("host", "port", "user", "password", "dbname")}
    )
    stub, stub_url = start_stub(args.stub_port)
    try:
        run(args, conninfo, stub_url)
    finally:  # a failed run must not leave the stub holding its port
        print(f"stub answered {stop_stub(stub)} requests")


def run(args: argparse.Namespace, conninfo: str, stub_url: str) -> None:
    submitter, consultant, department, spoke = network(stub_url)
    sub_token = api_token_issue(user=submitter, name="bench").raw
    con_token = api_token_issue(user=consultant, name="bench").raw
    # Deliveries are timed separately; ingest must not feed a broker that is not running.
    delivery.schedule_delivery = lambda message_id: None
    only = set(filter(None, args.only.split(",")))

    def want(name: str) -> bool:
        return not only or name in only

    base = f"http://127.0.0.1:{args.port}"
    if want("ingest") or want("async") or want("search"):
        server = start_gunicorn(args.workers, args.port, args.threads)
        try:
            if want("ingest") or want("async"):
                from fhir_gateway.models import IntakeJob

                IntakeJob.objects.all().delete()  # another run's leftovers are not this one's
                warm_up(base, sub_token, args.workers, lambda: bundle(spoke, department))
                drain_intake(args.drain_procs)
            if want("ingest"):
                print(
                    f"synchronous ingest, {args.repeat} rounds per level (each beside the "
                    "raw rate measured just before and just after it)"
                )
                print(f"{'clients':>7} {'bundles/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                      f"{'raw INSERT/s':>13} {'ratio':>6} {'lowest':>6}")  # fmt: skip
                for clients in (int(c) for c in args.clients.split(",")):
                    per = max(1, args.bundles // clients)
                    level = interleaved(
                        args.repeat,
                        functools.partial(
                            ingest, base, sub_token, clients, per, lambda: bundle(spoke, department)
                        ),
                        functools.partial(raw_insert_rate, conninfo, clients, max(50, per * 4)),
                    )
                    print(f"{clients:>7} {level.rate:>10.1f} {pct(level.samples, 0.5):>8.1f} "
                          f"{pct(level.samples, 0.99):>8.1f} {level.raw:>13.0f} "
                          f"{level.ratio:>6.3f} {level.lowest:>6.3f}")  # fmt: skip
            if want("async"):
                print(
                    "asynchronous intake (Prefer: respond-async): the 202 of a stored job, "
                    f"then the jobs applied by {args.drain_procs} processes (intake_drain, "
                    f"batches of {intake.batch_size()})"
                )
                print(f"{'clients':>7} {'accepted/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                      f"{'raw INSERT/s':>13} {'ratio':>6} {'lowest':>6} {'applied/s':>10}")  # fmt: skip
                for clients in (int(c) for c in args.clients.split(",")):
                    per = max(1, args.bundles // clients)
                    applied: list[float] = []

                    def accept_then_apply(
                        c: int = clients, n: int = per, out: list[float] = applied
                    ) -> tuple[float, list[float]]:
                        measured = ingest(
                            base, sub_token, c, n, lambda: bundle(spoke, department),
                            respond_async=True,
                        )  # fmt: skip
                        out.append(drain_intake(args.drain_procs)[1])  # not timed with it
                        return measured

                    level = interleaved(
                        args.repeat,
                        accept_then_apply,
                        functools.partial(raw_insert_rate, conninfo, clients, max(50, per * 4)),
                    )
                    print(f"{clients:>7} {level.rate:>10.1f} {pct(level.samples, 0.5):>8.1f} "
                          f"{pct(level.samples, 0.99):>8.1f} {level.raw:>13.0f} "
                          f"{level.ratio:>6.3f} {level.lowest:>6.3f} "
                          f"{statistics.median(applied):>10.1f}")  # fmt: skip
            if want("search"):
                search_department, search_token = department, con_token
                if args.search_department:
                    search_department = Department.objects.get(pk=args.search_department)
                    user = User.objects.filter(departments=search_department).first()
                    assert user is not None, "no member-system user linked to that department"
                    search_token = api_token_issue(user=user, name="bench").raw
                stored = Referral.objects.filter(
                    assigned_department=search_department, state="submitted"
                ).count()
                samples, lean = search(
                    base, search_token, search_department, args.searches, args.search_extra
                )
                print(f"Task search owner+status=requested,received{args.search_extra} (_count=50) over {stored} submitted "
                      f"referrals of the department; {Referral.objects.count()} referrals, "
                      f"{storage.current_rows('Task').count()} current Task rows: "
                      f"p50 {pct(samples, 0.5):.1f} ms, p95 {pct(samples, 0.95):.1f} ms (requests); "
                      f"p50 {pct(lean, 0.5):.1f} ms, p95 {pct(lean, 0.95):.1f} ms (http.client)")  # fmt: skip
        finally:
            server.terminate()
            server.wait(10)
    if want("floor"):
        floor(args, conninfo, base, sub_token, lambda: bundle(spoke, department))
    if want("projection"):
        stored_ms, validated_ms = projection_cost(50)
        print(
            f"projection per submit: {stored_ms:.2f} ms as stored (dicts, no validation); "
            f"{validated_ms:.2f} ms with fhir.resources validate + dump of the 6 renderings"
        )
    if want("outbound"):
        # The stub endpoints were already given messages by the ingest; deliver a fresh batch.
        rate = outbound(
            stub_url, args.messages, args.delivery_threads, args.delivery_procs, args.delivery_batch
        )
        raw = raw_insert_rate(conninfo, args.delivery_threads, 200)
        print(
            f"outbound: {rate:.0f} deliveries/s, {args.delivery_procs} processes x "
            f"{args.delivery_threads} threads, batches of {args.delivery_batch} "
            f"(raw INSERT/s at {args.delivery_threads} clients: {raw:.0f})"
        )


if __name__ == "__main__":
    main()
