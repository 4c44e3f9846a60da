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
def percent(value: Any) -> str:
    if value is None:
        return "hidden"
    return f"{value * 100:.1f} %"


@register.filter
def get(row: dict[str, Any], key: str) -> Any:
    return row.get(key)
