"""Writing and reading stage files, and the cost of a commit, beside bare loops.

Baselines, measured in the same process on the same records:
- bare write loop: per 1,000 records, json-encode each (stdlib json or orjson)
  -> zstd level 3 with checksum -> sha256 -> write to one file; also with each
  frame committed by the commit protocol's bare system calls (`_BareCommit`), in the
  loop's thread or in a second one committing all frames queued meanwhile at once;
- bare read loop: read each frame of that file -> decompress -> split lines -> orjson;
- atomic replace: temp file + fsync + ``os.replace`` + fsync of the folder.

Append is also measured with a single commit, at the end: what appending costs
without the per-flush commits.

A commit is one `RunWriter.flush` of 5 records (frame appended and fsynced,
revision created exclusively, ``manifest.json`` replaced) in a run already
holding 1,000 or 1,000,000 records; the big run is written with ``extend`` and
committed every 100,000 records, runs alternate, and the median is reported.

Records look like evaluation results (id, model, prompt from a shared pool,
generated output, score, token count, a null error) with Zipf-distributed
words, sized to exactly 204 or 2,048 bytes per JSON line.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import itertools
import json
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import zstandard
from common import Row, median_of, race

from runfmt.run import RunWriter
from runfmt.store import Store

SECTION = "format"
FLUSH_EVERY = 1000
STAGE = "generate"

Record = dict[str, Any]
Encode = Callable[[Record], bytes]


class _Corpus:
    """Deterministic evaluation-like records of an exact encoded size."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = [
            "".join(self._rng.choice(letters) for _ in range(self._rng.randint(2, 9)))
            for _ in range(5000)
        ]
        weights = list(itertools.accumulate(1 / (k + 1) ** 1.1 for k in range(5000)))
        self._stream = " ".join(self._rng.choices(words, cum_weights=weights, k=600_000))
        self._prompts = [self.text(2400) for _ in range(300)]

    def text(self, n: int) -> str:
        """``n`` characters of Zipf-distributed words from a random place in a 4 MB stream."""
        start = self._rng.randrange(len(self._stream) - n)
        return self._stream[start : start + n]

    def record(self, i: int, size: int) -> Record:
        rng = self._rng
        record: Record = {
            "id": f"item-{i:07d}",
            "model": rng.choice(["m-7b", "m-13b", "m-70b"]),
            "prompt": "",
            "output": "",
            "score": round(rng.random(), 3),
            "tokens": rng.randint(1, 4000),
            "error": None,
        }
        room = size - len(orjson.dumps(record)) - 1
        record["prompt"] = rng.choice(self._prompts)[: room // 2]
        record["output"] = self.text(room - room // 2)
        return record

    def records(self, n: int, size: int) -> list[Record]:
        return [self.record(i, size) for i in range(n)]


def _stdlib_line(record: Record) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _orjson_line(record: Record) -> bytes:
    return orjson.dumps(record) + b"\n"


def _bare_frames(records: list[Record], encode: Encode) -> Iterator[bytes]:
    """The bare loop's frames, one per 1,000 records, each added to a running sha256."""
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    digest = hashlib.sha256()
    for start in range(0, len(records), FLUSH_EVERY):
        payload = b"".join([encode(r) for r in records[start : start + FLUSH_EVERY]])
        frame = cctx.compress(payload)
        digest.update(frame)
        yield frame
    digest.hexdigest()


def bare_write(records: list[Record], encode: Encode, path: Path) -> list[int]:
    """The bare write loop; returns the compressed size of each frame."""
    sizes = []
    with open(path, "wb") as f:
        for frame in _bare_frames(records, encode):
            f.write(frame)
            sizes.append(len(frame))
    return sizes


def bare_durable_write(records: list[Record], folder: Path) -> None:
    """The orjson bare loop, each frame committed with the commit protocol's bare system
    calls (`_BareCommit`): the floor of any writer that makes every flush durable."""
    shutil.rmtree(folder, ignore_errors=True)
    bare = _BareCommit(folder, b"{}".ljust(1024))
    for frame in _bare_frames(records, _orjson_line):
        bare.commit(frame)
    bare.close()


def bare_grouped_write(records: list[Record], folder: Path) -> None:
    """`bare_durable_write` with the commits made by a second thread, each committing
    every frame queued meanwhile (group commit): the floor of a writer that overlaps
    its commits with encoding."""
    shutil.rmtree(folder, ignore_errors=True)
    bare = _BareCommit(folder, b"{}".ljust(1024))
    frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def committer() -> None:
        while True:
            group = [frames.get()]
            while not frames.empty():
                group.append(frames.get())
            data = b"".join(frame for frame in group if frame is not None)
            if data:
                bare.commit(data)
            if group[-1] is None:
                return

    thread = threading.Thread(target=committer)
    thread.start()
    for frame in _bare_frames(records, _orjson_line):
        frames.put(frame)
    frames.put(None)
    thread.join()
    bare.close()


def bare_read(path: Path, frame_sizes: list[int]) -> int:
    """The bare read loop over the frames `bare_write` wrote; returns the record count."""
    dctx = zstandard.ZstdDecompressor()
    count = 0
    with open(path, "rb") as f:
        for size in frame_sizes:
            lines = dctx.decompress(f.read(size)).split(b"\n")
            lines.pop()
            count += len(list(map(orjson.loads, lines)))
    return count


def runfmt_write(
    store: Store, records: list[Record], batch: int = 1, flush_every: int | None = FLUSH_EVERY
) -> str:
    """Write the records as one stage of a new run (``batch`` per call, a flush every
    ``flush_every`` records; None: one commit, at the end)."""
    with store.create_run("bench", flush_every=flush_every) as run:
        stage = run.stage(STAGE)
        if batch == 1:
            for record in records:
                stage.append(record)
        else:
            for start in range(0, len(records), batch):
                stage.extend(records[start : start + batch])
    return run.run_id


def runfmt_read(store: Store, run_id: str) -> int:
    """Stream the stage's records (sha256 verified) with no Python work per record; count them."""
    counter = itertools.count()
    collections.deque(zip(store.open_run(run_id).records(STAGE), counter, strict=False), maxlen=0)
    return next(counter)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _throughput(tmp: Path, records: list[Record], label: str, repeat: int) -> Iterable[Row]:
    n = len(records)
    bare = tmp / "bare.zst"
    store = Store(tmp / "runs")
    run_ids: list[str] = []
    write = race(
        repeat,
        {
            "json": lambda: bare_write(records, _stdlib_line, bare),
            "orjson": lambda: bare_write(records, _orjson_line, bare),
            "durable": lambda: bare_durable_write(records, tmp / "bare-durable"),
            "grouped": lambda: bare_grouped_write(records, tmp / "bare-grouped"),
            "runfmt": lambda: run_ids.append(runfmt_write(store, records)),
            "runfmt_extend": lambda: runfmt_write(store, records, batch=FLUSH_EVERY),
            "runfmt_once": lambda: runfmt_write(store, records, flush_every=None),
        },
    )
    frame_sizes = bare_write(records, _orjson_line, bare)
    run_id = run_ids[-1]
    if not runfmt_read(store, run_id) == n == bare_read(bare, frame_sizes):
        raise AssertionError("runfmt and the bare loop read back different record counts")
    read = race(
        2 * repeat - 1,
        {
            "bare": lambda: bare_read(bare, frame_sizes),
            "runfmt": lambda: runfmt_read(store, run_id),
        },
    )
    run_bytes = _folder_bytes(tmp / "runs" / run_id)
    bare_bytes = bare.stat().st_size
    shutil.rmtree(tmp / "runs")

    def rate(seconds: float) -> float:
        return n / seconds

    yield Row.vs(f"append {label} (vs stdlib json)", rate(write["runfmt"]), "rec/s",
                 "bare loop, stdlib json", rate(write["json"]))  # fmt: skip
    yield Row.vs(f"append {label}", rate(write["runfmt"]), "rec/s",
                 "bare loop, orjson", rate(write["orjson"]), at_least=0.5)  # fmt: skip
    yield Row.vs(f"append {label} (vs its syscalls)", rate(write["runfmt"]), "rec/s",
                 "bare loop + commit syscalls", rate(write["durable"]))  # fmt: skip
    yield Row.vs(f"bare loop + commit syscalls, {label}", rate(write["durable"]), "rec/s",
                 "bare loop, orjson", rate(write["orjson"]))  # fmt: skip
    yield Row.vs(f"bare loop + commit syscalls in a thread, {label}", rate(write["grouped"]),
                 "rec/s", "bare loop, orjson", rate(write["orjson"]))  # fmt: skip
    yield Row.vs(f"append {label}, one commit at the end", rate(write["runfmt_once"]), "rec/s",
                 "bare loop, orjson", rate(write["orjson"]))  # fmt: skip
    yield Row.vs(f"extend {label}, 1,000 per call", rate(write["runfmt_extend"]), "rec/s",
                 "bare loop, orjson", rate(write["orjson"]), at_least=0.5)  # fmt: skip
    yield Row.vs(f"read {label}", rate(read["runfmt"]), "rec/s",
                 "bare read loop", rate(read["bare"]), at_least=0.7)  # fmt: skip
    if label.startswith("204"):
        yield Row.limit(f"disk {label}, whole run folder", run_bytes / n, "B/rec", at_most=50,
                        baseline="bare loop file", baseline_value=bare_bytes / n)  # fmt: skip
    else:
        yield Row.vs(f"disk {label}, whole run folder", run_bytes / n, "B/rec",
                     "bare loop file", bare_bytes / n)  # fmt: skip


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(folder: Path, data: bytes) -> None:
    """The commit baseline: sibling temp file, fsync, ``os.replace``, fsync of the folder."""
    tmp = folder / ".tmp-manifest"
    _write_synced(tmp, data)
    os.replace(tmp, folder / "manifest.json")
    _fsync_folder(folder)


class _BareCommit:
    """The commit protocol's system calls with no logic around them: the floor of a commit.

    Append and fsync a data file, flock, list the revisions, create the next one
    (temp, fsync, link, unlink, fsync of the folder), replace ``manifest.json``
    (temp, rename: the copy of a running run is not made durable), unlock; every
    8th commit unlinks 8 old revisions.
    """

    def __init__(self, folder: Path, manifest: bytes) -> None:
        self.folder, self.manifest, self.revision = folder, manifest, 0
        (folder / "_manifests").mkdir(parents=True)
        self.data = os.open(folder / "data", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def commit(self, record: bytes) -> None:
        os.write(self.data, record)
        os.fsync(self.data)
        lock = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        revisions = self.folder / "_manifests"
        os.listdir(revisions)
        self.revision += 1
        tmp = revisions / ".tmp"
        _write_synced(tmp, self.manifest)
        os.link(tmp, revisions / f"{self.revision:08d}.json")
        os.unlink(tmp)
        _fsync_folder(revisions)
        copy = self.folder / ".tmp-manifest"
        copy.write_bytes(self.manifest)
        os.replace(copy, self.folder / "manifest.json")
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        if self.revision % 8 == 0 and self.revision > 32:
            for old in range(self.revision - 39, self.revision - 31):
                (revisions / f"{old:08d}.json").unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self.data)


def _build_run(store: Store, pool: list[Record], size: int) -> RunWriter:
    """A running run holding ``size`` records (ids unique), committed every 100,000 records."""
    writer = store.create_run("bench-commit", flush_every=None, flush_interval=None)
    stage = writer.stage(STAGE)
    for start in range(0, size, len(pool)):
        chunk = [
            dict(record, id=f"item-{start + i:07d}")
            for i, record in enumerate(pool[: size - start])
        ]
        stage.extend(chunk)
        if stage.pending >= 100_000:
            writer.flush()
    writer.flush()
    return writer


def _commits(tmp: Path, pool: list[Record], small: int, large: int, rounds: int) -> Iterable[Row]:
    store = Store(tmp / "commit-runs")
    writers = [_build_run(store, pool, small), _build_run(store, pool, large)]
    manifest = (tmp / "commit-runs" / writers[1].run_id / "manifest.json").read_bytes()
    times: list[list[float]] = [[], []]
    replace: list[float] = []
    floor: list[float] = []
    bare = _BareCommit(tmp / "bare-commit", manifest)
    five = b"".join(orjson.dumps(r) + b"\n" for r in pool[:5])
    for i in range(rounds):
        for w, out in zip(writers, times, strict=True):
            stage = w.stage(STAGE)
            for j in range(5):
                stage.append(pool[(i * 5 + j) % len(pool)])
            start = time.perf_counter()
            w.flush()
            out.append(time.perf_counter() - start)
        start = time.perf_counter()
        atomic_replace(tmp, manifest)
        replace.append(time.perf_counter() - start)
        start = time.perf_counter()
        bare.commit(five)
        floor.append(time.perf_counter() - start)
    bare.close()
    for w in writers:
        w.close()
    ms = 1000.0
    small_ms, large_ms = median_of(times[0]) * ms, median_of(times[1]) * ms
    yield Row.vs(f"commit 5 rec, run holds {small:,}", small_ms, "ms",
                 f"atomic replace+fsync {len(manifest):,} B", median_of(replace) * ms,
                 at_most=2.5)  # fmt: skip
    yield Row.vs(f"commit 5 rec, run holds {small:,} (vs its syscalls)", small_ms, "ms",
                 "the protocol's bare syscalls", median_of(floor) * ms)  # fmt: skip
    yield Row.vs(f"commit 5 rec, run holds {large:,}", large_ms, "ms",
                 f"commit, run holds {small:,}", small_ms, at_most=1.5)  # fmt: skip


def run(quick: bool) -> Iterable[Row]:
    corpus = _Corpus()
    with tempfile.TemporaryDirectory(prefix="runfmt-bench-") as name:
        tmp = Path(name)
        # Runs of 2,048 B records are short (0.3 s): more of them for a steady best time.
        for size, n, repeat in ((204, 100_000, 3), (2048, 20_000, 5)):
            records = corpus.records(n // 50 if quick else n, size)
            yield from _throughput(tmp, records, f"{size:,} B records", 1 if quick else repeat)
        pool = corpus.records(10_000, 204)
        large = 5_000 if quick else 1_000_000
        yield from _commits(tmp, pool, 1_000, large, 5 if quick else 40)
