"""The store index: listing 10,000 runs, cold rebuild, and cache lookups among 1,000,000 keys.

The baseline lists runs the way a store without an index must: open and parse
every run's manifest. The synthetic store's manifests are made with runfmt's
own encoder (three stages each, no stage files); the cache store is written by
`RunWriter` (100 runs of 10,000 keyed records; a tenth of that with --quick).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from common import Row, best_of, median_of

from runfmt.format import names
from runfmt.format.keys import compute_key
from runfmt.format.manifest import FileEntry, Manifest, StageEntry, encode_manifest
from runfmt.index import Index
from runfmt.store import Store

SECTION = "index"
_STAGES = ("generate", "parse", "score")


def make_store(root: Path, runs: int) -> None:
    """``runs`` run folders holding only their manifest (revision 1 and manifest.json)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rng = random.Random(0)
    for i in range(runs):
        created = start + timedelta(seconds=37 * i)
        run_id = names.format_run_id(created, rng.getrandbits(32))
        stamp = created.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        stages = tuple(
            StageEntry(
                stage,
                "completed",
                files=(
                    FileEntry(names.format_stage_file(stage, 1, "w1"), 40_000, 1000, 3, "0" * 64),
                ),
            )
            for stage in _STAGES
        )
        manifest = Manifest(
            run_id=run_id,
            name=f"eval-{i % 20}",
            revision=1,
            status="completed" if i % 10 else "failed",
            created_at=stamp,
            updated_at=stamp,
            finished_at=stamp,
            config={"model": f"m{i % 7}", "seed": i},
            config_hash=compute_key({"model": f"m{i % 7}", "seed": i}),
            tags={"model": f"m{i % 7}", "split": "dev" if i % 2 else "test"},
            stages=stages,
        )
        data = encode_manifest(manifest)
        folder = root / run_id / names.MANIFESTS_DIR
        folder.mkdir(parents=True)
        (folder / "00000001.json").write_bytes(data)
        (root / run_id / names.MANIFEST_FILE).write_bytes(data)


def list_by_reading(root: Path) -> list[dict[str, object]]:
    """The baseline: parse every manifest.json, newest first."""
    docs = []
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_dir() and not entry.name.startswith("."):
                with open(os.path.join(entry.path, names.MANIFEST_FILE), "rb") as f:
                    docs.append(orjson.loads(f.read()))
    docs.sort(key=lambda d: str(d["created_at"]), reverse=True)
    return docs


def _age(root: Path) -> None:
    """Date every folder back a minute, as a store not written to in the last seconds."""
    old = time.time() - 60
    for entry in os.scandir(root):
        if entry.is_dir() and not entry.name.startswith("."):
            os.utime(os.path.join(entry.path, names.MANIFESTS_DIR), (old, old))


def _cli_ls(root: Path) -> float:
    def once() -> None:
        subprocess.run([sys.executable, "-m", "runfmt", "--store", str(root), "ls", "--json",
                        "--limit", "50"], check=True, capture_output=True)  # fmt: skip

    return best_of(3, once)


def _python_start() -> float:
    return best_of(3, lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))


def listing_rows(root: Path, runs: int) -> Iterator[Row]:
    make_store(root, runs)
    _age(root)
    baseline = best_of(3, lambda: list_by_reading(root))
    index_file = root / ".runfmt" / "index.sqlite"

    def cold() -> None:
        shutil.rmtree(root / ".runfmt", ignore_errors=True)
        index = Index.for_url(str(root))
        index.refresh()
        index.close()

    cold_s = best_of(2, cold)
    assert index_file.exists()
    yield Row.vs(f"cold rebuild, {runs:,} runs", runs / cold_s, "runs/s",
                 "read every manifest", runs / baseline, at_least=1)  # fmt: skip
    yield Row("cold rebuild (target)", runs / cold_s, "runs/s", target=">= 5,000 runs/s",
              ok=runs / cold_s >= 5000)  # fmt: skip

    index = Index.for_url(str(root))
    assert len(index.runs()) == runs
    warm = best_of(5, index.runs)
    yield Row.limit(f"ls {runs:,} runs, warm index + reconcile", warm * 1000, "ms", at_most=100,
                    baseline="read every manifest", baseline_value=baseline * 1000)  # fmt: skip
    no_refresh = best_of(5, lambda: index.runs(refresh=False))
    yield Row.limit(f"ls {runs:,} runs, warm index, no reconcile", no_refresh * 1000, "ms",
                    at_most=100, baseline="read every manifest",
                    baseline_value=baseline * 1000)  # fmt: skip
    filtered = best_of(5, lambda: index.runs(tags={"model": "m3"}, status="completed", limit=50))
    yield Row.limit("ls --tag --status --limit 50 + reconcile", filtered * 1000, "ms", at_most=100,
                    baseline="read every manifest", baseline_value=baseline * 1000)  # fmt: skip
    index.close()
    yield Row.limit("runfmt ls --json --limit 50 (process)", _cli_ls(root), "s", at_most=0.5,
                    baseline="python -c pass", baseline_value=_python_start())  # fmt: skip


def cache_rows(root: Path, runs: int, per_run: int) -> Iterator[Row]:
    store = Store(root)
    keys = []
    for r in range(runs):
        with store.create_run(f"cache-{r}", {"r": r}, flush_every=per_run) as writer:
            stage = writer.stage("score", key_field="key")
            for i in range(per_run):
                key = compute_key({"run": r, "item": i})
                keys.append(key)
                stage.append({"key": key, "score": i % 2, "tokens": 120 + i % 50})
    _age(root)
    started = time.perf_counter()
    stats = store.index.refresh()
    indexing = time.perf_counter() - started
    assert stats.cache_entries == len(keys)
    yield Row(f"index {len(keys):,} cache keys", len(keys) / indexing, "keys/s")

    sample = random.Random(1).sample(keys, 5000)
    cache = store.cache
    cache.refresh()
    con = store.index._connection()
    bare = _per_call(lambda k: con.execute(
        "SELECT file_id, frame_start, line FROM cache WHERE stage='score' AND key=?", (k,)
    ).fetchone(), sample)  # fmt: skip
    lookup = _per_call(lambda k: cache.lookup("score", k), sample)
    yield Row.limit(f"cache lookup median, {len(keys):,} keys", lookup * 1e6, "us", at_most=50,
                    baseline="bare SQLite point lookup", baseline_value=bare * 1e6)  # fmt: skip
    get = _per_call(lambda k: cache.get("score", k), sample[:500])
    yield Row(f"cache get (reads 1 frame) median, {len(keys):,} keys", get * 1e6, "us")
    batch = sample[:1000] + [compute_key({"missing": i}) for i in range(1000)]
    contains = best_of(5, lambda: cache.contains("score", batch))
    yield Row("cache contains, 2,000 keys in one call", contains * 1000, "ms",
              "1,000 lookups", lookup * 1000 * 1000)  # fmt: skip


def _per_call(fn: object, args: list[str]) -> float:
    assert callable(fn)
    samples = []
    for arg in args:
        start = time.perf_counter_ns()
        fn(arg)
        samples.append((time.perf_counter_ns() - start) / 1e9)
    return median_of(samples)


def run(quick: bool) -> Iterator[Row]:
    with tempfile.TemporaryDirectory(prefix="runfmt-bench-index-") as tmp:
        yield from listing_rows(Path(tmp) / "listing", 1000 if quick else 10_000)
        yield from cache_rows(Path(tmp) / "cache", 10 if quick else 100, 10_000)
