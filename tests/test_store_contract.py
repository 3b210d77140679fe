"""One store contract, run over every backend: local folder (file://), memory://, s3:// and a
folder through fsspec (dir://)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
import pytest

from runfmt import check, lifecycle
from runfmt import run as run_module
from runfmt.check import ANY_WRITER, being_written_by, repair_run, verify_run
from runfmt.errors import (
    ConflictError,
    FormatError,
    ReadOnlyError,
    RunNotFoundError,
    StorageError,
)
from runfmt.format import names
from runfmt.gc import plan_gc
from runfmt.run import RunWriter, load_manifest
from runfmt.storage import Storage
from runfmt.store import Store

_SHARED = ["file", "memory", "s3"]
"""Backends several writers may share; ``dir`` is a single-writer one (COMMIT-10)."""


@pytest.fixture(params=[*_SHARED, "dir"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store on each backend in turn; ``dir`` is a backend with folders that runfmt
    reaches through fsspec only (as sftp://), where it must make the folders it writes in."""
    yield from _store(request, tmp_path)


@pytest.fixture(params=_SHARED)
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store on each backend that concurrent writers may share."""
    yield from _store(request, tmp_path)


def _store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "file":
        yield Store(f"file://{tmp_path}/runs")
    elif request.param == "dir":
        options = {"path": str(tmp_path), "target_protocol": "file"}
        yield Store("dir://runs", options, single_writer=True)
    elif request.param == "memory":
        url = f"memory://contract-{uuid.uuid4().hex}"
        yield Store(url)
        fsspec.filesystem("memory").rm(url, recursive=True)
    else:
        yield Store(request.getfixturevalue("s3_url"), request.getfixturevalue("s3_options"))


def _records(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"i": i, "text": f"item {i}"} for i in range(start, start + n)]


class TestStoreContract:
    def test_create_write_read(self, any_store: Store) -> None:
        with any_store.create_run("contract", {"model": "m", "seed": 1}, tags={"t": "x"}) as w:
            w.extend("gen", _records(25))
            w.flush()
            w.extend("gen", _records(25, 25))
            w.extend("score", [{"i": 0, "ok": True}])
        reader = any_store.open_run(w.run_id)
        assert reader.manifest.status == "completed"
        assert reader.manifest.config == {"model": "m", "seed": 1}
        assert list(reader.records("gen")) == _records(50)
        assert [s.name for s in reader.manifest.stages] == ["gen", "score"]
        assert verify_run(reader.storage) == []
        assert reader.storage.exists(names.SUMS_FILE)
        assert sorted(reader.storage.names()) == sorted(e.name for e in reader.storage.list())
        expected = {"_manifests", "manifest.json", "stages", "SHA256SUMS"}
        assert set(reader.storage.names()) == expected
        assert reader.storage.names("nothing-here") == ()

    def test_flush_is_visible_to_a_new_reader_before_close(self, any_store: Store) -> None:
        writer = any_store.create_run("visible")
        writer.extend("gen", _records(10))
        writer.flush()
        assert list(any_store.open_run(writer.run_id).records("gen")) == _records(10)
        writer.append("gen", {"i": 99})
        assert any_store.open_run(writer.run_id).stage("gen").records == 10
        writer.close()
        assert any_store.open_run(writer.run_id).stage("gen").records == 11

    def test_resume_continues_a_closed_run(self, any_store: Store) -> None:
        writer = any_store.create_run("resume")
        writer.extend("gen", _records(5))
        writer.close()
        with any_store.resume_run(writer.run_id) as again:
            again.extend("gen", _records(5, 5))
        reader = any_store.open_run(writer.run_id)
        assert list(reader.records("gen")) == _records(10)
        assert reader.manifest.status == "completed"
        assert verify_run(reader.storage) == []

    def test_verify_finds_a_changed_byte(self, any_store: Store) -> None:
        with any_store.create_run("flip") as w:
            w.extend("gen", _records(20))
        storage = any_store.locate(w.run_id)
        path = any_store.open_run(w.run_id).stage("gen").files[0].path
        data = bytearray(storage.read(path))
        data[-3] ^= 0xFF
        storage.put(path, bytes(data))
        assert any(p.rule == "CHECK-1" and p.location == path for p in verify_run(storage))
        with pytest.raises(FormatError):
            list(any_store.open_run(w.run_id).records("gen"))

    def test_repair_restores_manifest_json_from_the_newest_revision(self, any_store: Store) -> None:
        writer = any_store.create_run("torn")
        writer.extend("gen", _records(3))
        writer.flush()
        writer.close()
        storage = any_store.locate(writer.run_id)
        storage.delete(names.MANIFEST_FILE)
        nobody = frozenset[str]()  # no writer alive (without locks, a recent run may have one)
        assert [p.rule for p in verify_run(storage, live=nobody)] == ["COMMIT-7"]
        report = repair_run(storage)
        assert report.left == []
        assert verify_run(storage) == []
        assert list(any_store.open_run(writer.run_id).records("gen")) == _records(3)

    def test_lists_runs_newest_first(self, any_store: Store) -> None:
        assert any_store.run_ids() == []
        ids = []
        for n in range(3):
            with any_store.create_run(f"run{n}", run_id=f"20260101-00000{n}000-0000000{n}") as w:
                w.append("gen", {"n": n})
            ids.append(w.run_id)
        assert any_store.run_ids() == sorted(ids, reverse=True)
        assert [i for i, r in any_store.runs() if not isinstance(r, Exception)] == ids[::-1]
        with pytest.raises(RunNotFoundError):
            any_store.open_run("20990101-000000000-00000000")

    def test_concurrent_writers_lose_no_commit(self, shared_store: Store) -> None:
        base = shared_store.create_run("shared")
        base.close()

        def work(k: int) -> None:
            writer = shared_store.resume_run(base.run_id, flush_every=None, flush_interval=None)
            for step in range(4):
                writer.extend("gen", [{"w": k, "step": step}])
                writer.flush()
            writer.close()

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = sorted((r["w"], r["step"]) for r in shared_store.open_run(base.run_id).records("gen"))
        assert got == [(k, s) for k in range(4) for s in range(4)]

    def test_a_run_heard_from_recently_may_have_a_live_writer(self, any_store: Store) -> None:
        """Without locks (object stores), every writer of a running run heard from within
        LIFE-4's 300 s may be alive: its uncommitted objects and a stale manifest.json are
        no problems yet, and dropping them is refused (STORE-3)."""
        writer = any_store.create_run("live", flush_every=None, flush_interval=None)
        writer.extend("gen", _records(3))
        writer.flush()
        storage = any_store.locate(writer.run_id)
        pending = "stages/gen/part-000009-" + writer.writer_id + ".jsonl.zst"
        storage.put(pending, storage.read(writer.manifest.stage("gen").files[0].path))
        storage.delete(names.MANIFEST_FILE)
        if storage.is_local:
            assert being_written_by(storage) == [writer.writer_id]
            assert verify_run(storage) == []
            writer.close()
            assert {p.rule for p in verify_run(storage)} == {"COMMIT-7", "LAYOUT-4"}
            return
        assert being_written_by(storage) == [ANY_WRITER]
        assert verify_run(storage) == []
        with pytest.raises(ConflictError, match="may be alive") as refused:
            repair_run(storage, salvage=False)
        assert "STORE-3" in refused.value.problem
        with pytest.raises(ConflictError, match="may be alive"):
            any_store.resume_run(writer.run_id, salvage=False)
        assert storage.exists(pending)
        writer.finish()
        assert being_written_by(storage) == []
        assert [p.rule for p in verify_run(storage)] == ["LAYOUT-4"]

    def test_finishing_salvages_a_co_writers_uncommitted_data_only_where_locks_tell(
        self, shared_store: Store, flush_without_commit: Callable[[RunWriter], None]
    ) -> None:
        """COMMIT-11: on local disk a writer whose lock is free is dead, and finishing
        salvages its stage files; elsewhere it may be alive (STORE-3) and its commit would
        then be refused with its records committed: they are left, for a later repair."""
        w1 = shared_store.create_run("two", flush_every=None, flush_interval=None)
        w1.extend("gen", _records(2))
        w1.flush()
        w2 = shared_store.resume_run(w1.run_id, flush_every=None, flush_interval=None)
        w2.extend("gen", _records(3, 100))
        flush_without_commit(w2)
        w2.discard()  # on local disk its lock goes, as when its process dies
        done = w1.finish()
        storage = shared_store.locate(w1.run_id)
        if storage.is_local:
            assert done.stage("gen").records == 5
            assert verify_run(storage) == []
        else:
            assert done.stage("gen").records == 2
            assert [p.rule for p in verify_run(storage)] == ["LAYOUT-4"]

    def test_a_refused_writer_deletes_the_artifacts_it_stored(self, shared_store: Store) -> None:
        """COMMIT-11: a writer refused because the run was finished meanwhile drops its
        changes, its stored artifacts with them, and the finished run verifies."""
        w1 = shared_store.create_run("two", flush_every=None, flush_interval=None)
        w1.extend("gen", _records(2))
        w1.flush()
        w2 = shared_store.resume_run(w1.run_id, flush_every=None, flush_interval=None)
        w2.extend("gen", _records(1, 100))
        w2.add_artifact("late.txt", b"late")
        w1.finish()
        with pytest.raises(ConflictError, match="finished"):
            w2.flush()
        storage = shared_store.locate(w1.run_id)
        assert not storage.exists("artifacts/late.txt")
        assert verify_run(storage) == []

    def test_a_writer_whose_clock_is_behind_is_not_taken_for_dead(
        self, shared_store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """LIFE-4, STORE-3: its stamps say it was last heard from 10 minutes ago, but the
        storage wrote its newest revision just now: it may be alive, so dropping its
        uncommitted data, rerunning the run and collecting it are refused."""
        behind = datetime.now(UTC) - timedelta(minutes=10)
        monkeypatch.setattr(run_module, "now_utc",
                            lambda: behind.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))  # fmt: skip
        writer = shared_store.open_or_create("skewed", {"a": 1}, heartbeat_interval=None).writer
        writer.extend("gen", _records(2))
        writer.flush()
        storage = shared_store.locate(writer.run_id)
        if storage.is_local:
            writer.close()  # no lock tells any more: only the times can
        assert lifecycle.health(load_manifest(storage), lifecycle.now()) == "abandoned"
        assert lifecycle.may_be_alive(storage, load_manifest(storage), lifecycle.now())
        if not storage.is_local:
            assert being_written_by(storage) == [ANY_WRITER]
            with pytest.raises(ConflictError, match="may be alive"):
                repair_run(storage, salvage=False)
            with pytest.raises(ConflictError, match="is running"):
                shared_store.open_or_create("skewed", {"a": 1}, policy="rerun")
        plan = plan_gc(shared_store, keep_last=0, active_within=timedelta(minutes=5))
        assert [r.run_id for r in plan.delete] == []

        def not_told(self: Storage, rel: str) -> None:
            raise StorageError("Access Denied", location=self.where(rel))

        monkeypatch.setattr(Storage, "modified", not_told)
        assert lifecycle.may_be_alive(storage, load_manifest(storage), lifecycle.now()), (
            "a time the storage would not tell does not make the writer dead"
        )

    def test_a_resume_salvages_counter_deltas_with_their_records(
        self,
        any_store: Store,
        monkeypatch: pytest.MonkeyPatch,
        flush_without_commit: Callable[[RunWriter], None],
    ) -> None:
        """FRAME-6, COMMIT-8: the deltas of a flush whose commit never happened come back
        with its records, on every backend (a new object per flush on object stores), once
        no writer may be alive (at once on local disk; elsewhere once abandoned, STORE-3)."""
        writer = any_store.create_run("tokens", flush_every=None, flush_interval=None)
        writer.extend("gen", _records(2))
        writer.count("tokens", 5)
        writer.flush()
        writer.extend("gen", _records(3, start=2))
        writer.count("tokens", 7)
        flush_without_commit(writer)
        writer.discard()
        if not any_store.storage.is_local:
            later = lifecycle.now() + timedelta(seconds=lifecycle.ABANDON_AFTER + 1)
            monkeypatch.setattr(check, "now", lambda: later)
        resumed = any_store.resume_run(writer.run_id, heartbeat_interval=None)
        assert resumed.manifest.counters == {"tokens": 12}
        assert [r["i"] for r in any_store.open_run(writer.run_id).records("gen")] == list(range(5))
        resumed.finish()
        assert verify_run(any_store.locate(writer.run_id)) == []

    def test_an_artifact_stored_before_any_flush_is_a_live_writers(self, any_store: Store) -> None:
        """Where no lock names writers, a running run heard from lately may have one even
        with no stage file: its unlisted artifact is neither reported nor dropped."""
        writer = any_store.create_run("art", flush_every=None, flush_interval=None)
        writer.add_artifact("prompt.txt", b"p")
        storage = any_store.locate(writer.run_id)
        assert verify_run(storage) == []
        if not storage.is_local:
            with pytest.raises(ConflictError, match="may be alive"):
                repair_run(storage, salvage=False)
        writer.finish()
        assert any_store.open_run(writer.run_id).read_artifact("prompt.txt") == b"p"
        assert verify_run(storage) == []

    def test_a_resumed_job_stores_again_what_its_dead_writer_never_committed(
        self, any_store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ART-1: on local disk the resumed writer replaces the leftover; elsewhere resume
        deletes it once no writer may be alive (the run is abandoned), as no create-only
        write could replace it."""
        dead = any_store.create_run("report", flush_every=None, flush_interval=None)
        dead.extend("gen", _records(2))
        dead.flush()
        dead.add_artifact("report.txt", b"old report")
        dead.discard()
        if not any_store.storage.is_local:
            with any_store.resume_run(dead.run_id) as early:  # heard from just now
                with pytest.raises(ConflictError, match="another writer of the run stored it"):
                    early.add_artifact("report.txt", b"new report")
                early.discard()
            later = lifecycle.now() + timedelta(seconds=lifecycle.ABANDON_AFTER + 1)
            monkeypatch.setattr(check, "now", lambda: later)
        with any_store.resume_run(dead.run_id) as again:
            again.add_artifact("report.txt", b"new report")
        reader = any_store.open_run(dead.run_id)
        assert reader.read_artifact("report.txt") == b"new report"
        assert verify_run(reader.storage) == []

    def test_a_url_that_holds_no_run_is_told_apart(self, any_store: Store) -> None:
        """A RUN given as a URL is looked for there: a store is said to be one (with the
        command that lists it), anything else is no run; neither names another store."""
        any_store.create_run("x").finish()
        url = any_store.url
        with pytest.raises(RunNotFoundError) as store_given:
            any_store.open_run(url)
        assert f"runfmt --store {store_given.value.location} ls" in store_given.value.hint
        assert url.endswith(store_given.value.location.split("://")[-1])
        with pytest.raises(RunNotFoundError) as nothing:
            any_store.open_run(f"{url}/nothing-here")
        assert nothing.value.location.endswith("/nothing-here")
        assert "--store" not in nothing.value.hint

    def test_read_only_store_refuses_writes(self, any_store: Store) -> None:
        with any_store.create_run("ro") as w:
            w.append("gen", {"n": 1})
        reader_store = Store(any_store.url, _options(any_store), read_only=True)
        assert [r.run_id for _, r in reader_store.runs() if not isinstance(r, Exception)] == [
            w.run_id
        ]
        with pytest.raises(ReadOnlyError):
            reader_store.create_run("nope")


def _options(store: Store) -> dict[str, object]:
    fs = store.storage.fs
    return dict(fs.storage_options) if store.storage.protocol in ("s3", "dir") else {}
