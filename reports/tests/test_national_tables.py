"""The national month tables (no province, no hub) answer exactly what MonthlyRollup and
DurationHistogram answer -- and what the day rows, the fact rows and the hand-computed
scenario give -- for every slice that needs neither province nor hub."""

from __future__ import annotations

import importlib
from datetime import datetime
from typing import Any

import pytest
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from reports import selectors
from reports.models import (
    NATIONAL_HISTOGRAM_KEY,
    NATIONAL_KEY,
    DurationHistogram,
    MonthlyRollup,
    NationalHistogram,
    NationalMonthlyRollup,
)
from reports.selectors import (
    MonthTables,
    filters_parse,
    report_counts,
    report_response_times,
    report_summary,
)
from reports.tests import test_scenario as hand
from reports.tests.scenario import NOW, Network

pytestmark = pytest.mark.django_db

NATIONAL_QUERIES: list[dict[str, str]] = [
    {},
    {"from": "2025-01-01", "to": "2025-12-31"},
    {"by": "period", "period": "month"},
    {"by": "period", "period": "month", "from": "2024-03-01", "to": "2026-02-28"},
    {"by": "period", "period": "quarter"},
    {"by": "period", "period": "year"},
    {"by": "tier"},
    {"by": "specialty", "from": "2025-02-01", "to": "2025-03-31"},
    {"by": "country"},
    {"by": "campaign"},
    {"by": "cross_border"},
    {"campaign": "heart-2025"},
    {"tier": "4", "by": "period"},
    {"country": "LA", "by": "specialty"},
    {"cross_border": "false", "by": "tier"},
]


@pytest.fixture
def analyst(db: Any) -> User:
    return User.objects.create_superuser(username="analyst-n", password="pw-analyst")


def _month_tables_only(filters: Any, by: Any) -> MonthTables:
    return MonthTables(MonthlyRollup.objects.all(), DurationHistogram.objects.all())


def _answers(monkeypatch: Any, fn: Any, user: User, params: dict[str, str], **kw: Any) -> Any:
    """(national tables, MonthlyRollup/DurationHistogram, day rows and facts)."""
    national = fn(user, filters_parse(params), **kw)
    with monkeypatch.context() as m:
        m.setattr(selectors, "_month_tables", _month_tables_only)
        month = fn(user, filters_parse(params), **kw)
    with monkeypatch.context() as m:
        m.setattr(selectors, "_whole_months", lambda *_: False)
        day = fn(user, filters_parse(params), **kw)
    return national, month, day


def _tables_read(fn: Any, *args: Any, **kw: Any) -> set[str]:
    with CaptureQueriesContext(connection) as queries:
        fn(*args, **kw)
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    names = ("monthlyrollup", "durationhistogram", "nationalmonthlyrollup", "nationalhistogram")
    return {name for name in names if f"reports_{name}" in sql}


@pytest.mark.parametrize("params", NATIONAL_QUERIES)
@pytest.mark.parametrize("now", [NOW, datetime.fromisoformat("2025-03-10T00:00:00+00:00")])
def test_national_tables_give_the_month_table_counts(
    scenario: Network, analyst: User, monkeypatch: Any, params: dict[str, str], now: datetime
) -> None:
    """Counts (incl. verified/pending from the follow-up histogram) for the superuser and
    the ministry (suppressed): national == month tables == day rows and facts."""
    filters = filters_parse(params)
    assert selectors._rollup_source(selectors.report_scope_for(analyst), filters)[0].model is (
        NationalMonthlyRollup
    )
    for user in (analyst, scenario.ministry):
        national, month, day = _answers(monkeypatch, report_counts, user, params, now=now)
        assert national == month == day
        if user == analyst:
            assert national["total"]["submitted"] > 0


@pytest.mark.parametrize("params", NATIONAL_QUERIES)
def test_national_histogram_gives_the_month_histogram_percentiles(
    scenario: Network, monkeypatch: Any, report_settings: Any, params: dict[str, str]
) -> None:
    """The ministry's histogram percentiles: the national cells are the month cells summed
    over province and hub, so the estimates are identical, not merely within the bound."""
    report_settings.REPORTS_MIN_CELL = 1
    national = report_response_times(scenario.ministry, filters_parse(params))
    with monkeypatch.context() as m:
        m.setattr(selectors, "_month_tables", _month_tables_only)
        month = report_response_times(scenario.ministry, filters_parse(params))
    assert national["percentiles"] == "histogram"
    assert national == month


def test_national_slices_read_only_the_national_tables(scenario: Network) -> None:
    """The bench's three national slices never touch MonthlyRollup / DurationHistogram."""
    ministry = scenario.ministry
    assert _tables_read(report_counts, ministry, filters_parse({}), now=NOW) == {
        "nationalmonthlyrollup",
        "nationalhistogram",
    }
    one_year = filters_parse({"from": "2025-01-01", "to": "2025-12-31"})
    assert _tables_read(report_summary, ministry, one_year) == {
        "nationalmonthlyrollup",
        "nationalhistogram",
    }
    trend = filters_parse({"by": "period", "from": "2024-01-01", "to": "2025-12-31"})
    assert _tables_read(report_counts, ministry, trend, now=NOW) == {
        "nationalmonthlyrollup",
        "nationalhistogram",
    }


def test_province_and_hub_queries_read_the_month_tables(
    scenario: Network, monkeypatch: Any
) -> None:
    """A province or hub filter or grouping needs the columns the national tables lack:
    MonthlyRollup / DurationHistogram answer (same figures as the day rows)."""
    ministry = scenario.ministry
    scope = selectors.report_scope_for(ministry)
    for params in (
        {"by": "province"},
        {"by": "hub", "from": "2025-02-01", "to": "2025-03-31"},
        {"province": str(scenario.quang_ninh.pk)},
        {"hub": str(scenario.h2.pk), "by": "period"},
    ):
        filters = filters_parse(params)
        assert selectors._whole_months(scope, filters), params
        tables = selectors._month_tables(filters, filters.by)
        assert tables.rollup.model is MonthlyRollup, params
        assert tables.histogram.model is DurationHistogram, params
        assert selectors._rollup_source(scope, filters)[0].model is MonthlyRollup
        read = _tables_read(report_counts, ministry, filters, now=NOW)
        # With a province or hub filter, suppression rule 6 also reads the same figures
        # without that filter (the national tables answer those).
        national_tables = {"nationalmonthlyrollup", "nationalhistogram"}
        assert read - national_tables == {"monthlyrollup", "durationhistogram"}, params
        assert bool(read & national_tables) == ("province" in params or "hub" in params)
        national, month, day = _answers(monkeypatch, report_counts, ministry, params, now=NOW)
        assert national == month == day


HAND_COMPUTED = [
    hand.test_totals_over_the_whole_network,
    hand.test_by_month,
    hand.test_by_quarter_and_year_equal_the_total,
    hand.test_slices_by_filter,
    hand.test_by_province,
    hand.test_by_hub_hospital,
]


@pytest.mark.parametrize("tables", ["national", "month"])
@pytest.mark.parametrize("check", HAND_COMPUTED, ids=lambda f: f.__name__)
def test_hand_computed_figures_from_either_month_table(
    scenario: Network, analyst: User, monkeypatch: Any, tables: str, check: Any
) -> None:
    """The hand-computed scenario figures (test_scenario.py), answered from the national
    tables (the default for these slices) and from MonthlyRollup / DurationHistogram."""
    assert selectors._month_tables(filters_parse({}), ()).rollup.model is NationalMonthlyRollup
    if tables == "month":
        monkeypatch.setattr(selectors, "_month_tables", _month_tables_only)
    check(scenario, analyst)


def test_migration_fills_the_national_tables_from_the_month_tables(scenario: Network) -> None:
    """Migration 0006 derives the national tables from the existing month tables: the
    same rows as the watermark job wrote."""
    fill = importlib.import_module("reports.migrations.0006_national_month_tables").fill
    national = hand._rows(NationalMonthlyRollup, NATIONAL_KEY)
    cells = hand._rows(NationalHistogram, NATIONAL_HISTOGRAM_KEY)
    assert national and cells
    NationalMonthlyRollup.objects.all().delete()
    NationalHistogram.objects.all().delete()

    fill(apps, None)

    assert hand._rows(NationalMonthlyRollup, NATIONAL_KEY) == national
    assert hand._rows(NationalHistogram, NATIONAL_HISTOGRAM_KEY) == cells
