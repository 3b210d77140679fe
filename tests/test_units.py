"""Durations, times and sizes as people type them (CLI options)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from runfmt.errors import InvalidInputError
from runfmt.units import format_size, parse_duration, parse_since, parse_size


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    assert parse_duration(" 2W ") == timedelta(weeks=2)
    for bad in ("30", "d", "-1d", "3 days"):
        with pytest.raises(InvalidInputError, match="invalid duration"):
            parse_duration(bad)
    with pytest.raises(InvalidInputError, match="over 1,000 years"):
        parse_duration("3000000d")


def test_parse_since() -> None:
    now = datetime(2026, 11, 22, 12, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T10:00:00+02:00") == datetime(2026, 11, 1, 8, tzinfo=UTC)
    with pytest.raises(InvalidInputError, match="cannot read"):
        parse_since("last week")
    with pytest.raises(InvalidInputError, match="over 1,000 years"):
        parse_since("3000000d")


def test_sizes() -> None:
    assert parse_size("10GB") == 10**10
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("2048") == 2048
    assert parse_size("512 kb") == 512_000
    for bad in ("GB", "1XB", "-5MB"):
        with pytest.raises(InvalidInputError, match="invalid size"):
            parse_size(bad)
    assert format_size(1_234_567) == "1.2 MB"
    assert format_size(999) == "999 B"
