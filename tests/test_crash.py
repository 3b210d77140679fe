"""Writers killed with SIGKILL at random moments: the run always opens, `repair` then `verify`
pass, and no committed record is lost or duplicated (COMMIT-7, COMMIT-8).

The crash loop forks its writers from a multiprocessing forkserver that has runfmt
imported already, so each of the many real processes starts in milliseconds.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from runfmt.check import repair_run, verify_run
from runfmt.format.frames import FrameEncoder
from runfmt.run import RunReader
from runfmt.store import Store

ITERATIONS = 30
WRITER_OPTIONS: dict[str, Any] = {
    "flush_every": None,
    "flush_interval": None,
    "heartbeat_interval": None,
}


def crash_writer(store_url: str, run_id: str, tag: str, progress: str, seed: int) -> None:
    """Resume the run and commit batches (appended or extended) forever, logging each
    commit's record count; now and then finish the run and resume it again."""
    rng = random.Random(seed)
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND)
    store = Store(store_url)
    writer = store.resume_run(run_id, **WRITER_OPTIONS)
    os.write(fd, b"ready\n")
    done = 0
    while True:
        batch = rng.randint(1, 40)
        scores = [
            {"id": f"{tag}-{i}", "pad": "x" * rng.randint(0, 300), "p": rng.random(), "e": None}
            for i in range(done, done + batch)
        ]
        judged = [{"id": f"{tag}-{i}", "ok": True} for i in range(done, done + batch) if i % 3 == 0]
        if rng.random() < 0.5:
            writer.extend("score", scores)
            writer.extend("judge", judged)
        else:
            for record in scores:
                writer.append("score", record)
            for record in judged:
                writer.append("judge", record)
        if rng.random() < 0.3:
            writer.count("batches")
        if rng.random() < 0.15:
            writer.finish()
            done += batch
            os.write(fd, f"{done}\n".encode())
            writer = store.resume_run(run_id, **WRITER_OPTIONS)
            continue
        writer.flush()
        done += batch
        os.write(fd, f"{done}\n".encode())


def committed_counts(progress: Path) -> tuple[bool, int]:
    """Whether the writer got past resuming, and the record count of its last logged commit."""
    lines = progress.read_text().split("\n")[:-1]
    counts = [int(line) for line in lines if line.isdigit()]
    return "ready" in lines, counts[-1] if counts else 0


def kill_at_random(
    proc: multiprocessing.process.BaseProcess, progress: Path, after: float, *, wait_ready: bool
) -> None:
    """Start the writer, wait until it resumed the run (``wait_ready``, up to 10 s), let it
    write for ``after`` seconds more, and kill it with SIGKILL."""
    proc.start()
    deadline = time.monotonic() + 10
    while wait_ready and not committed_counts(progress)[0] and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(after)
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
    proc.join()


def ids_by_tag(reader: RunReader, stage: str) -> dict[str, list[int]]:
    """Record numbers per writer tag, in stored order."""
    found: dict[str, list[int]] = defaultdict(list)
    if reader.manifest.stage(stage) is None:
        return found
    for r in reader.records(stage):
        tag, _, n = r["id"].rpartition("-")
        found[tag].append(int(n))
    return found


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["runfmt.store", "runfmt.check", __name__])
    return ctx


def test_kill_9_at_random_moments(
    store: Store, tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext
) -> None:
    seed = int(os.environ.get("RUNFMT_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    store.create_run("crash", {"seed": seed}, **WRITER_OPTIONS).close()
    [run_id] = store.run_ids()
    expected: dict[str, int] = {}
    kills_while_writing = 0
    for it in range(ITERATIONS):
        tag, progress = f"w{it}", tmp_path / f"progress-{it}"
        progress.touch()
        proc = forkserver.Process(
            target=crash_writer, args=(store.url, run_id, tag, str(progress), rng.randrange(2**32))
        )
        kill_at_random(proc, progress, rng.uniform(0, 0.2), wait_ready=rng.random() < 0.8)
        assert proc.exitcode == -signal.SIGKILL, f"iteration {it} (seed {seed}): writer exited"
        ready, committed = committed_counts(progress)
        kills_while_writing += ready

        reader = store.open_run(run_id)
        report = repair_run(reader.storage)
        assert report.left == [], f"iteration {it} (seed {seed}): {report.left}"
        assert verify_run(reader.storage) == [], f"iteration {it} (seed {seed}): {report.actions}"

        reader = store.open_run(run_id)
        found = ids_by_tag(reader, "score")
        n = len(found.get(tag, []))
        assert found.get(tag, []) == list(range(n)), f"iteration {it}: gaps or duplicates"
        assert n >= committed, f"iteration {it} (seed {seed}): lost committed records"
        if n:
            expected[tag] = n
        assert {t: len(v) for t, v in found.items()} == expected, f"iteration {it}: older lost"
        judged = ids_by_tag(reader, "judge")
        assert all(v == sorted(set(v)) for v in judged.values())
    assert kills_while_writing >= ITERATIONS // 2
    assert len(expected) >= ITERATIONS // 4
    print(
        f"seed {seed}: {len(expected)} of {ITERATIONS} writers committed "
        f"{sum(expected.values())} records; {kills_while_writing} killed while writing"
    )


def counting_writer(store_url: str, run_id: str, progress: str, seed: int) -> None:
    """Resume the run and append records forever, counting each record's tokens as it goes
    and flushing every few records."""
    rng = random.Random(seed)
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND)
    writer = Store(store_url).resume_run(run_id, **WRITER_OPTIONS)
    os.write(fd, b"ready\n")
    for i in itertools.count():
        tokens = rng.randint(1, 1000)
        writer.append("gen", {"id": f"{seed}-{i}", "tokens": tokens, "pad": "x" * (i % 97)})
        writer.count("tokens", tokens)
        if rng.random() < 0.3:
            writer.flush()


def test_kill_9_leaves_counters_in_step_with_the_salvaged_records(
    store: Store, tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext
) -> None:
    """Whatever a kill interrupts, repair leaves the run's counters equal to what its records
    say: each flush's deltas are salvaged with its frame (FRAME-6, COMMIT-8)."""
    seed = int(os.environ.get("RUNFMT_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    store.create_run("tokens", {"seed": seed}, **WRITER_OPTIONS).close()
    [run_id] = store.run_ids()
    salvaged = 0
    for it in range(ITERATIONS // 2):
        progress = tmp_path / f"progress-{it}"
        progress.touch()
        proc = forkserver.Process(
            target=counting_writer, args=(store.url, run_id, str(progress), rng.randrange(2**32))
        )
        kill_at_random(proc, progress, rng.uniform(0, 0.1), wait_ready=True)
        reader = store.open_run(run_id)
        salvaged += repair_run(reader.storage).salvaged_records
        assert verify_run(reader.storage) == [], f"iteration {it} (seed {seed})"
        reader = store.open_run(run_id)
        tokens = sum(r["tokens"] for r in reader.records("gen")) if reader.manifest.stages else 0
        assert reader.manifest.counters.get("tokens", 0) == tokens, f"iteration {it} (seed {seed})"
    assert salvaged, f"seed {seed}: no kill left records to salvage"


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    from runfmt.store import Store
    writer = Store(sys.argv[1]).resume_run(
        sys.argv[2], flush_every=None, flush_interval=None, heartbeat_interval=None
    )
    n = 0
    while True:
        writer.extend("score", [{"id": f"a-{i}"} for i in range(n, n + 25)])
        writer.flush()
        n += 25
        print(n, flush=True)
    """
)


def test_resume_after_a_crash_keeps_every_committed_record(store: Store) -> None:
    store.create_run("crash", **WRITER_OPTIONS).close()
    [run_id] = store.run_ids()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, store.url, run_id],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    reported = [int(proc.stdout.readline()) for _ in range(4)]
    proc.send_signal(signal.SIGKILL)
    rest = proc.communicate()[0]
    reported += [int(x) for x in re.findall(r"^\d+$", rest, re.M)]
    committed = reported[-1]

    writer = store.resume_run(run_id, **WRITER_OPTIONS)
    writer.extend("score", [{"id": f"b-{i}"} for i in range(10)])
    writer.finish()
    reader = store.open_run(run_id)
    ids = [r["id"] for r in reader.records("score")]
    first = [i for i in ids if i.startswith("a-")]
    assert len(first) >= committed
    assert first == [f"a-{i}" for i in range(len(first))]
    assert ids[len(first) :] == [f"b-{i}" for i in range(10)]
    assert reader.manifest.status == "completed"
    assert verify_run(reader.storage) == []


@pytest.mark.parametrize("complete_frames", [0, 2])
def test_bytes_written_after_the_last_commit(store: Store, complete_frames: int) -> None:
    """A dead writer's uncommitted tail: readers ignore it, verify reports it as repairable,
    repair salvages its complete frames and cuts the torn rest (COMMIT-8)."""
    writer = store.create_run("tail", **WRITER_OPTIONS)
    writer.extend("score", [{"id": f"c-{i}"} for i in range(5)])
    writer.close()
    reader = store.open_run(writer.run_id)
    [entry] = reader.stage("score").files
    path = Path(reader.storage.path(entry.path))
    encoder = FrameEncoder()
    frames = [encoder.encode(f'{{"id":"s-{n}"}}\n'.encode()) for n in range(complete_frames)]
    torn = encoder.encode(b'{"id":"lost"}\n')[:-3]
    with path.open("ab") as f:
        f.write(b"".join(frames) + torn)

    assert [r["id"] for r in store.open_run(writer.run_id).records("score")] == [
        f"c-{i}" for i in range(5)
    ]
    problems = verify_run(reader.storage)
    assert [(p.location, p.rule, p.repairable) for p in problems] == [
        (entry.path, "COMMIT-8", True)
    ]
    report = repair_run(reader.storage)
    assert report.salvaged_records == complete_frames
    assert report.left == []
    assert verify_run(reader.storage) == []
    ids = [r["id"] for r in store.open_run(writer.run_id).records("score")]
    assert ids == [f"c-{i}" for i in range(5)] + [f"s-{n}" for n in range(complete_frames)]


def test_repair_removes_stale_temporaries_in_every_run_folder(store: Store) -> None:
    """A copy killed mid-file (sync, fork, import) leaves `.tmp-*` beside stage files."""
    with store.create_run("r", {}) as writer:
        writer.append("gen", {"i": 1})
        writer.add_artifact("a.txt", b"a")
    folder = Path(store.url) / writer.run_id
    old = time.time() - 3600
    temps = [folder / "stages" / "gen" / ".tmp-1", folder / "artifacts" / ".tmp-2"]
    for temp in temps:
        temp.write_bytes(b"partial")
        os.utime(temp, (old, old))
    fresh = folder / "stages" / "gen" / ".tmp-3"
    fresh.write_bytes(b"being written")
    report = repair_run(store.locate(writer.run_id))
    assert not any(t.exists() for t in temps)
    assert fresh.exists(), "a temporary younger than a minute may belong to a live copy"
    assert any("stages/gen/.tmp-1" in a for a in report.actions)
    assert verify_run(store.locate(writer.run_id)) == []


def test_repair_leaves_a_live_writers_temporaries_and_young_lock_files(store: Store) -> None:
    """COMMIT-8, COMMIT-12: while a writer is alive, an old temporary may be the big file it
    is still writing; a lock file younger than a minute may be a starting writer's, between
    its open and its lock. An old, unheld lock file is a dead writer's and goes."""
    live = store.create_run("r", {}, heartbeat_interval=None)
    live.append("gen", {"i": 1})
    live.flush()
    folder = Path(store.url) / live.run_id
    old = time.time() - 3600
    temp, dead, young = (
        folder / "artifacts" / ".tmp-big",
        folder / ".writer-dead0001.lock",
        folder / ".writer-new00001.lock",
    )
    temp.parent.mkdir()
    for f in (temp, dead, young):
        f.write_bytes(b"")
    for f in (temp, dead):
        os.utime(f, (old, old))
    repair_run(store.locate(live.run_id))
    assert (temp.exists(), dead.exists(), young.exists()) == (True, False, True)
    live.close()
    repair_run(store.locate(live.run_id))
    assert not temp.exists()


def interrupted_writer(store_url: str, progress: str) -> None:
    """Write ~3 KB records with frequent flushes until SIGINT (Ctrl-C) stops the process."""
    fd = os.open(progress, os.O_WRONLY | os.O_APPEND)
    with Store(store_url).create_run("ctrl-c", {}, flush_every=20, heartbeat_interval=None) as w:
        os.write(fd, f"{w.run_id}\n".encode())
        stage = w.stage("gen")
        for i in itertools.count():
            stage.append({"i": i, "text": "x" * 3000})
            if i % 7 == 0:
                w.count("n", 7)


def test_ctrl_c_at_random_moments_cancels_a_run_that_verifies(
    store: Store, tmp_path: Path, forkserver: multiprocessing.context.ForkServerContext
) -> None:
    """The `with` block's exit commits what is buffered: an interrupt that lands inside a
    flush must not make it list a byte twice, or under a stale sha256."""
    seed = int(os.environ.get("RUNFMT_CRASH_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    for it in range(20):
        progress = tmp_path / f"progress-{it}"
        progress.touch()
        proc = forkserver.Process(target=interrupted_writer, args=(store.url, str(progress)))
        proc.start()
        deadline = time.monotonic() + 10
        while not progress.read_text() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(proc.pid, signal.SIGINT)  # type: ignore[arg-type]
        proc.join(30)
        run_id = progress.read_text().strip()
        reader = store.open_run(run_id)
        where = f"iteration {it} (seed {seed}), run {run_id}"
        assert reader.manifest.status == "cancelled", where
        assert verify_run(reader.storage) == [], where
        records = [r["i"] for r in reader.records("gen")]
        assert records == list(range(len(records))), where
        counted = 7 * ((len(records) + 6) // 7)  # interrupted between append and count: 7 less
        assert reader.manifest.counters.get("n", 0) in (counted, counted - 7), where


def test_finishing_salvages_what_a_dead_co_writer_left(store: Store) -> None:
    """COMMIT-11: a second writer of the run died after storing a flush's frames, before
    committing them; finishing the run salvages them (COMMIT-8), so the finished run's
    stage files hold exactly what it lists and `SHA256SUMS` covers them."""
    w1 = store.create_run("two", **WRITER_OPTIONS)
    w1.extend("gen", [{"v": i} for i in range(10)])
    w1.flush()
    code = f"""
        import os
        import runfmt.run
        from runfmt.store import Store
        w2 = Store({store.url!r}).resume_run({w1.run_id!r}, **{WRITER_OPTIONS!r})
        w2.extend("gen", [{{"v": 100 + i}} for i in range(5)])
        runfmt.run.commit_locked = lambda *args, **kwargs: os._exit(9)
        w2.flush()
    """
    died = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False)
    assert died.returncode == 9
    w1.extend("gen", [{"v": i} for i in range(10, 20)])
    done = w1.finish()
    assert done.status == "completed"
    run = store.locate(w1.run_id)
    assert verify_run(run) == []
    assert run.walk("stages") == {
        f.path.removeprefix("stages/"): f.bytes for s in done.stages for f in s.files
    }
    values = sorted(r["v"] for r in store.open_run(w1.run_id).records("gen"))
    assert values == [*range(20), *range(100, 105)]
    sums = (Path(store.url) / w1.run_id / "SHA256SUMS").read_text()
    assert all(f.path in sums for s in done.stages for f in s.files)
