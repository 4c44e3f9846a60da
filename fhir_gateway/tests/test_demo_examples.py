"""What `make run` prepares before it says it is ready: the demo network as docs/fhir.md's
worked examples find it."""

from __future__ import annotations

import re
from pathlib import Path

RUN_SH = Path(__file__).resolve().parents[2] / "scripts" / "run.sh"


def _run_sh_steps() -> list[str]:
    """The manage.py commands scripts/run.sh runs before it starts the servers."""
    script = RUN_SH.read_text()
    before = script[: script.index("runserver")]
    return re.findall(r"manage\.py (\w+)", before)


def test_make_run_projects_the_registry_before_it_says_ready() -> None:
    """The doc's first searches (Organization, HealthcareService) read the projected registry:
    left to beat (a minute after start, then ~20 s on SQLite), they found nothing at first."""
    steps = _run_sh_steps()
    assert steps.index("seed_demo") < steps.index("fhir_project_registry")
