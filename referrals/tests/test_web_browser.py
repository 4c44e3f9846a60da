"""The clinicians' pages in a real headless browser (Debian's chromium through Playwright):
a referrer submits a case, the routed department's consultant accepts and advises it, the
referrer closes it locally with the close-out answer. No JavaScript is needed by the pages.

CI installs chromium; when it is missing this test fails (it does not skip)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group

from accounts.models import User
from accounts.roles import Role
from referrals.models import CloseOut, Referral
from referrals.routing import routing_cache_clear
from registry.models import Country, Department, Facility, Specialty, Tier

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PASSWORD = "pw-web-demo"


def _user(username: str, role: Role, facility: Facility, *departments: Department) -> User:
    user = User.objects.create_user(
        username=username, password=PASSWORD, facility=facility, first_name=username.title()
    )
    user.groups.add(Group.objects.get_or_create(name=role.value)[0])
    if departments:
        user.departments.set(departments)
    return user


@pytest.fixture
def demo(transactional_db: Any, monkeypatch: Any) -> dict[str, Any]:
    # Committed data (the live server reads it from another connection). The after-commit
    # notifications are not what this test is about and must not reach the shared broker.
    monkeypatch.setattr("referrals.services.notify_transition_later", lambda event_id: None)
    routing_cache_clear()
    country = Country.objects.create(code="VN", name="Viet Nam")
    paeds = Specialty.objects.create(code="394537008", display="Pediatric specialty")
    Specialty.objects.create(code="394579002", display="Cardiology")
    district = Facility.objects.create(
        code="WEB-D1", name="Con Dao District Hospital", country=country, tier=Tier.DISTRICT
    )
    hub = Facility.objects.create(
        code="WEB-C1", name="Central Children's Hospital", country=country, tier=Tier.CENTRAL
    )
    hub_paeds = Department.objects.create(
        facility=hub, specialty=paeds, name="Paediatrics", sla_hours=48
    )
    return {
        "referrer": _user("dr-district", Role.REFERRER, district),
        "consultant": _user("dr-hub", Role.CONSULTANT, hub, hub_paeds),
        "department": hub_paeds,
    }


def _login(page: Any, base: str, path: str, username: str) -> None:
    page.goto(f"{base}{path}")
    assert "/accounts/login/" in page.url
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    with page.expect_navigation():
        page.click("main form button[type=submit]")
    assert page.url.startswith(f"{base}{path}"), page.url


def _submit(page: Any, form: str) -> None:
    with page.expect_navigation():
        page.click(f"{form} button[type=submit]")


@pytest.mark.browser
def test_referral_demo_flow_in_chromium(demo: dict[str, Any], live_server: Any) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: install it (apt-get update && apt-get install -y "
            "chromium); the browser tests need Debian's chromium."
        )
    from playwright.sync_api import sync_playwright

    base = live_server.url
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        # JavaScript off: the pages must work without it.
        referrer = browser.new_context(java_script_enabled=False).new_page()
        consultant = browser.new_context(java_script_enabled=False).new_page()

        # 1. The referrer submits a case from the start page.
        _login(referrer, base, "/", "dr-district")
        with referrer.expect_navigation():
            referrer.click("#home-links >> text=New referral")
        assert referrer.url == f"{base}/referrals/new/"
        referrer.select_option("#id_specialty", label="Pediatric specialty")
        referrer.select_option("#id_priority", label="urgent")
        referrer.fill("#id_clinical_question", "Fever for 5 days in a 2-year-old, rash.")
        referrer.fill("#id_patient_ref", "CD-2024-117")
        referrer.select_option("#id_patient_sex", "female")
        referrer.fill("#id_patient_birth_year", "2023")
        _submit(referrer, "#referral-new")
        # (No ORM inside the Playwright block: it runs an event loop in this thread.)
        match = re.fullmatch(rf"{re.escape(base)}/referrals/(\d+)/", referrer.url)
        assert match is not None, referrer.url
        pk = int(match.group(1))
        assert "was submitted" in referrer.inner_text("#flash")
        assert referrer.get_attribute("#referral-state", "data-state") == "submitted"
        assert referrer.inner_text("#assigned-department") == (
            "Paediatrics — Central Children's Hospital"
        )

        # 2. The routed department's consultant finds it on the worklist and accepts it.
        _login(consultant, base, "/", "dr-hub")
        with consultant.expect_navigation():
            consultant.click("#home-links >> text=Worklist: Paediatrics")
        row = consultant.locator(f'#referral-table tr[data-referral="{pk}"]')
        assert "urgent" in row.inner_text() and "Con Dao District Hospital" in row.inner_text()
        with consultant.expect_navigation():
            row.locator("a").click()
        _submit(consultant, "#action-accept")
        assert consultant.get_attribute("#referral-state", "data-state") == "accepted"

        # 3. ... and advises with a consult note.
        consultant.select_option("#id_advise-disposition", "manage_locally")
        consultant.fill("#id_advise-text", "Likely viral exanthem. Oral fluids, paracetamol.")
        _submit(consultant, "#action-advise")
        assert consultant.get_attribute("#referral-state", "data-state") == "advised"
        assert "Likely viral exanthem" in consultant.inner_text("main")

        # 4. The referrer sees "advised" on the outgoing list and closes the case locally.
        referrer.goto(f"{base}/referrals/outgoing/")
        row = referrer.locator(f'#referral-table tr[data-referral="{pk}"]')
        assert row.get_attribute("data-state") == "advised"
        assert "Advised" in row.inner_text()
        with referrer.expect_navigation():
            row.locator("a").click()
        assert "Likely viral exanthem" in referrer.inner_text("main")
        referrer.select_option("#id_close_local-transfer_originally_considered", "yes")
        referrer.select_option("#id_close_local-outcome", "avoided")
        _submit(referrer, "#action-close_local")
        assert referrer.get_attribute("#referral-state", "data-state") == "closed_local"
        assert "avoided" in referrer.inner_text("#close-out")
        timeline = referrer.inner_text("#timeline")
        for action in ("submit", "accept", "advise", "close_local"):
            assert action in timeline
        referrer.screenshot(path=str(ARTIFACTS / "referral-web-flow.png"), full_page=True)
        browser.close()

    referral = Referral.objects.get()
    assert referral.pk == pk and referral.assigned_department_id == demo["department"].pk
    assert referral.placer_system == "urn:consilium:web" and referral.priority == 3
    close_out = CloseOut.objects.get(referral=referral)
    assert close_out.transfer_originally_considered is True and close_out.outcome == "avoided"
    assert (ARTIFACTS / "referral-web-flow.png").stat().st_size > 10_000
