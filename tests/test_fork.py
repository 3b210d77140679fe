"""Fork and replay: a new run takes another run's stages before a stage and recomputes
the rest; it records where it came from and stays a self-contained folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runfmt.check import repair_run, verify_run
from runfmt.cli import app
from runfmt.errors import (
    ChecksumMismatchError,
    ConflictError,
    InvalidInputError,
    ReadOnlyError,
    RunExistsError,
    RunNotFoundError,
)
from runfmt.format.frames import FrameEncoder
from runfmt.format.keys import compute_key
from runfmt.run import RunWriter
from runfmt.storage import Storage
from runfmt.store import Store, open_run

CONFIG = {"model": "m1", "judge": "j1"}


def pipeline(store: Store, *, finish: bool = True, run_id: str = "src") -> RunWriter:
    """A run with generate -> parse -> score, 3 keyed records each, and an artifact."""
    w = store.create_run("eval", CONFIG, run_id=run_id, heartbeat_interval=None)
    for stage in ("generate", "parse", "score"):
        w.stage(stage, key_field="key")
        for i in range(3):
            w.append(stage, {"key": f"q{i}", "stage": stage})
        w.stage(stage).complete()
        w.flush()
    w.add_artifact("prompt.txt", b"Answer briefly.\n")
    w.count("cost", 1.5)
    if finish:
        w.finish()
    else:
        w.flush()
    return w


def test_fork_takes_stages_before_the_fork_point_and_records_provenance(store: Store) -> None:
    pipeline(store)
    new_config = {**CONFIG, "judge": "j2"}
    w = store.fork_run("src", "score", config=new_config, run_id="fork1", heartbeat_interval=None)
    m = w.manifest
    assert (m.forked_from, m.forked_at_stage) == ("src", "score")
    assert [(s.name, s.status, s.records) for s in m.stages] == [
        ("generate", "completed", 3),
        ("parse", "completed", 3),
    ]
    assert (m.config, m.config_hash) == (new_config, compute_key(new_config))
    assert (m.revision, m.status, dict(m.counters)) == (1, "running", {})
    assert [a.path for a in m.artifacts] == ["artifacts/prompt.txt"]
    for i in range(3):
        w.append("score", {"key": f"q{i}", "stage": "score", "judge": "j2"})
    done = w.finish()
    assert [s.name for s in done.stages] == ["generate", "parse", "score"]
    reader = store.open_run("fork1")
    assert [r["judge"] for r in reader.records("score")] == ["j2"] * 3
    assert [r["stage"] for r in reader.records("parse")] == ["parse"] * 3
    assert verify_run(store.locate("fork1")) == []
    assert verify_run(store.locate("src")) == []


def test_fork_of_a_finished_run_hard_links_its_files(store: Store) -> None:
    """FORK-3: hard links where allowed."""
    pipeline(store)
    store.fork_run("src", "parse", run_id="fork1", heartbeat_interval=None).close()
    root = Path(store.url)
    for path in (root / "fork1").rglob("*.zst"):
        source = root / "src" / path.relative_to(root / "fork1")
        assert os.stat(path).st_ino == os.stat(source).st_ino
    art = root / "fork1" / "artifacts" / "prompt.txt"
    assert os.stat(art).st_ino == os.stat(root / "src" / "artifacts" / "prompt.txt").st_ino


def test_repairing_the_source_never_cuts_a_forks_shared_file(store: Store) -> None:
    """FORK-3: a repair that rolls the source back cuts its own copy of a file it shares
    with a fork by a hard link, never the fork's bytes."""
    w = store.create_run("src", run_id="src", heartbeat_interval=None)
    for first in (0, 3):
        for i in range(first, first + 3):
            w.append("gen", {"i": i})
            w.append("score", {"i": i})
        w.flush()
    w.stage("gen").complete()
    w.finish()
    store.fork_run("src", "score", run_id="fork1", heartbeat_interval=None).close()
    root = Path(store.url)
    [gen] = (root / "fork1" / "stages" / "gen").iterdir()
    source_gen = root / "src" / gen.relative_to(root / "fork1")
    assert os.stat(gen).st_ino == os.stat(source_gen).st_ino
    before = gen.read_bytes()
    [score] = (root / "src" / "stages" / "score").iterdir()
    os.truncate(score, score.stat().st_size - 10)  # a copy cut short: roll the source back
    report = repair_run(store.locate("src"), salvage=False, rollback=True)
    assert any("gen" in action and "cut" in action for action in report.actions)
    assert source_gen.stat().st_size < len(before)
    assert gen.read_bytes() == before
    assert verify_run(store.locate("fork1")) == []
    assert verify_run(store.locate("src")) == []
    assert [r["i"] for r in store.open_run("fork1").records("gen")] == list(range(6))


def test_a_file_a_live_writer_may_still_append_to_is_never_shared(store: Store) -> None:
    """FORK-3: a writer of a run another finished may append before its commit is refused:
    a fork taken meanwhile copies that writer's file, and its cleanup cuts its own."""
    stale = store.create_run("src", run_id="src", heartbeat_interval=None)
    stale.extend("gen", [{"i": i} for i in range(3)])
    stale.append("score", {"i": 0})
    stale.flush()
    finisher = store.resume_run("src", heartbeat_interval=None)
    finisher.stage("gen").complete()
    finisher.finish()
    store.fork_run("src", "score", run_id="fork1", heartbeat_interval=None).finish()
    root = Path(store.url)
    [gen] = (root / "fork1" / "stages" / "gen").iterdir()
    assert gen.stat().st_ino != (root / "src" / gen.relative_to(root / "fork1")).stat().st_ino
    before = gen.read_bytes()
    stale.extend("gen", [{"i": i} for i in range(3, 6)])
    with pytest.raises(ConflictError, match="finished"):
        stale.flush()
    assert gen.read_bytes() == before
    assert verify_run(store.locate("fork1")) == []
    assert verify_run(store.locate("src")) == []


def test_salvage_into_a_shared_file_gives_the_source_a_copy_of_its_own(store: Store) -> None:
    """FORK-3, COMMIT-8: a dead writer's complete frame past the committed bytes of a file a
    fork shares is salvaged into the source's own copy; the fork keeps what it lists, and
    its repair cuts the frame from its file alone."""
    pipeline(store)
    store.fork_run("src", "score", run_id="fork1", heartbeat_interval=None).close()
    root = Path(store.url)
    [gen] = (root / "src" / "stages" / "generate").iterdir()
    forked = root / "fork1" / gen.relative_to(root / "src")
    assert gen.stat().st_ino == forked.stat().st_ino
    with gen.open("ab") as f:  # what a dead writer left
        f.write(FrameEncoder().encode(b'{"key": "late", "stage": "generate"}\n'))
    assert repair_run(store.locate("src")).salvaged_records == 1
    assert gen.stat().st_ino != forked.stat().st_ino
    repair_run(store.locate("fork1"))
    for run_id, records in (("src", 4), ("fork1", 3)):
        assert verify_run(store.locate(run_id)) == []
        assert len(list(store.open_run(run_id).records("generate"))) == records


def test_a_cut_of_a_shared_file_changes_no_other_name(tmp_path: Path) -> None:
    """FORK-3: whatever a repair of one run cuts, a file that hard links share keeps every
    byte under the other names."""
    storage = Storage(str(tmp_path))
    (tmp_path / "a").write_bytes(b"0123456789")
    os.link(tmp_path / "a", tmp_path / "b")
    storage.truncate("a", 4)
    assert ((tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()) == (
        b"0123",
        b"0123456789",
    )


def test_a_fork_never_creates_its_sources_commit_lock(store: Store) -> None:
    """A source with no `.lock` (a folder copied without it) is copied, not linked: linking
    needs that lock, and a fork only reads its source (another user could not remove a
    lock file it made)."""
    pipeline(store)
    root = Path(store.url)
    (root / "src" / ".lock").unlink()
    store.fork_run("src", "parse", run_id="fork1", heartbeat_interval=None).close()
    assert not (root / "src" / ".lock").exists()
    for path in (root / "fork1" / "stages").rglob("*.zst"):
        assert (
            os.stat(path).st_ino != os.stat(root / "src" / path.relative_to(root / "fork1")).st_ino
        )
    assert verify_run(store.locate("fork1")) == []


def test_a_source_that_changed_before_its_files_are_linked_is_a_conflict(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FORK-3: once it holds the source's commit lock, a fork that finds the source at
    another revision than the one it read (a repair committed meanwhile) fails with a
    conflict, not a false CHECK-1, and leaves nothing."""
    from runfmt import fork

    pipeline(store)
    monkeypatch.setattr(fork, "revisions", lambda run: [999])
    with pytest.raises(ConflictError, match="changed while it was forked"):
        store.fork_run("src", "parse", run_id="fork1", heartbeat_interval=None)
    assert sorted(p.name for p in Path(store.url).iterdir() if p.name != ".runfmt") == ["src"]


def test_fork_of_a_running_run_copies_only_the_listed_bytes(store: Store) -> None:
    """FORK-3: no hard link to a file a live writer may extend."""
    src = pipeline(store, finish=False)
    src.append("score", {"key": "late", "stage": "score"})
    src.flush()
    w = store.fork_run("src", "score", run_id="fork1", heartbeat_interval=None)
    w.close()
    root = Path(store.url)
    for path in (root / "fork1" / "stages").rglob("*.zst"):
        source = root / "src" / path.relative_to(root / "fork1")
        assert os.stat(path).st_ino != os.stat(source).st_ino
    src.append("parse", {"key": "after-fork", "stage": "parse"})
    src.finish()
    assert len(list(store.open_run("fork1").records("parse"))) == 3
    assert verify_run(store.locate("fork1")) == []


def test_forked_folder_copied_alone_still_verifies_and_reads(store: Store, tmp_path: Path) -> None:
    pipeline(store)
    store.fork_run("src", "score", run_id="fork1", heartbeat_interval=None).finish()
    copy = tmp_path / "elsewhere" / "fork1"
    shutil.copytree(Path(store.url) / "fork1", copy)
    shutil.rmtree(Path(store.url) / "src")
    reader = open_run(copy)
    assert reader.manifest.forked_from == "src"
    assert len(list(reader.records("generate"))) == 3
    assert reader.read_artifact("prompt.txt") == b"Answer briefly.\n"
    assert verify_run(reader.storage) == []


@pytest.mark.parametrize("finish", [True, False], ids=["linked", "copied"])
@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_fork_refuses_damaged_data_and_leaves_nothing(
    store: Store, finish: bool, damage: str
) -> None:
    """CHECK-1: a taken file must match its listed sha256, or no fork is made."""
    pipeline(store, finish=finish)
    [f] = (Path(store.url) / "src" / "stages" / "generate").glob("*.zst")
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    else:
        f.unlink()
    with pytest.raises(ChecksumMismatchError, match=r"CHECK-1|LAYOUT-3") as info:
        store.fork_run("src", "score", run_id="fork1")
    assert f.name in str(info.value)
    assert sorted(p.name for p in Path(store.url).iterdir()) == ["src"]


def test_fork_at_the_first_stage_takes_nothing(store: Store) -> None:
    pipeline(store)
    m = store.fork_run("src", "generate", heartbeat_interval=None, artifacts=False).manifest
    assert (m.stages, m.artifacts, m.forked_at_stage) == ((), (), "generate")


def test_fork_on_memory_store_copies(memory_store: Store) -> None:
    pipeline(memory_store)
    w = memory_store.fork_run("src", "score", run_id="fork1", heartbeat_interval=None)
    w.append("score", {"key": "q0"})
    w.finish()
    assert verify_run(memory_store.locate("fork1")) == []
    assert len(list(memory_store.open_run("fork1").records("parse"))) == 3


def test_fork_bad_input_changes_nothing(store: Store) -> None:
    pipeline(store)
    before = sorted(p.name for p in Path(store.url).iterdir())
    with pytest.raises(InvalidInputError, match="no stage 'judge'"):
        store.fork_run("src", "judge")
    with pytest.raises(RunNotFoundError):
        store.fork_run("missing-run", "score")
    with pytest.raises(InvalidInputError, match="NAME-1"):
        store.fork_run("src", "score", run_id="Bad Id")
    with pytest.raises(InvalidInputError, match="NaN"):
        store.fork_run("src", "score", config={"x": float("nan")})
    with pytest.raises(RunExistsError):
        store.fork_run("src", "score", run_id="src")
    assert sorted(p.name for p in Path(store.url).iterdir()) == before
    assert verify_run(store.locate("src")) == []


def test_fork_refuses_to_take_an_incomplete_stage(store: Store) -> None:
    w = store.create_run("eval", run_id="src", heartbeat_interval=None)
    w.append("generate", {"v": 1})
    w.append("score", {"v": 1})
    w.close()
    with pytest.raises(InvalidInputError, match="generate of run src are not completed"):
        store.fork_run("src", "score")


def test_fork_from_a_read_only_store_is_refused(store: Store) -> None:
    pipeline(store)
    with pytest.raises(ReadOnlyError):
        Store(store.url, read_only=True).fork_run("src", "score")


def test_fork_cli(store: Store, tmp_path: Path) -> None:
    pipeline(store)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "m1", "judge": "j3"}))
    result = CliRunner().invoke(
        app,
        ["--store", store.url, "fork", "src", "score", "--run-id", "f2",
         "--config", str(config), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc == {"run_id": "f2", "forked_from": "src", "forked_at_stage": "score",
                   "stages_taken": ["generate", "parse"]}  # fmt: skip
    assert store.open_run("f2").manifest.config["judge"] == "j3"
    text = CliRunner().invoke(app, ["--store", store.url, "fork", "src", "parse"])
    assert text.exit_code == 0
    assert "forked src at stage parse" in text.output
    config.write_text("[1, 2]")
    bad = CliRunner().invoke(app, ["--store", store.url, "fork", "src", "score",
                                   "--config", str(config)])  # fmt: skip
    assert bad.exit_code == 2
    shown = CliRunner().invoke(app, ["--store", store.url, "show", "f2"])
    assert "from src at stage score" in shown.output
