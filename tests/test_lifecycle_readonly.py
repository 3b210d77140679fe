"""Read-only mode: a store or run opened read-only cannot be changed by any call —
not even a lock file appears."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runfmt.check import repair_run
from runfmt.errors import ReadOnlyError
from runfmt.format.manifest import ChangeSet
from runfmt.lifecycle import remove_run
from runfmt.run import RunWriter, commit, write_sums
from runfmt.store import Store, open_run


def everything(root: Path) -> dict[str, bytes | None]:
    """Every file and folder below ``root``, local state included."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def ro(store: Store) -> Store:
    w = store.create_run("eval", {"n": 1}, run_id="src", heartbeat_interval=None)
    w.stage("generate", key_field="key")
    w.append("generate", {"key": "a"})
    w.stage("generate").complete()
    w.add_artifact("a.txt", b"a")
    w.finish()
    crashed = store.create_run("eval", {"n": 2}, run_id="open", heartbeat_interval=None)
    crashed.append("generate", {"key": "b"})
    crashed.flush()
    crashed._release()
    return Store(store.url, read_only=True)


MUTATIONS: dict[str, Callable[[Store], Any]] = {
    "create_run": lambda s: s.create_run("x", heartbeat_interval=None),
    "resume_run": lambda s: s.resume_run("open", heartbeat_interval=None),
    "resume_run by path": lambda s: s.resume_run(str(Path(s.url) / "open")),
    "open_or_create auto (new)": lambda s: s.open_or_create("new", {}),
    "open_or_create auto (resume)": lambda s: s.open_or_create("eval", {"n": 2}, run_id="open"),
    "open_or_create rerun": lambda s: s.open_or_create("eval", {"n": 1}, run_id="src",
                                                       policy="rerun"),
    "open_or_create error (new)": lambda s: s.open_or_create("new", {}, policy="error"),
    "fork_run": lambda s: s.fork_run("src", "generate"),
    "remove_run": lambda s: remove_run(s, "src"),
    "repair_run": lambda s: repair_run(s.locate("open")),
    "commit": lambda s: commit(s.locate("open"), ChangeSet(tags={"a": "b"}), 1.0),
    "heartbeat commit": lambda s: commit(s.locate("open"), ChangeSet(heartbeat=True), 1.0),
    "write_sums": lambda s: write_sums(s.locate("src"), s.open_run("src").manifest),
    "RunWriter": lambda s: RunWriter(s.locate("open"), s.open_run("open").manifest),
    "RunWriter on open_run(path)": lambda s: RunWriter(
        (r := open_run(Path(s.url) / "open")).storage, r.manifest
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutating_call_raises_read_only_error(ro: Store, name: str) -> None:
    """RO-1."""
    before = everything(Path(ro.url))
    with pytest.raises(ReadOnlyError, match="read-only"):
        MUTATIONS[name](ro)
    assert everything(Path(ro.url)) == before


def test_reading_works_read_only(ro: Store) -> None:
    before = everything(Path(ro.url))
    reader = ro.open_run("src")
    assert [r["key"] for r in reader.records("generate")] == ["a"]
    assert reader.read_artifact("a.txt") == b"a"
    assert {r.run_id for r in ro.runs_with_config({"n": 1})} == {"src"}
    opened = ro.open_or_create("eval", {"n": 1}, run_id="src")
    assert (opened.action, opened.writer) == ("reused", None)
    assert everything(Path(ro.url)) == before
