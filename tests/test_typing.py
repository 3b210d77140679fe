"""The API's types as a framework's type checker sees them (`mypy --strict`): writer
options are checked by name and type where they are passed (`runfmt.run.WriterOptions`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CALLER = """\
from runfmt import Store

store = Store("runs")
store.create_run("ok", flush_every=5, until_stage="score", heartbeat_interval=None)
store.create_run("typo", flush_evry=5)
store.resume_run("x", flush_every="5")
store.open_or_create("y", {}, policy="auto", until_stage="a", lock_timeout=3.0)
store.fork_run("x", "score", name="n", compression_level=9)
store.open_or_create("z", {}, heartbeat_intervall=1.0)
"""


def test_writer_options_are_checked_by_name_and_type(tmp_path: Path) -> None:
    caller = tmp_path / "caller.py"
    caller.write_text(CALLER)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--cache-dir", str(tmp_path / "cache"), str(caller)],
        capture_output=True, text=True, env={**os.environ, "MYPYPATH": str(ROOT)}, check=False,
    )  # fmt: skip
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["5", "6", "9"], done.stdout
    assert 'did you mean "flush_every"' in errors[0]
    assert '"flush_every" to "resume_run"' in errors[1]
