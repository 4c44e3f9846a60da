"""Server-side SVG charts for the dashboard: no JavaScript, readable without colour.

Series differ by fill pattern (solid, diagonal hatching, dots) as well as shade, every bar
carries its value as text, and each chart has a legend and a <title>/<desc>. A hidden
(suppressed) value is drawn as no bar with the label "hidden", a value that does not
exist (no data) as no bar with "—".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PATTERNS = ("solid", "hatch", "dots")
DEFS = (
    '<defs><pattern id="{uid}-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
    'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
    '<line x1="0" y1="0" x2="0" y2="6" stroke="#123c69" stroke-width="3"/></pattern>'
    '<pattern id="{uid}-dots" width="5" height="5" patternUnits="userSpaceOnUse">'
    '<rect width="5" height="5" fill="#fff"/><circle cx="2.5" cy="2.5" r="1.4" fill="#555"/>'
    "</pattern></defs>"
)


def _fill(uid: str, pattern: str) -> str:
    if pattern == "solid":
        return "#123c69"
    return f"url(#{uid}-{pattern})"


@dataclass(frozen=True)
class Series:
    """``values``: None where there is no bar; ``hidden``: the indexes of those Nones
    that suppression hid (the others are no data)."""

    name: str
    values: Sequence[float | int | None]
    hidden: frozenset[int] = frozenset()

    def label(self, index: int, unit: str = "") -> str:
        if index in self.hidden:
            return "hidden"
        return _fmt(self.values[index], unit)


def _fmt(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}{unit}"
    return f"{int(value):,}{unit}"


def _legend(uid: str, series: Sequence[Series], y: int) -> str:
    parts = []
    x = 10
    for i, s in enumerate(series):
        fill = _fill(uid, PATTERNS[i % len(PATTERNS)])
        parts.append(
            f'<rect x="{x}" y="{y}" width="14" height="14" fill="{fill}" stroke="#123c69"/>'
            f'<text x="{x + 20}" y="{y + 12}" font-size="12">{escape(s.name)}</text>'
        )
        x += 30 + 8 * len(s.name)
    return "".join(parts)


def column_chart(
    uid: str, title: str, categories: Sequence[str], series: Sequence[Series]
) -> SafeString:
    """Grouped vertical bars, one group per category (e.g. periods)."""
    width_per_group = max(28 * len(series) + 16, 60)
    width = max(60 + width_per_group * len(categories), 360)
    height, top, bottom = 260, 30, 200
    values = [v for s in series for v in s.values if v is not None]
    peak = max(values or [0]) or 1
    out = [
        f'<svg role="img" aria-labelledby="{uid}-t {uid}-d" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
        f'class="chart" id="{uid}">',
        f'<title id="{uid}-t">{escape(title)}</title>',
        f'<desc id="{uid}-d">{escape(title)}: '
        + escape(
            "; ".join(
                f"{s.name} " + ", ".join(f"{c} {s.label(i)}" for i, c in enumerate(categories))
                for s in series
            )
        )
        + "</desc>",
        DEFS.format(uid=uid),
        f'<line x1="40" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="#333"/>',
    ]
    bar = 24
    for g, category in enumerate(categories):
        x0 = 50 + g * width_per_group
        for i, s in enumerate(series):
            value = s.values[g]
            x = x0 + i * (bar + 4)
            if value is not None:
                h = (bottom - top) * (value / peak)
                fill = _fill(uid, PATTERNS[i % len(PATTERNS)])
                out.append(
                    f'<rect x="{x}" y="{bottom - h:.1f}" width="{bar}" height="{h:.1f}" '
                    f'fill="{fill}" stroke="#123c69"><title>{escape(s.name)}, '
                    f"{escape(category)}: {s.label(g)}</title></rect>"
                )
            y = bottom - ((bottom - top) * (value / peak) if value else 0) - 4
            out.append(
                f'<text x="{x + bar / 2}" y="{y:.1f}" font-size="10" '
                f'text-anchor="middle">{s.label(g)}</text>'
            )
        out.append(
            f'<text x="{x0 + (len(series) * (bar + 4)) / 2}" y="{bottom + 16}" '
            f'font-size="11" text-anchor="middle">{escape(category)}</text>'
        )
    out.append(_legend(uid, series, height - 24))
    out.append("</svg>")
    return mark_safe("".join(out))  # noqa: S308  (every text above is escaped)


def bar_chart(
    uid: str,
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    unit: str = "",
) -> SafeString:
    """Horizontal bars, one row per category (provinces, hubs, specialties)."""
    row_height = 16 * len(series) + 10
    label_width = 230
    width = 640
    height = 30 + row_height * max(len(categories), 1) + 30
    values = [v for s in series for v in s.values if v is not None]
    peak = max(values or [0]) or 1
    span = width - label_width - 90
    out = [
        f'<svg role="img" aria-labelledby="{uid}-t" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
        f'class="chart" id="{uid}">',
        f'<title id="{uid}-t">{escape(title)}</title>',
        DEFS.format(uid=uid),
    ]
    for r, category in enumerate(categories):
        y0 = 20 + r * row_height
        out.append(
            f'<text x="{label_width - 6}" y="{y0 + row_height / 2}" font-size="12" '
            f'text-anchor="end">{escape(category[:36])}</text>'
        )
        for i, s in enumerate(series):
            value = s.values[r]
            y = y0 + i * 16
            w = span * ((value or 0) / peak)
            if value is not None:
                fill = _fill(uid, PATTERNS[i % len(PATTERNS)])
                out.append(
                    f'<rect x="{label_width}" y="{y}" width="{w:.1f}" height="13" '
                    f'fill="{fill}" stroke="#123c69"><title>{escape(s.name)}, '
                    f"{escape(category)}: {s.label(r, unit)}</title></rect>"
                )
            out.append(
                f'<text x="{label_width + w + 4:.1f}" y="{y + 11}" font-size="11">'
                f"{escape(s.name)}: {s.label(r, unit)}</text>"
            )
    out.append(_legend(uid, series, height - 22))
    out.append("</svg>")
    return mark_safe("".join(out))  # noqa: S308  (every text above is escaped)
