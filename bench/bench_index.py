"""The store index: listing 10,000 runs, cold rebuild, and cache lookups among 1,000,000 keys.

The baseline lists runs the way a store without an index must: open and parse
every run's manifest. The synthetic store's manifests are made with runfmt's
own encoder (three stages each, no stage files); the cache store is written by
`RunWriter` (100 runs of 10,000 keyed records; 4 runs of 2,500 with --quick).
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import orjson
from common import Row, best_of, median_of

from runfmt._index_reading import RACY_NS
from runfmt.cache import Cache
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
    """Make the store look untouched for a while: its folder dated back a minute, and the
    racy window of its runs waited out (their stamp is a change time, which no tool can set)."""
    old = time.time() - 60
    newest = max(
        os.stat(os.path.join(entry.path, names.MANIFESTS_DIR)).st_ctime_ns
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    time.sleep(max(0, newest + RACY_NS - time.time_ns()) / 1e9)
    os.utime(root, (old, old))


def best_cpu_of(repeat: int, fn: Callable[[], object], *, children: bool = False) -> float:
    """The least CPU time (user + system) of ``repeat`` calls of ``fn``, in seconds: on a
    shared, loaded machine it shows what the wall-clock time would be on an idle one."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    times = []
    for _ in range(repeat):
        before = resource.getrusage(who)
        fn()
        after = resource.getrusage(who)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(times)


def _ls_process(root: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "runfmt", "--store", str(root), "ls", "--json", "--limit", "50"],
        check=True,
        capture_output=True,
    )


def _help_process() -> None:
    subprocess.run([sys.executable, "-m", "runfmt", "--help"], check=True, capture_output=True)


def _python_start() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def listing_rows(root: Path, runs: int) -> Iterator[Row]:
    make_store(root, runs)
    _age(root)
    baseline = best_of(3, lambda: list_by_reading(root))
    baseline_cpu = best_cpu_of(3, lambda: list_by_reading(root))
    index_file = root / ".runfmt" / "index.sqlite"

    def cold() -> None:
        shutil.rmtree(root / ".runfmt", ignore_errors=True)
        index = Index.for_url(str(root))
        index.refresh()
        index.close()

    cold_s, cold_cpu = best_of(2, cold), best_cpu_of(2, cold)
    assert index_file.exists()
    yield Row.vs(
        f"cold rebuild, {runs:,} runs",
        runs / cold_s,
        "runs/s",
        "read every manifest",
        runs / baseline,
    )
    for label, seconds in (("wall", cold_s), ("CPU", cold_cpu)):
        yield Row(
            f"cold rebuild (target, {label} time)",
            runs / seconds,
            "runs/s",
            target=">= 5,000 runs/s",
            ok=runs / seconds >= 5000,
        )

    _age(root)
    index = Index.for_url(str(root))
    assert len(index.runs()) == runs
    ms, base_ms, base_cpu_ms = 1000, baseline * 1000, baseline_cpu * 1000
    for label, seconds, base in (
        ("", best_of(5, index.runs), base_ms),
        (", CPU time", best_cpu_of(5, index.runs), base_cpu_ms),
    ):
        yield Row.limit(
            f"ls {runs:,} runs, warm index + reconcile{label}",
            seconds * ms,
            "ms",
            at_most=100,
            baseline="read every manifest",
            baseline_value=base,
        )

    def after_a_change() -> None:
        os.utime(root)
        index.runs()

    yield Row.vs(
        f"ls {runs:,} runs + reconcile, store folder just changed",
        best_of(5, after_a_change) * ms,
        "ms",
        "read every manifest",
        base_ms,
    )
    _age(root)  # the rows below measure a store not written to lately, as the first ones do
    no_refresh = best_of(5, lambda: index.runs(refresh=False))
    yield Row.limit(
        f"ls {runs:,} runs, warm index, no reconcile",
        no_refresh * ms,
        "ms",
        at_most=100,
        baseline="read every manifest",
        baseline_value=base_ms,
    )
    filtered = best_of(5, lambda: index.runs(tags={"model": "m3"}, status="completed", limit=50))
    yield Row.limit(
        "ls --tag --status --limit 50 + reconcile",
        filtered * ms,
        "ms",
        at_most=100,
        baseline="read every manifest",
        baseline_value=base_ms,
    )
    index.close()
    process = partial(_ls_process, root)
    start = best_of(3, _python_start)
    for case, seconds, base, limit in (
        ("runfmt ls --json --limit 50 (process)", best_of(3, process), start, 0.5),
        ("runfmt ls --json --limit 50 (process, CPU time)",
         best_cpu_of(3, process, children=True),
         best_cpu_of(3, _python_start, children=True), 0.5),
        ("runfmt --help (process)", best_of(3, _help_process), start, 0.3),
    ):  # fmt: skip
        yield Row.limit(case, seconds, "s", at_most=limit, baseline="python -c pass",
                        baseline_value=base)  # fmt: skip


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
    bare = _per_call(
        lambda k: con.execute(
            "SELECT file_id, frame_start, line FROM cache WHERE stage='score' AND key=?", (k,)
        ).fetchone(),
        sample,
    )
    lookup = _per_call(lambda k: cache.lookup("score", k), sample)
    yield Row.limit(
        f"cache lookup median, {len(keys):,} keys",
        lookup * 1e6,
        "us",
        at_most=50,
        baseline="bare SQLite point lookup",
        baseline_value=bare * 1e6,
    )
    lookup_cpu = _per_call(lambda k: cache.lookup("score", k), sample, cpu=True)
    bare_cpu = _per_call(
        lambda k: con.execute(
            "SELECT file_id, frame_start, line FROM cache WHERE stage='score' AND key=?", (k,)
        ).fetchone(),
        sample,
        cpu=True,
    )
    yield Row.limit(
        f"cache lookup median, {len(keys):,} keys, CPU time",
        lookup_cpu * 1e6,
        "us",
        at_most=50,
        baseline="bare SQLite point lookup",
        baseline_value=bare_cpu * 1e6,
    )
    get = _per_call(lambda k: cache.get("score", k), sample[:500])
    yield Row(f"cache get (reads 1 frame) median, {len(keys):,} keys", get * 1e6, "us")
    ordered = keys[len(keys) // 2 : len(keys) // 2 + 1000]
    in_order = _cold(store, lambda c: [c.get("score", k) for k in ordered]) / len(ordered)
    yield Row(
        "cache get, 1,000 keys in written order, per key",
        in_order * 1e6,
        "us",
        "cache get (reads 1 frame)",
        get * 1e6,
    )
    many = _cold(store, lambda c: c.get_many("score", ordered)) / len(ordered)
    yield Row(
        "cache get_many, the same 1,000 keys, per key",
        many * 1e6,
        "us",
        "1,000 gets in written order",
        in_order * 1e6,
    )
    batch = sample[:1000] + [compute_key({"missing": i}) for i in range(1000)]
    contains = best_of(5, lambda: cache.contains("score", batch))
    yield Row(
        "cache contains, 2,000 keys in one call",
        contains * 1000,
        "ms",
        "1,000 lookups",
        lookup * 1000 * 1000,
    )


def _cold(store: Store, fn: Callable[[Cache], object], repeat: int = 3) -> float:
    """The shortest of ``repeat`` timed calls of ``fn`` on a new `Cache` (no frames kept)."""
    times = []
    for _ in range(repeat):
        cache = Cache(store.index)
        cache.refresh()
        start = time.perf_counter()
        fn(cache)
        times.append(time.perf_counter() - start)
    return min(times)


def _per_call(fn: Callable[[str], object], args: list[str], *, cpu: bool = False) -> float:
    """The median time of ``fn(arg)`` over ``args``, in seconds (wall, or this thread's CPU)."""
    clock = time.thread_time_ns if cpu else time.perf_counter_ns
    samples = []
    for arg in args:
        start = clock()
        fn(arg)
        samples.append((clock() - start) / 1e9)
    return median_of(samples)


def run(quick: bool) -> Iterator[Row]:
    with tempfile.TemporaryDirectory(prefix="runfmt-bench-index-") as tmp:
        yield from listing_rows(Path(tmp) / "listing", 500 if quick else 10_000)
        yield from cache_rows(Path(tmp) / "cache", 4 if quick else 100, 2500 if quick else 10_000)
