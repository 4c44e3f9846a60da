"""Tester's findings on the reports app: the total line of the files, tier order,
"hidden" only for what is hidden, the histogram note, input handling."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from openpyxl import load_workbook

from accounts.models import User
from registry.models import Facility
from reports.services import reports_catch_up
from reports.tests.scenario import Driver, Network, at, build_network, get

pytestmark = pytest.mark.django_db


def superuser() -> User:
    return User.objects.create_superuser(username="root-fixes", password="pw-fixes-1")


def _csv(response: Any) -> list[list[str]]:
    assert response.status_code == 200, response.content
    return list(csv.reader(io.StringIO(response.content.decode())))


def test_the_csv_total_line_is_labelled_total(scenario: Network) -> None:
    """The grouping columns come after the figures: they read TOTAL (they were empty)."""
    lines = _csv(get(scenario.ministry, "", by="country", format="csv"))
    total = dict(zip(lines[0], lines[-1], strict=True))

    assert total["country"] == "TOTAL" and total["country_label"] == "TOTAL"
    assert total["avoided"] == "9"
    assert [line[lines[0].index("country")] for line in lines[1:-1]] == [
        str(scenario.la.pk),
        str(scenario.vn.pk),
    ]


def test_the_response_times_files_label_their_total(scenario: Network) -> None:
    root = superuser()
    lines = _csv(get(root, "response-times/", by="tier", format="csv"))
    total = dict(zip(lines[0], lines[-1], strict=True))
    assert (total["tier"], total["tier_label"], total["accept_n"]) == ("TOTAL", "TOTAL", "15")

    sheet = load_workbook(
        io.BytesIO(get(root, "response-times/", by="tier", format="xlsx").content)
    )
    assert sheet.active is not None
    rows = list(sheet.active.values)
    last = dict(zip(rows[0], rows[-1], strict=True))
    assert (last["tier"], last["tier_label"], last["accept_n"]) == ("TOTAL", "TOTAL", 15)


def test_tier_rows_come_in_tier_order(scenario: Network) -> None:
    """Central (1: H1's counter-referral), District (3: D1, L1), Commune (4: C1) — not
    the labels' alphabetical Central, Commune, District."""
    rows = get(superuser(), "", by="tier").json()["rows"]

    assert [(r["tier"], r["tier_label"], r["submitted"]) for r in rows] == [
        (1, "Central / national", 1),
        (3, "District", 14),
        (4, "Commune / primary", 6),
    ]


@pytest.mark.parametrize("day", ["2025-W05", "20250101", "2025-W05-1"])
def test_only_yyyy_mm_dd_dates_are_accepted(scenario: Network, day: str) -> None:
    """date.fromisoformat takes ISO week and basic forms; the API says YYYY-MM-DD."""
    response = get(scenario.ministry, "summary/", **{"from": day})

    assert response.status_code == 400
    assert response.json()["errors"] == {"from": "a date YYYY-MM-DD"}


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("province", "١٢"),
        ("hub", "١٢"),
        ("facility", "\uff11"),  # fullwidth 1
        ("tier", "\uff13"),  # fullwidth 3
        ("province", " 1"),
        ("hub", "1_0"),
        ("tier", " 3"),
    ],
)
def test_ids_are_ascii_digits(scenario: Network, name: str, raw: str) -> None:
    """int() takes Arabic-Indic and fullwidth digits, spaces and underscores."""
    response = get(scenario.ministry, "summary/", **{name: raw})

    assert response.status_code == 400
    assert set(response.json()["errors"]) == {name}


@pytest.mark.parametrize("path", ["", "summary/", "response-times/", "capacity/"])
def test_an_unknown_format_is_a_400_naming_the_formats(scenario: Network, path: str) -> None:
    response = get(scenario.ministry, path, format="pdf")

    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["errors"] == {"format": "json, csv or xlsx"}


def test_an_unknown_format_still_answers_who_may_not_see_reports_first(
    scenario: Network,
) -> None:
    response = get(scenario.steward, "summary/", format="pdf")

    assert response.status_code == 403


def test_the_no_province_and_not_routed_rows_can_be_filtered_on(report_settings: Any) -> None:
    """ "(no province)" and "(not routed)" are rows (id 0) of the by= tables: 0 filters on
    them (it was a 400). C1 without a province submits two referrals."""
    net = build_network()
    Facility.objects.filter(pk=net.c1.pk).update(province=None)
    net.c1.refresh_from_db()
    driver = Driver(net)
    driver.submit(1, net.c1, net.paeds, net.h1p, "p1", at("2025-01-06"))
    driver.submit(2, net.c1, net.paeds, net.h1p, "p2", at("2025-01-07"))
    driver.submit(3, net.d1, net.paeds, net.h1p, "p3", at("2025-01-08"))
    reports_catch_up()
    root = superuser()
    rows = {
        r["province_label"]: r["submitted"] for r in get(root, "", by="province").json()["rows"]
    }
    assert rows == {"(no province)": 2, "Quang Ninh": 1}

    no_province = get(root, "summary/", province="0")
    not_routed = get(root, "summary/", hub="0")

    assert no_province.status_code == 200, no_province.content
    assert no_province.json()["counts"]["submitted"] == 2
    assert not_routed.status_code == 200, not_routed.content
    assert not_routed.json()["counts"]["submitted"] == 0  # every referral here was routed
    # the drill-down's own filter (over the referrals, not the tables) too
    drill = get(net.referrer_c1, "drilldown/", metric="submitted", province="0").json()
    assert drill["referral_ids"] == sorted(net.referrals[n].pk for n in (1, 2))
