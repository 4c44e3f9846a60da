import importlib
import os
from pathlib import Path
from typing import Any

from celery import Celery, beat, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")


class PersistentScheduler(beat.PersistentScheduler):
    """Celery's file-backed beat schedule, whose directory (``VAR_DIR``) is created first:
    beat alone on a host or container (no ``collectstatic`` or ``migrate`` made ``var/``
    there) stopped at start with FileNotFoundError on ``celerybeat-schedule``."""

    def setup_schedule(self) -> None:
        filename: str = self.schedule_filename  # type: ignore[attr-defined]
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()


app = Celery("consilium")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_init.connect
@signals.beat_init.connect
def _refuse_unworkable_settings(**kwargs: Any) -> None:
    """A worker or beat with settings that cannot work (core/checks.py: an outbox lease
    shorter than its deliveries, a zero interval) stops at start with the reason, instead
    of running and warning at run time. Celery logs and swallows a signal handler's
    exceptions, so this one exits."""
    from django.core.exceptions import ImproperlyConfigured

    from core.checks import refuse_unworkable_settings

    try:
        refuse_unworkable_settings()
    except ImproperlyConfigured as error:
        raise SystemExit(f"Consilium: {error}") from error


def _embedded_broker_hands_off_quickly() -> None:
    """The embedded SQLite broker of ``make run`` (kombu's SQLAlchemy transport) has no
    event loop: Celery's blocking loop performs the late acknowledgements of finished tasks
    only between two ``drain_events(timeout=2 s)`` calls, and a drain that may not deliver
    (every prefetch slot taken: with ``concurrency 2`` and a multiplier of 1, two tasks)
    waits out the whole 2 s. Hand-offs queued behind a burst (an asynchronous Bundle's
    drain behind 20 notifications and deliveries) came two per 2 s: 10 Bundles took ~20 s.
    With more prefetch slots (settings.base: CELERY_WORKER_PREFETCH_MULTIPLIER) the loop
    keeps delivering (and acknowledging) while tasks flow. The transport also sleeps its polling interval (1 s) whenever it finds nothing:
    0.1 s. (Its transport options go to SQLAlchemy's create_engine, which refuses
    ``polling_interval``, so the class default is set.) Redis and RabbitMQ are not touched."""
    if str(app.conf.broker_url or "").startswith("sqla+"):
        transport = importlib.import_module("kombu.transport.sqlalchemy")  # no type stubs
        transport.Transport.polling_interval = 0.1


_embedded_broker_hands_off_quickly()
