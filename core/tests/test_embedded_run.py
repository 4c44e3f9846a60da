"""`make run` uses SQLite and the embedded broker: its migrations and seed must work there too
(PostgreSQL-only operations are easy to add by accident)."""

import re
from pathlib import Path

import pytest

from tests.sqlite_run import sqlite_manage


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
    check = manage("check", "--fail-level", "WARNING")
    assert check.returncode == 0, check.stdout + check.stderr
    assert (tmp_path / "consilium.sqlite3").exists()
