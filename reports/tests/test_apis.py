"""The HTTP surface: permissions, suppression, exports, drill-down."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from django.test import Client
from openpyxl import load_workbook
from rest_framework.test import APIClient

from reports.tests.scenario import Network, client_for, get

pytestmark = pytest.mark.django_db


def by_label(body: dict[str, Any], grouping: str) -> dict[str, dict[str, Any]]:
    return {r[f"{grouping}_label"]: r for r in body["rows"]}


def test_ministry_sees_aggregates_with_small_cells_hidden(scenario: Network) -> None:
    response = get(scenario.ministry, "", by="province")

    assert response.status_code == 200
    rows = by_label(response.json(), "province")
    # Quang Ninh 5 avoided is shown; Lao Cai 2 and Vientiane 2 are hidden (< 5).
    assert rows["Quang Ninh"]["avoided"] == 5
    assert rows["Lao Cai"]["avoided"] is None
    assert rows["Vientiane"]["avoided"] is None
    assert "avoided" in rows["Lao Cai"]["suppressed"]
    # Derived figures go with the hidden count.
    assert rows["Vientiane"]["travel_km"] is None
    assert rows["Vientiane"]["travel_cost"] is None
    # Zero is shown; the total (9) is shown as two cells are hidden.
    assert rows["Ha Noi"]["avoided"] == 0
    assert response.json()["total"]["avoided"] == 9
    assert response.json()["suppression"] == {"min_cell": 5}


def test_complementary_suppression_when_one_cell_is_hidden(scenario: Network) -> None:
    rows = by_label(get(scenario.ministry, "", by="hub").json(), "hub")

    # Avoided by hub: H1 7, H2 2, D1 0. Total 9 - H1 7 would reveal H2, so H1 is hidden too.
    assert rows["Quang Ninh Provincial Hospital"]["avoided"] is None
    assert rows["Central Hospital"]["avoided"] is None
    assert rows["Van Don District Hospital"]["avoided"] == 0
    assert rows["Central Hospital"]["travel_km"] is None


def test_a_total_below_the_threshold_is_hidden(scenario: Network) -> None:
    body = get(scenario.ministry, "summary/", country="LA").json()

    assert body["counts"]["submitted"] is None  # 3
    assert body["counts"]["avoidance_rate"] is None
    assert body["response_times"]["accept_median_hours"] is None


def test_threshold_is_configurable(scenario: Network, settings: Any) -> None:
    settings.REPORTS_MIN_CELL = 2

    rows = by_label(get(scenario.ministry, "", by="province").json(), "province")

    assert rows["Lao Cai"]["avoided"] == 2
    assert rows["Ha Noi"]["submitted"] is None  # 1


def test_ministry_may_not_drill_down_or_cross_two_dimensions(scenario: Network) -> None:
    drill = get(scenario.ministry, "drilldown/", metric="avoided")
    crossed = get(scenario.ministry, "", by="period,province")

    assert drill.status_code == 403
    assert "referral_ids" not in drill.json()
    assert crossed.status_code == 400


def test_referrer_sees_only_their_facility_unsuppressed(scenario: Network) -> None:
    body = get(scenario.referrer_l1, "summary/").json()

    # Vientiane District Hospital: #8, #13, #19.
    assert body["counts"]["submitted"] == 3
    assert body["counts"]["avoided"] == 2
    assert body["suppression"] is None
    other = get(scenario.referrer_l1, "", facility=str(scenario.d1.pk)).json()
    assert other["total"]["submitted"] == 0


def test_referrer_drills_down_to_their_referral_ids(scenario: Network) -> None:
    response = get(scenario.referrer_l1, "drilldown/", metric="avoided")

    r = scenario.referrals
    assert response.status_code == 200
    assert response.json()["referral_ids"] == sorted([r[8].pk, r[13].pk])
    assert response.json()["count"] == 2 and response.json()["truncated"] is False


def test_a_long_drill_down_says_it_is_truncated(
    scenario: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reports import selectors

    monkeypatch.setattr(selectors, "DRILL_LIMIT", 1)
    body = get(scenario.referrer_l1, "drilldown/", metric="avoided").json()
    r = scenario.referrals
    assert body == {
        "metric": "avoided",
        "count": 2,
        "truncated": True,
        "referral_ids": [min(r[8].pk, r[13].pk)],
    }


def test_consultant_sees_their_departments(scenario: Network) -> None:
    body = get(scenario.consultant_h2, "summary/").json()

    # H2P: #5 (after the forward), #17, #18, #20.
    assert body["counts"]["accepted"] == 2
    assert body["counts"]["declined"] == 1
    assert body["counts"]["avoided"] == 2


def test_coordinator_sees_both_directions_of_their_facility(scenario: Network) -> None:
    body = get(scenario.coordinator_h2, "summary/").json()

    assert body["counts"]["avoided"] == 2  # as hub: #5 and #17


def test_accounts_without_a_reporting_role_are_refused(scenario: Network) -> None:
    assert get(scenario.steward, "summary/").status_code == 403
    # before their filters are read: a refused account learns nothing from a 400
    assert get(scenario.steward, "summary/", tier="9", **{"from": "x"}).status_code == 403
    assert get(scenario.steward, "", by="nonsense").status_code == 403
    web = Client()
    web.force_login(scenario.steward)
    assert web.get("/reports/", {"tier": "9"}).status_code == 403
    assert APIClient().get("/api/v1/reports/summary/").status_code == 401


def test_bad_filters_are_a_400_listing_each_problem(scenario: Network) -> None:
    response = get(scenario.ministry, "", period="fortnight", country="ZZ", tier="9")

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"period", "country", "tier"}


def test_csv_export_marks_hidden_cells(scenario: Network) -> None:
    response = get(scenario.ministry, "", by="province", format="csv")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert 'filename="report-counts.csv"' in response["Content-Disposition"]
    lines = list(csv.reader(io.StringIO(response.content.decode())))
    header = lines[0]
    rows = {line[header.index("province_label")]: line for line in lines[1:-1]}
    assert rows["Lao Cai"][header.index("avoided")] == "suppressed"
    assert rows["Quang Ninh"][header.index("avoided")] == "5"
    assert lines[-1][header.index("avoided")] == "9"


def test_xlsx_export(scenario: Network) -> None:
    response = get(scenario.referrer_l1, "", by="period", format="xlsx")

    assert response.status_code == 200
    sheet = load_workbook(io.BytesIO(response.content)).active
    assert sheet is not None
    values = list(sheet.values)
    header = list(values[0])
    periods = [line[header.index("period")] for line in values[1:-1]]
    assert periods == ["2025-01", "2025-02", "2025-03"]


def test_metric_catalogue(scenario: Network) -> None:
    codes = [m["code"] for m in get(scenario.ministry, "metrics/").json()["rows"]]

    assert "avoided_verified" in codes
    assert "accept_hours" in codes


def test_report_query_count_does_not_grow_with_groups(
    scenario: Network, django_assert_max_num_queries: Any
) -> None:
    client = client_for(scenario.ministry)
    with django_assert_max_num_queries(12):
        client.get("/api/v1/reports/", {"by": "hub"})


# --------------------------------------------------------------------------- found by tests/test_api_fuzz.py


@pytest.mark.parametrize("who", ["ministry", "referrer_d1"])
@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"specialty": "\x00"}, "specialty"),
        ({"country": "V\x00"}, "country"),
        ({"campaign": "c\x00"}, "campaign"),
        ({"to": "9999-12-31"}, "to"),
        ({"from": "0001-01-01"}, "from"),
        ({"facility": str(10**30)}, "facility"),
    ],
)
def test_filters_the_database_or_date_arithmetic_cannot_take_are_400(
    scenario: Network, who: str, params: dict[str, str], field: str
) -> None:
    response = get(getattr(scenario, who), "", **params)

    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/problem+json")
    assert field in response.json()["errors"]


@pytest.mark.parametrize("fmt", ["csv", "xlsx"])
def test_a_report_error_asked_for_as_a_file_is_a_json_problem(scenario: Network, fmt: str) -> None:
    response = get(scenario.ministry, "", cross_border="maybe", format=fmt)

    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/problem+json")
    assert response.json()["errors"] == {"cross_border": "true or false"}
    assert "Content-Disposition" not in response
