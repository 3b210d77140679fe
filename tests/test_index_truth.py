"""The index stays true to the folders: races between indexing processes, runs that go
back a revision, copies in progress, damaged manifests, and index files it cannot use."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from runfmt import _index_reading as reading
from runfmt import index as index_module
from runfmt.index import Index
from runfmt.run import RunWriter
from runfmt.store import Store


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust every stamp at once: a stale entry then stays stale unless the index fixes it."""
    monkeypatch.setattr(reading, "RACY_NS", 0)


def keyed_writer(store: Store, *keys: str) -> RunWriter:
    writer = store.create_run("r", {}, heartbeat_interval=None)
    writer.stage("score", key_field="key").extend({"key": k} for k in keys)
    writer.flush()
    return writer


def cached(index: Index) -> set[str]:
    return {key for (key,) in index.query("SELECT key FROM cache")}


def test_a_run_that_goes_back_a_revision_is_listed_as_that_revision(store: Store) -> None:
    """`repair --drop`, or a sync of an older copy, leaves an older newest revision."""
    writer = keyed_writer(store, "early")
    writer.append("score", {"key": "late"})
    writer.flush()
    writer.close()
    assert store.cache.get("score", "late") is not None
    manifests = Path(store.url) / writer.run_id / "_manifests"
    max(manifests.iterdir()).unlink()
    previous = max(manifests.iterdir())
    shutil.copyfile(previous, manifests.parent / "manifest.json")

    summary = store.index.run(writer.run_id)
    assert summary is not None
    assert (summary.revision, summary.records) == (int(previous.stem), 1)
    store.cache.refresh()
    assert store.cache.get("score", "late") is None, "no longer committed"
    assert store.cache.get("score", "early") is not None


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch) -> Callable[[Index], tuple[threading.Thread, Any]]:
    """Start ``index.refresh()`` in a thread that pauses once it has read the runs; the
    returned event lets it write."""
    file_work = Index._file_work
    gates: dict[int, tuple[threading.Event, threading.Event]] = {}

    def pausing(self: Index, con: Any, rows: Any, keys: bool, fresh: bool = False) -> Any:
        work = file_work(self, con, rows, keys, fresh)
        if id(self) in gates:
            read, go = gates[id(self)]
            read.set()
            assert go.wait(30)
        return work

    monkeypatch.setattr(Index, "_file_work", pausing)

    def start(index: Index, rebuild: bool = False) -> tuple[threading.Thread, threading.Event]:
        read, go = threading.Event(), threading.Event()
        gates[id(index)] = read, go
        thread = threading.Thread(target=index.rebuild if rebuild else index.refresh)
        thread.start()
        assert read.wait(30)
        return thread, go

    return start


def test_a_refresh_that_loses_a_race_reads_the_run_again(
    store: Store, paused: Callable[[Index], tuple[threading.Thread, threading.Event]]
) -> None:
    """A reads revision N; the writer commits N+1; B reads N+1; A writes; B writes."""
    writer = keyed_writer(store, *(f"a{i}" for i in range(5)))
    first, second = Index.for_url(store.url), Index.for_url(store.url)
    thread_a, go_a = paused(first)
    writer.stage("score").extend({"key": f"a{i}"} for i in range(5, 10))
    newest = writer.flush().revision
    thread_b, go_b = paused(second)
    go_a.set()
    thread_a.join()
    go_b.set()
    thread_b.join()

    fresh = Index.for_url(store.url)
    assert fresh.refresh().read == 0, "the index was left true: nothing to read again"
    assert cached(fresh) == {f"a{i}" for i in range(10)}
    assert [r.revision for r in fresh.runs()] == [newest]
    writer.finish()


def test_a_rebuild_hides_no_run_from_listings_meanwhile(
    store: Store, paused: Callable[..., tuple[threading.Thread, threading.Event]]
) -> None:
    """Another process lists while `runfmt index rebuild` has read the runs but not yet
    written them again: every run is there, as indexed before."""
    writer = keyed_writer(store, "a", "b")
    writer.finish()
    listing = Index.for_url(store.url)
    assert listing.refresh().runs == 1
    thread, go = paused(Index.for_url(store.url), rebuild=True)
    assert [r.run_id for r in listing.runs(refresh=False)] == [writer.run_id]
    assert cached(listing) == {"a", "b"}
    go.set()
    thread.join()
    assert [r.run_id for r in listing.runs()] == [writer.run_id]
    assert cached(listing) == {"a", "b"}


def test_a_stage_declared_anew_by_hand_drops_its_old_cache_entries(store: Store) -> None:
    """A hand-written revision that changes a stage's key field and record schema version
    drops the stage's entries; its file, whose header keeps the old declaration, is
    refused by every reader (FRAME-2), the cache too."""
    writer = store.create_run("r", {})
    writer.stage("score", key_field="key").append({"key": "K1", "id": "I1"})
    writer.finish()
    assert store.cache.get("score", "K1") is not None
    folder = Path(store.url) / writer.run_id
    doc = json.loads(max((folder / "_manifests").glob("*.json")).read_bytes())
    doc["revision"] += 1
    doc["stages"][0] |= {"record_schema_version": "2", "key_field": "id"}
    (folder / "_manifests" / f"{doc['revision']:08d}.json").write_text(json.dumps(doc))

    store.cache.refresh()
    assert store.cache.get("score", "K1") is None
    assert store.cache.get("score", "I1") is None, "record schema version 1 is gone"
    assert store.cache.get("score", "I1", record_schema_version="2") is None
    assert store.index.query("SELECT count(*) FROM cache") == [(0,)]


def test_a_run_copied_in_while_listed_is_indexed_once_the_copy_ends(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`cp -r` copies `_manifests/` before `stages/` (readdir order): an `ls` in between
    sees listed files that are not there yet."""
    source = Store(tmp_path / "elsewhere")
    writer = keyed_writer(source, "k")
    writer.finish()
    src, dst = Path(source.url) / writer.run_id, Path(store.url) / writer.run_id
    dst.mkdir(parents=True)
    shutil.copytree(src / "_manifests", dst / "_manifests")
    shutil.copy2(src / "manifest.json", dst)
    assert store.index.refresh().runs == 1, "a cache lookup during the copy"
    assert [r.run_id for r in store.index.runs()] == [writer.run_id]
    assert "not indexed for the cache (tried again at the next refresh)" in caplog.text

    shutil.copytree(src / "stages", dst / "stages")
    store.cache.refresh()
    assert store.cache.get("score", "k") is not None


def test_the_last_record_of_a_key_in_a_run_wins_whatever_the_writer_ids(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files rank by their place in the stage's list, not by name (LIN-2 agrees)."""
    monkeypatch.setattr(secrets, "token_hex", lambda n: "ff" * n)
    writer = keyed_writer(store)
    writer.append("score", {"key": "k", "value": "first"})
    writer.close()
    monkeypatch.setattr(secrets, "token_hex", lambda n: "00" * n)
    resumed = store.resume_run(writer.run_id, heartbeat_interval=None)
    resumed.append("score", {"key": "k", "value": "second"})
    resumed.finish()
    paths = [f.path for f in store.open_run(writer.run_id).manifest.stage("score").files]  # type: ignore[union-attr]
    assert sorted(paths) != paths, "the later file's name sorts first"

    hit = store.cache.get("score", "k")
    assert hit is not None
    assert hit.record["value"] == "second"
    assert store.cache.get_many("score", ["k"])["k"].record["value"] == "second"


def test_a_revision_this_process_cannot_read_is_listed_unreadable(store: Store) -> None:
    broken = keyed_writer(store, "x")
    broken.close()
    good = keyed_writer(store, "y")
    good.finish()
    newest = max((Path(store.url) / broken.run_id / "_manifests").iterdir())
    newest.unlink()
    newest.mkdir()  # listed as a revision, read fails: not a regular file

    runs = {r.run_id: r for r in store.index.runs()}
    assert runs[good.run_id].status == "completed"
    assert runs[broken.run_id].status == "unreadable"
    assert "cannot read its newest revision" in (runs[broken.run_id].problem or "")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"revision": 99}, "MAN-3"),
        ({"status": "weird"}, "status"),
        ({"finished_at": None}, "MAN-9"),
        ({"error": "boom"}, "MAN-9"),
    ],
)
def test_a_manifest_every_reader_refuses_is_listed_unreadable_and_never_hits(
    store: Store, change: dict[str, Any], problem: str
) -> None:
    writer = keyed_writer(store, "k")
    writer.finish()
    newest = max((Path(store.url) / writer.run_id / "_manifests").iterdir())
    doc = json.loads(newest.read_text())
    newest.write_text(json.dumps({**doc, **change}))

    [summary] = store.index.runs()
    assert summary.status == "unreadable"
    assert problem in (summary.problem or "")
    assert store.cache.get("score", "k") is None


def test_a_file_entry_with_a_malformed_sha256_is_listed_unreadable(store: Store) -> None:
    writer = keyed_writer(store, "k")
    writer.finish()
    newest = max((Path(store.url) / writer.run_id / "_manifests").iterdir())
    doc = json.loads(newest.read_text())
    doc["stages"][0]["files"][0]["sha256"] = "XYZ"
    newest.write_text(json.dumps(doc))
    [summary] = store.index.runs()
    assert summary.status == "unreadable"
    assert store.cache.get("score", "k") is None


def test_an_index_deleted_while_another_store_holds_it_is_rebuilt(store: Store) -> None:
    """Deleting the index leaves its WAL files behind, and a process holding it open."""
    holder = keyed_writer(store, "a")
    holder.finish()
    assert len(store.index.runs()) == 1
    path = Path(store.index.path)
    path.unlink()
    assert path.with_name(path.name + "-wal").exists()

    other = Store(store.url)
    assert len(other.index.runs()) == 1
    keyed_writer(store, "b").finish()
    assert len(store.index.runs()) == 2, "the holder opens the new file"
    assert len(other.index.runs()) == 2
    assert other.cache.get("score", "b") is not None
    assert other.index.query("PRAGMA integrity_check") == [("ok",)]


def test_an_index_file_this_process_may_not_write_is_kept_in_the_user_cache(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user created the store's index: it is readable, not writable, by us."""
    monkeypatch.setenv("RUNFMT_CACHE_DIR", str(tmp_path / "cache"))
    keyed_writer(store, "k").finish()
    shared = Path(store.index.path)
    assert store.index.runs()
    writable = os.access
    monkeypatch.setattr(
        index_module.os,
        "access",
        lambda p, mode: writable(p, mode) and not (mode == os.W_OK and Path(p) == shared),
    )
    index = Index.for_url(store.url)
    assert index.path.startswith(str(tmp_path / "cache"))
    assert len(index.runs()) == 1


def test_an_index_folder_that_cannot_be_made_gives_an_index_in_memory(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("RUNFMT_CACHE_DIR", str(tmp_path / "not-a-folder"))
    keyed_writer(store, "k").finish()
    index = Index.for_url(store.url, read_only=True)
    assert len(index.runs()) == 1
    assert index.path == ":memory:"
    assert "indexing in memory" in caplog.text


def test_a_run_replaced_in_a_memory_store_is_indexed_again(memory_store: Store) -> None:
    """Same id, same revision number, another run: the stamp also holds the revision's
    version as the backend lists it."""
    first = memory_store.open_or_create("det", {"a": 1}, heartbeat_interval=None).writer
    assert first is not None
    first.stage("score", key_field="key").append({"key": "old"})
    first.finish()
    assert memory_store.cache.get("score", "old") is not None
    other = Store(memory_store.url)
    assert other.index.runs()
    second = memory_store.open_or_create(
        "det", {"a": 1}, policy="rerun", heartbeat_interval=None
    ).writer
    assert second is not None
    assert second.run_id == first.run_id
    second.stage("score", key_field="key").append({"key": "new"})
    second.finish()
    assert second.manifest.revision == first.manifest.revision

    for store in (memory_store, other):
        store.cache.refresh()
        assert store.cache.get("score", "old") is None
        assert store.cache.get("score", "new") is not None


def test_since_takes_a_date(store: Store) -> None:
    keyed_writer(store, "k").finish()
    assert len(store.index.runs(since=date(2000, 1, 1))) == 1
    assert store.index.runs(since=date(9999, 1, 1)) == []
