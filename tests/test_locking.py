"""Several processes writing one run: commits merge and never lose one another's work; a
held commit lock makes a writer wait, then fail with `LockTimeoutError` (COMMIT-1..6)."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from runfmt.check import repair_run, verify_run
from runfmt.errors import LockTimeoutError, RunNotFoundError, StorageError
from runfmt.locking import commit_lock
from runfmt.run import KEEP_REVISIONS
from runfmt.storage import Storage
from runfmt.store import Store

QUIET: dict[str, Any] = {"flush_every": None, "flush_interval": None, "heartbeat_interval": None}

WRITER = textwrap.dedent(
    """
    import sys, time
    from runfmt.run import load_manifest
    from runfmt.store import Store
    url, run_id, tag, commits = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    peers = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    writer = Store(url).resume_run(
        run_id, flush_every=None, flush_interval=None, heartbeat_interval=None, lock_timeout=60
    )
    print("ready", flush=True)
    sys.stdin.readline()
    for c in range(commits):
        writer.extend("score", [{"id": f"{tag}-{c}-{i}"} for i in range(10)])
        writer.count("commits")
        writer.count("cost", 0.5)
        writer.flush()
        while c == 0 and len(load_manifest(writer.storage).stage("score").files) < peers:
            time.sleep(0.005)  # every peer's first commit: the writers always interleave
    writer.close()
    """
)

HOLDER = textwrap.dedent(
    """
    import sys
    from runfmt.locking import commit_lock
    from runfmt.storage import Storage
    with commit_lock(Storage(sys.argv[1]), timeout=10):
        print("held", flush=True)
        sys.stdin.readline()
    """
)


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == word


def new_run(store: Store) -> str:
    w = store.create_run("shared", **QUIET)
    w.close()
    return w.run_id


def test_two_processes_writing_one_run_both_survive(store: Store) -> None:
    run_id = new_run(store)
    commits = 15
    procs = [spawn(WRITER, store.url, run_id, tag, str(commits), "2") for tag in ("a", "b")]
    for p in procs:
        wait_for(p, "ready")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.wait(timeout=120) == 0
    reader = store.open_run(run_id)
    assert verify_run(reader.storage) == []
    ids = [r["id"] for r in reader.records("score")]
    assert len(ids) == len(set(ids)) == 2 * commits * 10
    for tag in ("a", "b"):
        mine = [i for i in ids if i.startswith(f"{tag}-")]
        assert mine == [f"{tag}-{c}-{i}" for c in range(commits) for i in range(10)]
    assert reader.manifest.counters == {"commits": 2 * commits, "cost": commits * 1.0}
    stage = reader.stage("score")
    assert len({f.path.rsplit("-", 1)[1] for f in stage.files}) == 2
    assert reader.manifest.revision >= 2 * commits + 1
    assert writer_switches(Path(store.url) / run_id) >= 2, "the writers never interleaved"


def writer_switches(run_dir: Path) -> int:
    """How often the writer whose file grew changes from one kept revision to the next."""
    growers = []
    before: dict[str, int] = {}
    for rev in sorted((run_dir / "_manifests").glob("*.json")):
        doc = json.loads(rev.read_bytes())
        sizes = {f["path"]: f["bytes"] for s in doc["stages"] for f in s["files"]}
        grown = [p.rsplit("-", 1)[1] for p, n in sizes.items() if n > before.get(p, 0)]
        if len(grown) == 1:
            growers.append(grown[0])
        before = sizes
    return sum(a != b for a, b in itertools.pairwise(growers))


def test_a_held_commit_lock_times_out_and_loses_nothing(store: Store) -> None:
    run_id = new_run(store)
    run_dir = Path(store.url) / run_id
    writer = store.resume_run(run_id, lock_timeout=0.3, **QUIET)
    writer.extend("score", [{"id": i} for i in range(5)])
    writer.flush()
    holder = spawn(HOLDER, str(run_dir))
    wait_for(holder, "held")
    writer.extend("score", [{"id": i} for i in range(5, 9)])
    started = time.monotonic()
    with pytest.raises(LockTimeoutError) as info:
        writer.flush()
    assert time.monotonic() - started >= 0.25
    assert info.value.location == str(run_dir / ".lock")
    assert "commit lock" in info.value.problem
    assert "lock_timeout" in info.value.hint
    assert [r["id"] for r in store.open_run(run_id).records("score")] == list(range(5))

    holder.communicate("release\n", timeout=30)
    writer.flush()
    writer.finish()
    reader = store.open_run(run_id)
    assert [r["id"] for r in reader.records("score")] == list(range(9))
    assert verify_run(reader.storage) == []


def test_a_commit_lock_that_cannot_be_opened_is_a_clear_error(store: Store) -> None:
    run_id = new_run(store)
    run_dir = Path(store.url) / run_id
    writer = store.resume_run(run_id, **QUIET)
    writer.append("score", {"id": 1})
    os.unlink(run_dir / ".lock")
    os.symlink(run_dir / "elsewhere", run_dir / ".lock")
    with pytest.raises(StorageError) as info:
        writer.flush()
    assert info.value.location == str(run_dir / ".lock")
    assert not (run_dir / "elsewhere").exists(), "the lock never follows a link"
    os.unlink(run_dir / ".lock")
    writer.finish()
    assert [r["id"] for r in store.open_run(run_id).records("score")] == [1]
    shutil.rmtree(run_dir)
    with pytest.raises(RunNotFoundError) as gone, commit_lock(Storage(str(run_dir)), timeout=1):
        pass
    assert gone.value.location == str(run_dir)
    assert "new run" in gone.value.hint


def test_threads_of_one_process_take_turns_at_the_commit_lock(store: Store) -> None:
    """Each hold has its own descriptor: a thread holding the lock excludes the others."""
    run_id = new_run(store)
    run = store.open_run(run_id).storage
    inside: list[int] = []
    overlaps: list[int] = []

    def commit_many(tag: int) -> None:
        for _ in range(30):
            with commit_lock(run, timeout=30):
                inside.append(tag)
                if len(inside) > 1:
                    overlaps.append(tag)
                time.sleep(0.001)
                inside.remove(tag)

    threads = [threading.Thread(target=commit_many, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    with commit_lock(run, timeout=1), commit_lock(run, timeout=1):
        pass  # a thread's own lock is reentrant


def test_a_liveness_probe_at_a_writers_start_does_not_fail_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repair elsewhere probes each writer's lock (`writer_alive`); one that catches a new
    writer's lock file between its creation and its lock only delays that writer."""
    run_id = new_run(store)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "abcd1234")
    probe = FileLock(str(Path(store.url) / run_id / ".writer-abcd1234.lock"), thread_local=False)
    probe.acquire()
    threading.Timer(0.2, probe.release).start()
    writer = store.resume_run(run_id, **QUIET)
    assert writer.writer_id == "abcd1234"
    writer.append("score", {"id": 1})
    writer.close()
    assert [r["id"] for r in store.open_run(run_id).records("score")] == [1]


def test_a_writer_waits_for_the_commit_lock(store: Store) -> None:
    run_id = new_run(store)
    writer = store.resume_run(run_id, lock_timeout=30, **QUIET)
    holder = spawn(HOLDER, str(Path(store.url) / run_id))
    wait_for(holder, "held")
    release = threading.Timer(0.4, holder.communicate, args=("release\n",))
    release.start()
    writer.append("score", {"id": 1})
    started = time.monotonic()
    writer.flush()
    waited = time.monotonic() - started
    release.join()
    assert holder.returncode == 0
    assert waited >= 0.35
    writer.finish()
    assert [r["id"] for r in store.open_run(run_id).records("score")] == [1]


def test_a_killed_lock_holder_does_not_block_commits(store: Store) -> None:
    run_id = new_run(store)
    holder = spawn(HOLDER, str(Path(store.url) / run_id))
    wait_for(holder, "held")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    writer = store.resume_run(run_id, lock_timeout=5, **QUIET)
    writer.append("score", {"id": 1})
    writer.finish()
    assert verify_run(store.open_run(run_id).storage) == []


def test_readers_during_writes_see_whole_commits(store: Store) -> None:
    run_id = new_run(store)
    commits = 40
    proc = spawn(WRITER, store.url, run_id, "a", str(commits))
    wait_for(proc, "ready")
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seen: set[int] = set()
    running = True
    while running:
        running = proc.poll() is None
        reader = store.open_run(run_id)
        if reader.manifest.stage("score") is None:
            continue
        ids = [r["id"] for r in reader.records("score")]
        assert ids == [f"a-{c}-{i}" for c in range(len(ids) // 10) for i in range(10)]
        seen.add(len(ids))
    assert proc.wait() == 0
    assert max(seen) == commits * 10
    assert len(seen) >= 2


def test_verify_and_repair_of_a_run_another_process_commits_to_find_nothing(
    store: Store,
) -> None:
    """Revisions pruned and manifest.json replaced by the live writer while `verify` reads
    are no problems (COMMIT-7, COMMIT-9), nor a failure of verify or repair."""
    run_id = new_run(store)
    writer = spawn(WRITER, store.url, run_id, "w", "2000")
    wait_for(writer, "ready")
    assert writer.stdin is not None
    writer.stdin.write("go\n")
    writer.stdin.flush()
    storage = store.open_run(run_id).storage
    try:
        checked = 0
        while writer.poll() is None or checked < 10:
            problems = verify_run(storage)
            assert problems == [], f"after {checked} checks: {problems} {writer.poll()}"
            assert repair_run(storage).left == []
            checked += 1
    finally:
        writer.kill()
        writer.wait()
    assert store.open_run(run_id).manifest.revision > 1 + KEEP_REVISIONS


def test_a_liveness_probe_never_makes_a_lock_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-12: a reader takes a writer's lock only if its file exists, even when the
    writer deletes it while the reader looks (here: a listing that still shows it)."""
    from runfmt.locking import writer_alive

    w = store.create_run("x", **QUIET)
    lock = Path(store.url) / w.run_id / f".writer-{w.writer_id}.lock"
    assert writer_alive(w.storage, w.writer_id)
    w.close()
    monkeypatch.setattr(Storage, "exists", lambda self, rel: True)
    assert not writer_alive(w.storage, w.writer_id)
    assert not lock.exists()
