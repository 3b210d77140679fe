"""Memory of writing and streaming one big stage, beside the same work on a stage 16x smaller.

Each measurement runs in a fresh process (``python bench_memory.py write|read ...``)
that reports how far its peak resident set grew during the work alone, past what
importing runfmt and opening the store took. A writer that flushes every 1,000
records and a reader that streams frame by frame must stay flat in the stage's
size: the big stage may take at most 1.5x the memory of the small one, plus 8 MiB
for the allocator's slack.

Records are 2,048 B evaluation-like lines (the format section's corpus), 1,000
distinct ones cycled with a new id each: the big stage holds 2 GB of JSON.
"""

from __future__ import annotations

import collections
import gc
import itertools
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common import Row

SECTION = "memory"
STAGE = "generate"
RECORD_SIZE = 2048
SLACK_MB = 8.0


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{field}:", 1)[1].split()[0]) / 1024


def _start() -> float:
    """Reset the peak resident set to the current one (Linux), and return the current."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _grown(start: float) -> float:
    return _status_mb("VmHWM") - start


def _write(store_path: str, n: int) -> tuple[str, float]:
    from bench_format import _Corpus

    from runfmt.store import Store

    pool = _Corpus().records(1000, RECORD_SIZE)
    store = Store(store_path)
    start = _start()
    with store.create_run("bench-memory", flush_every=1000) as run:
        stage = run.stage(STAGE)
        for i in range(n):
            stage.append(dict(pool[i % 1000], id=f"item-{i:09d}"))
    return run.run_id, _grown(start)


def _read(store_path: str, run_id: str) -> tuple[int, float]:
    from runfmt.store import Store

    reader = Store(store_path, read_only=True).open_run(run_id)
    start = _start()
    counter = itertools.count()
    collections.deque(zip(reader.records(STAGE), counter, strict=False), maxlen=0)
    return next(counter), _grown(start)


def _child(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"bench_memory {' '.join(args)} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _measure(store: Path, n: int) -> tuple[float, float]:
    """Peak growth (MiB) of writing a stage of ``n`` records, then of streaming it."""
    written = _child("write", str(store), str(n))
    read = _child("read", str(store), written["run_id"])
    if read["records"] != n:
        raise AssertionError(f"wrote {n:,} records, read back {read['records']:,}")
    return written["grew_mb"], read["grew_mb"]


def _size(records: int) -> str:
    size = records * RECORD_SIZE
    return f"{size / 1e9:.2g} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def run(quick: bool) -> Iterable[Row]:
    large = 64_000 if quick else 1_000_000
    small = large // 16
    with tempfile.TemporaryDirectory(prefix="runfmt-bench-memory-") as name:
        store = Path(name) / "runs"
        measured = zip(_measure(store, large), _measure(store, small), strict=True)
    for verb, (big, baseline) in zip(("write", "read"), measured, strict=True):
        yield Row(
            f"{verb} memory, {_size(large)} stage (peak growth)",
            big,
            "MiB",
            f"{verb}, {_size(small)} stage",
            baseline,
            f"<= 1.5x + {SLACK_MB:g} MiB",
            big <= 1.5 * baseline + SLACK_MB,
        )


def _main(argv: list[str]) -> None:
    verb, store, arg = argv
    if verb == "write":
        run_id, grew = _write(store, int(arg))
        print(json.dumps({"run_id": run_id, "grew_mb": grew}))
    else:
        records, grew = _read(store, arg)
        print(json.dumps({"records": records, "grew_mb": grew}))


if __name__ == "__main__":
    _main(sys.argv[1:])
