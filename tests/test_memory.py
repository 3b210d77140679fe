"""Streaming holds one frame's records at a time, whatever the stage's compression ratio."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runfmt import transfer
from runfmt.check import verify_run
from runfmt.store import Store
from runfmt.transfer import export_run, export_stage, import_run

FRAMES = 600
PER_FRAME = 10
PAD = 10_000
"""600 frames of 100 KB that compress about 300 times: 60 MB of records in one 1 MiB read."""
BOUND = 12 << 20


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(tmp_path_factory.mktemp("memory") / "runs")
    with store.create_run("compressible", flush_every=PER_FRAME, flush_interval=None) as run:
        stage = run.stage("pad", key_field="key")
        for i in range(FRAMES * PER_FRAME):
            stage.append({"key": f"k{i}", "pad": "a" * PAD})
    return store


def _peak(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _drain(records: Iterator[object]) -> None:
    for _ in records:
        pass


def _cache_hit(store: Store) -> None:
    assert Store(store.url).cache.record("pad", "k5") == {"key": "k5", "pad": "a" * PAD}


@pytest.mark.parametrize(
    "work",
    [
        pytest.param(lambda s, r, tmp: _drain(s.open_run(r).records("pad")), id="records"),
        pytest.param(lambda s, r, tmp: verify_run(s.locate(r)), id="verify"),
        pytest.param(
            lambda s, r, tmp: export_stage(s.open_run(r), "pad", tmp / "pad.jsonl"), id="export"
        ),
        pytest.param(lambda s, r, tmp: _cache_hit(s), id="cache-scan"),
    ],
)
def test_streaming_memory_is_one_frame_not_one_read(
    store: Store, tmp_path: Path, work: Callable[[Store, str, Path], object]
) -> None:
    (run_id,) = store.run_ids()
    size = sum(f.stat().st_size for f in (Path(store.url) / run_id / "stages").rglob("*.zst"))
    assert size < 1 << 20, "the whole stage is one read"
    assert _peak(lambda: work(store, run_id, tmp_path)) < BOUND


def test_indexing_the_keys_of_a_big_run_holds_no_list_of_them(tmp_path: Path) -> None:
    """The cache entries a refresh finds wait in SQLite (a temporary table), not in a
    Python list: hundreds of thousands of keys take no more memory than a few."""
    store = Store(tmp_path / "runs")
    with store.create_run("keys", flush_interval=None) as run:
        run.stage("t", key_field="key")
        run.extend("t", ({"key": f"key-{i:07d}", "v": i} for i in range(200_000)))
    index = Store(store.url).index
    assert _peak(index.refresh) < BOUND
    assert Store(store.url).cache.record("t", "key-0199999") == {"key": "key-0199999", "v": 199999}
    assert index.query("SELECT count(*) FROM cache") == [(200_000,)]


def test_importing_records_that_compress_many_times_over_holds_a_frame_not_a_stage(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive of 60 MB of records in a few KB imports with a bounded buffer: a flush
    once a frame's worth (64 MiB; 4 MiB here) is buffered."""
    (run_id,) = store.run_ids()
    export_run(store.open_run(run_id), tmp_path / "run.tar")
    monkeypatch.setattr(transfer, "_IMPORT_FLUSH_BYTES", 4 << 20)
    into = Store(tmp_path / "into")
    assert _peak(lambda: import_run(into, tmp_path / "run.tar")) < BOUND + (4 << 20)
    assert sum(1 for _ in into.open_run(run_id).records("pad")) == FRAMES * PER_FRAME
