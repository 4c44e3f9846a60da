"""Formatting of report figures: a suppressed (None) figure reads "hidden"."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def figure(value: Any, digits: int = 0) -> str:
    if value is None:
        return "hidden"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    if isinstance(value, float):
        return f"{round(value):,}"
    return f"{value:,}" if isinstance(value, int) else str(value)


@register.filter
def hours(value: Any) -> str:
    """Hours with one decimal and their unit; "hidden" alone (no unit after nothing)."""
    return "hidden" if value is None else f"{figure(value, 1)} h"


@register.filter
def percent(value: Any) -> str:
    if value is None:
        return "hidden"
    return f"{value * 100:.1f} %"


@register.filter
def get(row: dict[str, Any], key: str) -> Any:
    return row.get(key)
