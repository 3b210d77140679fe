"""The benchmark command still runs: ``bench/run.py --quick`` (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_quick_memory_run_streams_a_stage_16_times_bigger_in_flat_memory() -> None:
    """Peak memory is not noisy the way time is: a reader or writer holding the stage
    instead of a frame or a flush would grow by tens of MiB here."""
    done = _bench("--json", "memory")
    assert done.returncode == 0, done.stderr
    rows = {
        json.loads(line)["case"].split()[0]: json.loads(line) for line in done.stdout.splitlines()
    }
    assert set(rows) == {"write", "read"}
    for row in rows.values():
        assert 0 <= row["value"] < 64
        assert row["ok"] is True, row


def test_rows_render_as_one_table_with_ratios_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.Row.vs("append", 300_000.0, "rec/s", "bare loop", 400_000.0, at_least=0.5)
    lines = bench.render([("format", row)]).splitlines()
    assert lines[0].split() == [
        "section",
        "case",
        "runfmt",
        "baseline",
        "target",
        "result",
        "ratio",
    ]
    assert lines[2].split()[-3:] == ["0.5x", "PASS", "0.75x"]
    assert "format" in bench.discover()


def test_unknown_section_is_a_usage_error() -> None:
    done = _bench("no-such-section")
    assert done.returncode == 2
    assert "unknown section no-such-section" in done.stderr
