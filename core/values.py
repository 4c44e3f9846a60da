"""Checks of raw values that several input paths share (REST, FHIR, reports)."""

from __future__ import annotations

from datetime import UTC, datetime

# Dates and instants accepted anywhere: period and interval arithmetic stays inside
# Python's and PostgreSQL's ranges, and every stored instant renders in UTC.
FIRST_YEAR, LAST_YEAR = 1900, 2999


def ascii_digits(text: str) -> bool:
    """Only the digits 0-9 (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def year_supported(moment: datetime) -> bool:
    """Whether an aware instant lies in FIRST_YEAR..LAST_YEAR in UTC (one past year 9999
    in UTC, e.g. 9999-12-31T23:59-14:00, is not)."""
    try:
        year = moment.astimezone(UTC).year
    except OverflowError:
        return False
    return FIRST_YEAR <= year <= LAST_YEAR
