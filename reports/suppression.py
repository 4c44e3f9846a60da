"""Small-cell suppression for aggregate views (ministry accounts).

Rules (docs/metrics.md, "Suppression"):

1. Primary: a count c with 0 < c < REPORTS_MIN_CELL is hidden. Zeros are shown (a zero
   singles out nobody).
2. Complementary: in a table with a total, a column with exactly one hidden cell would let
   anyone compute it as total - visible cells. Then the smallest visible non-zero cell of
   that column is hidden too; when there is none, the total is hidden. The same holds
   along each ``lines`` grouping of the rows (a table whose margins other queries
   publish: the rows of one line sum to a published figure), where, with no non-zero
   cell left to hide, a zero is hidden (the published sum then splits between two
   unknowns).
3. Within a row: where one count is the sum of others (``relations``: sla_due = accepted
   + declined + expired), exactly one hidden member is hidden with another (the smallest
   visible non-zero part, else the whole). Rules 2 and 3 repeat until neither hides more.
4. Derived figures (rates, km, cost, percentiles) are hidden in every row where one of
   the counts they depend on is hidden; a ``weighted`` figure of the total (km: the
   avoided transfers times public distances) is hidden when any row hides its count, as
   it is one more equation in the hidden cells.
Complements of filters (docs rule 6; ``hide_small_complements``, applied before 1-4):
a filtered figure is hidden when the same figure with one filter dropped, minus it,
is a small count (that difference is a cell of the table the filter cuts out).

A hidden value becomes None and its name is listed in the row's ``suppressed``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
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
    relations: Sequence[tuple[str, Sequence[str]]] = (),
    weighted: Mapping[str, str] | None = None,
    lines: Sequence[Callable[[Row], Hashable]] = (),
) -> None:
    """Suppress in place. ``counts``: count columns; ``derived``: column -> the counts it
    is hidden with; ``relations``: (whole, parts) with whole = sum(parts) in every row;
    ``weighted``: a total's column -> the count it weighs; ``lines``: keys grouping the
    rows into lines whose sums are published elsewhere."""
    if min_cell <= 1:
        return
    everything = [*rows, *([total] if total is not None else [])]
    for column in counts:
        for row in everything:
            value = row.get(column)
            if value is not None and 0 < value < min_cell:
                _hide(row, column)
    by_lines: list[list[list[Row]]] = []
    for line_of in lines:
        by_line: dict[Hashable, list[Row]] = {}
        for row in rows:
            by_line.setdefault(line_of(row), []).append(row)
        by_lines.append(list(by_line.values()))
    changed = True
    while changed:
        changed = False
        for column in counts:
            changed |= _complement(rows, total, column)
            for lines_ in by_lines:
                for line in lines_:
                    changed |= _complement(line, None, column)
        for row in everything:
            for whole, parts in relations:
                changed |= _complement_within(row, whole, parts)
    for column, depends_on in derived.items():
        for row in everything:
            if any(_is_hidden(row, dep) for dep in depends_on):
                _hide(row, column)
    if total is not None:
        for column, count in (weighted or {}).items():
            if any(_is_hidden(row, count) for row in rows):
                _hide(total, column)


def hide_small_complements(
    rows: Sequence[Row],
    total: Row | None,
    broader: Sequence[tuple[Sequence[Row], Row | None]],
    *,
    key: Callable[[Row], Hashable],
    counts: Sequence[str],
    min_cell: int,
) -> None:
    """Docs rule 6, before ``suppress_table``: ``broader`` holds the same table computed with
    one filter dropped (one entry per filter, its rows matched to ``rows`` by ``key``).
    A filtered count c whose broader count b gives a complement 0 < b - c < min_cell is
    hidden: b is published by the query without that filter, so showing c would publish
    b - c. A zero stays shown (then b - c = b, which that other query suppresses itself)."""
    if min_cell <= 1:
        return
    for broader_rows, broader_total in broader:
        by_key = {key(r): r for r in broader_rows}
        pairs: list[tuple[Row, Row | None]] = [(row, by_key.get(key(row))) for row in rows]
        if total is not None:
            pairs.append((total, broader_total))
        for row, wider in pairs:
            if wider is None:
                continue
            for column in counts:
                value, whole = row.get(column), wider.get(column)
                if not value or whole is None or _is_hidden(row, column):
                    continue
                if 0 < whole - value < min_cell:
                    _hide(row, column)


def _complement(rows: Sequence[Row], total: Row | None, column: str) -> bool:
    """Rule 2 for one column of ``rows`` (summing to ``total``; a line's sum published by
    another query when None). True when it hid something."""
    if total is not None and _is_hidden(total, column):
        return False
    if sum(_is_hidden(r, column) for r in rows) != 1:
        return False
    visible = [r for r in rows if not _is_hidden(r, column)]
    candidates = [r for r in visible if (r.get(column) or 0) > 0]
    if candidates:
        _hide(min(candidates, key=lambda r: r[column]), column)
        return True
    if total is not None:
        _hide(total, column)
        return True
    if visible:
        # Only zeros left beside it: a line's sum is published, so hide a zero too (the
        # sum then splits between two unknowns).
        _hide(visible[0], column)
        return True
    return False  # the line's sum is the hidden cell itself: primary suppression hides it


def _complement_within(row: Row, whole: str, parts: Sequence[str]) -> bool:
    """Rule 3 for one relation of one row. True when it hid something."""
    members = [whole, *parts]
    if sum(_is_hidden(row, m) for m in members) != 1:
        return False
    candidates = [p for p in parts if not _is_hidden(row, p) and (row.get(p) or 0) > 0]
    if candidates:
        _hide(row, min(candidates, key=lambda p: row[p]))
        return True
    if not _is_hidden(row, whole):
        _hide(row, whole)
        return True
    visible = [p for p in parts if not _is_hidden(row, p)]
    if visible:  # the whole is hidden and the parts left are zeros: hide one of them
        _hide(row, visible[0])
        return True
    return False
