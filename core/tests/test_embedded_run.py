"""`make run` uses SQLite and the embedded broker: its migrations and seed must work there too
(PostgreSQL-only operations are easy to add by accident)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_migrate_and_seed_demo_on_sqlite(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(
        {"DEBUG": "1", "VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "config.settings.base"}
    )

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    migrate = manage("migrate", "--noinput", "-v", "0")
    assert migrate.returncode == 0, migrate.stderr
    seed = manage("seed_demo")
    assert seed.returncode == 0, seed.stderr
    assert "facilities: 1,026" in seed.stdout
    check = manage("check", "--fail-level", "WARNING")
    assert check.returncode == 0, check.stdout + check.stderr
    assert (tmp_path / "consilium.sqlite3").exists()
