"""The store index: listing, reconciling with the folders, robustness, concurrency."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sqlite3
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from runfmt import _index_reading as reading
from runfmt import index as index_module
from runfmt.cache import Cache
from runfmt.check import verify_run
from runfmt.cli import app
from runfmt.demo import write_demo_run
from runfmt.errors import ManifestError, StorageError
from runfmt.index import Index, is_network_filesystem
from runfmt.store import Store
from tests.test_cli import run_main

runner = CliRunner()


def write_run(
    store: Store,
    name: str = "eval",
    *,
    tags: dict[str, str] | None = None,
    records: int = 3,
    status: str = "completed",
) -> str:
    writer = store.create_run(name, {"name": name}, tags=tags or {})
    stage = writer.stage("score", key_field="key")
    for i in range(records):
        stage.append({"key": f"{name}-{i}", "value": i})
    if status == "running":
        writer.close()
    else:
        writer.finish(status)  # type: ignore[arg-type]
    return writer.run_id


def index_path(store: Store) -> Path:
    return Path(store.url) / ".runfmt" / "index.sqlite"


def cli(store: Store, *args: str) -> Any:
    return runner.invoke(app, ["--store", store.url, *args])


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust every stamp at once, so tests can count which runs a refresh re-reads."""
    monkeypatch.setattr(reading, "RACY_NS", 0)


def test_lists_newest_first_with_every_filter(store: Store) -> None:
    a = write_run(store, "eval-a", tags={"model": "m1", "split": "dev"})
    b = write_run(store, "eval-b", tags={"model": "m2"}, status="failed")
    c = write_run(store, "train-c", tags={"model": "m1"}, status="running")
    idx = store.index

    assert [r.run_id for r in idx.runs()] == [c, b, a]
    assert [r.run_id for r in idx.runs(status="failed")] == [b]
    assert [r.run_id for r in idx.runs(status=["failed", "running"])] == [c, b]
    assert [r.run_id for r in idx.runs(name="eval-*")] == [b, a]
    assert [r.run_id for r in idx.runs(name="[!e]*")] == [c], "fnmatch's negation"
    assert [r.run_id for r in idx.runs(name="eval-[ab]")] == [b, a]
    assert [r.run_id for r in idx.runs(name="[^t]*")] == [c], "^ is no negation in fnmatch"
    assert [r.run_id for r in idx.runs(tags={"model": "m1"})] == [c, a]
    assert [r.run_id for r in idx.runs(tags={"model": "m1", "split": "dev"})] == [a]
    assert [r.run_id for r in idx.runs(limit=2)] == [c, b]
    assert idx.runs(since="1d") != []
    assert idx.runs(since=datetime.now(UTC) + timedelta(hours=1)) == []

    run = idx.run(a)
    assert run is not None
    assert (run.name, run.status, run.records, run.tags) == ("eval-a", "completed", 3, {
        "model": "m1", "split": "dev"})  # fmt: skip
    score = run.stage("score")
    assert score is not None
    assert (score.records, score.files, score.key_field) == (3, 1, "key")
    assert score.bytes == store.open_run(a).manifest.stage("score").bytes  # type: ignore[union-attr]


def test_cli_ls_json_and_text(store: Store) -> None:
    a = write_run(store, "eval-a", tags={"model": "m1"})
    b = write_run(store, "eval-b", status="failed")

    result = cli(store, "ls", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["run_id"] for r in rows] == [b, a]
    assert rows[1]["tags"] == {"model": "m1"}
    assert rows[1]["stages"][0]["records"] == 3

    result = cli(store, "ls", "--tag", "model=m1", "--status", "completed", "--limit", "5")
    assert result.exit_code == 0
    assert a in result.stdout
    assert b not in result.stdout
    assert cli(store, "ls", "--name", "nothing*").stdout == f"no runs in {store.url} match\n"


def test_cli_ls_aligns_wide_characters(store: Store) -> None:
    write_run(store, "日本語の評価")
    write_run(store, "ab")
    lines = cli(store, "ls").stdout.splitlines()
    status_column = {
        sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line[: line.index(s)])
        for line, s in zip(lines, ("STATUS", "completed", "completed"), strict=True)
    }
    assert len(status_column) == 1, lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday-ish"], "cannot read"),
        (["--tag", "no-equals-sign"], "KEY=VALUE"),
        (["--tag", "k=a", "--tag", "k=b"], "two values"),
        (["--limit", "-1"], "--limit"),
    ],
)
def test_cli_ls_bad_usage_exits_2(store: Store, args: list[str], message: str) -> None:
    result = cli(store, "ls", *args)
    assert result.exit_code == 2
    assert message in result.output


def _settle(store: Store, settled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``settled``, take no change as recent and list the store: the index then
    remembers the listing until the folder's own stamp changes."""
    if settled:
        monkeypatch.setattr(reading, "RACY_NS", 0)
        store.index.runs()


@pytest.mark.parametrize("settled", [False, True])
def test_copied_folder_appears_and_deleted_folder_disappears(
    store: Store, tmp_path: Path, settled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_run(store, "a")
    b = write_run(store, "b")
    assert len(store.index.runs()) == 2
    _settle(store, settled, monkeypatch)

    other = Store(tmp_path / "other")
    c = write_run(other, "copied")
    shutil.copytree(Path(other.url) / c, Path(store.url) / c)
    shutil.rmtree(Path(store.url) / a)

    assert [r.run_id for r in store.index.runs()] == [c, b]
    assert [r.run_id for r in Store(store.url).index.runs()] == [c, b]


def test_a_folder_swapped_in_shows_though_the_store_folder_mtime_was_set_back(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run folder deleted and another moved in keep the store folder's link count, and
    ``touch -d`` (or ``rsync -a``) sets its mtime back: its change time still tells."""
    gone = write_run(store, "gone")
    _settle(store, True, monkeypatch)
    before = os.stat(store.url)
    other = Store(tmp_path / "other")
    moved = write_run(other, "moved")
    shutil.rmtree(Path(store.url) / gone)
    shutil.move(Path(other.url) / moved, Path(store.url) / moved)
    os.utime(store.url, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(store.url).st_nlink == before.st_nlink

    assert [r.run_id for r in store.index.runs()] == [moved]


@pytest.mark.parametrize("settled", [False, True])
def test_reconciling_lists_run_folders_only(
    store: Store, tmp_path: Path, settled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files, links and names outside the run id grammar are never listed; a listed run
    whose folder became a file or a link is dropped; one left with only ``manifest.json``
    is listed as unreadable."""
    keep, bare, to_file, to_link = (write_run(store, n) for n in ("k", "b", "f", "l"))
    assert len(store.index.runs()) == 4
    _settle(store, settled, monkeypatch)
    root = Path(store.url)
    outside = Store(tmp_path / "outside")
    linked = write_run(outside, "linked")
    (root / linked).symlink_to(Path(outside.url) / linked, target_is_directory=True)
    (root / "20260101-000000000-0000000f").write_text("a file named like a run")
    shutil.copytree(root / keep, root / "Not_A_Run")
    shutil.rmtree(root / bare / "_manifests")
    shutil.rmtree(root / to_file)
    (root / to_file).write_text("")
    shutil.move(root / to_link, tmp_path / to_link)
    (root / to_link).symlink_to(tmp_path / to_link, target_is_directory=True)

    runs = {r.run_id: r.status for r in store.index.runs()}
    assert runs == {keep: "completed", bare: "unreadable"}
    assert store.index.refresh(keys=False).read == 0


def test_a_copy_under_another_run_id_is_unreadable_in_the_store_but_reads_by_path(
    store: Store, tmp_path: Path
) -> None:
    """LAYOUT-1: in a store a folder's name is its run id; a copy renamed by hand is listed as
    unreadable there, and opened by its path it reads and verifies under any name."""
    run_id = write_run(store, "a")
    other = "20200101-000000000-00000001"
    shutil.copytree(Path(store.url) / run_id, Path(store.url) / other)
    listed = {r.run_id: r for r in store.index.runs()}
    assert (listed[run_id].status, listed[other].status) == ("completed", "unreadable")
    assert "LAYOUT-1" in str(listed[other].problem)

    renamed = tmp_path / "my backup"
    shutil.copytree(Path(store.url) / run_id, renamed)
    assert [r["key"] for r in store.open_run(renamed).records("score")] == ["a-0", "a-1", "a-2"]
    assert verify_run(store.locate(str(renamed))) == []


def test_a_copy_under_another_run_id_is_refused_by_id_and_fails_verify(store: Store) -> None:
    """LAYOUT-1: by id, a folder whose manifest names another run is refused with where, the
    run it holds, the rule and the way out; the store-wide verify fails it; by its path it
    opens under any name."""
    run_id = write_run(store, "a")
    other = "20200101-000000000-00000001"
    copy = Path(store.url) / other
    shutil.copytree(Path(store.url) / run_id, copy)
    for open_by_id in (store.open_run, store.locate, store.resume_run):
        with pytest.raises(ManifestError) as refused:
            open_by_id(other)
        assert refused.value.location == str(copy)
        assert refused.value.problem == (
            f"manifest names run {run_id!r}, not its folder name (LAYOUT-1)"
        )
        assert refused.value.hint == f"rename the folder to {run_id}, or open it by its path"
    assert [(i, type(r).__name__) for i, r in store.runs()] == [
        (run_id, "RunReader"),
        (other, "ManifestError"),
    ]
    assert store.open_run(copy).run_id == run_id

    result = CliRunner().invoke(app, ["--store", store.url, "verify"])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"ok    {run_id}",
        f"{copy}: manifest names run {run_id!r}, not its folder name (LAYOUT-1)",
        f"FAIL  {other}: 1 problem",
        "checked 2 runs: 1 with problems",
    ]
    assert CliRunner().invoke(app, ["--store", store.url, "verify", str(copy)]).exit_code == 0


def test_a_folder_without_revisions_is_not_a_run_until_one_appears(
    store: Store, tmp_path: Path
) -> None:
    """LAYOUT-2: an empty ``_manifests/`` (a creation or a copy cut short before its first
    revision) is not listed; with a revision it is; with only ``manifest.json`` it is
    listed as unreadable."""
    done = write_run(store, "done")
    other = Store(tmp_path / "other")
    pending = write_run(other, "pending")
    folder = Path(store.url) / pending
    (folder / "_manifests").mkdir(parents=True)
    (folder / "_manifests" / ".tmp-revision").write_bytes(b"{")
    assert [r.run_id for r in store.index.runs()] == [done]
    assert store.index.run(pending) is None
    assert Store(store.url).index.run(pending) is None

    revision = max((Path(other.url) / pending / "_manifests").glob("0*.json"))
    shutil.copy(revision, folder / "_manifests" / revision.name)
    assert store.index.run(pending) is not None
    assert {r.run_id: r.status for r in store.index.runs()} == {done: "completed",
                                                                pending: "completed"}  # fmt: skip

    shutil.rmtree(folder / "_manifests")
    (folder / "_manifests").mkdir()
    (folder / "manifest.json").write_bytes(revision.read_bytes())
    summary = store.index.run(pending)
    assert summary is not None
    assert summary.status == "unreadable"
    assert "LAYOUT-2" in str(summary.problem)


def _commit_more(url: str, run_id: str) -> None:
    writer = Store(url).resume_run(run_id)
    writer.append("score", {"key": "late", "value": 99})
    writer.finish("completed")


def test_run_committed_by_another_process_shows_its_new_state(store: Store) -> None:
    run_id = write_run(store, "a", status="running")
    assert store.index.run(run_id).status == "running"  # type: ignore[union-attr]

    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_commit_more, args=(store.url, run_id))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0

    (run,) = store.index.runs()
    assert (run.status, run.records) == ("completed", 4)


def test_run_updated_in_place_with_its_times_kept_shows_its_new_state(
    store: Store, tmp_path: Path
) -> None:
    """``rsync -a`` of a newer copy over an indexed run keeps the folders' inodes and sets
    ``_manifests/`` back to the source's mtime: the stamp is the change time, which it
    cannot set, so the run is read again."""
    run_id = write_run(store, "a", status="running")
    assert store.index.run(run_id).status == "running"  # type: ignore[union-attr]
    manifests = Path(store.url) / run_id / "_manifests"
    before = manifests.stat()

    newer = tmp_path / "newer"
    shutil.copytree(Path(store.url) / run_id, newer / run_id)
    _commit_more(str(newer), run_id)
    for item in (newer / run_id).rglob("*"):
        if item.is_file():
            target = Path(store.url) / run_id / item.relative_to(newer / run_id)
            target.parent.mkdir(exist_ok=True)
            shutil.copy2(item, target)
    os.utime(manifests, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (manifests.stat().st_ino, manifests.stat().st_mtime_ns) == (
        before.st_ino, before.st_mtime_ns)  # fmt: skip

    (run,) = store.index.runs()
    assert (run.status, run.records) == ("completed", 4)


def test_refresh_rereads_only_changed_runs(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [write_run(store, f"r{i}") for i in range(5)]
    first = store.index.refresh()
    assert (first.runs, first.read) == (5, 5)

    reads: list[str] = []
    original = reading.LocalSource.manifest

    def counting(self: reading.LocalSource, run_id: str) -> bytes:
        reads.append(run_id)
        return original(self, run_id)

    monkeypatch.setattr(reading.LocalSource, "manifest", counting)
    assert store.index.refresh().read == 0
    _commit_more(store.url, ids[2])
    assert store.index.refresh().read == 1
    assert reads == [ids[2]]


def test_listing_leaves_the_keys_of_new_records_to_the_cache(store: Store) -> None:
    """A listing after a large write reads manifests, not stage files; the first cache
    lookup (a refresh with keys) scans them, once."""
    ids = [write_run(store, f"r{i}", records=50) for i in range(3)]
    listing = store.index.refresh(keys=False)
    assert (listing.read, listing.cache_entries) == (3, 0)
    assert store.index.query("SELECT count(*) FROM cache") == [(0,)]
    assert store.index.refresh(keys=False).read == 0, "pending keys do not make a run changed"
    assert [r.records for r in store.index.runs()] == [50, 50, 50]
    with_keys = store.index.refresh()
    assert (with_keys.read, with_keys.cache_entries) == (3, 150)
    assert store.index.refresh().read == 0
    assert store.cache.get("score", "r1-7") is not None
    assert ids


def test_a_refresh_sees_what_another_connection_wrote(store: Store) -> None:
    """The stamps a refresh keeps in memory are dropped when another connection writes."""
    ids = [write_run(store, f"r{i}") for i in range(3)]
    mine = store.index
    assert len(mine.runs()) == 3
    assert mine.refresh(keys=False).read == 0
    other = Index.for_url(store.url)
    other.forget([ids[1]])
    assert [r.run_id for r in other.runs(refresh=False)] == [ids[2], ids[0]]
    assert [r.run_id for r in mine.runs()] == ids[::-1]
    assert mine.refresh(keys=False).read == 0
    other.close()


def test_deleting_the_index_loses_nothing(store: Store) -> None:
    ids = [write_run(store, f"r{i}") for i in range(3)]
    assert len(store.index.runs()) == 3
    store.index.close()
    index_path(store).unlink()

    assert [r.run_id for r in Store(store.url).index.runs()] == ids[::-1]
    assert index_path(store).exists()


def test_cli_index_rebuild(store: Store) -> None:
    write_run(store, "a")
    write_run(store, "b", records=5)
    result = cli(store, "index", "rebuild")
    assert result.exit_code == 0, result.output
    assert "indexed 2 runs and 8 cache entries" in result.stdout
    result = cli(store, "index", "rebuild", "--json")
    assert json.loads(result.stdout)["cache_entries"] == 8


def _damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not a database at all" * 200)
    elif how == "foreign":
        path.unlink()
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE other(x)")
        con.commit()
        con.close()
    elif how == "garbled schema":  # SQLite's message quotes bytes that are no UTF-8
        con = sqlite3.connect(path)
        con.execute("PRAGMA writable_schema=ON")
        con.execute("UPDATE sqlite_master SET name=CAST(x'ff90fe' AS TEXT), "
                    "sql=CAST(x'43524541544520ff90' AS TEXT) WHERE name='cache_file'")  # fmt: skip
        con.commit()
        con.close()
    else:
        con = sqlite3.connect(path)
        con.execute({
            "newer": "PRAGMA user_version=99",
            "column dropped": "ALTER TABLE runs DROP COLUMN problem",
            "undecodable text": "UPDATE runs SET detail = CAST(x'7b22ff1b5b33316d0a' AS TEXT)",
        }[how])  # fmt: skip
        con.commit()
        con.close()


@pytest.mark.parametrize(
    ("how", "warning"),
    [
        ("garbage", "corrupt"),
        ("foreign", "not a runfmt index"),
        ("newer", "newer runfmt"),
        ("column dropped", "damaged (its tables or indexes are not runfmt's)"),
        ("undecodable text", "Could not decode"),
        ("garbled schema", "corrupt ('utf-8' codec can't decode"),
    ],
)
def test_damaged_index_is_rebuilt_with_a_warning(
    store: Store, how: str, warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [write_run(store, f"r{i}") for i in range(2)]
    store.index.runs()
    store.index.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{index_path(store)}{suffix}").unlink(missing_ok=True)
    _damage(index_path(store), how)

    with caplog.at_level(logging.WARNING, logger="runfmt.index"):
        runs = Store(store.url).index.runs()
    assert [r.run_id for r in runs] == ids[::-1]
    assert warning in caplog.text
    assert "\x1b" not in caplog.text, "a damaged file's bytes reach the terminal escaped"
    con = sqlite3.connect(index_path(store))
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("PRAGMA user_version").fetchone() == (index_module.SCHEMA_VERSION,)


def test_reading_the_index_of_a_missing_store_creates_nothing(tmp_path: Path) -> None:
    """A mistyped store path stays missing, so that the CLI still says so afterwards."""
    store = Store(tmp_path / "typo")
    assert list(store.index.runs()) == []
    assert store.cache.get("score", "a-0") is None
    assert not (tmp_path / "typo").exists()


def test_a_damaged_index_never_fails_a_run_that_uses_the_cache(store: Store) -> None:
    Path(store.url).mkdir(parents=True)  # an existing store: its index is on disk
    first = write_demo_run(store, reuse=store.cache.record)
    store.cache.index.close()
    _damage(index_path(store), "column dropped")
    again = Store(store.url)
    second = write_demo_run(again, reuse=again.cache.record)
    assert 0 < second.reused < first.total, "all but the failures reused"
    assert Store(store.url).open_run(second.run_id).manifest.status == "completed"


def test_an_index_locked_by_another_process_is_kept_in_memory_not_waited_on_for_good(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A lock another program keeps on the index (a ``sqlite3`` shell in a transaction):
    after the index timeout, lists, lookups and a run that uses the cache answer from an
    index in memory, with a warning, and the file is left as it is."""
    first = write_run(store, "a")
    store.index.refresh()
    store.index.close()
    holder = sqlite3.connect(index_path(store), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        later = write_run(store, "b")
        index = Index.for_storage(store.storage, timeout=0.2)
        with caplog.at_level(logging.WARNING, logger="runfmt.index"):
            assert sorted(r.run_id for r in index.runs()) == sorted([first, later])
            assert Cache(index).record("score", "b-1") == {"key": "b-1", "value": 1}
            demo = write_demo_run(store, reuse=Cache(index).record)
        assert "stayed locked by another process for 0.2 s" in caplog.text
        assert "indexing in memory" in caplog.text
        assert store.open_run(demo.run_id).manifest.status == "completed"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    kept = sqlite3.connect(index_path(store)).execute("SELECT run_id FROM runs").fetchall()
    assert kept == [(first,)]


def test_no_room_for_sqlites_temporary_files_keeps_the_scanned_keys_in_memory(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys a refresh finds wait in a temporary table; where SQLite's temporary files
    have no room (a small ``TMPDIR``), the refresh starts again with them in memory."""
    with store.create_run("many", flush_interval=None) as run:
        run.stage("t", key_field="key")
        run.extend("t", ({"key": f"k{i}", "v": i} for i in range(20_000)))
    spill = Index._spill

    def cramped(self: Index, con: sqlite3.Connection, entries: Any) -> tuple[int, int]:
        if con.execute("PRAGMA temp_store").fetchone()[0] != 2:  # not in memory yet (MEMORY)
            con.execute("PRAGMA temp.max_page_count=8")
        return spill(self, con, entries)

    monkeypatch.setattr(Index, "_spill", cramped)
    with caplog.at_level(logging.WARNING, logger="runfmt.index"):
        assert Cache(Store(store.url).index).record("t", "k19999") == {"key": "k19999", "v": 19999}
    assert "no room for SQLite's temporary files" in caplog.text
    assert store.index.query("SELECT count(*) FROM cache") == [(20_000,)]


def test_an_index_that_cannot_grow_is_kept_in_memory_not_discarded(
    store: Store, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: the index file stays as it is (it is not damaged), lists and lookups
    answer from an index in memory, with a warning."""
    first = write_run(store, "a")
    Store(store.url).index.refresh()
    later = [write_run(store, f"b{i}") for i in range(20)]
    prepare = Index._prepare

    def full(self: Index, con: sqlite3.Connection) -> str | None:
        problem = prepare(self, con)
        if self.path != ":memory:":
            pages = con.execute("PRAGMA page_count").fetchone()[0]
            con.execute(f"PRAGMA max_page_count={pages}")
        return problem

    monkeypatch.setattr(Index, "_prepare", full)
    with caplog.at_level(logging.WARNING, logger="runfmt.index"):
        found = Store(store.url).index.runs()
    assert sorted(r.run_id for r in found) == sorted([first, *later])
    assert "no space left to keep the index" in caplog.text
    con = sqlite3.connect(index_path(store))
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert (first,) in con.execute("SELECT run_id FROM runs").fetchall()
    finally:
        con.close()
    assert Store(store.url).cache.get("score", "b2-0") is not None


def test_an_index_path_that_is_a_folder_is_indexed_in_memory(
    store: Store,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_id = write_run(store, "a")
    index_path(store).parent.mkdir(exist_ok=True)
    index_path(store).mkdir()
    with caplog.at_level(logging.WARNING, logger="runfmt.index"):
        assert [r.run_id for r in Store(store.url).index.runs()] == [run_id]
    assert "it is not a regular file" in caplog.text
    assert Store(store.url).cache.get("score", "a-0") is not None
    for args in (["ls"], ["index", "rebuild"], ["cache", "get", "score", "a-0"]):
        code, _, err = run_main(["--store", store.url, *args], monkeypatch, capsys)
        assert code == 0, err


def test_an_index_damaged_again_and_again_is_an_error_not_a_crash(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(store, "a")

    def damaged(*args: object) -> None:
        raise index_module._Retry

    monkeypatch.setattr(Index, "_refresh", damaged)
    with pytest.raises(StorageError, match="deleted, replaced or damaged 5 times while in use"):
        Store(store.url).index.runs()
    monkeypatch.setattr(Index, "_query", damaged)
    with pytest.raises(StorageError, match="damaged 5 times"):
        Store(store.url).cache.get("score", "a-0")
    code, _, err = run_main(["--store", store.url, "ls"], monkeypatch, capsys)
    assert code == 1
    assert "damaged 5 times" in err
    assert "Traceback" not in err


def _list_after_damage(url: str, expected: int) -> None:
    assert len(Store(url).index.runs()) == expected
    assert Store(url).cache.get("score", "r0-0") is not None


def test_processes_meeting_a_damaged_index_at_once_all_rebuild_it(store: Store) -> None:
    for i in range(3):
        write_run(store, f"r{i}")
    ctx = multiprocessing.get_context("spawn")
    for how in ("garbage", "foreign"):
        store.index.runs()
        store.index.close()
        for suffix in ("-wal", "-shm"):
            Path(f"{index_path(store)}{suffix}").unlink(missing_ok=True)
        _damage(index_path(store), how)
        procs = [ctx.Process(target=_list_after_damage, args=(store.url, 3)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 8


def test_unreadable_run_is_listed_with_its_problem(store: Store) -> None:
    good = write_run(store, "good")
    bad = write_run(store, "bad")
    for path in (Path(store.url) / bad / "_manifests").iterdir():
        path.write_text("{not json")

    runs = {r.run_id: r for r in store.index.runs()}
    assert runs[good].status == "completed"
    assert runs[bad].status == "unreadable"
    assert "not valid JSON" in (runs[bad].problem or "")
    result = cli(store, "ls", "--status", "unreadable")
    assert result.exit_code == 0
    assert bad in result.stdout
    assert good not in result.stdout


def test_runs_are_ordered_by_creation_time_to_the_nanosecond(store: Store) -> None:
    """§14.1: the latest created_at (compared as times, then the greatest run id) comes
    first in listings and wins cache lookups, however little the times differ, and
    ``since`` compares to the same precision."""
    times = {
        "run-b": "2030-01-01T00:00:00.0000009Z",
        "run-z": "2030-01-01T00:00:00.0000001Z",
        "run-a": "9999-12-31T23:59:59.99999Z",
        "run-y": "9999-12-31T23:59:59.99998Z",
        "run-c": "2030-01-01T00:00:00Z",
    }
    for run_id, created in times.items():
        with store.create_run("a", {"r": run_id}, run_id=run_id, created_at=created) as w:
            w.stage("gen", key_field="key").append({"key": "K", "run": run_id})
    newest_first = ["run-a", "run-y", "run-b", "run-z", "run-c"]
    for index in (store.index, Store(store.url).index):
        assert [r.run_id for r in index.runs()] == newest_first
    hit = Store(store.url).cache.get("gen", "K")
    assert hit is not None
    assert hit.provenance.run_id == "run-a"
    since = datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    assert [r.run_id for r in store.index.runs(since=since)] == ["run-a", "run-y"]
    by_text = store.index.runs(since="2030-01-01T00:00:00.0000005Z")
    assert [r.run_id for r in by_text] == ["run-a", "run-y", "run-b"]
    listed = cli(store, "ls", "--json", "--since", "2030-01-01T00:00:00.0000005Z")
    assert [r["run_id"] for r in json.loads(listed.stdout)] == ["run-a", "run-y", "run-b"]
    for beyond, listed in (("0001-01-01T00:00:00+01:00", newest_first),
                           ("9999-12-31T23:59:59-01:00", [])):  # fmt: skip
        assert [r.run_id for r in store.index.runs(since=beyond)] == listed
        assert cli(store, "ls", "--since", beyond).exit_code == 0


def _listed_twice(doc: dict[str, Any]) -> None:
    doc["stages"][0]["files"].append(dict(doc["stages"][0]["files"][0]))


def _stage_twice(doc: dict[str, Any]) -> None:
    doc["stages"].append(json.loads(json.dumps(doc["stages"][0])))


def _huge_counter(doc: dict[str, Any]) -> None:
    doc["counters"]["tokens"] = 2**70


def _counts_past_64_bits(doc: dict[str, Any]) -> None:
    [first] = doc["stages"][0]["files"]
    second = dict(first, path=first["path"].replace("part-000001", "part-000002"))
    first["records"] = second["records"] = 2**63 - 1
    doc["stages"][0]["files"].append(second)


@pytest.mark.parametrize(
    ("damage", "status"),
    [(_listed_twice, "unreadable"), (_stage_twice, "unreadable"),
     (_counts_past_64_bits, "unreadable"), (_huge_counter, "unreadable")],
)  # fmt: skip
def test_a_revision_the_index_cannot_hold_is_one_unreadable_run(
    store: Store, damage: Any, status: str
) -> None:
    """A hand-made revision that lists a file or a stage twice, or counts past 64 bits
    (MAN-4, MAN-5, MAN-7, COMMIT-5), is listed as unreadable by ls and status alike, and the
    rest of the store is listed and looked up."""
    good = write_run(store, "good")
    bad = write_run(store, "bad")
    folder = Path(store.url) / bad / "_manifests"
    doc = json.loads(max(folder.glob("0*.json")).read_bytes())
    damage(doc)
    doc["revision"] += 1
    (folder / f"{doc['revision']:08d}.json").write_text(json.dumps(doc))
    for index in (store.index, Store(store.url).index):
        assert {r.run_id: r.status for r in index.runs()} == {good: "completed", bad: status}
    assert Store(store.url).cache.get("score", "good-1") is not None
    assert cli(store, "index", "rebuild").exit_code == 0
    assert cli(store, "cache", "get", "score", "good-1").exit_code == 0
    shown = cli(store, "status", "--json")
    assert shown.exit_code == (status == "unreadable")
    assert {r["run_id"]: r["health"] for r in json.loads(shown.stdout)} == {
        good: "completed", bad: status}  # fmt: skip


def test_reading_a_run_never_needs_the_index(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_id = write_run(store, "a")
    (Path(store.url) / ".runfmt").write_text("not a folder")
    assert [r["value"] for r in store.open_run(run_id).records("score")] == [0, 1, 2]

    code, out, err = run_main(["--store", store.url, "ls"], monkeypatch, capsys)
    assert code == 0
    assert run_id in out, "listed from an index in memory"
    assert "cannot keep the index" in caplog.text
    assert "Traceback" not in err


def test_network_filesystem_detection() -> None:
    mounts = (
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/nfs nfs4 rw 0 0\n"
        "//host/share /mnt/my\\040share cifs rw 0 0\n"
        "sshfs#x /mnt/ssh fuse.sshfs rw 0 0\n"
    )
    assert not is_network_filesystem("/home/user/runs", mounts)
    assert is_network_filesystem("/mnt/nfs/runs/.runfmt/index.sqlite", mounts)
    assert is_network_filesystem("/mnt/my share/runs", mounts)
    assert is_network_filesystem("/mnt/ssh/x", mounts)
    assert not is_network_filesystem("/mnt/nfsother", mounts)


@pytest.mark.parametrize(("env", "mode"), [(None, "wal"), ("delete", "delete")])
def test_journal_mode(
    store: Store, monkeypatch: pytest.MonkeyPatch, env: str | None, mode: str
) -> None:
    if env:
        monkeypatch.setenv("RUNFMT_INDEX_JOURNAL", env)
    write_run(store)
    store.index.runs()
    con = sqlite3.connect(index_path(store))
    assert con.execute("PRAGMA journal_mode").fetchone() == (mode,)


def test_an_unknown_journal_mode_is_ignored_with_a_warning(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RUNFMT_INDEX_JOURNAL", "Bogus")
    write_run(store)
    with caplog.at_level(logging.WARNING, logger="runfmt.index"):
        store.index.runs()
    assert "RUNFMT_INDEX_JOURNAL=Bogus is neither wal nor delete; ignored" in caplog.text
    con = sqlite3.connect(index_path(store))
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_network_filesystem_gets_the_rollback_journal(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "is_network_filesystem", lambda path: True)
    write_run(store)
    store.index.runs()
    con = sqlite3.connect(index_path(store))
    assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)


def test_read_only_and_remote_stores_keep_the_index_in_the_user_cache(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_store: Store
) -> None:
    monkeypatch.setenv("RUNFMT_CACHE_DIR", str(tmp_path / "cache"))
    run_id = write_run(store)
    readonly = Store(store.url, read_only=True)
    assert [r.run_id for r in readonly.index.runs()] == [run_id]
    assert not (Path(store.url) / ".runfmt").exists()
    assert readonly.index.path.startswith(str(tmp_path / "cache"))

    remote = Index.for_url("s3://user:secret@bucket/runs")
    assert remote.path.startswith(str(tmp_path / "cache"))
    assert "secret" not in remote.path
    assert Index.for_url("s3://bucket/runs").path == remote.path
    assert index_module.index_location("abfs://a@acct/runs", local=False) != (
        index_module.index_location("abfs://b@acct/runs", local=False)
    ), "a user without a password names a location (an Azure container), not a credential"
    on_a, on_b = (
        Index.for_url("s3://bucket/runs", {"endpoint_url": f"http://127.0.0.1:{port}"})
        for port in (9001, 9002)
    )
    assert on_a.path != on_b.path, "the same bucket on two services is two stores"

    memory_id = write_run(memory_store)
    assert [r.run_id for r in memory_store.index.runs()] == [memory_id]


def test_a_store_this_process_may_not_write_is_indexed_in_the_user_cache(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user's store, readable but not writable: ``ls`` works from the user cache."""
    monkeypatch.setenv("RUNFMT_CACHE_DIR", str(tmp_path / "cache"))
    run_id = write_run(store)
    writable = os.access
    monkeypatch.setattr(
        index_module.os, "access", lambda p, mode: mode != os.W_OK and writable(p, mode)
    )
    assert cli(Store(store.url), "ls", "--json").exit_code == 0
    index = Index.for_url(store.url)
    assert index.path.startswith(str(tmp_path / "cache"))
    assert [r.run_id for r in index.runs()] == [run_id]
    assert not (Path(store.url) / ".runfmt").exists()


def _writer_process(url: str, worker: int, runs: int) -> None:
    store = Store(url)
    for i in range(runs):
        write_run(store, f"w{worker}-{i}", records=20)
        store.index.refresh()


def test_concurrent_writers_and_indexers_lose_nothing(store: Store) -> None:
    os.makedirs(store.url, exist_ok=True)
    store.index.refresh()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(store.url, w, 6)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    fresh = Index.for_url(store.url)
    listed = fresh.runs(refresh=False)
    assert len(listed) == 24
    assert {r.status for r in listed} == {"completed"}
    assert fresh.query("SELECT count(*), count(DISTINCT key) FROM cache") == [(480, 480)]
    assert fresh.query("PRAGMA integrity_check") == [("ok",)]


def test_forget_runs_drops_deleted_runs_at_once(store: Store) -> None:
    keep = write_run(store, "keep")
    drop = write_run(store, "drop")
    assert store.index.refresh().runs == 2
    shutil.rmtree(Path(store.url) / drop)
    store.index.forget([drop])
    assert [r.run_id for r in store.index.runs(refresh=False)] == [keep]
    assert store.index.query("SELECT count(*) FROM cache") == [(3,)]


def test_remote_store_reconciles_and_serves_the_cache(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNFMT_CACHE_DIR", str(tmp_path / "cache"))
    store = Store(s3_url, s3_options)
    a = write_run(store, "a")
    b = write_run(store, "b")
    assert [r.run_id for r in store.index.runs()] == [b, a]
    hit = store.cache.get("score", "a-1")
    assert hit is not None
    assert (hit.record, hit.provenance.run_id) == ({"key": "a-1", "value": 1}, a)

    store.storage.delete_tree(a)
    c = write_run(store, "c")
    again = Store(s3_url, s3_options)
    assert again.index.path == store.index.path
    assert [r.run_id for r in again.index.runs()] == [c, b]
    assert again.cache.get("score", "a-1") is None
    assert Path(store.index.path).parent == tmp_path / "cache" / "index"
    assert Path(store.index.path).is_file()
