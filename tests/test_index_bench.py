"""The index benchmark still runs: ``bench/run.py --quick index`` (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_quick_index_run_prints_every_row() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", "index"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["case"]: row for row in map(json.loads, done.stdout.splitlines())}
    for case in (
        "cold rebuild, 500 runs",
        "cold rebuild (target, CPU time)",
        "ls 500 runs, warm index + reconcile",
        "runfmt ls --json --limit 50 (process)",
        "cache lookup median, 10,000 keys",
        "cache contains, 2,000 keys in one call",
    ):
        assert rows[case]["value"] > 0, case
    assert rows["ls 500 runs, warm index + reconcile"]["baseline"] == "read every manifest"
    assert rows["cache lookup median, 10,000 keys"]["target"] == "<= 50 us"
