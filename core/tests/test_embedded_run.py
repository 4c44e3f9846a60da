"""`make run` uses SQLite and the embedded broker: its migrations and seed must work there too
(PostgreSQL-only operations are easy to add by accident)."""

import re
from pathlib import Path

import pytest

from tests.sqlite_run import sqlite_manage

INTAKE_SCRIPT = """
import json
from accounts.models import User
from fhir_gateway.intake import intake_accept, intake_drain, intake_poll
user = User.objects.get(username="demo-member-system")
bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
    {"fullUrl": "urn:uuid:p1", "request": {"method": "POST", "url": "Patient"},
     "resource": {"resourceType": "Patient", "gender": "female", "birthDate": "2022"}},
    {"fullUrl": "urn:uuid:s1", "request": {"method": "POST", "url": "ServiceRequest"},
     "resource": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                  "subject": {"reference": "urn:uuid:p1"},
                  "identifier": [{"system": "https://demo/sid/referral", "value": "A-1"}],
                  "performerType": {"coding": [{"system": "http://snomed.info/sct",
                                                "code": "394537008"}]},
                  "reasonCode": [{"text": "Fever 5 days"}]}}]}
from accounts.authentication import user_for_bearer
from accounts.services import api_token_issue
raw = api_token_issue(user=user, name="embedded").raw
for _ in range(2):  # the second reads the last use the first stamped
    assert user_for_bearer(raw)[0].pk == user.pk
job = intake_accept(user=user, body=json.dumps(bundle), fhir_version="4.0",
                    answer_version="4.0", base="http://127.0.0.1:8000/fhir")
print("pending", intake_poll(user=user, job_id=str(job.pk)).status)
print("drained", intake_drain())
answer = json.loads(intake_poll(user=user, job_id=str(job.pk)).body)
entry = answer["entry"][0]
print("answer", entry["response"]["status"].split()[0],
      entry["resource"]["entry"][1]["response"]["status"])
"""


@pytest.mark.slow
def test_migrate_and_seed_demo_on_sqlite(tmp_path: Path) -> None:
    manage = sqlite_manage(tmp_path)
    migrate = manage("migrate", "--noinput", "-v", "0")
    assert migrate.returncode == 0, migrate.stderr
    seed = manage("seed_demo")
    assert seed.returncode == 0, seed.stderr
    assert "facilities: 1,026" in seed.stdout
    # The write paths with hand-written SQL (load counter upsert, feed numbering, audit)
    # and both simulation paths must run on SQLite as well.
    services = manage("simulate_referrals", "--count", "25", "--services", "--no-progress")
    assert services.returncode == 0, services.stderr
    assert "simulated 25 referrals through the services" in services.stdout
    refreshed = re.search(r"medians refreshed for (\d+) departments", services.stdout)
    assert refreshed is not None and int(refreshed.group(1)) >= 1, services.stdout
    bulk = manage("simulate_referrals", "--count", "200", "--bulk", "--no-progress")
    assert bulk.returncode == 0, bulk.stderr
    load = manage("rebuild_department_load", "--all")
    assert load.returncode == 0, load.stderr
    assert "already matched" in load.stdout, load.stdout
    # An asynchronous FHIR transaction (Prefer: respond-async) is stored, applied by the
    # drain (no SELECT ... FOR UPDATE on SQLite) and answered.
    intake = manage("shell", "--no-imports", "-c", INTAKE_SCRIPT)
    assert intake.returncode == 0, intake.stderr
    assert intake.stdout.splitlines() == ["pending 202", "drained 1", "answer 200 201 Created"]
    check = manage("check", "--fail-level", "WARNING")
    assert check.returncode == 0, check.stdout + check.stderr
    assert (tmp_path / "consilium.sqlite3").exists()


BROKER_SCRIPT = """
from config.celery import app
from kombu.transport import sqlalchemy
print(app.conf.broker_url.split(":")[0], app.conf.worker_prefetch_multiplier,
      sqlalchemy.Transport.polling_interval)
"""


def test_the_embedded_broker_hands_off_without_waiting_out_its_drains(tmp_path: Path) -> None:
    """On the embedded broker the worker's blocking loop acknowledges finished tasks only
    between 2-second drains: with one prefetch slot per process, queued hand-offs came two
    per 2 s (10 asynchronous Bundles behind a burst of notifications took ~20 s in `make
    run`; ~0.3 s with these settings, measured by hand, not here: this checks that the
    embedded broker gets them, and only it). The suite's own settings (Redis) keep one slot
    per process."""
    shell = sqlite_manage(tmp_path)("shell", "--no-imports", "-c", BROKER_SCRIPT)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.split() == ["sqla+sqlite", "16", "0.1"]

    from config.celery import app

    assert app.conf.broker_url.startswith("redis://")
    assert app.conf.worker_prefetch_multiplier == 1
