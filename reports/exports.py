"""CSV and XLSX renderings of report tables (DRF renderers: ``?format=csv|xlsx``).

A table is ``{"rows": [...], "total": {...}}``; the total becomes the last line, labelled
TOTAL. A suppressed value is written as the text ``suppressed`` so a spreadsheet never
mistakes it for zero. Text is never a formula: names and campaigns are typed by users, so
a CSV cell that a spreadsheet would read as one (starting with ``= + - @``, a tab or a
carriage return) is written with a leading apostrophe (OWASP's advice for CSV injection),
and XLSX cells holding text are typed as text.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from rest_framework.renderers import BaseRenderer

SUPPRESSED = "suppressed"


def table_lines(data: Any) -> list[list[Any]]:
    """Header + lines for a report table (or key/value lines for anything else)."""
    if not isinstance(data, dict):
        return [["value"], [data]]
    rows: list[dict[str, Any]] | None = data.get("rows")
    if rows is None:  # a summary: name/value lines, section by section
        sections = [
            section
            for section in (data.get("counts"), data.get("response_times"))
            if isinstance(section, dict)
        ] or [data]
        lines: list[list[Any]] = [["name", "value"]]
        for section in sections:
            lines.extend([k, _value(section, k)] for k in section if k != "suppressed")
        if "percentiles" in data:  # how the medians and p90s were computed
            lines.append(["percentiles", data["percentiles"]])
        return lines
    total = data.get("total")
    everything = [*rows, *([total] if total else [])]
    columns: list[str] = []
    for row in everything:
        for key in row:
            if key not in columns and key != "suppressed":
                columns.append(key)
    lines = [columns]
    for row in rows:
        lines.append([_value(row, c) for c in columns])
    if total:
        # The grouping and label columns (which come after the figures) are the ones the
        # total has no value for: they read TOTAL.
        lines.append([_value(total, c) if c in total else "TOTAL" for c in columns])
    return lines


def _value(row: dict[str, Any], column: str) -> Any:
    if column in row.get("suppressed", ()):
        return SUPPRESSED
    return _cell(row.get(column, ""))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return str(value)
    return value


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class CSVRenderer(BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerows([[_csv_text(cell) for cell in line] for line in table_lines(data)])
        return buffer.getvalue().encode("utf-8")


def _xlsx_text(value: str) -> str:
    """A text as a worksheet can hold it: XML 1.0 has no C0 control characters other than
    tab and line ends, and openpyxl raised for them (a campaign typed with one made every
    export grouped by campaign a 500). Each becomes U+FFFD, so the label stays visibly odd."""
    return ILLEGAL_CHARACTERS_RE.sub("\ufffd", value)


class XLSXRenderer(BaseRenderer):
    media_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    format = "xlsx"
    charset = None
    render_style = "binary"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        workbook = Workbook()
        sheet = workbook.active
        assert sheet is not None
        sheet.title = "report"
        for row, line in enumerate(table_lines(data), start=1):
            for column, value in enumerate(line, start=1):
                if isinstance(value, str):
                    value = _xlsx_text(value)
                cell = sheet.cell(row=row, column=column, value=value)
                if isinstance(value, str):
                    cell.data_type = "s"  # openpyxl would store "=…" as a formula
        buffer = io.BytesIO()
        workbook.save(buffer)
        return buffer.getvalue()
