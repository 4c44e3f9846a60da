from __future__ import annotations

from reports.suppression import suppress_table


def test_primary_and_complementary() -> None:
    rows = [{"n": 10}, {"n": 3}, {"n": 7}, {"n": 0}]
    total = {"n": 20}

    suppress_table(rows, total, counts=["n"], derived={"rate": ["n"]}, min_cell=5)

    assert [r["n"] for r in rows] == [10, None, None, 0]
    assert total["n"] == 20
    assert rows[2]["suppressed"] == ["n", "rate"]


def test_total_hidden_when_no_complement_exists() -> None:
    rows = [{"n": 3}, {"n": 0}]
    total = {"n": 3}

    suppress_table(rows, total, counts=["n"], derived={}, min_cell=5)

    assert rows[0]["n"] is None and total["n"] is None


def test_one_visible_large_cell_becomes_the_complement() -> None:
    rows = [{"n": 40}, {"n": 1}]
    total = {"n": 41}

    suppress_table(rows, total, counts=["n"], derived={}, min_cell=5)

    assert rows[0]["n"] is None and rows[1]["n"] is None and total["n"] == 41
