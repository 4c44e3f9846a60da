"""Suppression rule 6: a filter must not publish, by difference with the same query
without it, a small count of what it cut away (docs/metrics.md, "Small-cell
suppression"). The scenario's Lao requesters (#8, #13, #19) have 3 referrals, 2 of them
avoided transfers; the network has 21 referrals and 9 avoided transfers."""

from __future__ import annotations

from typing import Any

import pytest

from reports.models import ReferralFact
from reports.tests.scenario import Network, get

pytestmark = pytest.mark.django_db


def test_a_country_filter_does_not_reveal_the_other_country(
    scenario: Network, django_user_model: Any
) -> None:
    by_country = get(scenario.ministry, "", by="country").json()
    assert by_country["total"]["avoided"] == 9
    assert [r["avoided"] for r in by_country["rows"]] == [None, None]  # LA 2, VN 7

    counts = get(scenario.ministry, "summary/", country="VN").json()["counts"]

    # 9 - 7 would be LA's 2: the filtered figure is hidden, and what derives from it.
    assert counts["avoided"] is None
    assert {"avoided", "avoidance_rate", "travel_km", "travel_cost"} <= set(counts["suppressed"])
    assert counts["avoidance_rate"] is None and counts["travel_km"] is None
    # Rule 5 is part of the suppression of aggregate-only accounts, nobody else's.
    root = django_user_model.objects.create_superuser(username="root-c", password="pw-c-1")
    assert get(root, "summary/", country="VN").json()["counts"]["avoided"] == 7


def test_a_border_filter_does_not_reveal_the_other_side(scenario: Network) -> None:
    counts = get(scenario.ministry, "summary/", cross_border="false").json()["counts"]

    assert counts["avoided"] is None  # 9 - 7 would be the 2 cross-border ones


def test_a_large_complement_leaves_the_figure_shown(scenario: Network) -> None:
    """District requesters (D1, L1): 14 of the 21 referrals (7 cut away: shown), 7 of the
    9 avoided transfers (2 cut away, C1's #11 and #17: hidden)."""
    counts = get(scenario.ministry, "summary/", tier="3").json()["counts"]

    assert counts["submitted"] == 14
    assert counts["avoided"] is None
    assert "submitted" not in counts["suppressed"]


def test_a_grouped_table_under_a_filter_protects_its_cells_and_total(scenario: Network) -> None:
    """Avoided by specialty: paediatrics 8 (2 of them LA), cardiology 1. Under country=VN
    paediatrics 6 would give LA's 2 against the unfiltered table, and the total 7 too."""
    body = get(scenario.ministry, "", by="specialty", country="VN").json()

    rows = {r["specialty_label"]: r for r in body["rows"]}
    assert rows["Pediatric specialty"]["avoided"] is None
    assert rows["Cardiology"]["avoided"] is None
    assert body["total"]["avoided"] is None
    assert body["total"]["travel_km"] is None


def test_response_time_counts_are_protected_the_same_way(scenario: Network) -> None:
    """15 referrals accepted, 3 of them from LA: VN's 12 would give LA's 3."""
    assert ReferralFact.objects.filter(accept_seconds__isnull=False).count() == 15
    times = get(scenario.ministry, "summary/", country="VN").json()["response_times"]

    assert times["accept_n"] is None
    assert times["accept_median_hours"] is None


def test_the_csv_export_writes_the_protected_figure_suppressed(scenario: Network) -> None:
    response = get(scenario.ministry, "summary/", country="VN", format="csv")

    lines = dict(line.split(",", 1) for line in response.content.decode().splitlines())
    assert lines["avoided"] == "suppressed"
