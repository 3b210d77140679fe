"""One store contract, run over every backend: local folder (file://), memory://, s3:// and a
folder through fsspec (dir://)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from runfmt.check import repair_run, verify_run
from runfmt.errors import FormatError, ReadOnlyError, RunNotFoundError
from runfmt.format import names
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
        assert [p.rule for p in verify_run(storage)] == ["COMMIT-7"]
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
