"""kill -9 at every storage write of a fork and of a rerun: the store stays consistent,
the source is untouched, no half-made run is ever visible, and a retry succeeds.

A child process wraps every writing `Storage` method so that it SIGKILLs itself
just before its N-th write; N runs over every write the operation makes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runfmt.check import repair_run, verify_run
from runfmt.lifecycle import deterministic_run_id
from runfmt.store import Store

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from runfmt import storage
    from runfmt.store import Store

    op, jobs = sys.argv[1], json.loads(sys.argv[2])
    state = {"limit": 0, "writes": 0}

    def wrap(name):
        original = getattr(storage.Storage, name)

        def write(self, *args, **kwargs):
            state["writes"] += 1
            if state["writes"] == state["limit"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)

        setattr(storage.Storage, name, write)

    for name in ("put", "put_stream", "write_atomic", "create_exclusive", "rename", "delete",
                 "delete_tree", "link_from", "makedirs", "truncate", "open_append"):
        wrap(name)

    def work(url):
        store = Store(url)
        if op == "fork":
            writer = store.fork_run("src", "score", run_id="forked", heartbeat_interval=None)
            writer.append("score", {"key": "new"})
            writer.finish()
        else:
            opened = store.open_or_create("eval", {"n": 1}, policy="rerun",
                                          heartbeat_interval=None)
            opened.writer.append("generate", {"key": "fresh"})
            opened.writer.finish()

    results = []
    for limit, url in jobs:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            state["limit"] = limit
            try:
                work(url)
            except BaseException as exc:
                os.write(write, repr(exc).encode())
                os._exit(3)
            os.write(write, str(state["writes"]).encode())
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            said = f.read()
        results.append([os.waitstatus_to_exitcode(status), said])
    print(json.dumps(results))
    """
)


def run_jobs(op: str, jobs: list[tuple[int, Path]]) -> list[tuple[int, str]]:
    """Run ``op`` on each store, killed before write ``limit`` (0: never): (exit code, output)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, op, json.dumps([[n, str(url)] for n, url in jobs])],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [(code, said) for code, said in json.loads(done.stdout)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def make_source(url: str) -> None:
    store = Store(url)
    w = store.create_run("eval", {"n": 1}, run_id="src", heartbeat_interval=None)
    for stage in ("generate", "score"):
        w.stage(stage, key_field="key")
        w.extend(stage, [{"key": f"q{i}"} for i in range(3)])
        w.stage(stage).complete()
        w.flush()
    w.add_artifact("a.txt", b"artifact")
    w.finish()
    old = store.open_or_create("eval", {"n": 1}, heartbeat_interval=None)
    assert old.writer is not None
    old.writer.extend("generate", [{"key": f"old{i}"} for i in range(3)])
    old.writer.finish()


@pytest.mark.parametrize("op", ["fork", "rerun"])
def test_kill_at_every_write(op: str, tmp_path: Path) -> None:
    """FORK-4 and POLICY-4: no half-made or half-deleted run is ever visible."""
    template = tmp_path / "template"
    make_source(str(template))
    source_bytes = snapshot(template / "src")
    rerun_id = deterministic_run_id("eval", {"n": 1})
    shutil.copytree(template, tmp_path / "count")
    [(code, said)] = run_jobs(op, [(0, tmp_path / "count")])
    assert code == 0, said
    total = int(said)
    assert total >= 5
    roots = [tmp_path / f"kill-{limit}" for limit in range(1, total + 1)]
    for root in roots:
        shutil.copytree(template, root)
    killed = run_jobs(op, list(enumerate(roots, 1)))
    assert [code for code, _ in killed] == [-9] * total, killed
    retries = []
    for limit, root in enumerate(roots, 1):
        store = Store(root)
        assert snapshot(root / "src") == source_bytes, f"source changed (kill at write {limit})"
        for _, run in store.runs():
            assert not isinstance(run, Exception), f"unreadable run after kill at {limit}: {run}"
        if op == "fork" and (root / "forked").exists():
            repair_run(store.locate("forked"))
            assert verify_run(store.locate("forked")) == [], limit
            assert store.open_run("forked").manifest.forked_from == "src"
        elif op == "fork":
            retries.append(root)
        else:
            if (root / rerun_id / "_manifests").exists():
                reader = store.open_run(rerun_id)
                keys = {r["key"] for s in reader.manifest.stages for r in reader.records(s.name)}
                assert keys in ({f"old{i}" for i in range(3)}, set(), {"fresh"}), (limit, keys)
                repair_run(store.locate(rerun_id))
                assert verify_run(store.locate(rerun_id)) == [], limit
            retries.append(root)
    for build in (b for root in retries for b in root.glob(".fork-*")):
        os.utime(build, (time.time() - 120, time.time() - 120))  # a builder's folder is spared
    assert [code for code, _ in run_jobs(op, [(0, root) for root in retries])] == [0] * len(retries)
    for root in roots:
        store = Store(root)
        final = rerun_id if op == "rerun" else "forked"
        assert verify_run(store.locate(final)) == [], root
        leftovers = [p.name for p in root.iterdir() if p.name.startswith((".fork-", ".rerun-"))]
        assert leftovers == [], (root, leftovers)
