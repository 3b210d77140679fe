"""The benchmark command still runs: ``bench/run.py --quick`` (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_quick_format_run_prints_every_row_with_its_baseline() -> None:
    done = _bench("--json", "format")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    cases = {row["case"] for row in rows}
    for size in ("204 B", "2,048 B"):
        for what in ("append", "read", "disk"):
            assert any(c.startswith(f"{what} {size}") for c in cases), (what, size, cases)
    assert any(c.startswith("commit") for c in cases)
    for row in rows:
        assert row["section"] == "format"
        assert row["value"] > 0
        if row["baseline_value"] is not None:
            assert row["ratio"] == row["value"] / row["baseline_value"]
        assert (row["ok"] is None) == (row["target"] == "")


def test_quick_format_run_prints_one_table() -> None:
    done = _bench("format")
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("section"))
    assert header.split() == ["section", "case", "runfmt", "baseline", "target", "result", "ratio"]
    assert "load average" in done.stdout


def test_unknown_section_is_a_usage_error() -> None:
    done = _bench("no-such-section")
    assert done.returncode == 2
    assert "unknown section no-such-section" in done.stderr
