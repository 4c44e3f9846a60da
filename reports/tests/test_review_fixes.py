"""Tester's findings on the reports app: the total line of the files, tier order,
"hidden" only for what is hidden, the histogram note, input handling."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import pytest
from django.test import Client
from openpyxl import load_workbook

from accounts.models import User
from registry.models import Country, Facility
from reports import charts
from reports.fhir import measure_report_data
from reports.selectors import filters_parse
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


def _cards(user: User, **params: str) -> dict[str, str]:
    """The dashboard's headline cards: metric -> the text of its value."""
    client = Client()
    client.force_login(user)
    response = client.get("/reports/", params)
    assert response.status_code == 200
    return dict(CARD.findall(response.content.decode()))


CARD = re.compile(r'data-metric="(\w+)"><div class="value">([^<]*)</div>')


def test_the_dashboard_says_no_data_where_nothing_is_hidden(scenario: Network) -> None:
    """A referrer (never suppressed) in a month without referrals: the rates and medians
    do not exist — "—", not "hidden"."""
    cards = _cards(scenario.referrer_l1, **{"from": "2024-01-01", "to": "2024-01-31"})

    assert cards["submitted"] == "0"
    assert cards["avoidance_rate"] == "—"
    assert cards["sla_share"] == "—"
    assert cards["accept_median_hours"] == "—"
    assert "hidden" not in cards.values()


def test_the_ministry_dashboard_tells_hidden_from_no_data(scenario: Network) -> None:
    """A country without referrals: 0 avoided and no rate ("—"); LA: small, hidden; the
    hidden km and cost carry no unit."""
    Country.objects.create(code="KH", name="Cambodia")

    cambodia = _cards(scenario.ministry, country="KH")
    laos = _cards(scenario.ministry, country="LA")

    assert (cambodia["avoided"], cambodia["avoidance_rate"]) == ("0", "—")
    assert (cambodia["travel_km"], cambodia["travel_cost"]) == ("0 km", "0 USD")
    assert (laos["submitted"], laos["avoidance_rate"]) == ("hidden", "hidden")
    assert (laos["travel_km"], laos["travel_cost"]) == ("hidden", "hidden")


def test_a_chart_labels_no_data_apart_from_hidden() -> None:
    svg = charts.bar_chart(
        "c", "t", ["a", "b"], [charts.Series("Median", [None, None], frozenset({1}))]
    )

    assert "Median: —" in svg and "Median: hidden" in svg
    assert svg.count("hidden") == 1


def test_the_fhir_hook_says_which_figures_are_hidden(scenario: Network) -> None:
    """Avoidance rate by hub: D1 (hub of the counter-referral) has nothing considered, so
    no rate (not-applicable); H2's 2 avoided are hidden (masked)."""
    filters = filters_parse({"by": "hub", "from": "2025-01-01", "to": "2025-12-31"})
    data = measure_report_data(scenario.ministry, filters)
    [rate] = [g for g in data["groups"] if g["measure"].endswith(":avoidance_rate")]
    strata = {s["stratum"]["hub"]: s for s in rate["strata"]}

    assert strata["Van Don District Hospital"] == {
        "stratum": {"hub": "Van Don District Hospital"},
        "value": None,
        "suppressed": False,
    }
    assert strata["Quang Ninh Provincial Hospital"]["suppressed"] is True


def test_the_summary_says_how_its_percentiles_were_computed(scenario: Network) -> None:
    """Ministry, whole months: histogram estimates, said in the JSON, the file and on the
    dashboard; a referrer gets exact figures and no note."""
    window = {"from": "2025-01-01", "to": "2025-03-31"}
    assert get(scenario.ministry, "summary/", **window).json()["percentiles"] == "histogram"
    assert get(scenario.referrer_d1, "summary/", **window).json()["percentiles"] == "exact"
    lines = _csv(get(scenario.ministry, "summary/", format="csv", **window))
    assert lines[-1] == ["percentiles", "histogram"]

    client = Client()
    client.force_login(scenario.ministry)
    assert 'id="histogram-note"' in client.get("/reports/", window).content.decode()
    client.force_login(scenario.referrer_d1)
    assert 'id="histogram-note"' not in client.get("/reports/", window).content.decode()
