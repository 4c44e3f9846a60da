"""docs/fhir.md's fhirpy examples, run as written against the live server on the demo network
that `make run` seeds (`seed_demo`): only the base URL and the tokens are replaced.

A name the demo does not have, a search that finds nothing, a refusal or a wrong claim in the
doc fails here: the examples are what a member hospital's integrator copies first."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from accounts.models import User
from accounts.services import api_token_issue
from referrals.models import Referral, ReferralState

DOC = Path(__file__).resolve().parents[2] / "docs" / "fhir.md"
RUN_SH = Path(__file__).resolve().parents[2] / "scripts" / "run.sh"
DOC_BASE = '"https://consilium.example.org/fhir"'
CONNECTING = "### Connecting a member system (worked example, fhirpy)"
CONFERENCE = "### Worked example: conference and counter-referral (fhirpy)"


def _example(heading: str) -> str:
    """The first python block under the heading, after as many blank lines as there are
    lines above it in the doc: a traceback's line numbers are the doc's."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(heading + "\n")
    match = re.compile(r"```python\n(.*?)\n```", re.S).search(text, start)
    assert match is not None, heading
    return "\n" * text.count("\n", 0, match.start(1)) + match.group(1)


def _replace(code: str, old: str, new: str) -> str:
    """Replace a placeholder the doc must still have (else the test would run something else)."""
    assert old in code, old
    return code.replace(old, new)


def _run(code: str, namespace: dict[str, Any]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the doc's own example
    return out.getvalue()


def _token(username: str) -> str:
    return api_token_issue(user=User.objects.get(username=username), name="doc example").raw


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


@pytest.mark.slow  # ~17 s: the seed and its projection
@pytest.mark.django_db(transaction=True)
def test_the_docs_fhirpy_examples_run_on_the_demo_network(live_server: Any, settings: Any) -> None:
    settings.DEBUG = True  # seed_demo is refused with DEBUG off
    call_command("seed_demo", stdout=io.StringIO(), verbosity=0)  # as make run does
    # make run projects every type; the examples read these (the rest would triple the time).
    types = ("Organization", "HealthcareService", "PractitionerRole")
    call_command("fhir_project_registry", *(f"--type={t}" for t in types), stdout=io.StringIO())
    base = f'"{live_server.url}/fhir"'
    member, hub = _token("demo-member-system"), _token("demo-member-system-hub")

    connecting = _replace(_example(CONNECTING), DOC_BASE, base)
    connecting = _replace(connecting, '"Bearer <token>"', f'"Bearer {member}"')
    connecting = _replace(connecting, '"Bearer <hub token>"', f'"Bearer {hub}"')
    first: dict[str, Any] = {}
    printed = _run(connecting, first).splitlines()

    hub_facility, paediatrics = first["hub"], first["paediatrics"]
    assert hub_facility["name"] == "Bệnh viện Nhi Trung ương"
    referral = Referral.objects.get()
    department = referral.assigned_department
    assert department is not None
    assert referral.requester_facility == User.objects.get(username="demo-member-system").facility
    assert str(department.pk) == paediatrics.id
    assert str(department.facility.pk) == hub_facility.id
    # What the example prints: the owner, then the worklist's count and priorities.
    assert printed == [f"HealthcareService/{paediatrics.id}", "1 ['urgent']"]
    referral.refresh_from_db()
    assert referral.state == ReferralState.ACCEPTED

    conference = _replace(_example(CONFERENCE), DOC_BASE, base)
    conference = _replace(conference, '"<consultant system token>"', f'"{hub}"')
    conference = _replace(conference, '"CSL-…"', f'"{first["task"].id}"')
    second: dict[str, Any] = {}
    assert _run(conference, second) == ""

    referral.refresh_from_db()
    assert referral.state == ReferralState.ADVISED  # a counter-referral leaves it advised
    assert list(referral.conference_experts.values_list("username", flat=True)) == [
        "demo-consultant"
    ]
    back = referral.counter_referrals.get()
    assert second["back"].id == back.filler_id
    assert back.requester_facility == department.facility
    assert back.assigned_department is not None
    assert back.assigned_department.facility == referral.requester_facility
