"""Health of the parts the service needs: database and broker."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import connection
from kombu import Connection


def check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return f"{type(exc).__name__}: {exc}"
    return None


def check_broker(url: str | None = None, timeout: int = 2) -> str | None:
    url = url or settings.CELERY_BROKER_URL
    try:
        if url.startswith("sqla+"):
            _check_sqlalchemy_broker(url.removeprefix("sqla+"), timeout)
        else:
            with Connection(url, connect_timeout=timeout) as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_sqlalchemy_broker(url: str, timeout: int) -> None:
    """kombu's SQLAlchemy transport (the embedded broker of ``make run``) connects lazily:
    ``ensure_connection`` succeeds even when its database cannot be opened. Open it, within
    ``timeout``; a SQLite file is opened read-only (a probe creates nothing: a missing file
    is reported, though the first task sent would create it)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    connect_args: dict[str, object] = {"connect_timeout": timeout}
    probe = "SELECT 1"
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if not path or path == ":memory:":
            raise ValueError("the embedded broker needs a database file")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no broker database at {path}")
        url = f"sqlite:///file:{Path(path).resolve()}?mode=ro&uri=true"
        connect_args = {"timeout": timeout}
        probe = "SELECT count(*) FROM sqlite_master"  # reads the file: a damaged one fails
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.execute(text(probe))
    finally:
        engine.dispose()


def embedded_broker_prepare(url: str | None = None) -> Path | None:
    """Create the embedded broker's SQLite file (as kombu would on the worker's first
    connection) so that /healthz does not report it missing while the worker starts
    (``make run`` calls this before starting anything). Returns the path, or None for
    any other broker."""
    import sqlite3

    from sqlalchemy.engine import make_url

    url = url or settings.CELERY_BROKER_URL
    if not url.startswith("sqla+"):
        return None
    parsed = make_url(url.removeprefix("sqla+"))
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(path).close()
    return path
