"""`runfmt gc`: retention by count per name, age, status and size; never a run being written."""

from __future__ import annotations

import json
import os
import shutil
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from runfmt.check import verify_run
from runfmt.format import names
from runfmt.gc import delete_planned, plan_gc
from runfmt.run import interrupts_held
from runfmt.storage import Storage
from runfmt.store import Store
from runfmt.sync import sync
from tests.fixtures_manage import Cli, MakeRun

LATER = datetime.now(UTC) + timedelta(days=3)


def ids(entries: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(e.run_id for e in entries)


@pytest.fixture
def runs(store: Store, make_run: MakeRun) -> Store:
    payload = {"s": (None, [{"text": "x" * 200, "i": i} for i in range(50)])}
    for i in range(3):
        make_run(store, "a", {"i": i}, payload, run_id=f"a{i}")
    for i in range(2):
        make_run(store, "b", {"i": i}, payload, run_id=f"b{i}", status="failed")
    return store


def test_keep_last_is_per_name(runs: Store) -> None:
    plan = plan_gc(runs, keep_last=1)
    assert ids(plan.delete) == ["a0", "a1", "b0"]
    assert ids(plan.keep) == ["a2", "b1"]
    assert "beyond the newest 1 of 'a'" in plan.delete[0].reason
    assert plan.bytes_freed == sum(e.bytes for e in plan.delete) > 0


def test_only_completed_spares_other_statuses(runs: Store) -> None:
    plan = plan_gc(runs, keep_last=1, only_completed=True)
    assert ids(plan.delete) == ["a0", "a1"]
    assert "b0" in ids(plan.keep)


def test_older_than_uses_the_last_update(runs: Store) -> None:
    assert plan_gc(runs, older_than=timedelta(days=1)).delete == []
    plan = plan_gc(runs, older_than=timedelta(days=1), now=LATER)
    assert ids(plan.delete) == ["a0", "a1", "a2", "b0", "b1"]
    both = plan_gc(runs, older_than=timedelta(days=1), keep_last=2, now=LATER)
    assert ids(both.delete) == ["a0"]


def test_max_size_deletes_oldest_until_under_the_cap(runs: Store) -> None:
    sizes = {e.run_id: e.bytes for e in plan_gc(runs, keep_last=99).keep}
    total = sum(sizes.values())
    plan = plan_gc(runs, max_size=total - sizes["a0"] - 1)
    assert ids(plan.delete) == ["a0", "a1"]
    assert plan.over_cap == 0
    assert plan_gc(runs, max_size=total).delete == []
    assert plan_gc(runs, max_size=0).over_cap == 0
    assert len(plan_gc(runs, max_size=0).delete) == 5


def test_runs_being_written_are_never_chosen(store: Store, make_run: MakeRun) -> None:
    live = store.create_run("a", {}, run_id="live")
    live.append("s", {"i": 1})
    live.flush()
    make_run(store, "a", {}, {"s": (None, [{"i": 1}])}, run_id="crashed", status="running")
    plan = plan_gc(store, keep_last=0, max_size=0, now=LATER)
    assert ids(plan.protected) == ["live"]
    assert "live writer" in plan.protected[0].reason
    assert ids(plan.delete) == ["crashed"]
    assert plan.over_cap > 0
    recent = plan_gc(store, keep_last=0)
    assert ids(recent.protected) == ["crashed", "live"]
    assert "updated" in recent.protected[0].reason
    live.finish()


def test_delete_planned_rechecks_each_run_and_updates_the_index(runs: Store) -> None:
    runs.index.refresh()
    assert runs.index.run("a1", refresh=False) is not None
    plan = plan_gc(runs, keep_last=1)
    resumed = runs.resume_run("a0")
    resumed.append("s", {"i": 99})
    resumed.flush()
    deleted, skipped = delete_planned(runs, plan)
    resumed.close()
    assert deleted == ["a1", "b0"]
    assert skipped == [{"run_id": "a0", "reason": "being written (a live writer holds its lock)"}]
    assert runs.run_ids() == ["b1", "a2", "a0"]
    assert not runs.storage.exists("a1")
    assert runs.index.run("a1", refresh=False) is None
    assert runs.index.run("a0", refresh=False) is not None


def test_cli_prints_plan_and_deletes_only_with_yes(runs: Store, cli: Cli) -> None:
    code, out, _ = cli(runs, "gc", "--keep-last", "1")
    assert code == 0
    assert "would delete 3 run(s)" in out
    assert "a0" in out
    assert "run again with --yes" in out
    assert len(runs.run_ids()) == 5
    code, out, _ = cli(runs, "gc", "--keep-last", "1", "--dry-run", "--json")
    assert [e["run_id"] for e in json.loads(out)["delete"]] == ["a0", "a1", "b0"]
    assert len(runs.run_ids()) == 5
    code, out, _ = cli(runs, "gc", "--keep-last", "1", "--yes")
    assert code == 0
    assert "deleted 3 run(s)" in out
    assert runs.run_ids() == ["b1", "a2"]
    code, out, _ = cli(runs, "ls", "--json")
    assert code == 0
    assert sorted(r["run_id"] for r in json.loads(out)) == ["a2", "b1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a policy"),
        (["--older-than", "soon"], "Invalid value for --older-than: invalid duration 'soon'"),
        (["--max-size", "lots"], "Invalid value for --max-size: invalid size 'lots'"),
        (["--keep-last", "1", "--yes", "--dry-run"], "contradict"),
        (["--keep-last", "-1"], "Invalid value for '--keep-last'"),
    ],
)
def test_cli_usage_errors_exit_2(runs: Store, cli: Cli, args: list[str], message: str) -> None:
    code, out, err = cli(runs, "gc", *args)
    assert code == 2
    assert out == ""
    assert message in err
    assert len(runs.run_ids()) == 5


def test_unreadable_runs_are_left_alone(runs: Store, cli: Cli) -> None:
    runs.storage.put("a0/_manifests/00000003.json", b"{broken")
    plan = plan_gc(runs, keep_last=0)
    assert [u["run_id"] for u in plan.unreadable] == ["a0"]
    assert "a0" not in ids(plan.delete)
    code, out, _ = cli(runs, "gc", "--keep-last", "0", "--yes")
    assert code == 0
    assert "leaving unreadable a0 alone" in out
    assert runs.run_ids() == ["a0"]


def test_files_a_fork_shares_count_once_and_free_nothing_while_it_stays(
    store: Store, make_run: MakeRun
) -> None:
    """A fork's hard links (FORK-3) hold its source's bytes: the store's size counts them
    once, and deleting the source frees only what the fork does not hold."""
    stages = {s: (None, [{"text": "x" * 200, "i": i} for i in range(50)]) for s in "st"}
    make_run(store, "src", {}, stages, run_id="src")
    store.fork_run("src", "t", run_id="fork", heartbeat_interval=None).close()
    files = [p for p in Path(store.url).rglob("*") if p.is_file() and ".runfmt" not in p.parts]
    on_disk = sum(os.lstat(p).st_size for p in {os.lstat(p).st_ino: p for p in files}.values())
    assert plan_gc(store, max_size=on_disk).delete == []
    alone = {e.run_id: e.bytes for e in plan_gc(store, keep_last=99).keep}["src"]
    [chosen] = plan_gc(store, max_size=0).delete  # the fork is being written: it stays
    assert chosen.run_id == "src"
    assert 0 < chosen.bytes < alone  # its stage file "s" stays with the fork
    for revision in (Path(store.url) / "fork" / "_manifests").iterdir():
        revision.write_text("{damaged")  # unreadable: left alone, with what it holds
    plan = plan_gc(store, max_size=0)
    assert [u["run_id"] for u in plan.unreadable] == ["fork"]
    assert [(e.run_id, e.bytes) for e in plan.delete] == [("src", chosen.bytes)]
    shutil.move(Path(store.url) / "fork", Path(store.url) / ".fork-killed")  # a killed build's
    assert [(e.run_id, e.bytes) for e in plan_gc(store, max_size=0).delete] == [
        ("src", chosen.bytes)]  # fmt: skip
    fork = shutil.move(Path(store.url) / ".fork-killed", Path(store.url) / "fork")
    shutil.rmtree(fork / "_manifests")  # what a delete cut short leaves
    (fork / "manifest.json").unlink()
    (fork / names.DELETING_FILE).write_bytes(b"")
    plan = plan_gc(store, max_size=0)
    assert [x["run_id"] for x in plan.leftovers] == ["fork"]
    assert [(e.run_id, e.bytes) for e in plan.delete] == [("src", chosen.bytes)]
    (fork / names.DELETING_FILE).unlink()  # a copy under way holds its files too
    assert [(e.run_id, e.bytes) for e in plan_gc(store, max_size=0).delete] == [
        ("src", chosen.bytes)]  # fmt: skip


def test_a_delete_cut_short_is_listed_with_its_size_and_left_alone(
    runs: Store, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete cut short after the revisions went leaves a marked folder that is no run:
    gc lists it whatever its policy and deletes nothing of it; a folder named like a run
    with no marker (a copy under way) is not listed."""
    delete_tree = Storage.delete_tree

    def cut_short(self: Storage, rel: str) -> None:
        self.delete(names.STAGES_DIR + "/s/" + self.names("stages/s")[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(Storage, "delete_tree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        delete_planned(runs, plan_gc(runs, keep_last=2))
    monkeypatch.setattr(Storage, "delete_tree", delete_tree)
    copying = Path(runs.url) / "20260101-000000000-0000000c"
    shutil.copytree(Path(runs.url) / "a1" / "stages", copying / "stages")
    left = sorted(p.relative_to(runs.url) for p in (Path(runs.url) / "a0").rglob("*"))
    assert Path("a0/.deleting") in left
    assert not (Path(runs.url) / "a0" / "manifest.json").exists()

    code, out, _ = cli(runs, "gc", "--keep-last", "5", "--json")
    plan = json.loads(out)
    assert (code, plan["delete"], [x["run_id"] for x in plan["leftovers"]]) == (0, [], ["a0"])
    assert plan["leftovers"][0]["bytes"] > 0
    assert plan["bytes_freed"] == 0
    code, out, _ = cli(runs, "gc", "--keep-last", "0", "--yes")
    assert code == 0
    assert "1 folder(s)" in out
    assert "that a delete cut short left: no run; delete them by hand" in out
    assert sorted(p.relative_to(runs.url) for p in (Path(runs.url) / "a0").rglob("*")) == left
    assert copying.exists()


@pytest.mark.parametrize("cut_at", [1, 2, 3, 4])
def test_the_delete_marker_goes_last_wherever_the_delete_is_cut(
    runs: Store, monkeypatch: pytest.MonkeyPatch, cut_at: int
) -> None:
    """Whichever part of the folder a cut-short delete reached, the marker is still there
    while anything else is, so gc lists the folder."""
    delete_tree = Storage.delete_tree
    calls = 0

    def cut(self: Storage, rel: str) -> None:
        nonlocal calls
        calls += 1
        if calls == cut_at:
            raise KeyboardInterrupt
        delete_tree(self, rel)

    monkeypatch.setattr(Storage, "delete_tree", cut)
    with pytest.raises(KeyboardInterrupt):
        delete_planned(runs, plan_gc(runs, keep_last=2))
    monkeypatch.setattr(Storage, "delete_tree", delete_tree)
    assert (Path(runs.url) / "a0" / ".deleting").exists()
    assert [x["run_id"] for x in plan_gc(runs, keep_last=5).leftovers] == ["a0"]


def test_a_sync_into_a_folder_a_delete_left_makes_it_a_run_again(
    runs: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(runs.url, backup, symlinks=True)
    monkeypatch.setattr(Storage, "delete_tree", lambda self, rel: _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        delete_planned(runs, plan_gc(runs, keep_last=2))
    monkeypatch.undo()
    assert [x["run_id"] for x in plan_gc(runs, keep_last=5).leftovers] == ["a0"]
    assert sync(str(backup / "a0"), runs.url).ok
    assert not (Path(runs.url) / "a0" / ".deleting").exists()
    assert plan_gc(runs, keep_last=5).leftovers == []
    assert verify_run(runs.locate("a0")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_wait_for_the_run_being_deleted_to_be_gone(
    runs: Store, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """SIGTERM as the CLI handles it: a KeyboardInterrupt, held back as Ctrl-C is."""
    delete_tree = Storage.delete_tree

    def interrupted(self: Storage, rel: str) -> None:
        signal.raise_signal(signum)
        delete_tree(self, rel)

    def stop(received: int, frame: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Storage, "delete_tree", interrupted)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            delete_planned(runs, plan_gc(runs, keep_last=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (Path(runs.url) / "a0").exists()
    assert sorted(runs.run_ids()) == ["a1", "a2", "b0", "b1"]


def _raise(exc: BaseException) -> None:
    raise exc


def test_ctrl_c_and_sigterm_both_held_deliver_sigterm() -> None:
    """Both came while a delete or commit held them: the command ends as terminated."""

    class Terminated(Exception):
        pass

    def stop(received: int, frame: object) -> None:
        raise Terminated

    def both() -> None:
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Terminated):
            both()
    finally:
        signal.signal(signal.SIGTERM, previous)
