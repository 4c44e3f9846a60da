"""Tester's findings on the reports app: the total line of the files, tier order,
"hidden" only for what is hidden, the histogram note, input handling."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from openpyxl import load_workbook

from accounts.models import User
from reports.tests.scenario import Network, get

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
