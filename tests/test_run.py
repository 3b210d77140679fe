"""Writing and reading runs through the Python API: what a framework relies on."""

from __future__ import annotations

import errno
import itertools
import os
import time
from pathlib import Path
from typing import Any

import pytest

import runfmt
from runfmt import storage as storage_module
from runfmt.check import verify_run
from runfmt.errors import ConflictError, InvalidInputError, ReadOnlyError, StorageError
from runfmt.format.keys import compute_key
from runfmt.locking import writer_alive
from runfmt.store import Store

QUIET: dict[str, Any] = {"flush_interval": None, "heartbeat_interval": None}


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"q{i}", "answer": i * 1.5, "ok": i % 3 != 0} for i in range(start, start + n)]


def stage_files(store: Store, run_id: str) -> list[Path]:
    return sorted((Path(store.url) / run_id / "stages").rglob("*.jsonl.zst"))


def test_records_read_back_in_order_per_stage(store: Store) -> None:
    with store.create_run("eval", {"model": "m1", "n": 3}, tags={"team": "a"}, **QUIET) as w:
        w.extend("generate", rows(250))
        w.extend("score", [{"id": r["id"], "correct": r["ok"]} for r in rows(250)])
        w.count("cost_usd", 0.25)
        w.count("cost_usd", 0.5)
    reader = store.open_run(w.run_id)
    m = reader.manifest
    assert list(reader.records("generate")) == rows(250)
    assert [r["id"] for r in reader.records("score")] == [r["id"] for r in rows(250)]
    assert (m.status, m.name, dict(m.tags), dict(m.counters)) == (
        "completed", "eval", {"team": "a"}, {"cost_usd": 0.75},
    )  # fmt: skip
    assert m.config == {"model": "m1", "n": 3}
    assert m.config_hash == compute_key({"model": "m1", "n": 3})
    assert [(s.name, s.status, s.records) for s in m.stages] == [
        ("generate", "completed", 250), ("score", "completed", 250),
    ]  # fmt: skip
    assert m.finished_at is not None
    assert verify_run(reader.storage) == []


def test_each_flush_commits_a_revision_and_appends_to_the_same_file(store: Store) -> None:
    w = store.create_run("eval", flush_every=100, **QUIET)
    snapshots = []
    for batch in range(4):
        w.extend("score", rows(100, start=batch * 100))
        assert w.manifest.revision == batch + 2
        committed = store.open_run(w.run_id).manifest.stage("score")
        assert committed is not None
        assert committed.records == (batch + 1) * 100
        [path] = stage_files(store, w.run_id)
        snapshots.append(path.read_bytes())
    for earlier, later in itertools.pairwise(snapshots):
        assert later.startswith(earlier), "bytes already listed must never change"
    w.close()
    assert store.open_run(w.run_id).manifest.status == "running"


def test_buffered_records_are_invisible_until_a_flush(store: Store) -> None:
    w = store.create_run("eval", flush_every=None, **QUIET)
    w.extend("score", rows(10))
    assert store.open_run(w.run_id).manifest.stages == ()
    w.flush()
    assert len(list(store.open_run(w.run_id).records("score"))) == 10
    w.close()


def test_flush_interval_flushes_on_time(store: Store) -> None:
    w = store.create_run("eval", flush_every=None, flush_interval=0.05, heartbeat_interval=None)
    w.append("score", {"id": "a"})
    time.sleep(0.06)
    w.append("score", {"id": "b"})
    assert [r["id"] for r in store.open_run(w.run_id).records("score")] == ["a", "b"]
    w.close()


def test_an_exception_in_the_with_block_fails_the_run(store: Store) -> None:
    w = store.create_run("eval", **QUIET)

    def work() -> None:
        with w:
            w.extend("score", rows(5))
            raise RuntimeError("model server went away")

    with pytest.raises(RuntimeError):
        work()
    m = store.open_run(w.run_id).manifest
    assert (m.status, m.error) == ("failed", "RuntimeError: model server went away")
    assert len(list(store.open_run(w.run_id).records("score"))) == 5

    quiet = store.create_run("eval", **QUIET)
    with pytest.raises(KeyboardInterrupt), quiet:
        raise KeyboardInterrupt
    m = store.open_run(quiet.run_id).manifest
    assert (m.status, m.error) == ("cancelled", "KeyboardInterrupt"), "no dangling ': '"


def test_ctrl_c_while_the_closing_commit_waits_for_the_lock_cancels_the_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a `with` block's run finishes cancelled on KeyboardInterrupt, also when it
    comes while the closing commit waits for the run's lock; buffered records go in."""
    import contextlib

    from runfmt import run as run_module

    lock = run_module.commit_lock
    waits = iter([True])

    @contextlib.contextmanager
    def interrupted_once(*args: Any) -> Any:
        if next(waits, False):
            raise KeyboardInterrupt
        with lock(*args):
            yield

    with pytest.raises(KeyboardInterrupt), store.create_run("x", flush_every=None) as w:  # noqa: PT012
        monkeypatch.setattr(run_module, "commit_lock", interrupted_once)
        w.append("s", {"i": 1})
    m = store.open_run(w.run_id).manifest
    assert (m.status, m.error, m.stage("s").records) == ("cancelled", "KeyboardInterrupt", 1)


@pytest.mark.parametrize(("how", "status"), [("fail", "failed"), ("cancel", "cancelled")])
def test_finish_as_failed_or_cancelled(store: Store, how: str, status: str) -> None:
    w = store.create_run("eval", **QUIET)
    w.extend("score", rows(3))
    m = w.fail("judge crashed") if how == "fail" else w.cancel()
    assert m.status == status
    assert (Path(store.url) / w.run_id / "SHA256SUMS").exists()
    assert verify_run(store.open_run(w.run_id).storage) == []


def test_a_closed_run_resumes_and_keeps_every_record(store: Store) -> None:
    w = store.create_run("eval", **QUIET)
    w.extend("score", rows(20))
    w.close()
    for use in (w.flush, lambda: w.append("score", rows(1)[0]), lambda: w.extend("score", [])):
        with pytest.raises(InvalidInputError, match="closed"):
            use()
    w2 = store.resume_run(w.run_id, **QUIET)
    w2.extend("score", rows(20, start=20))
    w2.finish()
    assert list(store.open_run(w.run_id).records("score")) == rows(40)


def test_a_finished_run_resumed_is_running_again(store: Store) -> None:
    with store.create_run("eval", **QUIET) as w:
        w.extend("score", rows(2))
    w2 = store.resume_run(w.run_id, **QUIET)
    assert store.open_run(w.run_id).manifest.status == "running"
    assert not (Path(store.url) / w.run_id / "SHA256SUMS").exists()
    w2.finish()
    assert verify_run(store.open_run(w.run_id).storage) == []


def test_bad_records_change_nothing(store: Store) -> None:
    w = store.create_run("eval", flush_every=2, **QUIET)
    w.append("score", {"id": "a"})
    for bad in ([1], {"x": float("nan")}, {3: "int key"}):
        with pytest.raises(InvalidInputError):
            w.append("score", bad)  # type: ignore[arg-type]
    w.append("score", {"id": "b"})
    w.finish()
    assert [r["id"] for r in store.open_run(w.run_id).records("score")] == ["a", "b"]


def test_key_field_values_are_checked(store: Store) -> None:
    w = store.create_run("eval", **QUIET)
    stage = w.stage("score", key_field="key")
    stage.append({"key": "k1:abc", "v": 1})
    with pytest.raises(InvalidInputError, match="key field 'key'"):
        stage.append({"key": 42})
    with pytest.raises(ConflictError, match="declared"):
        w.stage("score", key_field="other")
    w.finish()
    reader = store.open_run(w.run_id)
    assert reader.keys("score") == {"k1:abc"}
    assert reader.stage("score").key_field == "key"


def test_runs_open_by_id_and_by_path(store: Store) -> None:
    with store.create_run("eval", **QUIET) as w:
        w.extend("score", rows(3))
    folder = Path(store.url) / w.run_id
    for reader in (store.open_run(w.run_id), store.open_run(folder), runfmt.open_run(folder)):
        assert reader.run_id == w.run_id
        assert list(reader.records("score")) == rows(3)
    assert store.run_ids() == [w.run_id]


def test_read_only_store_refuses_writes(store: Store) -> None:
    with store.create_run("eval", **QUIET) as w:
        w.extend("score", rows(1))
    ro = Store(store.url, read_only=True)
    with pytest.raises(ReadOnlyError):
        ro.create_run("other")
    with pytest.raises(ReadOnlyError):
        ro.resume_run(w.run_id)
    assert list(ro.open_run(w.run_id).records("score")) == rows(1)


def test_unknown_stage_names_the_known_ones(store: Store) -> None:
    with store.create_run("eval", **QUIET) as w:
        w.extend("score", rows(1))
    with pytest.raises(InvalidInputError, match=r"no stage 'scores' \(stages: score\)"):
        list(store.open_run(w.run_id).records("scores"))


def test_memory_store_round_trip(memory_store: Store) -> None:
    with memory_store.create_run("eval", flush_every=7, **QUIET) as w:
        w.extend("score", rows(30))
    reader = memory_store.open_run(w.run_id)
    assert list(reader.records("score")) == rows(30)
    assert verify_run(reader.storage) == []


def test_a_write_that_fails_halfway_leaves_no_torn_frame(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full in the middle of a frame: the flush fails, the torn bytes are cut off, and
    the buffered records go to a new file at the next flush."""
    from runfmt.storage import AppendFile

    writer = store.create_run("full", {}, flush_every=None, heartbeat_interval=None)
    writer.append("gen", {"i": 0})
    writer.flush()
    real_write = AppendFile.write

    def disk_full(self: AppendFile, data: bytes) -> None:
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AppendFile, "write", disk_full)
    writer.append("gen", {"i": 1})
    with pytest.raises((OSError, StorageError)):
        writer.flush()
    monkeypatch.undo()
    writer.finish()
    assert verify_run(writer.storage) == []
    assert [r["i"] for r in store.open_run(writer.run_id).records("gen")] == [0, 1]


def test_create_run_records_a_given_creation_time_and_checks_it(store: Store) -> None:
    """For importers: an old run keeps its place in listings."""
    writer = store.create_run("old", created_at="2020-01-02T03:04:05.000000Z")
    writer.finish()
    assert store.open_run(writer.run_id).manifest.created_at == "2020-01-02T03:04:05.000000Z"
    with pytest.raises(InvalidInputError, match="created_at"):
        store.create_run("bad", created_at="yesterday")


def test_threads_share_one_writer(store: Store) -> None:
    """A thread pool appending, extending, counting and tagging through one writer while
    flushes (its own, and heartbeats from another thread) commit: every record committed
    once, counters exact, the run verifies."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    writer = store.create_run("pool", flush_every=7, heartbeat_interval=0.001)
    gen = writer.stage("gen", key_field="key")
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for i in range(1500):
            record = {"key": f"{t}-{i}", "_error": "x" if i % 10 == 0 else None}
            if i % 3:
                gen.append(record)
            else:
                writer.extend("log", [record, dict(record, key=None)])
            writer.count("tokens", 2)
            if i % 500 == 0:
                writer.tag(**{f"t{t}": str(i)})
                writer.flush()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(4)))
    m = writer.finish()
    assert verify_run(store.locate(writer.run_id)) == []
    reader = store.open_run(writer.run_id)
    keys = [r["key"] for r in reader.records("gen")]
    assert len(keys) == len(set(keys)) == 4 * 1000
    assert sum(1 for _ in reader.records("log")) == 4 * 500 * 2
    assert (m.stage("gen").records, m.stage("gen").failures) == (4000, 4 * 100)
    assert m.counters["tokens"] == 4 * 1500 * 2
    assert m.tags == {f"t{t}": "1000" for t in range(4)}


def test_an_append_racing_a_first_use_that_takes_nothing_is_committed(store: Store) -> None:
    """A thread's `extend` of a stage new to the writer takes no record while another
    thread appends to that stage: the appended record is committed, not dropped with the
    stage writer the first use made and let go."""
    import threading

    writer = store.create_run("race", flush_interval=None, heartbeat_interval=None)
    started = threading.Event()

    def nothing() -> Any:
        started.set()
        time.sleep(0.2)  # the other thread looks the stage up meanwhile
        yield from ()

    def late() -> None:
        started.wait()
        writer.append("score", {"id": 1})

    thread = threading.Thread(target=late)
    thread.start()
    writer.extend("score", nothing())
    thread.join()
    writer.append("score", {"id": 2})
    writer.finish()
    assert [r["id"] for r in store.open_run(writer.run_id).records("score")] == [1, 2]


def test_an_artifact_racing_a_finish_is_refused_not_lost(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact being written while another thread finishes the run: `add_artifact`
    raises as on a closed writer, and the run keeps no unlisted file."""
    import threading

    from runfmt.storage import Storage

    writer = store.create_run("race", flush_interval=None, heartbeat_interval=None)
    writer.append("s", {"x": 1})
    create = Storage.create_exclusive

    def finished_meanwhile(self: Storage, rel: str, data: bytes) -> bool:
        created = create(self, rel, data)
        if rel.startswith("artifacts/"):
            finisher = threading.Thread(target=writer.finish)
            finisher.start()
            finisher.join()
        return created

    monkeypatch.setattr(Storage, "create_exclusive", finished_meanwhile)
    with pytest.raises(InvalidInputError, match="this writer is closed"):
        writer.add_artifact("big.bin", b"\0" * 1000)
    reader = store.open_run(writer.run_id)
    assert (reader.manifest.status, reader.manifest.artifacts) == ("completed", ())
    assert verify_run(store.locate(writer.run_id)) == []
    assert not (Path(store.url) / writer.run_id / "artifacts" / "big.bin").exists()


def test_an_append_racing_a_finish_is_refused_not_lost(store: Store) -> None:
    """A thread whose append waits for the writer's lock while another finishes the run
    gets the closed writer's error, never a silent drop."""
    import threading

    writer = store.create_run("race", flush_interval=None, heartbeat_interval=None)
    gen = writer.stage("gen")
    outcome: list[BaseException | None] = []

    def late() -> None:
        try:
            gen.append({"i": 1})
            outcome.append(None)
        except InvalidInputError as exc:
            outcome.append(exc)

    with writer._mutex:
        thread = threading.Thread(target=late)
        thread.start()
        time.sleep(0.2)  # it has passed its own closed check and waits for the lock
        writer.finish()
    thread.join()
    assert [str(e) for e in outcome if e is not None] == [f"{writer.storage.where()}: "
        "this writer is closed (resume the run to write more)"]  # fmt: skip
    assert store.open_run(writer.run_id).stage("gen").records == 0


def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write to a stage file fails as on a full disk."""

    def refuse(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage_module, "_write_all", refuse)


def test_a_full_disk_is_a_storage_error_and_a_retry_commits_each_record_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.create_run("full", flush_every=2, heartbeat_interval=None)
    w.append("gen", {"i": 0})
    with monkeypatch.context() as patched:
        disk_full(patched)
        with pytest.raises(StorageError, match="No space left") as info:
            w.append("gen", {"i": 1})
    assert "free space there" in info.value.hint
    assert "the next flush commits this record: do not append it again" in info.value.hint
    assert "/stages/gen/part-000001-" in info.value.location
    assert stage_files(store, w.run_id) == [], "the new file holds nothing: it was removed"
    w.finish()
    assert [r["i"] for r in store.open_run(w.run_id).records("gen")] == [0, 1]
    assert verify_run(w.storage) == []


def test_a_with_block_whose_finish_fails_releases_its_writer(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that cannot finish stops as a crashed one would: no heartbeat, no lock."""
    w = store.create_run("full", heartbeat_interval=1)

    def write_in_a_with_block() -> None:
        with w:
            w.append("gen", {"i": 0})

    with monkeypatch.context() as patched:
        disk_full(patched)
        with pytest.raises(StorageError):
            write_in_a_with_block()
    assert not writer_alive(w.storage, w.writer_id)
    revision = w.storage.walk("_manifests")
    time.sleep(1.5)
    assert w.storage.walk("_manifests") == revision, "no heartbeat commits any more"
    again = store.resume_run(w.run_id, heartbeat_interval=None)
    again.append("gen", {"i": 1})
    again.finish()
    assert [r["i"] for r in store.open_run(w.run_id).records("gen")] == [1]
    assert verify_run(w.storage) == []


def test_a_write_that_fails_leaves_no_temporary_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.create_run("full", heartbeat_interval=None)
    with monkeypatch.context() as patched:
        disk_full(patched)
        with pytest.raises(StorageError, match="No space left"):
            w.add_artifact("a.bin", b"x" * 1000)
        w.tag(t="1")
        with pytest.raises(StorageError, match="No space left"):
            w.flush()
    w.finish()
    run = Path(store.url) / w.run_id
    assert [p.name for p in run.rglob(".tmp-*")] == []
    assert verify_run(w.storage) == []


def test_an_extend_whose_flush_fails_says_how_many_records_it_took(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.create_run("full", flush_every=3, heartbeat_interval=None)
    w.extend("gen", [{"i": i} for i in range(2)])
    with monkeypatch.context() as patched:
        disk_full(patched)
        with pytest.raises(StorageError) as info:
            w.extend("gen", [{"i": i} for i in range(2, 10)])
        assert "the first record given to extend: give it the rest, from record 1" in (
            info.value.hint
        )
        parent = [{"stage": "gen", "key": "x"}]
        with pytest.raises(StorageError) as info:
            w.extend("gen", [{"i": i, "_parents": parent} for i in range(3, 7)])
        assert "the first 3 records given to extend: give it the rest, from record 3" in (
            info.value.hint
        )
    w.extend("gen", [{"i": i} for i in range(6, 10)])
    w.finish()
    assert [r["i"] for r in store.open_run(w.run_id).records("gen")] == list(range(10))
    assert verify_run(w.storage) == []


def test_a_failed_write_to_a_new_file_leaves_no_file_and_the_retry_verifies(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header fits, the records do not: the file holding only its header goes."""
    w = store.create_run("full", heartbeat_interval=None)
    w.append("gen", {"i": 0})
    write = storage_module._write_all
    calls: list[int] = []

    def header_only(fd: int, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(fd, data)

    with monkeypatch.context() as patched:
        patched.setattr(storage_module, "_write_all", header_only)
        with pytest.raises(StorageError):
            w.flush()
    assert stage_files(store, w.run_id) == []
    w.finish()
    assert verify_run(w.storage) == []
    assert [r["i"] for r in store.open_run(w.run_id).records("gen")] == [0]


def test_a_with_block_whose_only_commit_fails_says_its_writer_stopped(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.create_run("full", flush_every=None, heartbeat_interval=None)

    def write_in_a_with_block() -> None:
        with w:
            w.extend("gen", [{"i": i} for i in range(5)])

    with monkeypatch.context() as patched:
        disk_full(patched)
        with pytest.raises(StorageError) as info:
            write_in_a_with_block()
    assert "the writer stopped" in info.value.hint


def test_a_with_block_that_stops_its_writer_says_the_records_were_not_taken(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.create_run("full", flush_every=1, heartbeat_interval=None)

    def write_in_a_with_block() -> None:
        with w:
            w.append("gen", {"i": 0})

    with monkeypatch.context() as patched:
        disk_full(patched)
        with pytest.raises(StorageError) as info:
            write_in_a_with_block()
    assert "do not append it again" not in info.value.hint
    assert "the writer stopped" in info.value.hint
    assert "free space there" in info.value.hint


def test_a_run_whose_manifest_copy_cannot_be_written_is_still_created(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-7: `manifest.json` is a copy; once revision 1 exists the run does, and the
    caller gets its writer, whose next commit writes the copy."""
    write_atomic = storage_module.Storage.write_atomic

    def full(self: storage_module.Storage, rel: str, data: bytes, **kwargs: Any) -> None:
        if rel == "manifest.json":
            raise StorageError("No space left on device", location=self.where(rel))
        write_atomic(self, rel, data, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(storage_module.Storage, "write_atomic", full)
        w = store.create_run("full", heartbeat_interval=None)
    assert not (Path(store.url) / w.run_id / "manifest.json").exists()
    w.append("gen", {"i": 0})
    w.finish()
    assert verify_run(w.storage) == []


@pytest.mark.parametrize("failures", [1, 2])
def test_finish_never_leaves_sums_that_contradict_manifest_json(
    store: Store, monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    """COMMIT-11, CHECK-3: the final commit's copy of the revision failed (a full disk),
    which a commit leaves to the next one; SHA256SUMS lists the copy, so it is written
    again first, and when that fails too, no SHA256SUMS is written (§9.3 state 9)."""
    w = store.create_run("full", heartbeat_interval=None)
    w.append("gen", {"i": 0})
    w.flush()
    write_atomic = storage_module.Storage.write_atomic
    left = [failures]

    def full(self: storage_module.Storage, rel: str, data: bytes, **kwargs: Any) -> None:
        if rel == "manifest.json" and left[0]:
            left[0] -= 1
            raise StorageError("No space left on device", location=self.where(rel))
        write_atomic(self, rel, data, **kwargs)

    monkeypatch.setattr(storage_module.Storage, "write_atomic", full)
    run = Path(store.url) / w.run_id
    if failures == 1:
        assert w.finish().status == "completed"
        assert verify_run(w.storage) == []
        return
    with pytest.raises(StorageError):
        w.finish()
    assert not (run / "SHA256SUMS").exists()
    assert runfmt.open_run(run).manifest.status == "completed"
