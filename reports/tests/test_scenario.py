"""Every metric against values computed by hand (see the table in scenario.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from accounts.models import User
from reports.models import (
    COUNTERS,
    HISTOGRAM_KEY,
    MONTHLY_KEY,
    NATIONAL_HISTOGRAM_KEY,
    NATIONAL_KEY,
    ROLLUP_KEY,
    DailyRollup,
    DurationHistogram,
    MonthlyRollup,
    NationalHistogram,
    NationalMonthlyRollup,
    ReferralFact,
)
from reports.selectors import (
    filters_parse,
    report_capacity,
    report_counts,
    report_drilldown,
    report_response_times,
)
from reports.services import _histogram_keys, reports_catch_up, reports_rebuild
from reports.tests.scenario import NOW, UNIT_KM, Network

pytestmark = pytest.mark.django_db


@pytest.fixture
def analyst(db: Any) -> User:
    # A superuser sees every figure unsuppressed (the ministry view is tested elsewhere).
    return User.objects.create_superuser(username="analyst", password="pw-analyst")


def counts(user: User, **params: Any) -> dict[str, Any]:
    return report_counts(user, filters_parse(params), now=NOW)


def row(result: dict[str, Any], grouping: str, label: str) -> dict[str, Any]:
    [match] = [r for r in result["rows"] if r[f"{grouping}_label"] == label]
    return match


def km(units: int) -> float:
    return round(units * UNIT_KM, 1)


def test_totals_over_the_whole_network(scenario: Network, analyst: User) -> None:
    total = counts(analyst)["total"]

    assert {k: total[k] for k in TOTALS} == TOTALS
    assert total["avoidance_rate"] == 0.9  # 9 avoided / 10 considered
    assert total["sla_share"] == round(13 / 18, 4)
    assert total["travel_km"] == km(28)  # 2+2+1+6+4+6+2+2+3 units
    # VN requesters 16 units x 0.25, LA requesters 12 units x 0.5
    assert total["travel_cost"] == round(16 * UNIT_KM * 0.25 + 12 * UNIT_KM * 0.5, 2)


TOTALS = {
    "submitted": 21,
    "accepted": 15,
    "declined": 2,
    "forwarded": 1,
    "cancelled": 2,
    "expired": 1,
    "advised": 14,
    "closed_local": 12,
    "transfer_considered": 10,
    "avoided": 9,
    "avoided_verified": 6,  # 1, 5, 8, 11, 13, 14
    "avoided_pending": 1,  # 16 (closed 20 Mar, window open until 19 Apr)
    "transfer_requested": 2,
    "transfer_completed": 1,
    "counter_referrals": 1,
    "sla_due": 18,
    "sla_met": 13,
}


def test_by_month(scenario: Network, analyst: User) -> None:
    result = counts(analyst, by="period", period="month")

    jan, feb, mar = (row(result, "period", p) for p in ("2025-01", "2025-02", "2025-03"))
    assert [r["period"] for r in result["rows"]] == ["2025-01", "2025-02", "2025-03"]
    assert (jan["submitted"], feb["submitted"], mar["submitted"]) == (8, 8, 5)
    assert (jan["accepted"], feb["accepted"], mar["accepted"]) == (6, 6, 3)
    assert (jan["avoided"], feb["avoided"], mar["avoided"]) == (4, 3, 2)
    assert (jan["avoided_verified"], feb["avoided_verified"], mar["avoided_verified"]) == (
        3,
        3,
        0,
    )
    assert (jan["closed_local"], feb["closed_local"], mar["closed_local"]) == (5, 5, 2)
    assert (jan["expired"], feb["expired"], mar["expired"]) == (0, 1, 0)
    assert (jan["counter_referrals"], feb["counter_referrals"]) == (0, 1)
    assert jan["transfer_completed"] == 1
    assert jan["travel_km"] == km(2 + 2 + 1 + 6)


def test_by_quarter_and_year_equal_the_total(scenario: Network, analyst: User) -> None:
    for period, label in (("quarter", "2025-Q1"), ("year", "2025")):
        result = counts(analyst, by="period", period=period)
        [only] = result["rows"]
        assert only["period"] == label
        assert only["submitted"] == 21
        assert only["avoided"] == 9


def test_by_province(scenario: Network, analyst: User) -> None:
    result = counts(analyst, by="province")

    quang_ninh = row(result, "province", "Quang Ninh")
    lao_cai = row(result, "province", "Lao Cai")
    vientiane = row(result, "province", "Vientiane")
    ha_noi = row(result, "province", "Ha Noi")
    assert (quang_ninh["submitted"], lao_cai["submitted"], vientiane["submitted"]) == (11, 6, 3)
    assert ha_noi["submitted"] == 1  # the counter-referral, sent by the central hospital
    assert (quang_ninh["avoided"], lao_cai["avoided"], vientiane["avoided"]) == (5, 2, 2)
    assert quang_ninh["travel_km"] == km(9)
    assert lao_cai["travel_km"] == km(7)
    assert vientiane["travel_km"] == km(12)
    assert vientiane["travel_cost"] == round(12 * UNIT_KM * 0.5, 2)


def test_by_hub_hospital(scenario: Network, analyst: User) -> None:
    result = counts(analyst, by="hub")

    h1 = row(result, "hub", "Central Hospital")
    h2 = row(result, "hub", "Quang Ninh Provincial Hospital")
    d1 = row(result, "hub", "Van Don District Hospital")
    # #20 was sent without a department: routing chose the nearest, H2.
    assert (h1["submitted"], h2["submitted"], d1["submitted"]) == (17, 3, 1)
    assert (h1["cancelled"], h2["cancelled"]) == (1, 1)
    assert (h1["avoided"], h2["avoided"]) == (7, 2)
    assert h1["forwarded"] == 1  # counted against the department that passed it on
    assert (h1["sla_due"], h1["sla_met"]) == (15, 12)
    assert (h2["sla_due"], h2["sla_met"]) == (3, 1)
    assert h2["travel_km"] == km(1 + 3)


def test_slices_by_filter(scenario: Network, analyst: User) -> None:
    border = counts(analyst, cross_border="true")["total"]
    assert (border["submitted"], border["accepted"], border["avoided"]) == (3, 3, 2)
    assert border["avoided_verified"] == 2
    assert border["travel_km"] == km(12)

    cardio = counts(analyst, specialty="394579002")["total"]
    assert (cardio["submitted"], cardio["closed_local"], cardio["transfer_considered"]) == (3, 2, 1)
    assert (cardio["avoided"], cardio["transfer_requested"], cardio["travel_km"]) == (1, 1, km(4))

    campaign = counts(analyst, campaign="heart-2025")["total"]
    assert (campaign["submitted"], campaign["avoided"]) == (2, 1)

    commune = counts(analyst, tier="4")["total"]
    assert (commune["submitted"], commune["avoided"], commune["declined"]) == (6, 2, 1)

    laos = counts(analyst, country="LA")["total"]
    assert (laos["submitted"], laos["avoided"]) == (3, 2)

    february = counts(analyst, **{"from": "2025-02-01", "to": "2025-02-28"})["total"]
    assert (february["submitted"], february["avoided"], february["expired"]) == (8, 3, 1)

    d1 = counts(analyst, facility=str(scenario.d1.pk))["total"]
    assert (d1["submitted"], d1["avoided"], d1["avoided_verified"]) == (11, 5, 3)
    assert d1["avoided_pending"] == 1

    hub2 = counts(analyst, hub=str(scenario.h2.pk))["total"]
    assert (hub2["accepted"], hub2["declined"], hub2["avoided"]) == (2, 1, 2)


def test_response_times(scenario: Network, analyst: User) -> None:
    total = report_response_times(analyst, filters_parse({}))["total"]
    # accept hours: 1,1,2,2,3,3,3,4,5,6,10,13,20,30,50
    assert (total["accept_n"], total["accept_median_hours"], total["accept_p90_hours"]) == (
        15,
        4.0,
        26.0,
    )
    # advice hours: 3,4,5,6,6,8,9,10,14,20,20,30,40,72
    assert (total["advice_n"], total["advice_median_hours"], total["advice_p90_hours"]) == (
        14,
        9.5,
        37.0,
    )

    by_specialty = report_response_times(analyst, filters_parse({"by": "specialty"}))
    cardio = row(by_specialty, "specialty", "Cardiology")
    paeds = row(by_specialty, "specialty", "Pediatric specialty")
    assert (cardio["accept_median_hours"], cardio["accept_p90_hours"]) == (20.0, 44.0)
    assert (cardio["advice_median_hours"], cardio["advice_p90_hours"]) == (30.0, 63.6)
    assert (paeds["accept_n"], paeds["accept_median_hours"], paeds["accept_p90_hours"]) == (
        12,
        3.0,
        12.3,
    )

    hub2 = report_response_times(analyst, filters_parse({"hub": str(scenario.h2.pk)}))["total"]
    assert (hub2["accept_n"], hub2["accept_median_hours"]) == (2, 8.0)  # 3 h and 13 h


def test_capacity_building(scenario: Network, analyst: User) -> None:
    result = report_capacity(analyst, filters_parse({"period": "month"}))

    d1 = [r for r in result["rows"] if r["facility_label"] == "Van Don District Hospital"]
    shares = {
        (r["specialty_label"], r["period"]): (
            r["closed_local"],
            r["transfer_requested"],
            r["resolved_locally_share"],
        )
        for r in d1
    }
    assert shares == {
        ("Pediatric specialty", "2025-01"): (3, 1, 0.75),
        ("Pediatric specialty", "2025-02"): (2, 0, 1.0),
        ("Pediatric specialty", "2025-03"): (1, 0, 1.0),
        ("Cardiology", "2025-02"): (0, 1, 0.0),
    }
    # Only lower tiers (district, commune): the central hospital's counter-referral is out.
    assert {r["facility_label"] for r in result["rows"]} == {
        "Van Don District Hospital",
        "Sa Pa Commune Health Station",
        "Vientiane District Hospital",
    }


def test_drilldown_lists_the_referrals_behind_a_figure(scenario: Network) -> None:
    r = scenario.referrals
    avoided = report_drilldown(scenario.referrer_d1, filters_parse({}), "avoided", now=NOW)
    assert avoided["referral_ids"] == sorted(r[i].pk for i in (1, 2, 5, 14, 16))

    verified = report_drilldown(
        scenario.referrer_d1, filters_parse({}), "avoided_verified", now=NOW
    )
    assert verified["referral_ids"] == sorted(r[i].pk for i in (1, 5, 14))

    # Counted against H1, which passed it on; only the requester still sees #5.
    forwarded = report_drilldown(
        scenario.referrer_d1, filters_parse({"hub": str(scenario.h1.pk)}), "forwarded"
    )
    assert forwarded["referral_ids"] == [r[5].pk]

    expired = report_drilldown(scenario.consultant_h1, filters_parse({}), "expired")
    assert expired["referral_ids"] == [r[10].pk]


def _rows(model: Any, order: tuple[str, ...], **filters: Any) -> list[tuple[Any, ...]]:
    fields = [f.name for f in model._meta.concrete_fields if f.name != "id"]
    return [
        tuple(v if not isinstance(v, float) else round(v, 6) for v in row)
        for row in model.objects.filter(**filters).order_by(*order).values_list(*fields)
    ]


def _dicts(queryset: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in queryset.values()]


def _snapshot() -> tuple[list[tuple[Any, ...]], ...]:
    """(daily rollups, facts, monthly rollups, non-empty histogram cells, national monthly
    rollups, non-empty national cells); checks that the month rows are the day rows summed,
    the histograms a GROUP BY of the facts and the national tables the month tables summed
    over province and hub."""
    rollups = _rows(DailyRollup, ROLLUP_KEY)
    facts = _rows(ReferralFact, ("referral_id",))
    monthly = _rows(MonthlyRollup, MONTHLY_KEY)
    histograms = _rows(DurationHistogram, HISTOGRAM_KEY, n__gt=0)
    national = _rows(NationalMonthlyRollup, NATIONAL_KEY)
    national_cells = _rows(NationalHistogram, NATIONAL_HISTOGRAM_KEY, n__gt=0)
    assert DurationHistogram.objects.filter(n__lt=0).count() == 0
    assert NationalHistogram.objects.filter(n__lt=0).count() == 0
    sums = [*COUNTERS, "travel_km"]
    expected: dict[tuple[Any, ...], list[float]] = {}
    for row in _dicts(DailyRollup.objects.all()):
        key = (row["day"].replace(day=1), *(row[c] for c in MONTHLY_KEY[1:]))
        totals = expected.setdefault(key, [0] * len(sums))
        for i, c in enumerate(sums):
            totals[i] += row[c]
    actual = {
        tuple(row[c] for c in MONTHLY_KEY): [row[c] for c in sums]
        for row in _dicts(MonthlyRollup.objects.all())
    }
    assert actual.keys() == expected.keys()
    for key, values in expected.items():
        assert actual[key] == pytest.approx(values), key
    cells: Counter[tuple[Any, ...]] = Counter()
    for fact in ReferralFact.objects.all():
        cells.update(_histogram_keys(fact))
    assert {
        tuple(row[c] for c in HISTOGRAM_KEY): row["n"]
        for row in _dicts(DurationHistogram.objects.filter(n__gt=0))
    } == dict(cells)
    expected = {}
    for row in _dicts(MonthlyRollup.objects.all()):
        totals = expected.setdefault(tuple(row[c] for c in NATIONAL_KEY), [0] * len(sums))
        for i, c in enumerate(sums):
            totals[i] += row[c]
    actual = {
        tuple(row[c] for c in NATIONAL_KEY): [row[c] for c in sums]
        for row in _dicts(NationalMonthlyRollup.objects.all())
    }
    assert actual == expected  # exact: km are multiples of 1/1024
    summed: Counter[tuple[Any, ...]] = Counter()
    for fact in ReferralFact.objects.all():
        summed.update(
            tuple(key[HISTOGRAM_KEY.index(c)] for c in NATIONAL_HISTOGRAM_KEY)
            for key in _histogram_keys(fact)
        )
    assert {
        tuple(row[c] for c in NATIONAL_HISTOGRAM_KEY): row["n"]
        for row in _dicts(NationalHistogram.objects.filter(n__gt=0))
    } == dict(summed)
    return rollups, facts, monthly, histograms, national, national_cells


def test_rebuild_gives_the_same_tables_as_the_job(scenario: Network) -> None:
    incremental = _snapshot()

    reports_rebuild()

    assert _snapshot() == incremental
    assert reports_catch_up() == 0  # nothing left above the watermark
