"""The feed under `make run` (SQLite): migrations apply, rows are numbered by id, and
retention prunes them (the horizon upsert and the numbering base use SQLite's MAX)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sqlite_run import sqlite_manage

SCRIPT = """
from django.db import transaction
from django.utils import timezone
from fhir_gateway.feed import feed_last_number, feed_number, feed_page, feed_record
from fhir_gateway.models import FhirResource

rows = [
    FhirResource(resource_type="Task", logical_id=f"T{n}", version_id=1, last_updated=timezone.now())
    for n in range(3)
]
with transaction.atomic():
    feed_record(facility_ids=[7, 8], rows=rows[:2], referral_id=None)
print("numbered", feed_number(7))
with transaction.atomic():
    feed_record(facility_ids=[7], rows=rows[2:], referral_id=None)
print("numbered", feed_number(7), feed_number(7))
items, more = feed_page(7, first=2, count=10)
print("page", [(i.number, i.logical_id) for i in items], more)
print("last", feed_last_number(7), feed_last_number(8))
from datetime import timedelta
from fhir_gateway.retention import retention_prune
report = retention_prune(batch_size=2, now=timezone.now() + timedelta(days=31))
print("pruned", report.feed_numbered, report.feed_deleted, report.finished)
with transaction.atomic():
    feed_record(facility_ids=[7], rows=rows[:1], referral_id=None)
print("after", feed_number(7), feed_last_number(7), feed_page(7, first=1, count=10)[0][0].number)
"""


@pytest.mark.slow
def test_feed_numbers_by_id_on_sqlite(tmp_path: Path) -> None:
    manage = sqlite_manage(tmp_path)
    migrate = manage("migrate", "--noinput", "-v", "0")
    assert migrate.returncode == 0, migrate.stderr
    run = manage("shell", "--no-imports", "-c", SCRIPT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "numbered 2",
        "numbered 1 0",
        "page [(2, 'T1'), (3, 'T2')] False",
        "last 3 0",
        "pruned 2 5 True",  # 8 was never numbered: numbered, then pruned
        "after 1 4 4",
    ]
