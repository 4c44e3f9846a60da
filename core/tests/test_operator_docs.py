"""README and docs/operations.md name only commands and make targets that exist, and
README names all of them."""

from __future__ import annotations

import re
from pathlib import Path

from django.core.management import get_commands

ROOT = Path(__file__).resolve().parents[2]
OURS = {"accounts", "fhir_gateway", "referrals", "registry", "reports", "core"}


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _our_commands() -> set[str]:
    return {name for name, app in get_commands().items() if app in OURS}


def _make_targets() -> set[str]:
    phony = re.search(r"^\.PHONY:(.*)$", _text("Makefile"), flags=re.MULTILINE)
    assert phony
    return set(phony.group(1).split()) | {"venv"}


def test_readme_names_every_make_target_and_only_those() -> None:
    readme = _text("README.md")
    named = set(re.findall(r"`make (\w+)", readme)) | set(
        re.findall(r"^make (\w+)", readme, flags=re.MULTILINE)
    )
    assert named == _make_targets()


def test_readme_quick_start_is_make_run_and_make_test() -> None:
    """The interface contract: on a fresh machine, exactly these two commands."""
    section = _text("README.md").split("## Quick start", 1)[1]
    block = section.split("```", 2)[1]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_readme_names_every_management_command_of_the_project() -> None:
    section = _text("README.md").split("Commands (`python manage.py …`):", 1)[1]
    section = section.split("\n\n", 1)[0]
    named = {word.split()[0] for word in re.findall(r"`([a-z_]+[^`]*)`", section)}
    assert named == _our_commands()


def test_operations_runs_only_commands_that_exist() -> None:
    text = _text("docs/operations.md")
    used = set(re.findall(r"manage\.py (\w+)", text))
    used |= {m for m in re.findall(r"`(\w+)`", text) if m.startswith(("axes_reset",))}
    missing = sorted(name for name in used if name not in get_commands())
    assert used and missing == []


def test_operations_names_only_settings_the_code_reads() -> None:
    """Every upper-case variable docs/operations.md names in backquotes is in .env.example
    or the settings (CELERY_*, Django's own)."""
    text = _text("docs/operations.md")
    known = _text(".env.example") + _text("config/settings/base.py")
    named = set(re.findall(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)", text))
    assert named and sorted(n for n in named if n not in known) == []


def test_operations_lists_every_beat_job() -> None:
    from django.conf import settings

    text = _text("docs/operations.md")
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert f"| `{name}` | `{entry['task']}`" in text, name


def test_operations_invocations_name_modules_that_exist() -> None:
    text = _text("docs/operations.md")
    assert "gunicorn config.wsgi:application" in text
    assert "celery -A config worker" in text and "celery -A config beat" in text
    from django.conf import settings

    from config import celery_app, wsgi

    assert callable(wsgi.application)
    assert celery_app.conf.beat_schedule == settings.CELERY_BEAT_SCHEDULE


def test_operations_health_endpoint_is_the_one_routed() -> None:
    from django.urls import reverse

    assert reverse("healthz") == "/healthz"
    assert "`GET /healthz` (or `HEAD`)" in _text("docs/operations.md")
