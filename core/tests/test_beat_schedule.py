"""Beat's schedule as an operator runs it: every entry names a task the workers know, and
every entry expires, so runs queued while the workers were down (hours) do not pile up and
run all at once when they come back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from config.celery import app

SCHEDULE: dict[str, dict[str, Any]] = settings.CELERY_BEAT_SCHEDULE


@pytest.mark.parametrize("name", sorted(SCHEDULE))
def test_every_beat_entry_names_a_registered_task(name: str) -> None:
    app.loader.import_default_modules()  # what a worker imports at start
    assert SCHEDULE[name]["task"] in app.tasks


@pytest.mark.parametrize("name", sorted(SCHEDULE))
def test_every_beat_entry_expires_within_a_few_of_its_intervals(name: str) -> None:
    entry = SCHEDULE[name]
    interval = float(entry["schedule"])
    expires = entry.get("options", {}).get("expires")
    assert isinstance(expires, float | int), f"{name} has no expires: its runs would pile up"
    # Positive (0 would expire every run before a worker takes it), and at most three
    # intervals: at most three queued runs of it wait for workers that come back.
    assert 0 < expires <= 3 * interval, (name, expires, interval)


def test_beat_creates_the_directory_of_its_schedule_file(tmp_path: Path) -> None:
    """Beat alone on a host (no migrate or collectstatic made VAR_DIR there) starts."""
    from celery import beat

    service_class: Any = beat.Service  # (the type stubs lack its arguments)

    assert settings.CELERY_BEAT_SCHEDULER == "config.celery:PersistentScheduler"
    filename = tmp_path / "var" / "not-yet" / "celerybeat-schedule"
    service = service_class(
        app, schedule_filename=str(filename), scheduler_cls=app.conf.beat_scheduler
    )
    scheduler = service.get_scheduler()  # as `celery beat` and `worker -B` build it
    try:
        assert filename.parent.is_dir()
        assert "fhir-outbox-drain" in scheduler.schedule
    finally:
        scheduler.close()
