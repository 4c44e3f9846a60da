"""The dashboard in a real headless browser (Debian's chromium through Playwright).

CI installs chromium; when it is missing this test fails (it does not skip)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from reports.services import reports_catch_up
from reports.tests.scenario import build_network, run_scenario

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


@pytest.fixture
def browser_scenario(transactional_db: Any, report_settings: Any, monkeypatch: Any) -> Any:
    # Committed data (the live server reads it from another connection). The after-commit
    # side effects of the referral services (notifications, re-routing a decline) are
    # not what this test is about and must not reach the shared broker.
    monkeypatch.setattr("referrals.services.notify_transition_later", lambda event_id: None)
    report_settings.REFERRAL_DECLINE_AUTO_REROUTE = False
    net = run_scenario(build_network())
    reports_catch_up()
    return net


@pytest.mark.browser
def test_ministry_dashboard_in_chromium(browser_scenario: Any, live_server: Any) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: install it (apt-get update && apt-get install -y "
            "chromium); the browser tests need Debian's chromium."
        )
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(f"{live_server.url}/reports/")
        # Not logged in: the login form, then back to the dashboard.
        assert "/accounts/login/" in page.url
        page.fill("input[name=username]", "ministry-official")
        page.fill("input[name=password]", "pw-scenario")
        with page.expect_navigation():
            page.click("form button[type=submit]")
        assert page.url.startswith(f"{live_server.url}/reports/")

        def headline(metric: str) -> str:
            return page.inner_text(f'[data-metric="{metric}"] .value').strip()

        assert headline("submitted") == "21"
        assert headline("avoided") == "9"
        assert headline("accepted") == "15"

        # Filter: Viet Nam only (Laos sends #8, #13, #19).
        page.select_option("select[name=country]", "VN")
        with page.expect_navigation():
            page.click("#report-filters button[type=submit]")
        assert "country=VN" in page.url
        # VN's 18, 7 and 12 would give Laos's 3, 2 and 3 against the totals above
        # (suppression rule 6): hidden.
        assert headline("submitted") == "hidden"
        assert headline("avoided") == "hidden"
        assert headline("accepted") == "hidden"
        assert headline("sla_share") == "hidden"
        # Small cells are hidden for the ministry: Lao Cai avoided 2.
        province_rows = page.inner_text("#table-province")
        assert "Lao Cai" in province_rows and "hidden" in province_rows
        assert page.locator("svg#chart-trend").count() == 1
        assert (page.locator("#csv-trend").get_attribute("href") or "").endswith("format=csv")
        page.screenshot(path=str(ARTIFACTS / "reports-dashboard.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "reports-dashboard.png").stat().st_size > 10_000
