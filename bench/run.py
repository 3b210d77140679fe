"""Run the benchmarks and print one table: ``python bench/run.py [--quick] [--json] [SECTION...]``.

Each ``bench/bench_<section>.py`` module defines ``SECTION`` and
``run(quick) -> Iterable[Row]`` (see ``bench/common.py``); with no SECTION
given, every section runs. Baselines are measured in the same run; the last
column is the ratio of runfmt to its baseline.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

from common import Row

HERE = Path(__file__).resolve().parent
Section = Callable[[bool], Iterable[Row]]


def discover() -> dict[str, ModuleType]:
    """The section modules ``bench_*.py`` beside this file, by their ``SECTION`` name."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    modules = {}
    for path in sorted(HERE.glob("bench_*.py")):
        module = importlib.import_module(path.stem)
        modules[getattr(module, "SECTION", path.stem.removeprefix("bench_"))] = module
    return modules


def _number(value: float, unit: str) -> str:
    if unit == "rec/s":
        return f"{value / 1000:,.0f}k {unit}"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def _cells(section: str, row: Row) -> list[str]:
    baseline = ""
    if row.baseline_value is not None:
        baseline = f"{_number(row.baseline_value, row.unit)} {row.baseline}"
    ok = {None: "", True: "PASS", False: "FAIL"}[row.ok]
    ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
    return [section, row.case, _number(row.value, row.unit), baseline, row.target, ok, ratio]


def render(rows: list[tuple[str, Row]]) -> str:
    head = ["section", "case", "runfmt", "baseline", "target", "result", "ratio"]
    table = [head] + [_cells(section, row) for section, row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def context() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  "
        f"Python {platform.python_version()}  {platform.machine()}  "
        f"{os.cpu_count()} CPUs  load average {load}"
    )


def main(argv: list[str] | None = None) -> int:
    sections = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", nargs="*", metavar="SECTION",
                        help=f"sections to run (default: all): {', '.join(sections)}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.section) - set(sections))
    if unknown:
        parser.error(f"unknown section {', '.join(unknown)}; known: {', '.join(sections)}")
    chosen = args.section or list(sections)
    before = context()
    rows: list[tuple[str, Row]] = []
    for name in chosen:
        start = time.perf_counter()
        for row in sections[name].run(args.quick):
            rows.append((name, row))
            if args.json:
                print(json.dumps({"section": name, "ratio": row.ratio, **_asdict(row)}), flush=True)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if not args.json:
        print(f"before: {before}\n{render(rows)}\nafter:  {context()}")
    return 0


def _asdict(row: Row) -> dict[str, object]:
    return {f: getattr(row, f) for f in Row.__slots__}


if __name__ == "__main__":
    sys.exit(main())
