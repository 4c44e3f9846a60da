"""Checks of raw values that several input paths share (REST, FHIR, reports)."""

from __future__ import annotations

from datetime import UTC, datetime

# Dates and instants accepted anywhere: period and interval arithmetic stays inside
# Python's and PostgreSQL's ranges, and every stored instant renders in UTC.
FIRST_YEAR, LAST_YEAR = 1900, 2999


def ascii_digits(text: str) -> bool:
    """Only the digits 0-9 (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def declared_length(text: str) -> int | None:
    """A Content-Length header: its number, 0 when absent, None when it is not ASCII digits
    or has more than 19 of them (``int`` takes " 12", "1_2" and "١٢", and raises past
    4,300 digits; Django then reads no body at all)."""
    return digits_int(text) if text else 0


def digits_int(text: str, max_digits: int = 19) -> int | None:
    """The number written in ASCII digits, at most ``max_digits`` of them; None otherwise
    (``int`` takes "²" and fullwidth digits, and raises past 4,300 digits)."""
    if len(text) > max_digits or not ascii_digits(text):
        return None
    return int(text)


def written_int(text: str, max_digits: int = 19) -> int | None:
    """The number ``text`` is when written as we write numbers (``str(n)``): ASCII digits
    without a leading zero, at most ``max_digits``; None otherwise. For a number inside an
    id (``Organization/7``, ``…-att-7``): ids are strings, so ``07`` is not ``7``."""
    number = digits_int(text, max_digits)
    return number if number is not None and str(number) == text else None


def row_id(value: object) -> int | None:
    """A primary key given as an int or a string of ASCII digits, in bigint range; None
    for anything else (a bool, a float, "²" or a fullwidth digit, which ``int`` takes)."""
    if isinstance(value, str):
        value = digits_int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63:
        return value
    return None


def year_supported(moment: datetime) -> bool:
    """Whether an aware instant lies in FIRST_YEAR..LAST_YEAR in UTC (one past year 9999
    in UTC, e.g. 9999-12-31T23:59-14:00, is not)."""
    try:
        year = moment.astimezone(UTC).year
    except OverflowError:
        return False
    return FIRST_YEAR <= year <= LAST_YEAR


# JSON bodies deeper than this are refused: no resource we take comes near it (a Bundle's
# entry's resource's nested extensions stay well below), and a few hundred levels exhaust
# the recursive validators' stack.
MAX_JSON_DEPTH = 64


def json_depth(value: object) -> int:
    """How deeply ``value`` nests (a scalar 0, ``[]`` and ``{}`` 1), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: object = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)  # type: ignore[attr-defined]
    return deepest


def json_holds_nul(value: object) -> bool:
    """Whether a parsed JSON value holds NUL in a string (a key or a value): PostgreSQL's
    text and jsonb cannot store it (``\\u0000`` in jsonb is an error), without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
