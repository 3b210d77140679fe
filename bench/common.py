"""What every ``bench/bench_*.py`` module shares: the `Row` it reports and timing helpers.

A section module defines ``SECTION`` (the name given on the command line) and
``run(quick: bool) -> Iterable[Row]``; `bench/run.py` finds it by its file name.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Row", "best_of", "median_of", "race"]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a measurement beside its baseline and target."""

    case: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    ok: bool | None = None

    @property
    def ratio(self) -> float | None:
        """``value / baseline_value``, the last column of the table."""
        if not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @classmethod
    def vs(
        cls,
        case: str,
        value: float,
        unit: str,
        baseline: str,
        baseline_value: float,
        *,
        at_least: float | None = None,
        at_most: float | None = None,
    ) -> Row:
        """A row whose target bounds the ratio to the baseline."""
        ratio = value / baseline_value if baseline_value else None
        target, ok = "", None
        if at_least is not None:
            target, ok = f">= {at_least:g}x", ratio is not None and ratio >= at_least
        if at_most is not None:
            target, ok = f"<= {at_most:g}x", ratio is not None and ratio <= at_most
        return cls(case, value, unit, baseline, baseline_value, target, ok)

    @classmethod
    def limit(
        cls,
        case: str,
        value: float,
        unit: str,
        *,
        at_most: float,
        baseline: str = "",
        baseline_value: float | None = None,
    ) -> Row:
        """A row whose target is an absolute upper bound on the value."""
        return cls(
            case, value, unit, baseline, baseline_value, f"<= {at_most:g} {unit}", value <= at_most
        )


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """The shortest of ``repeat`` timed calls of ``fn``, in seconds (garbage collector off)."""
    return race(repeat, {"": fn})[""]


def race(repeat: int, candidates: Mapping[str, Callable[[], object]]) -> dict[str, float]:
    """The shortest of ``repeat`` timed calls of each candidate, in seconds.

    Candidates take turns, so a change in machine load hits them alike; the
    garbage collector is off while a call is timed, as in `timeit`.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return {name: min(t) for name, t in times.items()}


def median_of(samples: list[float]) -> float:
    return statistics.median(samples)
