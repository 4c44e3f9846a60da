"""Formatting of report figures. A figure hidden by suppression reads "hidden"; a figure
that does not exist (a rate without a denominator, a median of nothing) reads "—", as
the files leave it empty. Both are None in the data: ``cell`` tells them apart through
the row's ``suppressed`` list."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()

NO_DATA = "—"


class Hidden:
    """A suppressed figure (``row|cell:"name"``)."""

    def __str__(self) -> str:
        return "hidden"


HIDDEN = Hidden()


@register.filter
def cell(row: dict[str, Any], key: str) -> Any:
    """The row's figure, or HIDDEN when suppression hid it (None then means no data)."""
    if key in row.get("suppressed", ()):
        return HIDDEN
    return row.get(key)


@register.filter
def figure(value: Any, digits: int = 0) -> str:
    if value is HIDDEN:
        return "hidden"
    if value is None:
        return NO_DATA
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    if isinstance(value, float):
        return f"{round(value):,}"
    return f"{value:,}" if isinstance(value, int) else str(value)


@register.filter
def unit(text: str, name: str) -> str:
    """A formatted figure and its unit; "hidden" or "—" alone (no unit after nothing)."""
    return text if text in ("hidden", NO_DATA) else f"{text} {name}"


@register.filter
def hours(value: Any) -> str:
    """Hours with one decimal and their unit."""
    return unit(figure(value, 1), "h")


@register.filter
def percent(value: Any) -> str:
    if value is HIDDEN or value is None:
        return figure(value)
    return f"{value * 100:.1f} %"


@register.filter
def get(row: dict[str, Any], key: str) -> Any:
    return row.get(key)
