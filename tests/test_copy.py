"""A run folder copied elsewhere (cp -r, shutil.copytree) verifies, reads and resumes there
by path, as if written there: nothing in it points back to where it was made."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import runfmt
from runfmt.check import being_written_by, repair_run, verify_run
from runfmt.errors import StorageError
from runfmt.run import load_manifest, revisions
from runfmt.storage import Storage
from runfmt.store import Store

QUIET: dict[str, Any] = {"flush_every": 25, "flush_interval": None, "heartbeat_interval": None}
RECORDS = [{"id": f"q{i}", "score": i % 5} for i in range(60)]


def cp_r(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)


COPIERS: dict[str, Callable[[Path, Path], Any]] = {"cp -r": cp_r, "copytree": shutil.copytree}


@pytest.fixture(params=["completed", "running"])
def source_run(request: pytest.FixtureRequest, store: Store) -> Path:
    """A finished run, or one left resumable by `close`."""
    w = store.create_run("copyme", {"model": "m"}, tags={"k": "v"}, **QUIET)
    w.extend("score", RECORDS)
    w.add_artifact("notes.txt", b"hello")
    if request.param == "completed":
        w.finish()
    else:
        w.close()
    return Path(store.url) / w.run_id


@pytest.mark.parametrize("copier", COPIERS)
def test_a_copied_run_verifies_and_reads_by_path(
    source_run: Path, tmp_path: Path, copier: str
) -> None:
    dst = tmp_path / "elsewhere" / "renamed-folder"
    dst.parent.mkdir()
    COPIERS[copier](source_run, dst)
    assert verify_run(Storage(str(dst))) == []
    unrelated = Store(tmp_path / "another-store")
    for reader in (unrelated.open_run(dst), runfmt.open_run(dst), runfmt.open_run(str(dst))):
        assert reader.run_id == source_run.name
        assert list(reader.records("score")) == RECORDS
        assert reader.read_artifact("notes.txt") == b"hello"
        assert reader.storage.where() == str(dst)


def test_nothing_in_a_run_names_the_folder_it_was_written_in(source_run: Path) -> None:
    needles = (str(source_run).encode(), str(source_run.parent).encode())
    for f in source_run.rglob("*"):
        if f.is_file() and not f.name.startswith("."):
            assert not any(n in f.read_bytes() for n in needles), f


def test_a_run_copied_into_another_store_is_found_by_id_and_resumes(
    source_run: Path, tmp_path: Path
) -> None:
    other = Store(tmp_path / "other")
    (tmp_path / "other").mkdir()
    cp_r(source_run, tmp_path / "other" / source_run.name)
    assert other.run_ids() == [source_run.name]
    before = {p: p.read_bytes() for p in source_run.rglob("*") if p.is_file()}

    writer = other.resume_run(source_run.name, **QUIET)
    writer.extend("score", [{"id": "extra", "score": 0}])
    writer.finish()
    reader = other.open_run(source_run.name)
    assert list(reader.records("score")) == [*RECORDS, {"id": "extra", "score": 0}]
    assert verify_run(reader.storage) == []
    assert {p: p.read_bytes() for p in source_run.rglob("*") if p.is_file()} == before


def test_a_copy_without_manifest_history_is_a_clear_error(source_run: Path, tmp_path: Path) -> None:
    dst = tmp_path / "partial"
    shutil.copytree(source_run, dst, ignore=shutil.ignore_patterns("_manifests"))
    with pytest.raises(runfmt.ManifestError, match="LAYOUT-2") as info:
        runfmt.open_run(dst)
    assert "copy it whole" in info.value.hint


def _copy_stages_then_manifests(src: Path, dst: Path, between: Callable[[], object]) -> None:
    """A copy that took ``stages/`` and ``artifacts/`` before the run wrote more, and
    ``_manifests/`` after: its newest revision lists more than its files hold. `cp` goes on
    past files a live writer deletes meanwhile (temporary files, pruned revisions)."""
    dst.mkdir()
    for part in ("stages", "artifacts"):
        if (src / part).exists():
            subprocess.run(["cp", "-r", str(src / part), str(dst / part)], check=False)
    between()
    for part in ("_manifests", "manifest.json"):
        subprocess.run(["cp", "-r", str(src / part), str(dst / part)], check=False)


def _keys(run: Path, stage: str) -> list[str]:
    return [r["id"] for r in runfmt.open_run(run).records(stage)]


def test_a_copy_taken_while_the_run_was_written_goes_back_to_a_whole_revision(
    store: Store, tmp_path: Path
) -> None:
    """COMMIT-13: files cut short or missing, the rest whole, no writer alive: repair
    asked to roll back commits the newest revision the files hold whole again, then
    salvages whole frames; without the option it changes nothing and names it."""
    w = store.create_run("live", **QUIET)
    w.extend("score", RECORDS)
    w.flush()
    src, dst = Path(store.url) / w.run_id, tmp_path / "copy"

    def write_more() -> None:
        w.extend("score", [{"id": f"late{i}", "score": 0} for i in range(60)])
        w.extend("judge", [{"id": "j1"}])
        w.add_artifact("late.txt", b"late")
        w.flush()

    _copy_stages_then_manifests(src, dst, write_more)
    w.finish()
    copy = Storage(str(dst))
    counts = {r: sum(s.records for s in load_manifest(copy, r).stages) for r in revisions(copy)}
    whole = max(r for r, n in counts.items() if n == len(RECORDS))
    newest = max(counts)

    problems = verify_run(Storage(str(dst)))
    assert {p.location.split("/")[0] for p in problems} == {"stages", "artifacts"}
    assert all(not p.repairable and f"goes back to revision {whole}" in p.problem
               for p in problems)  # fmt: skip
    plain = subprocess.run(["runfmt", "repair", str(dst)], check=False, capture_output=True,
                           text=True)  # fmt: skip
    assert plain.returncode == 1
    assert f"`runfmt repair --rollback` goes back to revision {whole}" in plain.stderr
    assert max(revisions(copy)) == newest
    done = subprocess.run(["runfmt", "repair", "--rollback", str(dst)], check=False,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"went back to revision {whole}" in done.stdout
    assert verify_run(Storage(str(dst))) == []
    manifest = load_manifest(Storage(str(dst)))
    assert manifest.revision == newest + 1
    assert manifest.status == "running"
    assert manifest.artifacts == ()
    assert _keys(dst, "score") == [r["id"] for r in RECORDS]
    assert _keys(src, "score")[: len(RECORDS)] == [r["id"] for r in RECORDS]


def test_a_copy_cut_short_with_no_whole_revision_says_to_copy_again(
    store: Store, tmp_path: Path
) -> None:
    """COMMIT-13 with the run's early revisions pruned (COMMIT-9): none is whole."""
    w = store.create_run("cut", **QUIET)
    for record in RECORDS[:40]:
        w.append("score", record)
        w.flush()
    w.finish()
    dst = tmp_path / "copy"
    shutil.copytree(Path(store.url) / w.run_id, dst)
    part = next((dst / "stages" / "score").iterdir())
    part.write_bytes(part.read_bytes()[:100])
    [problem] = [p for p in verify_run(Storage(str(dst))) if p.rule == "CHECK-1"]
    assert "copy the run again from its source" in problem.problem


def test_a_damaged_file_keeps_repair_from_going_back(store: Store, tmp_path: Path) -> None:
    """COMMIT-13 is for files cut short only: a listed file whose bytes were changed is
    damage, and repair then changes nothing (it would cut that file's later frames)."""
    w = store.create_run("live", **QUIET)
    w.extend("other", RECORDS)
    w.extend("score", RECORDS)
    w.flush()
    src, dst = Path(store.url) / w.run_id, tmp_path / "copy"
    _copy_stages_then_manifests(src, dst, lambda: (w.extend("score", RECORDS), w.flush()))
    w.close()
    other = next((dst / "stages" / "other").iterdir())
    data = bytearray(other.read_bytes())
    data[-5] ^= 1
    other.write_bytes(bytes(data))

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in dst.rglob("[!.]*") if p.is_file()}

    before = files()
    problems = verify_run(Storage(str(dst)))
    assert any(p.rule == "CHECK-1" for p in problems)
    assert not any(p.repairable for p in problems if p.rule == "CHECK-1")
    report = repair_run(Storage(str(dst)), rollback=True)
    why = "not rolled back: another listed file is damaged, not cut short"
    assert {(p.rule, p.problem) for p in report.left if p.rule != "CHECK-1"} == {("COMMIT-13", why)}
    assert report.rollback_to is None
    done = subprocess.run(["runfmt", "repair", "--rollback", str(dst)], check=False,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1
    assert "nothing to repair" not in done.stdout
    assert "copy it again" in done.stderr
    changed = {path for path, data in files().items() if before.get(path) != data}
    assert changed <= {dst / "manifest.json"}


def test_copies_of_a_run_being_written_all_repair_with_no_record_lost(tmp_path: Path) -> None:
    """A real writer process; each copy takes stages/ before _manifests/ (the order that
    cuts files short) while it commits every 20 records."""
    script = (
        "import sys, time, runfmt\n"
        "w = runfmt.Store(sys.argv[1]).create_run('live', flush_every=20, flush_interval=None)\n"
        "for i in range(10**9):\n"
        "    w.append('gen', {'id': f'{i:09d}', 'text': 'x' * 100})\n"
        "    if i % 20 == 0: time.sleep(0.002)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "runs")])
    try:
        while not list((tmp_path / "runs").glob("*/_manifests/00000002.json")):
            time.sleep(0.05)
        (src,) = (tmp_path / "runs").iterdir()
        for n in range(5):
            dst = tmp_path / f"copy{n}"
            _copy_stages_then_manifests(src, dst, lambda: time.sleep(0.05))
            report = repair_run(Storage(str(dst)), rollback=True)
            assert report.left == []
            assert verify_run(Storage(str(dst))) == []
            keys = _keys(dst, "gen")
            assert keys == [f"{i:09d}" for i in range(len(keys))]
    finally:
        writer.kill()
        writer.wait()


def test_a_filesystem_without_hard_links_holds_runs_for_reading_only(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """STORE-2: on a FAT or exFAT stick, a copied run lists, verifies and reads, and a
    commit is refused with a clear error instead of a half-made revision."""
    with store.create_run("copied", heartbeat_interval=None) as w:
        w.append("gen", {"i": 1})

    def no_links(src: str, dst: str) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", dst)

    monkeypatch.setattr(os, "link", no_links)
    reader = store.open_run(w.run_id)
    assert list(reader.records("gen")) == [{"i": 1}]
    assert verify_run(reader.storage) == []
    with pytest.raises(StorageError, match="no hard links") as info:
        store.resume_run(w.run_id, heartbeat_interval=None)
    assert "copy them here" in (info.value.hint or "")
    assert being_written_by(reader.storage) == []
    assert store.open_run(w.run_id).manifest.revision == reader.manifest.revision
    assert verify_run(reader.storage) == []
