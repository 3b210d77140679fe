"""`runfmt sync`: manifest-driven copies between local folders, memory:// and S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import register_implementation
from typer.testing import CliRunner

from runfmt.check import verify_run
from runfmt.cli import app
from runfmt.errors import InvalidInputError, RunNotFoundError, StorageError
from runfmt.format import names
from runfmt.run import RunWriter, load_manifest, revisions, write_manifest_copy
from runfmt.storage import Storage
from runfmt.store import Store
from runfmt.sync import _check_apart, _Engine, sync
from tests.fixtures_manage import Cli


def _run(store: Store, n: int, name: str = "run", stages: tuple[str, ...] = ("gen",)) -> str:
    with store.create_run(name, {"n": n}) as writer:
        for stage in stages:
            writer.extend(stage, [{"i": i, "stage": stage} for i in range(n)])
        writer.add_artifact("notes.txt", f"{name} {n}".encode())
    return writer.run_id


def _committed(storage: Storage) -> dict[str, bytes]:
    """The bytes a reader of the run sees: listed files, manifests and SHA256SUMS."""
    manifest = load_manifest(storage)
    found = {p: storage.read_range(p, 0, n) for p, n in manifest.listed_paths().items()}
    paths = [names.MANIFEST_FILE, names.revision_file(manifest.revision)]
    if storage.exists(names.SUMS_FILE):
        paths.append(names.SUMS_FILE)
    return found | {p: storage.read(p) for p in paths}


def _same_runs(src: Store, dst: Store) -> None:
    """DST holds exactly SRC's committed bytes, nothing past a listed length, and verifies."""
    assert dst.run_ids() == src.run_ids()
    for run_id in src.run_ids():
        copy = dst.locate(run_id)
        assert _committed(copy) == _committed(src.locate(run_id))
        for path, length in load_manifest(copy).listed_paths().items():
            assert copy.size(path) == length
        assert verify_run(copy) == []


@pytest.fixture
def src(tmp_path: Path) -> Store:
    store = Store(tmp_path / "src")
    for n in (3, 5, 8):
        _run(store, n, f"run{n}", ("gen", "score"))
    return store


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://sync-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def test_copies_a_store_then_a_resync_copies_nothing(src: Store, tmp_path: Path) -> None:
    """SYNC-1, SYNC-6: an unchanged run is recognised by its manifest and not copied again."""
    report = sync(src.url, str(tmp_path / "dst"))
    assert report.ok
    assert (report.count("new"), report.count("same")) == (3, 0)
    assert report.files == 3 * 3
    dst = Store(tmp_path / "dst")
    _same_runs(src, dst)
    again = sync(src.url, str(tmp_path / "dst"))
    assert (again.count("same"), again.files, again.bytes) == (3, 0, 0)


def test_same_bytes_through_s3_and_memory(
    src: Store, tmp_path: Path, s3_url: str, s3_options: dict[str, Any], memory_url: str
) -> None:
    assert sync(src.url, s3_url, dst_options=s3_options).ok
    assert sync(s3_url, memory_url, src_options=s3_options).ok
    assert sync(memory_url, s3_url + "-copy", dst_options=s3_options).ok
    assert sync(s3_url + "-copy", str(tmp_path / "back"), src_options=s3_options).ok
    s3_to_s3 = sync(s3_url, s3_url + "-copy", src_options=s3_options, dst_options=s3_options)
    assert (s3_to_s3.count("same"), s3_to_s3.files) == (3, 0)
    for store in (Store(s3_url, s3_options), Store(memory_url), Store(tmp_path / "back")):
        _same_runs(src, store)


def test_a_file_missing_from_the_source_is_named(src: Store, tmp_path: Path) -> None:
    run_id = src.run_ids()[0]
    (path,) = [p for p in load_manifest(src.locate(run_id)).listed_paths() if "/gen/" in p]
    (Path(src.url) / run_id / path).unlink()
    report = sync(src.url, str(tmp_path / "dst"))
    (bad,) = [r for r in report.runs if r.action == "error"]
    assert bad.message == (f"{src.locate(run_id).where(path)}: SRC lists this file but it is "
                           "missing; nothing published (LAYOUT-3)")  # fmt: skip
    dst = Store(tmp_path / "dst")
    with pytest.raises(RunNotFoundError):
        dst.open_run(run_id)
    assert [r.action for r in report.runs if r.run_id != run_id] == ["new", "new"]


def test_force_copies_again_what_is_damaged_or_missing_in_dst(src: Store, tmp_path: Path) -> None:
    """SYNC-4: a plain re-sync trusts DST's manifest; --force checks every file."""
    sync(src.url, str(tmp_path / "dst"))
    dst = Store(tmp_path / "dst")
    run_id = src.run_ids()[0]
    gen, score = sorted(
        p for p in load_manifest(dst.locate(run_id)).listed_paths() if "stages/" in p
    )
    (Path(dst.url) / run_id / gen).unlink()
    damaged = Path(dst.url) / run_id / score
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    stray = Path(dst.url) / run_id / "stages" / "gen" / "part-000001-0badbeef.jsonl.zst"
    stray.write_bytes(b"left by a killed sync")
    assert sync(src.url, dst.url).count("same") == 3
    for dry_run in (True, False):
        forced = sync(src.url, dst.url, force=True, dry_run=dry_run)
        (healed,) = [r for r in forced.runs if r.action == "update"]
        assert (healed.run_id, healed.files) == (run_id, 2)
        assert healed.message == "DST had 2 damaged or missing files and 1 that SRC does not list"
        assert forced.count("same") == 2
    assert not stray.exists()
    stray.write_bytes(b"left by another killed sync")
    (healed,) = [r for r in sync(src.url, dst.url, force=True).runs if r.action == "update"]
    assert (healed.files, healed.message) == (0, "DST had 0 damaged or missing files and 1 "
                                              "that SRC does not list")  # fmt: skip
    assert not stray.exists()
    _same_runs(src, dst)
    assert sync(src.url, dst.url, force=True, dry_run=True).count("same") == 3


def test_one_run_goes_into_the_destination_store(src: Store, tmp_path: Path) -> None:
    run_id = src.run_ids()[1]
    folder = src.locate(run_id).root
    assert sync(folder, str(tmp_path / "dst")).count("new") == 1
    assert sync(folder, str(tmp_path / "dst" / run_id)).count("same") == 1
    dst = Store(tmp_path / "dst")
    assert dst.run_ids() == [run_id]
    assert _committed(dst.locate(run_id)) == _committed(src.locate(run_id))


def test_only_new_files_and_committed_bytes_are_copied(tmp_path: Path) -> None:
    """SYNC-2: missing or longer files only, and never past the listed length."""
    src = Store(tmp_path / "src")
    writer = src.create_run("growing", flush_every=None, flush_interval=None)
    writer.extend("gen", [{"i": i} for i in range(10)])
    writer.flush()
    dst_url = str(tmp_path / "dst")
    assert sync(src.url, dst_url).files == 1
    writer.extend("gen", [{"i": i} for i in range(10, 20)])
    writer.extend("other", [{"i": 0}])
    writer.flush()
    entry = src.open_run(writer.run_id).stage("gen").files[0]
    with open(src.locate(writer.run_id).path(entry.path), "ab") as f:
        f.write(b"uncommitted bytes of a frame being written")
    report = sync(src.url, dst_url)
    assert (report.count("update"), report.files) == (1, 2)
    copied = Store(dst_url).locate(writer.run_id)
    assert copied.size(entry.path) == entry.bytes
    assert [r["i"] for r in Store(dst_url).open_run(writer.run_id).records("gen")] == list(
        range(20)
    )
    assert verify_run(copied) == []
    writer.close()


def test_a_destination_run_changed_independently_is_refused_unless_forced(
    src: Store, tmp_path: Path
) -> None:
    """SYNC-4: a newer DST revision is refused; --force makes DST a copy of SRC."""
    run_id = src.run_ids()[0]
    dst_url = str(tmp_path / "dst")
    sync(src.url, dst_url)
    dst = Store(dst_url)
    with dst.resume_run(run_id) as writer:
        writer.append("gen", {"i": "only at dst"})
    before = _committed(dst.locate(run_id))
    report = sync(src.url, dst_url)
    assert not report.ok
    refused = next(r for r in report.runs if r.run_id == run_id)
    assert refused.action == "conflict"
    assert "changed independently" in refused.message
    assert "--force" in refused.message
    assert _committed(dst.locate(run_id)) == before
    result = CliRunner().invoke(app, ["sync", src.url, dst_url])
    assert result.exit_code == 1
    assert "changed independently" in result.stderr
    forced = sync(src.url, dst_url, force=True)
    assert forced.ok
    _same_runs(src, dst)


def test_diverged_history_is_a_conflict(src: Store, tmp_path: Path) -> None:
    """SYNC-4: DST's revision is not the one SRC went through."""
    run_id = src.run_ids()[0]
    dst_url = str(tmp_path / "dst")
    sync(src.url, dst_url)
    with Store(dst_url).resume_run(run_id) as writer:
        writer.append("gen", {"i": "dst"})
    with src.resume_run(run_id, flush_every=1) as writer:
        writer.extend("gen", [{"i": "src"}] * 4)
    assert (
        load_manifest(src.locate(run_id)).revision
        > load_manifest(Store(dst_url).locate(run_id)).revision
    )
    (result,) = [r for r in sync(src.url, dst_url).runs if r.run_id == run_id]
    assert result.action == "conflict"
    assert "differs from SRC's revision" in result.message


@pytest.mark.parametrize("change", ["artifact", "stage", "stage schema", "name"])
def test_a_change_at_dst_is_a_conflict_after_src_dropped_that_revision(
    src: Store, tmp_path: Path, change: str
) -> None:
    """SYNC-4: with DST's revision pruned at SRC, an artifact or a stage that only DST
    lists, or a member no writer changes, still shows that DST changed on its own; a push
    never deletes or overwrites it."""
    run_id = src.run_ids()[0]
    dst_url = str(tmp_path / "dst")
    sync(src.url, dst_url)
    with Store(dst_url).resume_run(run_id) as writer:
        if change == "artifact":
            writer.add_artifact("only-at-dst.txt", b"made at DST")
        elif change == "stage":
            writer.stage("only-at-dst").complete()
    if change in ("stage schema", "name"):  # a hand-made revision: no writer changes these
        revs = tmp_path / "dst" / run_id / names.MANIFESTS_DIR
        doc = json.loads(max(revs.glob("0*.json")).read_bytes())
        if change == "name":
            doc["name"] = "renamed at DST"
        else:
            doc["stages"][0]["record_schema_version"] = "2"
        doc["revision"] += 1
        (revs / names.revision_file(doc["revision"]).split("/")[-1]).write_text(json.dumps(doc))
    with src.resume_run(run_id, flush_every=1) as writer:
        writer.extend("gen", [{"i": "src"}] * 40)
    dst_revision = load_manifest(Store(dst_url).locate(run_id)).revision
    assert not src.locate(run_id).exists(names.revision_file(dst_revision))
    (result,) = [r for r in sync(src.url, dst_url).runs if r.run_id == run_id]
    assert result.action == "conflict"
    assert "does not extend" in result.message
    dst_manifest = load_manifest(Store(dst_url).locate(run_id))
    assert dst_manifest.revision == dst_revision
    if change == "artifact":
        assert (tmp_path / "dst" / run_id / "artifacts" / "only-at-dst.txt").exists()


def test_an_update_interrupted_before_its_revision_leaves_no_stale_sums(
    src: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-11, SYNC-5: over a finished DST run, SHA256SUMS goes first and comes back
    after the revision, so an interruption between leaves none that the shown revision
    contradicts; the next sync completes the job."""
    run_id = src.run_ids()[0]
    dst_url = str(tmp_path / "dst")
    assert sync(src.url, dst_url).ok
    with src.resume_run(run_id) as writer:
        writer.append("gen", {"i": "more"})
    create = Storage.create_exclusive

    def interrupted(self: Storage, rel: str, data: bytes) -> bool:
        if rel.startswith(names.MANIFESTS_DIR) and self.root.startswith(dst_url):
            raise StorageError("the connection dropped", location=self.where(rel))
        return create(self, rel, data)

    monkeypatch.setattr(Storage, "create_exclusive", interrupted)
    [failed] = [r for r in sync(src.url, dst_url).runs if r.run_id == run_id]
    assert failed.action == "error"
    dst_run = Store(dst_url).locate(run_id)
    assert not dst_run.exists(names.SUMS_FILE)
    assert {p.rule for p in verify_run(dst_run)} == {"LAYOUT-4"}  # the files copied so far
    shown = CliRunner().invoke(app, ["verify", dst_run.where()])
    assert "run that sync again instead" in shown.stdout
    monkeypatch.setattr(Storage, "create_exclusive", create)
    assert sync(src.url, dst_url).ok
    assert verify_run(dst_run) == []
    _same_runs(src, Store(dst_url))


def test_dry_run_writes_nothing(src: Store, tmp_path: Path) -> None:
    report = sync(src.url, str(tmp_path / "dst"), dry_run=True)
    assert report.count("new") == 3
    assert report.files == 9
    assert report.bytes == sum(
        sum(load_manifest(src.locate(i)).listed_paths().values()) for i in src.run_ids()
    )
    assert not (tmp_path / "dst").exists()


def test_delete_removes_destination_runs_only_when_asked(src: Store, tmp_path: Path) -> None:
    """SYNC-7."""
    dst_url = str(tmp_path / "dst")
    extra = _run(Store(dst_url), 2, "only-at-dst")
    assert sync(src.url, dst_url).ok
    assert extra in Store(dst_url).run_ids()
    dry = sync(src.url, dst_url, delete=True, dry_run=True)
    assert [r.run_id for r in dry.runs if r.action == "delete"] == [extra]
    assert extra in Store(dst_url).run_ids()
    assert sync(src.url, dst_url, delete=True).count("delete") == 1
    assert Store(dst_url).run_ids() == src.run_ids()


@pytest.mark.parametrize("where", ["memory://no-such-store-here", "missing-folder"])
def test_a_source_that_does_not_exist_is_an_error_and_deletes_nothing(
    src: Store, tmp_path: Path, where: str
) -> None:
    """A mistyped source must not empty the destination through --delete."""
    dst_url = str(tmp_path / "dst")
    assert sync(src.url, dst_url).ok
    missing = where if "://" in where else str(tmp_path / where)
    with pytest.raises(RunNotFoundError):
        sync(missing, dst_url, delete=True)
    assert Store(dst_url).run_ids() == src.run_ids()
    result = CliRunner().invoke(app, ["sync", missing, dst_url, "--delete"])
    assert result.exit_code == 1
    assert Store(dst_url).run_ids() == src.run_ids()


def test_a_forced_sync_interrupted_after_publishing_leaves_no_other_run_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SYNC-4, SYNC-6: DST held another run with the same id; a forced sync killed right
    after `manifest.json` must not leave that run's files for `repair` to salvage."""
    run_id = "20260101-000000000-0000abcd"
    ours, theirs = Store(tmp_path / "src"), Store(tmp_path / "dst")
    for store, name, n in ((theirs, "theirs", 7), (ours, "ours", 3)):
        with store.create_run(name, {"n": n}, run_id=run_id) as writer:
            writer.extend("gen", [{"i": i, "of": name} for i in range(n)])
    assert sync(ours.url, theirs.url).count("conflict") == 1

    def killed(run: Storage, data: bytes, *, finished: bool) -> None:
        write_manifest_copy(run, data, finished=finished)
        raise KeyboardInterrupt

    monkeypatch.setattr("runfmt.sync.write_manifest_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        sync(ours.url, theirs.url, force=True, workers=1)
    monkeypatch.undo()
    assert sync(ours.url, theirs.url).ok
    copy = theirs.locate(run_id)
    assert verify_run(copy) == []
    assert [r["of"] for r in theirs.open_run(run_id).records("gen")] == ["ours"] * 3


def test_an_interrupted_sync_stops_soon_and_the_next_one_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C drops the runs and files not started yet instead of copying them first; what
    it stopped is not published, and the next sync copies the rest."""
    src, dst = Store(tmp_path / "src"), Store(tmp_path / "dst")
    for i in range(40):
        _run(src, 3, name=f"r{i}")
    copy = _Engine._copy
    calls = 0

    def interrupted(self: _Engine, *args: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return copy(self, *args)

    monkeypatch.setattr(_Engine, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sync(src.url, dst.url, workers=2)
    assert calls < 10, "queued runs were copied after the interruption"
    published = [r for r in dst.run_ids() if (Path(dst.url) / r / names.MANIFEST_FILE).exists()]
    assert len(published) < 5
    assert all(verify_run(dst.locate(run_id)) == [] for run_id in published)
    monkeypatch.undo()
    assert sync(src.url, dst.url).ok
    _same_runs(src, dst)


def test_verify_checks_checksums_at_the_destination(src: Store, tmp_path: Path) -> None:
    dst_url = str(tmp_path / "dst")
    sync(src.url, dst_url)
    run_id = src.run_ids()[0]
    storage = Store(dst_url).locate(run_id)
    path = load_manifest(storage).stages[0].files[0].path
    data = bytearray(storage.read(path))
    data[-2] ^= 0x01
    storage.put(path, bytes(data))
    assert sync(src.url, dst_url).ok
    checked = sync(src.url, dst_url, verify=True)
    assert not checked.ok
    (bad,) = [r for r in checked.runs if r.problems]
    assert bad.run_id == run_id
    assert path in bad.problems[0]


def test_corrupt_source_file_is_never_published(src: Store, tmp_path: Path) -> None:
    """SYNC-3: bytes that do not match the listed sha256 fail the run before it is published."""
    run_id = src.run_ids()[0]
    storage = src.locate(run_id)
    path = load_manifest(storage).stages[0].files[0].path
    data = bytearray(storage.read(path))
    data[-2] ^= 0x01
    storage.put(path, bytes(data))
    report = sync(src.url, str(tmp_path / "dst"))
    (bad,) = [r for r in report.runs if not r.ok]
    assert (bad.run_id, bad.action) == (run_id, "error")
    assert "sha256" in bad.message
    dst = Store(tmp_path / "dst")
    with pytest.raises(RunNotFoundError):
        dst.open_run(run_id)
    for other in set(src.run_ids()) - {run_id}:
        assert verify_run(dst.locate(other)) == []


def test_progress_receives_bytes_and_files(src: Store, tmp_path: Path) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.planned_files = self.planned_bytes = self.bytes = self.files = 0

        def planned(self, files: int, nbytes: int) -> None:
            self.planned_files += files
            self.planned_bytes += nbytes

        def advanced(self, nbytes: int) -> None:
            self.bytes += nbytes

        def file_done(self) -> None:
            self.files += 1

    seen = Recorder()
    report = sync(src.url, str(tmp_path / "dst"), progress=seen)
    assert seen.planned_files == seen.files == report.files == 9
    assert seen.planned_bytes == seen.bytes == report.bytes


def test_cli_json_summary(src: Store, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["sync", src.url, str(tmp_path / "dst"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["runs"]["new"] == 3
    assert doc["files"] == 9
    assert {d["action"] for d in doc["details"]} == {"new"}
    again = json.loads(
        runner.invoke(app, ["sync", src.url, str(tmp_path / "dst"), "--json"]).stdout
    )
    assert (again["runs"]["same"], again["files"]) == (3, 0)
    text = runner.invoke(app, ["sync", src.url, str(tmp_path / "dst"), "--dry-run"])
    assert text.exit_code == 0
    assert "3 unchanged" in text.stdout


def test_a_new_destination_named_like_a_run_id_is_a_folder_here(
    src: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Cli
) -> None:
    """Only the id of a run in ``--store`` names that run; ``backup`` is ``./backup``."""
    monkeypatch.chdir(tmp_path)
    assert cli(src, "sync", src.url, "backup")[0] == 0
    _same_runs(src, Store(tmp_path / "backup"))
    assert not (Path(src.url) / "backup").exists()
    run_id = src.run_ids()[0]
    assert cli(src, "sync", run_id, "one")[0] == 0
    assert Store(tmp_path / "one").run_ids() == [run_id]


@pytest.mark.parametrize("inside", ["run", "store", "around"])
def test_a_destination_overlapping_the_source_is_refused(
    src: Store, tmp_path: Path, inside: str, cli: Cli
) -> None:
    """The copy would land in what is being copied: refused, nothing written."""
    run_id = src.run_ids()[0]
    before = {p: p.stat().st_size for p in Path(src.url).rglob("*") if p.is_file()}
    source, dst = {
        "run": (src.url, f"{src.url}/{run_id}"),
        "store": (f"{src.url}/{run_id}", src.url),
        "around": (src.url, str(tmp_path)),
    }[inside]
    code, _, err = cli(src, "sync", source, dst)
    assert code == 1
    assert "overlaps the source" in err
    assert {p: p.stat().st_size for p in Path(src.url).rglob("*") if p.is_file()} == before


def test_a_folder_that_is_no_run_yet_is_not_synced(src: Store, tmp_path: Path) -> None:
    """LAYOUT-2: a creation or copy cut short before its first revision is no run."""
    runs = sorted(src.run_ids())
    debris = Path(src.url) / "20260101-000000000-0000dead"
    (debris / "_manifests").mkdir(parents=True)
    (debris / "stages").mkdir()
    report = sync(src.url, str(tmp_path / "dst"))
    assert report.ok
    assert sorted(r.run_id for r in report.runs) == runs
    assert "20260101-000000000-0000dead" not in Store(tmp_path / "dst").run_ids()
    with pytest.raises(RunNotFoundError, match="LAYOUT-2"):
        sync(str(debris), str(tmp_path / "dst"))


def test_a_destination_that_is_a_file_is_refused_once(src: Store, tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "a-file").write_text("not a store")
    with pytest.raises(InvalidInputError, match="is a file"):
        sync(src.url, str(tmp_path / "a-file"))
    code, _, err = cli(src, "sync", src.url, str(tmp_path / "a-file"))
    assert code == 1
    assert err.count("is a file") == 1


def test_the_same_bucket_on_two_services_does_not_overlap() -> None:
    """Moving a store from one S3 service to another under the same bucket name."""
    a, b = (
        Storage("s3://bucket/runs", {"endpoint_url": f"http://127.0.0.1:{port}"})
        for port in (9001, 9002)
    )
    _check_apart(a, b)
    with pytest.raises(InvalidInputError, match="overlaps"):
        _check_apart(a, Storage("s3://bucket/runs", {"endpoint_url": "http://127.0.0.1:9001"}))


def test_an_interrupted_commit_is_finished_by_the_next_sync(src: Store, tmp_path: Path) -> None:
    """SYNC-2, SYNC-5: files left by an interrupted sync are hashed at DST, not copied again."""
    dst_url = str(tmp_path / "dst")
    sync(src.url, dst_url)
    run_id = src.run_ids()[0]
    storage = Store(dst_url).locate(run_id)
    storage.delete(names.MANIFEST_FILE)
    manifest = load_manifest(storage)
    storage.delete(names.revision_file(manifest.revision))
    with pytest.raises(RunNotFoundError):
        Store(dst_url).open_run(run_id)
    report = sync(src.url, dst_url)
    (done,) = [r for r in report.runs if r.run_id == run_id]
    assert (done.action, done.files) == ("new", 0)
    _same_runs(src, Store(dst_url))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_sync_never_shows_a_partial_run_and_resumes(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SYNC-5, SYNC-6: killed at any point, DST shows whole runs only; a re-run completes."""
    src = Store(tmp_path / "src")
    runs = 40 if where == "local" else 12
    for n in range(runs):
        _run(src, 200 + n, f"r{n}")
    env = dict(os.environ)
    options: dict[str, Any] = {}
    if where == "s3":
        dst_url = request.getfixturevalue("s3_url")
        options = request.getfixturevalue("s3_options")
        env = request.getfixturevalue("s3_env")
    else:
        dst_url = str(tmp_path / "dst")
    dst = Store(dst_url, options)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runfmt", "sync", src.url, dst_url, "--workers", "1", "--json"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(dst.run_ids()) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shown = 0
    listed = {r.run_id for r in dst.index.runs()}
    for run_id in dst.run_ids():
        if not revisions(dst.storage.child(run_id)):
            with pytest.raises(RunNotFoundError):
                dst.open_run(run_id)
            assert run_id not in listed
            continue
        shown += 1
        assert run_id in listed
        storage = dst.locate(run_id)
        assert [p for p in verify_run(storage) if p.rule != "COMMIT-7"] == []
        expected = load_manifest(src.locate(run_id)).stages[0].records
        assert len(list(dst.open_run(run_id).records("gen"))) == expected
    assert shown < runs, "the sync finished before it was killed"
    report = sync(src.url, dst_url, dst_options=options)
    assert report.ok
    _same_runs(src, Store(dst_url, options))


def test_an_empty_bucket_as_source_is_an_error_and_deletes_nothing(
    src: Store, tmp_path: Path, s3_endpoint: str, s3_options: dict[str, Any]
) -> None:
    """An object store's root that exists but holds nothing is no store: a bucket just made,
    or the wrong one, must not empty the destination through --delete."""
    import s3fs

    bucket = f"empty-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options).mkdir(bucket)
    dst_url = str(tmp_path / "dst")
    assert sync(src.url, dst_url).ok
    for source in (f"s3://{bucket}", f"s3://{bucket}/"):
        for dry_run in (True, False):
            with pytest.raises(RunNotFoundError, match="no run or store here"):
                sync(source, dst_url, src_options=s3_options, delete=True, dry_run=dry_run)
    assert Store(dst_url).run_ids() == src.run_ids()


@pytest.mark.parametrize("holds", ["nothing", "a note", "a store below", "no revision"])
def test_delete_from_a_source_that_holds_no_run_is_an_error(
    src: Store, tmp_path: Path, holds: str
) -> None:
    """A SRC that exists but holds no run (an empty folder, the folder above the store)
    must not empty the destination through --delete."""
    dst_url = str(tmp_path / "dst")
    assert sync(src.url, dst_url).ok
    source = tmp_path / "elsewhere"
    source.mkdir()
    if holds == "a note":
        (source / "notes.txt").write_text("mine")
    if holds == "a store below":
        _run(Store(source / "runs"), 2)
    if holds == "no revision":  # a creation cut short (LAYOUT-2)
        (source / "20200101-000000000-00000001" / names.MANIFESTS_DIR).mkdir(parents=True)
    for dry_run in (True, False):
        with pytest.raises(RunNotFoundError, match="SRC holds no run"):
            sync(str(source), dst_url, delete=True, dry_run=dry_run)
    assert Store(dst_url).run_ids() == src.run_ids()
    result = CliRunner().invoke(app, ["sync", str(source), dst_url, "--delete"])
    assert result.exit_code == 1
    assert Store(dst_url).run_ids() == src.run_ids()


def test_writer_running_at_source_is_synced_as_committed(tmp_path: Path) -> None:
    src = Store(tmp_path / "src")
    writer: RunWriter = src.create_run("live", flush_every=None, flush_interval=None)
    writer.extend("gen", [{"i": i} for i in range(5)])
    writer.flush()
    writer.append("gen", {"i": "buffered"})
    sync(src.url, str(tmp_path / "dst"))
    reader = Store(tmp_path / "dst").open_run(writer.run_id)
    assert reader.manifest.status == "running"
    assert [r["i"] for r in reader.records("gen")] == list(range(5))
    writer.close()


class _DroppingFS(MemoryFileSystem):
    """memory:// whose connection drops after a budget of writes."""

    protocol = "dropping"
    root_marker = "/"
    budget = 0

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if _DroppingFS.budget <= 0:
            raise ConnectionResetError("connection reset by peer")
        _DroppingFS.budget -= 1
        super().pipe_file(path, value, mode=mode, **kwargs)


register_implementation("dropping", _DroppingFS, clobber=True)


def test_a_dropped_connection_never_shows_a_partial_run_and_resync_completes(
    src: Store,
) -> None:
    dst_url = f"dropping://sync-{uuid.uuid4().hex}"
    _DroppingFS.budget = 8
    report = sync(src.url, dst_url, single_writer=True, workers=2)
    failed = [r for r in report.runs if r.action == "error"]
    assert failed, "the connection should have dropped during the sync"
    assert all("connection reset" in r.message for r in failed)
    dst = Store(dst_url, single_writer=True)
    for run in report.runs:
        if dst.storage.child(run.run_id).exists(names.MANIFESTS_DIR):
            problems = verify_run(dst.locate(run.run_id))
            assert [p for p in problems if p.rule != "COMMIT-7"] == []
        else:
            assert run in failed
            with pytest.raises(RunNotFoundError):
                dst.open_run(run.run_id)
    _DroppingFS.budget = 1000
    assert sync(src.url, dst_url, single_writer=True).ok
    _same_runs(src, dst)
    _DroppingFS().rm(dst_url, recursive=True)


def test_large_files_are_streamed_or_uploaded_whole(
    tmp_path: Path, s3_url: str, s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files above the in-memory size: a finished run's are uploaded whole, a live run's
    committed prefix is streamed; both checked against the listed sha256 (SYNC-3)."""
    monkeypatch.setattr("runfmt.sync._SMALL", 512)
    monkeypatch.setattr("runfmt.storage._READ_CHUNK", 700)
    src = Store(tmp_path / "src")
    done = _run(src, 300, "finished")
    live = src.create_run("live", flush_every=None, flush_interval=None)
    live.extend("gen", [{"i": i, "pad": "x" * (i % 50)} for i in range(300)])
    live.flush()
    with open(
        src.locate(live.run_id).path(src.open_run(live.run_id).stage("gen").files[0].path), "ab"
    ) as f:
        f.write(b"not committed")
    assert sync(src.url, s3_url, dst_options=s3_options).ok
    assert sync(s3_url, str(tmp_path / "back"), src_options=s3_options).ok
    _same_runs(src, Store(s3_url, s3_options))
    _same_runs(src, Store(tmp_path / "back"))
    storage = src.locate(done)
    path = load_manifest(storage).stages[0].files[0].path
    data = bytearray(storage.read(path))
    data[100] ^= 0x01
    storage.put(path, bytes(data))
    report = sync(src.url, s3_url + "-2", dst_options=s3_options)
    assert {r.run_id: r.action for r in report.runs} == {done: "error", live.run_id: "new"}
    (bad,) = [r for r in report.runs if r.run_id == done]
    assert "SYNC-3" in bad.message
    live_storage = src.locate(live.run_id)
    live_path = load_manifest(live_storage).stages[0].files[0].path
    with open(live_storage.path(live_path), "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = sync(src.url, s3_url + "-3", dst_options=s3_options)
    assert {r.run_id: r.action for r in report.runs}[live.run_id] == "error"
    assert not Storage(s3_url + "-3", s3_options).child(live.run_id).exists(live_path)
    live.close()


def test_delete_leaves_alone_a_destination_folder_that_holds_no_run(
    src: Store, tmp_path: Path
) -> None:
    """SYNC-7 deletes runs: a folder of the user's, even one named like a run, stays."""
    dst = tmp_path / "dst"
    for name in ("notes", "20260101-000000000-0000beef"):
        (dst / name).mkdir(parents=True)
        (dst / name / "todo.txt").write_text("keep me")
    report = sync(src.url, str(dst), delete=True)
    assert report.ok
    assert report.count("delete") == 0
    assert (dst / "notes" / "todo.txt").read_text() == "keep me"
    assert (dst / "20260101-000000000-0000beef" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("source", ["store", "another run"])
def test_a_destination_that_is_a_run_folder_is_refused(
    src: Store, tmp_path: Path, source: str, cli: Cli
) -> None:
    """A copy into a run folder would land inside that run (and --delete would take its
    stages for runs): refused, nothing written."""
    host = tmp_path / "other"
    host_id = _run(Store(host), 2, "host")
    before = {p: p.read_bytes() for p in (host / host_id).rglob("*") if p.is_file()}
    from_url = src.url if source == "store" else f"{src.url}/{src.run_ids()[0]}"
    with pytest.raises(InvalidInputError, match="is, or lies in, a run folder"):
        sync(from_url, str(host / host_id))
    delete = ["--delete"] if source == "store" else []
    code, _, err = cli(src, "sync", from_url, str(host / host_id), *delete)
    assert code != 0
    assert "run folder" in err
    assert {p: p.read_bytes() for p in (host / host_id).rglob("*") if p.is_file()} == before
    assert verify_run(Storage(str(host / host_id))) == []


@pytest.mark.parametrize("inside", ["", "/artifacts", "/stages/gen"])
def test_a_run_folder_or_one_inside_it_is_refused_as_a_store(src: Store, inside: str) -> None:
    """Runs created there would land inside the run."""
    with pytest.raises(InvalidInputError, match="run folder"):
        Store(f"{src.url}/{src.run_ids()[0]}{inside}")


@pytest.mark.parametrize("create", ["create_run", "fork_run"])
def test_a_missing_store_folder_inside_a_run_creates_no_run(src: Store, create: str) -> None:
    """A store folder that does not exist yet may lie in a run folder (a run in it is read
    by its path), but runs are not created there."""
    run_id = src.run_ids()[0]
    inside = Store(f"{src.url}/{run_id}/runs")
    make = {"create_run": lambda: inside.create_run("nested"),
            "fork_run": lambda: inside.fork_run(f"{src.url}/{run_id}", "gen")}[create]  # fmt: skip
    with pytest.raises(InvalidInputError, match="inside the run folder"):
        make()
    assert not Path(inside.url).exists()


def test_a_folder_inside_a_run_is_refused_as_a_destination(src: Store, tmp_path: Path) -> None:
    host = tmp_path / "other"
    host_id = _run(Store(host), 2, "host")
    before = {p: p.read_bytes() for p in (host / host_id).rglob("*") if p.is_file()}
    with pytest.raises(InvalidInputError, match="lies in, a run folder"):
        sync(f"{src.url}/{src.run_ids()[0]}", str(host / host_id / "artifacts"))
    assert {p: p.read_bytes() for p in (host / host_id).rglob("*") if p.is_file()} == before


def test_sha256sums_is_made_at_the_destination_not_copied(src: Store, tmp_path: Path) -> None:
    """CHECK-3: SHA256SUMS follows from the manifest, so a damaged one is not carried over."""
    run_id = src.run_ids()[0]
    sums = Path(src.url) / run_id / "SHA256SUMS"
    good = sums.read_bytes()
    sums.write_bytes(good.replace(b"  ", b" ", 1))
    assert sync(src.url, str(tmp_path / "dst")).ok
    assert (tmp_path / "dst" / run_id / "SHA256SUMS").read_bytes() == good
    assert verify_run(Storage(str(tmp_path / "dst" / run_id))) == []


@pytest.mark.parametrize("damage", ["revision number", "run id"])
def test_a_run_that_readers_refuse_is_not_synced(src: Store, tmp_path: Path, damage: str) -> None:
    """MAN-3, LAYOUT-1: sync refuses what a reader refuses, instead of publishing it at the
    destination as a run that verifies there."""
    run_id = src.run_ids()[0]
    run = Path(src.url) / run_id
    rev = sorted((run / "_manifests").glob("*.json"))[-1]
    doc = json.loads(rev.read_bytes())
    if damage == "revision number":
        rev.rename(rev.with_name(f"{doc['revision'] - 1:08d}.json.tmp"))
        rev = rev.with_name(f"{doc['revision'] - 1:08d}.json")
        rev.with_suffix(".json.tmp").replace(rev)
    else:
        doc["run_id"] = "20200101-000000000-00000000"
        rev.write_bytes(json.dumps(doc).encode())
    report = sync(src.url, str(tmp_path / "dst"))
    [bad] = [r for r in report.runs if r.run_id == run_id]
    assert bad.action == "error"
    assert ("MAN-3" if damage == "revision number" else "LAYOUT-1") in bad.message
    assert not (tmp_path / "dst" / run_id).exists()


@pytest.mark.parametrize("one_run", [True, False])
def test_a_destination_folder_holding_no_run_but_other_files_is_never_written(
    src: Store, tmp_path: Path, one_run: bool
) -> None:
    """A folder named as the run that holds the user's files, and no run, is no debris of
    an interrupted sync: nothing of it is deleted, and no run is mixed into it."""
    run_id = src.run_ids()[0]
    mine = tmp_path / "dst" / run_id / "notes" / "thesis.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("years of work")
    report = sync(f"{src.url}/{run_id}" if one_run else src.url, str(tmp_path / "dst"))
    [result] = [r for r in report.runs if r.run_id == run_id]
    assert result.action == "conflict"
    assert "holds no run but other files" in result.message
    assert mine.read_text() == "years of work"
    assert sorted(p.name for p in (tmp_path / "dst" / run_id).rglob("*")) == ["notes", "thesis.txt"]


def test_a_source_whose_revision_and_copy_disagree_is_not_synced(
    src: Store, tmp_path: Path
) -> None:
    """COMMIT-14: sync must not publish a changed revision as an intact run (with a new
    SHA256SUMS that would vouch for it at DST)."""
    run_id = src.run_ids()[0]
    rev = sorted((Path(src.url) / run_id / "_manifests").glob("*.json"))[-1]
    rev.write_bytes(rev.read_bytes().replace(b'"name": "run', b'"name": "xun'))
    report = sync(src.url, str(tmp_path / "dst"))
    [bad] = [r for r in report.runs if r.run_id == run_id]
    assert bad.action == "error"
    assert "COMMIT-14" in bad.message
    assert not (tmp_path / "dst" / run_id).exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_at_a_listed_source_path_is_named_as_such(src: Store, tmp_path: Path) -> None:
    """LAYOUT-3: present but no regular file, not "missing"; and no hang."""
    run_id = src.run_ids()[0]
    art = Path(src.url) / run_id / "artifacts" / "notes.txt"
    art.unlink()
    os.mkfifo(art)
    report = sync(src.url, str(tmp_path / "dst"))
    [bad] = [r for r in report.runs if r.run_id == run_id]
    assert bad.action == "error"
    assert "not a regular file (LAYOUT-3)" in bad.message


def test_a_destination_run_folder_holding_a_link_is_not_written_through(
    src: Store, tmp_path: Path
) -> None:
    """LAYOUT-5: a link in the DST run folder (its stages/ pointing at the user's folder)
    would take the copy, and a forced sync's deletions, out of the run."""
    run_id = src.run_ids()[0]
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("precious")
    (tmp_path / "dst" / run_id).mkdir(parents=True)
    (tmp_path / "dst" / run_id / "stages").symlink_to(user)
    report = sync(src.url, str(tmp_path / "dst"), force=True)
    [bad] = [r for r in report.runs if r.run_id == run_id]
    assert bad.action == "error"
    assert "LAYOUT-5" in bad.message
    assert [p.name for p in user.iterdir()] == ["thesis.txt"]
    (tmp_path / "dst" / run_id / "stages").unlink()
    (tmp_path / "dst" / run_id).rmdir()
    (tmp_path / "dst" / run_id).symlink_to(user)  # the run folder itself a link
    report = sync(src.url, str(tmp_path / "dst"))
    [bad] = [r for r in report.runs if r.run_id == run_id]
    assert "LAYOUT-5" in bad.message
    assert [p.name for p in user.iterdir()] == ["thesis.txt"]


def test_a_store_reached_through_a_link_into_a_run_is_refused(src: Store, tmp_path: Path) -> None:
    link = tmp_path / "lnk"
    link.symlink_to(Path(src.url) / src.run_ids()[0] / "artifacts")
    with pytest.raises(InvalidInputError, match="run folder"):
        Store(link)
    with pytest.raises(InvalidInputError, match="run folder"):
        sync(f"{src.url}/{src.run_ids()[1]}", str(link))


def test_folders_that_only_look_like_runs_do_not_stop_a_store(tmp_path: Path) -> None:
    """A run folder is one whose _manifests/ holds a revision (LAYOUT-2): an empty
    _manifests/ up the tree, or a web project's manifest.json, is none."""
    (tmp_path / "web" / "_manifests").mkdir(parents=True)
    (tmp_path / "web" / "manifest.json").write_text('{"name": "webapp"}')
    for where in ("web", "web/runs", "web/_manifests/runs"):
        with Store(tmp_path / where).create_run("fine") as w:
            w.append("g", {"i": 1})
        assert verify_run(w.storage) == []
