"""The month tables answer exactly what the day rows and fact rows answer (counts,
verified/pending), and the histogram percentiles keep the documented error bound."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import pytest

from accounts.models import User
from reports import histogram, selectors
from reports.selectors import filters_parse, report_counts, report_response_times
from reports.tests.scenario import NOW, Driver, Network

pytestmark = pytest.mark.django_db

QUERIES: list[dict[str, str]] = [
    {},
    {"by": "period"},
    {"by": "period", "period": "quarter"},
    {"by": "province"},
    {"by": "hub", "from": "2025-02-01", "to": "2025-03-31"},
    {"by": "specialty", "from": "2025-01-01", "to": "2025-12-31"},
    {"by": "cross_border"},
    {"country": "LA"},
    {"by": "campaign", "from": "2025-02-01"},
]


def _both(
    monkeypatch: Any, fn: Any, user: User, params: dict[str, str], **kw: Any
) -> tuple[Any, Any]:
    month = fn(user, filters_parse(params), **kw)
    with monkeypatch.context() as m:
        m.setattr(selectors, "_whole_months", lambda *_: False)
        day = fn(user, filters_parse(params), **kw)
    return month, day


@pytest.mark.parametrize("params", QUERIES)
@pytest.mark.parametrize("now", [NOW, datetime.fromisoformat("2025-03-10T00:00:00+00:00")])
def test_month_tables_give_the_day_path_counts(
    scenario: Network, monkeypatch: Any, params: dict[str, str], now: datetime
) -> None:
    analyst = User.objects.create_superuser(username="analyst-m", password="pw-analyst")
    assert selectors._whole_months(selectors.report_scope_for(analyst), filters_parse(params)), (
        "the query must be one the month tables answer"
    )
    for user in (analyst, scenario.ministry):
        month, day = _both(monkeypatch, report_counts, user, params, now=now)
        assert month == day


def test_day_grain_queries_do_not_use_the_month_tables(scenario: Network) -> None:
    scope = selectors.report_scope_for(scenario.ministry)
    for params in (
        {"from": "2025-02-02"},
        {"to": "2025-02-27"},
        {"by": "period", "period": "week"},
        {"facility": str(scenario.d1.pk)},
    ):
        assert not selectors._whole_months(scope, filters_parse(params))
    referrer = selectors.report_scope_for(Driver(scenario).referrer_of(scenario.d1))
    assert not selectors._whole_months(referrer, filters_parse({}))  # scoped: day rows


def test_ministry_percentiles_come_from_histograms_within_the_bound(
    scenario: Network, monkeypatch: Any, report_settings: Any
) -> None:
    report_settings.REPORTS_MIN_CELL = 1
    month, day = _both(monkeypatch, report_response_times, scenario.ministry, {"by": "specialty"})
    assert month["percentiles"] == "histogram" and day["percentiles"] == "exact"
    for approx, exact in zip(
        [*month["rows"], month["total"]], [*day["rows"], day["total"]], strict=True
    ):
        for key, value in exact.items():
            if key.endswith("_n"):
                assert approx[key] == value
            elif key.endswith("_hours") and value is not None:
                # rounding to 0.01 h on top of the 4.4 % / 30 s bound
                assert (
                    abs(approx[key] - value)
                    <= max(value * histogram.RELATIVE_ERROR, 30 / 3600) + 0.01
                ), key


def test_histogram_percentile_error_bound() -> None:
    rng = random.Random(3)
    for _ in range(200):
        values = [rng.lognormvariate(6, 2.5) for _ in range(rng.randint(1, 300))]
        cells: dict[int, int] = {}
        for v in values:
            cells[histogram.bucket_of(v)] = cells.get(histogram.bucket_of(v), 0) + 1
        for fraction in (0.5, 0.9):
            exact = selectors.percentile_cont(values, fraction)
            approx = histogram.percentile(cells.items(), fraction)
            assert exact is not None and approx is not None
            assert abs(approx - exact) <= exact * histogram.RELATIVE_ERROR + 30 + 1e-9
    assert histogram.percentile([], 0.5) is None
    assert histogram.bucket_of(-5) == 0 and histogram.bucket_of(59.9) == 0
    assert histogram.bucket_of(60) == 1


SEGMENT_QUERIES: list[dict[str, str]] = [
    {"by": "period", "period": "week"},
    {"by": "period", "period": "week", "from": "2025-01-06", "to": "2025-03-09"},
    {"by": "period", "period": "month", "from": "2025-01-13", "to": "2025-02-28"},
    {"by": "province", "from": "2025-02-01", "to": "2025-03-16"},
    {"by": "facility"},
    {"by": "specialty", "from": "2025-01-01", "to": "2025-12-31"},
    {"by": "campaign", "period": "quarter"},
]


def _segments_and_days(
    monkeypatch: Any, fn: Any, user: User, params: dict[str, str], **kw: Any
) -> tuple[Any, Any]:
    segment = fn(user, filters_parse(params), **kw)
    with monkeypatch.context() as m:
        m.setattr(selectors, "_whole_segments", lambda *_: False)
        m.setattr(selectors, "_whole_months", lambda *_: False)
        day = fn(user, filters_parse(params), **kw)
    return segment, day


@pytest.mark.parametrize("params", SEGMENT_QUERIES)
def test_segment_table_gives_the_day_path_counts(
    scenario: Network, monkeypatch: Any, params: dict[str, str]
) -> None:
    """SegmentRollup (week-within-month rows per facility) answers exactly what the day
    rows answer, for the ministry (suppressed), a superuser and a referrer (own facility)."""
    analyst = User.objects.create_superuser(username="analyst-s", password="pw-analyst")
    referrer = Driver(scenario).referrer_of(scenario.d1)
    for user in (analyst, scenario.ministry, referrer):
        scope = selectors.report_scope_for(user)
        if scope.aggregate_only and "," in params.get("by", ""):
            continue
        filters = filters_parse(params)
        _, column = selectors._rollup_source(scope, filters)
        if column != "month":
            assert column == "segment", (params, user)
        segment, day = _segments_and_days(monkeypatch, report_counts, user, params, now=NOW)
        assert segment == day
        capacity, capacity_days = _segments_and_days(
            monkeypatch, selectors.report_capacity, user, params
        )
        assert capacity == capacity_days
        assert selectors._rollup_source(scope, filters, ("facility", "specialty", "period"))[1] == (
            "segment" if filters.period != "day" else "day"
        )


def test_queries_the_segment_table_cannot_answer_use_the_day_rows(scenario: Network) -> None:
    ministry = selectors.report_scope_for(scenario.ministry)
    consultant = selectors.report_scope_for(scenario.consultant_h1)
    for scope, params in (
        (ministry, {"from": "2025-02-04"}),  # a Tuesday, not a 1st
        (ministry, {"to": "2025-02-27"}),  # a Thursday, not a month's end
        (ministry, {"by": "period", "period": "day"}),
        (ministry, {"hub": str(scenario.h1.pk), "from": "2025-02-03"}),
        (ministry, {"by": "hub", "from": "2025-02-03"}),
        (ministry, {"cross_border": "true", "from": "2025-02-03"}),
        (consultant, {}),  # scoped by department: the segment rows have none
    ):
        filters = filters_parse(params)
        assert selectors._rollup_source(scope, filters)[1] == "day", params
