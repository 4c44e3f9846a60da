"""Health of the parts the service needs: database and broker."""

from __future__ import annotations

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
            _check_sqlalchemy_broker(url.removeprefix("sqla+"))
        else:
            with Connection(url, connect_timeout=timeout) as conn:
                conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_sqlalchemy_broker(url: str) -> None:
    """kombu's SQLAlchemy transport (the embedded broker of ``make run``) connects lazily:
    ``ensure_connection`` succeeds even when its database cannot be opened. Open it."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
