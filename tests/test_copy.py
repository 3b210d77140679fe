"""A run folder copied elsewhere (cp -r, shutil.copytree) verifies, reads and resumes there
by path, as if written there: nothing in it points back to where it was made."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import runfmt
from runfmt.check import verify_run
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
