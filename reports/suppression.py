"""Small-cell suppression for aggregate views (ministry accounts).

Rules (docs/metrics.md, "Suppression"):

1. Primary: a count c with 0 < c < REPORTS_MIN_CELL is hidden. Zeros are shown (a zero
   singles out nobody).
2. Complementary: in a table with a total, a column with exactly one hidden cell would let
   anyone compute it as total - visible cells. Then the smallest visible non-zero cell of
   that column is hidden too; when there is none, the total is hidden.
3. Derived figures (rates, km, cost, percentiles) are hidden in every row where one of
   the counts they depend on is hidden.

A hidden value becomes None and its name is listed in the row's ``suppressed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Row = dict[str, Any]


def _hide(row: Row, column: str) -> None:
    row[column] = None
    hidden = row.setdefault("suppressed", [])
    if column not in hidden:
        hidden.append(column)


def _is_hidden(row: Row, column: str) -> bool:
    return column in row.get("suppressed", ())


def suppress_table(
    rows: Sequence[Row],
    total: Row | None,
    *,
    counts: Sequence[str],
    derived: Mapping[str, Sequence[str]],
    min_cell: int,
) -> None:
    """Suppress in place. ``counts``: count columns; ``derived``: column -> the counts it
    is hidden with."""
    if min_cell <= 1:
        return
    everything = [*rows, *([total] if total is not None else [])]
    for column in counts:
        for row in everything:
            value = row.get(column)
            if value is not None and 0 < value < min_cell:
                _hide(row, column)
        if total is None or _is_hidden(total, column):
            continue
        while sum(_is_hidden(r, column) for r in rows) == 1 and not _is_hidden(total, column):
            candidates = [r for r in rows if not _is_hidden(r, column) and (r.get(column) or 0) > 0]
            if candidates:
                _hide(min(candidates, key=lambda r: r[column]), column)
            else:
                _hide(total, column)
    for column, depends_on in derived.items():
        for row in everything:
            if any(_is_hidden(row, dep) for dep in depends_on):
                _hide(row, column)
