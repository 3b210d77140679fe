"""Durations, times, byte counts and text as people type and read them (CLI options, gc, ls)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from runfmt.errors import InvalidInputError

__all__ = [
    "format_number",
    "format_size",
    "parse_duration",
    "parse_since",
    "parse_size",
    "printable",
]

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION = 1000 * 365.25 * 86400
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(b|[kmgtp]i?b?)?\s*", re.IGNORECASE)
_SIZE_FORMS = (
    "a number and a unit: 10GB, 512MiB, 100B; units B, kB, MB, GB, TB, PB and KiB, MiB, GiB, "
    "TiB, PiB"
)


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` as a `timedelta`."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise InvalidInputError(
            f"invalid duration {text!r}", hint="use a number and s, m, h, d or w: 30d"
        )
    seconds = float(m[1]) * _SECONDS[m[2].lower()]
    if seconds > _MAX_DURATION:
        raise InvalidInputError(f"duration {text!r} is over 1,000 years")
    return timedelta(seconds=seconds)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time from an age (`parse_duration`: ``7d``, ``12h``), a date or an ISO
    8601 time. Times without a zone are UTC."""
    if _DURATION.fullmatch(text):
        return (now or datetime.now(UTC)) - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInputError(
            f"cannot read {text!r} as a time",
            hint="give a date (2026-11-01), an ISO time (2026-11-01T12:00:00Z) or an age (7d, 12h)",
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_size(text: str, *, unit_required: bool = False) -> int:
    """``10GB`` (10^9), ``1.5GiB`` (2^30), ``500MB``, ``100B``, ``2048`` (bytes) as a byte
    count. With ``unit_required``, a bare number is refused: on a command line ``10``
    meant as 10 GB would be 10 bytes (``gc --max-size``)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise InvalidInputError(f"invalid size {text!r}", hint=f"use {_SIZE_FORMS}")
    unit = (m[2] or "").lower()
    if not unit and unit_required:
        raise InvalidInputError(f"size {text!r} has no unit", hint=f"give {_SIZE_FORMS}")
    power = "bkmgtp".index(unit[0]) if unit else 0
    base = 1024 if "i" in unit else 1000
    size = float(m[1]) * base**power
    if not math.isfinite(size):
        raise InvalidInputError(f"size {text!r} is too large")
    return int(size)


def format_size(n: int) -> str:
    """A byte count for people: ``1.2 GB``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError  # pragma: no cover


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\n``, ``\\x1b``): a
    run's name, tags or error, shown on a terminal, can neither fake lines nor send it
    escape sequences."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def format_number(value: float) -> str:
    """A counter's value: an integer whole, a float to 15 significant digits (a sum of
    floats' last digits are noise: 0.0007959, not 0.0007958999999999998)."""
    return f"{value:.15g}" if isinstance(value, float) else str(value)
