"""Per-run counters: deltas merged at commit, never lost or double-counted when several
writer processes commit at once (COMMIT-6)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from runfmt.check import verify_run
from runfmt.errors import InvalidInputError
from runfmt.store import Store

WORKER = textwrap.dedent(
    """
    import sys
    from runfmt.store import Store

    url, run_id, worker, commits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    writer = Store(url).resume_run(run_id, heartbeat_interval=0.02, flush_every=None,
                                   flush_interval=None)
    for i in range(commits):
        writer.append("work", {"worker": worker, "i": i})
        writer.count("cost_usd", 0.25)
        writer.count("tokens", 7)
        writer.flush()
    writer.close()
    """
)


@pytest.mark.slow
def test_concurrent_writer_processes_never_lose_or_double_count(store: Store) -> None:
    w = store.create_run("counters", heartbeat_interval=None)
    w.count("tokens", 1)
    w.close()
    workers, commits = 4, 15
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, store.url, w.run_id, f"w{n}", str(commits)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(workers)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    m = store.open_run(w.run_id).manifest
    assert dict(m.counters) == {
        "tokens": 1 + workers * commits * 7,
        "cost_usd": workers * commits * 0.25,
    }
    assert m.stage("work").records == workers * commits  # type: ignore[union-attr]
    assert verify_run(store.locate(w.run_id)) == []


def test_counters_survive_resume_and_accumulate(store: Store) -> None:
    w = store.create_run("counters", heartbeat_interval=None)
    w.count("cost", 1.5)
    w.count("cost", 0.5)
    w.count("calls")
    w.close()
    again = store.resume_run(w.run_id, heartbeat_interval=None)
    again.count("cost", -1)
    m = again.finish()
    assert dict(m.counters) == {"cost": 1.0, "calls": 1}


@pytest.mark.parametrize("delta", [float("nan"), float("inf"), "3", True, None])
def test_bad_counter_deltas_are_refused(store: Store, delta: object) -> None:
    w = store.create_run("counters", heartbeat_interval=None)
    with pytest.raises(InvalidInputError, match="finite number"):
        w.count("cost", delta)  # type: ignore[arg-type]
    assert dict(w.finish().counters) == {}
