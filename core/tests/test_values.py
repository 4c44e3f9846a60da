from datetime import UTC, datetime, timedelta, timezone

from core.values import ascii_digits, year_supported


def test_ascii_digits_refuses_what_int_refuses_or_reads_otherwise() -> None:
    assert ascii_digits("0123")
    for text in ("", "²", "\u0663", "1.0", "-1", " 1", "1a"):
        assert not ascii_digits(text), text


def test_years_are_supported_from_1900_to_2999_in_utc() -> None:
    minus_14 = timezone(timedelta(hours=-14))
    assert year_supported(datetime(1900, 1, 1, tzinfo=UTC))
    assert year_supported(datetime(2999, 12, 31, 23, 59, tzinfo=UTC))
    assert not year_supported(datetime(1899, 12, 31, 23, 59, tzinfo=UTC))
    assert not year_supported(datetime(3000, 1, 1, tzinfo=UTC))
    assert not year_supported(datetime(2999, 12, 31, 12, tzinfo=minus_14))  # 3000 in UTC
    assert not year_supported(datetime(9999, 12, 31, 23, 59, tzinfo=minus_14))  # overflows
