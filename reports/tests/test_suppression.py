from __future__ import annotations

from typing import Any

from reports.suppression import hide_small_complements, suppress_table


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


LINES = [
    lambda r: (r["facility"], r["period"]),
    lambda r: (r["specialty"], r["period"]),
    lambda r: (r["facility"], r["specialty"]),
]


def test_a_complement_is_never_alone_in_a_line_whose_sum_is_published() -> None:
    """F1/S1 = 2 is hidden (rule 1), so F1/S2 = 10 is hidden with it along F1's line; along
    S2's line F1/S2 would then be the only hidden cell beside a zero, and the S2 sum (10,
    published by another query) would give it away, and F1/S1 with it (F1's sum 12 - 10):
    the zero is hidden too, and so on until no line has a lone hidden cell."""
    rows: list[dict[str, Any]] = [
        {"facility": "F1", "specialty": "S1", "period": "P", "n": 2},
        {"facility": "F1", "specialty": "S2", "period": "P", "n": 10},
        {"facility": "F2", "specialty": "S1", "period": "P", "n": 20},
        {"facility": "F2", "specialty": "S2", "period": "P", "n": 0},
    ]
    suppress_table(rows, None, counts=["n"], derived={}, min_cell=5, lines=LINES)
    for line_of in LINES[:2]:
        lines: dict[object, list[dict[str, Any]]] = {}
        for row in rows:
            lines.setdefault(line_of(row), []).append(row)
        for line in lines.values():
            assert sum("n" in r.get("suppressed", ()) for r in line) != 1, line


def test_a_relation_whose_parts_are_zeros_ends() -> None:
    """sla_due hidden by rule 1 beside parts that are all zeros (data that breaks the
    relation): the loop still ends."""
    row = {"sla_due": 3, "accepted": 0, "declined": 0, "expired": 0}
    suppress_table(
        [row],
        None,
        counts=["sla_due"],
        derived={},
        min_cell=5,
        relations=[("sla_due", ("accepted", "declined", "expired"))],
    )
    assert row["sla_due"] is None


def test_a_small_complement_of_a_filter_hides_the_filtered_cell() -> None:
    """Rule 6: the broader table (one filter dropped) minus the filtered one is the part
    the filter cut away; 12 - 10 = 2 would be published, 30 - 20 = 10 may be, and a zero
    reveals nothing the broader query does not suppress itself."""
    rows = [{"g": "a", "n": 10}, {"g": "b", "n": 20}, {"g": "c", "n": 0}]
    total = {"n": 30}
    broader = [{"g": "a", "n": 12}, {"g": "b", "n": 30}, {"g": "c", "n": 3}]

    hide_small_complements(
        rows, total, [(broader, {"n": 45})], key=lambda r: r["g"], counts=["n"], min_cell=5
    )

    assert [r["n"] for r in rows] == [None, 20, 0]
    assert rows[0]["suppressed"] == ["n"]
    assert total == {"n": 30}  # 45 - 30 = 15
