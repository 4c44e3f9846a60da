from __future__ import annotations

from typing import Any

import pytest

from reports.services import reports_catch_up
from reports.tests.scenario import Network, build_network, run_scenario


@pytest.fixture
def report_settings(settings: Any) -> Any:
    settings.REPORTS_TIME_ZONE = "UTC"
    settings.REPORTS_MIN_CELL = 5
    settings.REPORTS_VERIFY_DAYS = 30
    settings.REPORTS_COST_PER_KM = {"VN": 0.25, "LA": 0.5, "default": 0.3}
    return settings


@pytest.fixture
def scenario(db: Any, report_settings: Any) -> Network:
    """The hand-computed scenario (reports/tests/scenario.py), applied by the job."""
    net = run_scenario(build_network())
    reports_catch_up()
    return net
