"""Fail early, and say what is missing, when PostgreSQL or the broker is unreachable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
django.setup()

from django.conf import settings  # noqa: E402

from core.health import check_broker, check_database  # noqa: E402

problems = []
db = settings.DATABASES["default"]
if db["ENGINE"] != "django.db.backends.postgresql":
    problems.append(f"the test suite needs PostgreSQL; DATABASE_URL points at {db['ENGINE']}")
else:
    # The test database is created by pytest-django; check the server with the maintenance DB.
    from django.db import connections

    conn = connections["default"]
    conn.settings_dict["NAME"] = "postgres"
    error = check_database()
    conn.close()
    conn.settings_dict["NAME"] = db["NAME"]
    if error:
        problems.append(
            f"PostgreSQL at {db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432} is unreachable "
            f"({error}). Start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) "
            "main start — or set DATABASE_URL."
        )
error = check_broker()
if error:
    problems.append(
        f"the broker at {settings.CELERY_BROKER_URL} is unreachable ({error}). Start Redis: "
        'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no '
        "— or set CELERY_BROKER_URL."
    )
if problems:
    print("make test cannot run:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    sys.exit(2)
print(
    f"services ok: PostgreSQL {db.get('HOST')}:{db.get('PORT')}, broker {settings.CELERY_BROKER_URL}"
)
