"""Counter deltas travel with the records they were counted with: each flush writes them
as a counter frame before its last data frame (FRAME-6), and salvage adds them to the
run's counters exactly once (COMMIT-8)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import runfmt.run
from runfmt.check import repair_run, verify_run
from runfmt.errors import StorageError
from runfmt.format.frames import (
    DataFrame,
    FrameDecoder,
    FrameEncoder,
    encode_counters,
    iter_frames,
)
from runfmt.format.manifest import ChangeSet, FileEntry
from runfmt.run import RunWriter
from runfmt.storage import Storage
from runfmt.store import Store

QUIET: dict[str, Any] = {"flush_every": None, "flush_interval": None, "heartbeat_interval": None}


def frames_of(path: Path) -> tuple[list[int], list[tuple[int, dict[str, Any]]]]:
    """Where each data frame starts, and each counter frame's start and deltas."""
    data = path.read_bytes()
    decoder = FrameDecoder(counters_from=0)
    starts = [e.start for e in decoder.decode(data) if isinstance(e, DataFrame)]
    return starts, [(f.start, f.counters) for f in decoder.counter_frames]


def stage_file(writer: RunWriter, stage: str) -> Path:
    [path] = (Path(writer.storage.url) / "stages" / stage).iterdir()
    return path


def test_a_flush_writes_its_deltas_once_before_its_last_data_frame(store: Store) -> None:
    w = store.create_run("frames", **QUIET)
    w.extend("generate", [{"i": i} for i in range(3)])
    w.extend("score", [{"i": i} for i in range(3)])
    w.count("tokens", 30)
    w.count("cost", 0.5)
    w.flush()
    w.append("score", {"i": 3})  # no new delta: no counter frame
    w.flush()
    w.count("tokens", 1)
    w.flush()  # a commit without records carries its delta in the manifest only
    w.append("score", {"i": 4})
    w.flush()
    assert frames_of(stage_file(w, "generate"))[1] == []
    data_starts, counter_frames = frames_of(stage_file(w, "score"))
    text = b'{"counters":{"tokens":30,"cost":0.5}}'
    size = 8 + len(text) + 1 + 64  # magic, size, JSON text, a line feed, its sha256
    assert counter_frames == [(data_starts[0] - size, {"tokens": 30, "cost": 0.5})]
    assert len(data_starts) == 3
    assert w.finish().counters == {"tokens": 31, "cost": 0.5}
    assert verify_run(w.storage) == []


def test_repair_salvages_the_deltas_of_a_flush_whose_commit_never_happened(
    store: Store, flush_without_commit: Callable[[RunWriter], None]
) -> None:
    w = store.create_run("crash", **QUIET)
    w.append("generate", {"i": 0})
    w.count("tokens", 5)
    w.flush()
    w.extend("generate", [{"i": i} for i in range(1, 4)])
    w.extend("score", [{"i": i} for i in range(1, 4)])
    w.count("tokens", 7)
    w.count("cost", 0.25)
    flush_without_commit(w)
    w.append("score", {"i": 4})
    w.count("tokens", 100)
    flush_without_commit(w)  # a second frame holds only the new delta
    w.discard()

    report = repair_run(w.storage)
    assert report.salvaged_records == 7
    assert "salvaged counter delta tokens +107" in report.actions
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"tokens": 112, "cost": 0.25}
    assert verify_run(w.storage) == []
    assert repair_run(w.storage).actions == []
    assert store.open_run(w.run_id).manifest.counters == {"tokens": 112, "cost": 0.25}


def test_drop_loses_the_deltas_with_the_records(
    store: Store, flush_without_commit: Callable[[RunWriter], None]
) -> None:
    w = store.create_run("drop", **QUIET)
    w.append("generate", {"i": 0})
    w.count("tokens", 7)
    flush_without_commit(w)
    w.discard()
    repair_run(w.storage, salvage=False)
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {}
    assert reader.manifest.stages == ()


def test_a_counter_frame_before_a_torn_data_frame_is_cut_with_it(
    store: Store, flush_without_commit: Callable[[RunWriter], None]
) -> None:
    w = store.create_run("torn", **QUIET)
    w.append("generate", {"i": 0})
    w.count("tokens", 7)
    flush_without_commit(w)
    w.append("generate", {"i": 1})
    w.count("tokens", 100)
    flush_without_commit(w)
    w.discard()
    path = stage_file(w, "generate")
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the crash tore the second flush's data frame
    report = repair_run(w.storage)
    assert report.salvaged_records == 1
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"tokens": 7}
    assert list(reader.records("generate")) == [{"i": 0}]
    assert verify_run(w.storage) == []


def test_a_changed_counter_frame_is_not_salvaged_as_genuine(
    store: Store, flush_without_commit: Callable[[RunWriter], None]
) -> None:
    """FRAME-6: a flipped digit in an uncommitted counter frame breaks its sha256, so
    salvage keeps what comes before it, as it does before a torn frame."""
    w = store.create_run("flipped", **QUIET)
    w.append("generate", {"i": 0})
    w.count("n", 5)
    w.flush()
    w.append("generate", {"i": 1})
    w.count("n", 5)
    flush_without_commit(w)
    w.discard()
    path = stage_file(w, "generate")
    data = bytearray(path.read_bytes())
    at = data.rindex(b'"n":5}') + 4
    data[at] ^= 0x02  # 5 -> 7
    path.write_bytes(bytes(data))
    report = repair_run(w.storage)
    assert report.salvaged_records == 0
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"n": 5}
    assert list(reader.records("generate")) == [{"i": 0}]
    assert verify_run(w.storage) == []


def test_a_salvaged_delta_a_manifest_cannot_hold_is_reported_not_added(store: Store) -> None:
    w = store.create_run("overflow", **QUIET)
    w.append("generate", {"i": 0})
    w.count("big", 2**63 - 1)
    w.close()
    with stage_file(w, "generate").open("ab") as f:  # what a writer that did not check left
        f.write(encode_counters({"big": 1, "tokens": 3}) + FrameEncoder().encode(b'{"i":1}\n'))
    report = repair_run(w.storage)
    assert [(p.rule, "'big'" in p.problem) for p in report.left] == [("FRAME-6", True)]
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"big": 2**63 - 1, "tokens": 3}
    assert list(reader.records("generate")) == [{"i": 0}, {"i": 1}]


def test_each_salvaged_delta_is_added_while_its_counter_can_hold_it(store: Store) -> None:
    """COMMIT-8: the delta that would overflow its counter is left out, not those before
    it."""
    w = store.create_run("overflow-float", **QUIET)
    w.append("generate", {"i": 0})
    w.count("cost", 0.25)
    w.close()
    with stage_file(w, "generate").open("ab") as f:
        for line in (b'{"i":1}\n', b'{"i":2}\n'):
            f.write(encode_counters({"cost": 1.7e308}) + FrameEncoder().encode(line))
    report = repair_run(w.storage)
    assert [p.rule for p in report.left] == ["FRAME-6"]
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"cost": 0.25 + 1.7e308}
    assert list(reader.records("generate")) == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_salvage_checks_only_the_counter_frames_past_the_committed_length(
    store: Store,
) -> None:
    """FRAME-6: readers skip the counter frames of a listed prefix unchecked, and so does
    salvage: a committed one whose sha256 does not match cut the valid frames after it."""
    w = store.create_run("committed-counter-frame", **QUIET)
    w.append("generate", {"i": 0})
    w.close()
    path = stage_file(w, "generate")
    changed = encode_counters({"n": 1}).replace(b'"n":1', b'"n":2')
    with path.open("ab") as f:
        f.write(changed + FrameEncoder().encode(b'{"i":1}\n'))
    data = path.read_bytes()
    rel = path.relative_to(w.storage.url).as_posix()
    entry = FileEntry(rel, len(data), 2, 0, hashlib.sha256(data).hexdigest())
    runfmt.run.commit(w.storage, ChangeSet(files={rel: entry}), lock_timeout=5.0)
    assert verify_run(w.storage) == []
    with path.open("ab") as f:
        f.write(encode_counters({"n": 3}) + FrameEncoder().encode(b'{"i":2}\n'))
    assert repair_run(w.storage).salvaged_records == 1
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"n": 3}
    assert list(reader.records("generate")) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert verify_run(w.storage) == []


def test_every_zstd_reader_skips_counter_frames(store: Store) -> None:
    with store.create_run("skip", **QUIET) as w:
        w.append("generate", {"i": 0})
        w.count("tokens", 1)
    data = stage_file(w, "generate").read_bytes()
    assert b'{"counters":{"tokens":1}}' in data
    [(_, content)] = [
        (e.start, e.content) for e in iter_frames(data) if isinstance(e, DataFrame) and e.content
    ]
    assert content == b'{"i":0}\n'


def test_deltas_too_many_for_one_frame_go_in_the_commit_only(store: Store) -> None:
    """FRAME-6 is a SHOULD: deltas whose frame would pass 64 KiB are committed, not framed."""
    with store.create_run("many", **QUIET) as w:
        for i in range(4000):
            w.count(f"a-counter-with-a-long-name-{i:05d}", 1)
        w.append("generate", {"i": 0})
    assert frames_of(stage_file(w, "generate"))[1] == []
    assert len(store.open_run(w.run_id).manifest.counters) == 4000


@pytest.mark.parametrize("how", ["repair", "resume"])
def test_deltas_are_not_counted_twice_when_a_live_writers_object_is_salvaged(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """STORE-3: on an object store, a repair while a writer may be alive lists its newest
    object but leaves its deltas to that writer's own commit."""
    w = memory_store.create_run("race", **QUIET)
    commit = runfmt.run.commit_locked

    def repair_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(runfmt.run, "commit_locked", commit)  # once
        if how == "repair":
            repair_run(memory_store.locate(w.run_id))
        else:
            memory_store.resume_run(w.run_id, heartbeat_interval=None).close()
        return commit(*args, **kwargs)

    for _ in range(5):
        w.append("generate", {"tokens": 10})
        w.count("tokens", 10)
    monkeypatch.setattr(runfmt.run, "commit_locked", repair_first)
    w.flush()
    reader = memory_store.open_run(w.run_id)
    assert sum(r["tokens"] for r in reader.records("generate")) == 50
    assert reader.manifest.counters == {"tokens": 50}


def test_an_integer_delta_beyond_64_bits_goes_in_the_commit_only(store: Store) -> None:
    w = store.create_run("big", **QUIET)
    w.count("x", 2**63 - 1)
    w.flush()
    w.count("x", -(2**64 - 2))
    w.append("generate", {"i": 0})
    assert w.finish().counters == {"x": -(2**63 - 1)}
    assert frames_of(stage_file(w, "generate"))[1] == []


@pytest.mark.parametrize("landed", [True, False])
def test_a_put_that_may_have_landed_is_sent_again_as_it_was(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """An object store PUT that raised may have stored the object: the next flush sends the
    same bytes to the same key before new records, so no second object holds its records
    and a later salvage finds no orphan (COMMIT-1, COMMIT-8)."""
    w = memory_store.create_run("put", **QUIET)
    put = Storage.put

    def lost_reply(self: Storage, rel: str, data: bytes) -> None:
        monkeypatch.setattr(Storage, "put", put)  # once
        if landed:
            put(self, rel, data)
        raise StorageError("connection reset", location=rel)

    for tokens in (10, 20):
        w.count("tokens", tokens)
        w.append("generate", {"tokens": tokens})
    monkeypatch.setattr(Storage, "put", lost_reply)
    with pytest.raises(StorageError, match="connection reset"):
        w.flush()
    w.count("tokens", 30)
    w.append("generate", {"tokens": 30})
    w.close()
    memory_store.resume_run(w.run_id, **QUIET).close()
    reader = memory_store.open_run(w.run_id)
    assert [r["tokens"] for r in reader.records("generate")] == [10, 20, 30]
    assert reader.manifest.counters == {"tokens": 60}
    assert [f.records for f in reader.manifest.stage("generate").files] == [2, 1]
    assert verify_run(reader.storage) == []
