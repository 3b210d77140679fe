"""Commit-protocol edges seen on object stores: a create-only write whose response was
lost, a run id whose first revision was pruned, a run replaced while a writer held it."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import runfmt.run
from runfmt import check, lifecycle
from runfmt import run as run_module
from runfmt.check import repair_run, verify_run
from runfmt.errors import ConflictError, InvalidInputError, RunExistsError, StorageError
from runfmt.format import names
from runfmt.run import ABANDON_AFTER, KEEP_REVISIONS, MAX_HEARTBEAT_INTERVAL, revisions
from runfmt.storage import Storage
from runfmt.store import Store


@pytest.fixture(params=["local", "memory"])
def any_store(request: pytest.FixtureRequest) -> Store:
    return request.getfixturevalue("store" if request.param == "local" else "memory_store")


def lose_responses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every create-only write of a revision lands, but reports a lost race: as when the
    client retries a PUT whose response was lost and the retry gets HTTP 412."""
    lost: list[str] = []
    create = Storage.create_exclusive

    def landed_but_refused(self: Storage, rel: str, data: bytes) -> bool:
        created = create(self, rel, data)
        if rel.startswith(names.MANIFESTS_DIR):
            lost.append(rel)
            return False
        return created

    monkeypatch.setattr(Storage, "create_exclusive", landed_but_refused)
    return lost


def test_a_commit_whose_response_was_lost_counts_once(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = any_store.create_run("r", {}, heartbeat_interval=None)
    lost = lose_responses(monkeypatch)
    writer.count("cost_usd", 10)
    writer.append("gen", {"i": 1})
    committed = writer.flush()
    assert lost, "the write reported a lost race"
    assert committed.counters == {"cost_usd": 10}
    assert committed.revision == 2, "not committed a second time"
    reread = any_store.open_run(writer.run_id)
    assert reread.manifest.counters == {"cost_usd": 10}
    assert [r["i"] for r in reread.records("gen")] == [1]
    writer.finish()


def test_a_run_created_while_its_response_was_lost_is_created(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    lose_responses(monkeypatch)
    writer = any_store.create_run("r", {}, heartbeat_interval=None)
    assert any_store.open_run(writer.run_id).manifest.revision == 1
    writer.finish()


def test_create_run_refuses_an_id_whose_first_revision_was_pruned(any_store: Store) -> None:
    """COMMIT-3 holds after COMMIT-9 pruned revision 1."""
    writer = any_store.create_run("original", {"a": 1}, heartbeat_interval=None)
    for _ in range(KEEP_REVISIONS + 8):
        writer.count("n", 1)
        writer.flush()
    writer.finish()
    run = any_store.locate(writer.run_id)
    assert 1 not in revisions(run)

    with pytest.raises(RunExistsError):
        any_store.create_run("impostor", {"b": 2}, run_id=writer.run_id)
    reread = any_store.open_run(writer.run_id)
    assert (reread.manifest.name, reread.manifest.counters) == ("original", {"n": 40})
    assert 1 not in revisions(run), "no revision 1 of another run was created"


def test_a_running_run_on_an_object_store_is_not_replaced(memory_store: Store) -> None:
    """No liveness lock there: a fresh heartbeat is the sign of a live writer (LIFE-4)."""
    first = memory_store.open_or_create("det", {"a": 1}, heartbeat_interval=None).writer
    assert first is not None
    first.append("gen", {"i": 1})
    first.flush()
    with pytest.raises(ConflictError, match="running"):
        memory_store.open_or_create("det", {"a": 1}, policy="rerun")
    assert [r["i"] for r in memory_store.open_run(first.run_id).records("gen")] == [1]
    first.finish()


def rerun_under(store: Store, monkeypatch: pytest.MonkeyPatch, commits: int) -> tuple[Any, Any]:
    """A writer that committed once and went silent, and the run that replaced its run
    (judged abandoned at once) after ``commits`` commits: (old writer, new writer)."""
    old: Any = store.open_or_create("det", {"a": 1}, heartbeat_interval=None).writer
    old.append("gen", {"i": "old"})
    old.flush()
    monkeypatch.setattr(lifecycle, "ABANDON_AFTER", -1.0)
    new: Any = store.open_or_create("det", {"a": 1}, policy="rerun", heartbeat_interval=None).writer
    for i in range(commits):
        new.append("gen", {"i": i})
        new.flush()
    return old, new


@pytest.mark.parametrize("new_commits", [3, 1])
def test_a_writer_whose_run_was_replaced_cannot_commit_into_the_new_run(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch, new_commits: int
) -> None:
    """The old writer stopped heartbeating, so its run was abandoned and rerun; it wakes
    up and flushes: its changes must not land in the new run. After one commit the new
    run is at the old writer's revision number: only a re-read shows that the run changed
    hands, and a silence past any heartbeat interval calls for one."""
    old, new = rerun_under(memory_store, monkeypatch, new_commits)
    if new.manifest.revision == old.manifest.revision:
        silent = datetime.now(UTC) - timedelta(seconds=MAX_HEARTBEAT_INTERVAL + 1)
        stamp = silent.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        old.manifest = replace(old.manifest, updated_at=stamp)
    old.append("gen", {"i": "late"})
    with pytest.raises(ConflictError, match="replaced by another run"):
        old.flush()
    reread = memory_store.open_run(new.run_id)
    assert reread.manifest.created_at == new.manifest.created_at
    assert [r["i"] for r in reread.records("gen")] == list(range(new_commits))
    new.finish()
    run = memory_store.locate(old.run_id)
    assert not [p for p in run.walk() if old.writer_id in p], "its stage files are deleted"
    assert verify_run(run) == []
    with pytest.raises(InvalidInputError, match="closed"):
        old.append("gen", {"i": "later"})


def test_a_refused_writer_deletes_only_artifacts_holding_its_own_bytes(
    any_store: Store,
) -> None:
    """COMMIT-11, COMMIT-4: a file by the name of one of its artifacts that holds other
    bytes is another writer's (a run that replaced this one may store the same name)."""
    w1 = any_store.create_run("two", heartbeat_interval=None, flush_interval=None)
    w1.flush()
    w2 = any_store.resume_run(w1.run_id, heartbeat_interval=None, flush_interval=None)
    w2.add_artifact("mine.txt", b"mine")
    w2.add_artifact("theirs.txt", b"w2")
    run = any_store.locate(w1.run_id)
    run.delete("artifacts/theirs.txt")
    run.put("artifacts/theirs.txt", b"another writer's")
    w1.finish()
    with pytest.raises(ConflictError, match="finished"):
        w2.flush()
    assert not run.exists("artifacts/mine.txt")
    assert run.read("artifacts/theirs.txt") == b"another writer's"


def test_a_writer_whose_clock_stepped_back_still_sees_its_run_was_replaced(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-4: the old writer's base looks fresh by its ``updated_at`` (the clock stepped
    back), but by the monotonic clock it has been silent past any heartbeat interval."""
    old, new = rerun_under(memory_store, monkeypatch, 1)
    assert new.manifest.revision == old.manifest.revision
    monkeypatch.setattr(old, "_based_at", old._based_at - MAX_HEARTBEAT_INTERVAL - 1)
    old.append("gen", {"i": "late"})
    with pytest.raises(ConflictError, match="replaced by another run"):
        old.flush()
    assert [r["i"] for r in memory_store.open_run(new.run_id).records("gen")] == [0]


@pytest.mark.parametrize("meanwhile", ["nothing", "salvaged", "dropped"])
def test_a_writer_silent_past_abandonment_commits_only_what_is_still_its_own(
    memory_store: Store, flush_without_commit: Any, meanwhile: str
) -> None:
    """LIFE-4, STORE-3: silent for over 300 s (a process frozen), the writer was taken for
    abandoned; a repair may have listed or deleted what it had stored: it then stops."""
    w = memory_store.create_run("frozen", heartbeat_interval=None, flush_interval=None)
    w.append("gen", {"i": 0})
    w.flush()
    w.append("gen", {"i": 1})
    flush_without_commit(w)
    w.add_artifact("late.txt", b"late")
    run = memory_store.locate(w.run_id)
    if meanwhile == "salvaged":
        assert repair_run(run).salvaged_records == 1
    elif meanwhile == "dropped":  # as `repair --drop` does once the run is abandoned
        for path in [*w._changes.files, "artifacts/late.txt"]:
            run.delete(path)
    w._flushed_at -= ABANDON_AFTER + 1
    if meanwhile == "nothing":
        assert w.finish().stage("gen").records == 2
        assert verify_run(run) == []
        return
    with pytest.raises(ConflictError, match="taken for abandoned"):
        w.flush()
    with pytest.raises(ConflictError, match="taken for abandoned"):
        w.append("gen", {"i": 2})
    records = [r["i"] for r in memory_store.open_run(w.run_id).records("gen")]
    assert records == ([0, 1] if meanwhile == "salvaged" else [0])
    assert verify_run(run) == []


def committed_one_pending_one(store: Store) -> tuple[Any, Storage]:
    """A writer with one record and counter delta committed and one of each buffered."""
    w = store.create_run("frozen", heartbeat_interval=None, flush_interval=None)
    w.append("gen", {"i": 0})
    w.count("c", 1)
    w.flush()
    w.append("gen", {"i": 1})
    w.count("c", 1)
    return w, store.locate(w.run_id)


@pytest.mark.parametrize("meanwhile", ["salvaged", "dropped"])
def test_a_writer_frozen_between_storing_and_committing_commits_nothing(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """STORE-3: the check comes right before the commit, after the flush stored its
    objects: a repair meanwhile must not see its records or counter deltas twice."""
    w, run = committed_one_pending_one(memory_store)
    put = Storage.put

    def frozen_after(self: Storage, rel: str, data: bytes) -> None:
        put(self, rel, data)
        if rel.startswith("stages/"):
            w._flushed_at -= ABANDON_AFTER + 1
            if meanwhile == "salvaged":
                repair_run(run)
            else:
                run.delete(rel)

    monkeypatch.setattr(Storage, "put", frozen_after)
    with pytest.raises(ConflictError, match="taken for abandoned"):
        w.flush()
    monkeypatch.setattr(Storage, "put", put)
    reader = memory_store.open_run(w.run_id)
    salvaged = meanwhile == "salvaged"
    assert [r["i"] for r in reader.records("gen")] == ([0, 1] if salvaged else [0])
    assert reader.manifest.counters == {"c": 1}, "a repair of a run heard from lately adds none"
    assert verify_run(run) == []


@pytest.mark.parametrize("meanwhile", ["salvaged", "dropped"])
def test_a_commit_retried_on_a_revision_that_lists_its_files_is_refused(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """STORE-3, COMMIT-4: a writer silent past abandonment lost the race for its revision
    to a repair that salvaged the very objects it was committing: re-applying its changes
    to that revision could count their counter deltas twice. (A writer heard from lately
    may: such a repair adds no deltas, test_salvage_counters.)"""
    w, run = committed_one_pending_one(memory_store)
    create = runfmt.run.create_revision

    def repaired_first(storage: Storage, revision: int, data: bytes) -> bool:
        monkeypatch.setattr(runfmt.run, "create_revision", create)
        if meanwhile == "salvaged":
            assert repair_run(run).salvaged_records == 1
        else:  # a drop, then another machine's commit, which this one loses the race to
            for path in w._changes.files:
                run.delete(path)
            runfmt.run.commit(run, runfmt.run.ChangeSet(heartbeat=True), 1.0)
        return create(storage, revision, data)

    monkeypatch.setattr(runfmt.run, "create_revision", repaired_first)
    w._flushed_at -= ABANDON_AFTER + 1  # frozen: the repair may have counted its deltas
    with pytest.raises(ConflictError, match="taken for abandoned"):
        w.flush()
    reader = memory_store.open_run(w.run_id)
    assert [r["i"] for r in reader.records("gen")] == ([0, 1] if meanwhile == "salvaged" else [0])
    assert reader.manifest.counters == {"c": 1}
    assert verify_run(run) == []
    with pytest.raises(ConflictError):
        w.append("gen", {"i": 2})


def test_heartbeats_do_not_hide_a_writers_silence_from_its_check(
    memory_store: Store,
) -> None:
    """STORE-3: a heartbeat commits none of what the writer stored, so the time since its
    last flush, not its last heartbeat, says whether it was silent."""
    w = memory_store.create_run("frozen", heartbeat_interval=None, flush_interval=None)
    w.flush()
    w.add_artifact("late.txt", b"late")
    memory_store.locate(w.run_id).delete("artifacts/late.txt")  # `repair --drop` meanwhile
    w._flushed_at -= ABANDON_AFTER + 1
    w.manifest = runfmt.run.commit(  # what the heartbeat thread does
        w.storage, runfmt.run.ChangeSet(heartbeat=True), 1.0, w.manifest
    )
    with pytest.raises(ConflictError, match="taken for abandoned"):
        w.flush()


def test_a_run_whose_newest_revision_cannot_be_read_may_have_a_live_writer(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORE-3: where no lock tells, not being told is no sign of death."""
    w = memory_store.create_run("flaky", heartbeat_interval=None)
    w.add_artifact("late.txt", b"late")
    run = memory_store.locate(w.run_id)

    def flaky(*args: Any, **kwargs: Any) -> None:
        raise StorageError("the connection dropped")

    monkeypatch.setattr(check, "load_manifest", flaky)
    assert check.being_written_by(run) == [check.ANY_WRITER]


def test_repair_never_salvages_a_replaced_runs_file_into_its_successor(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused writer died before deleting the stage file it wrote for the new run:
    its header's run_created_at names the old run, so repair removes it (COMMIT-8)."""
    old, new = rerun_under(memory_store, monkeypatch, 3)
    new.finish()
    delete = Storage.delete

    def dies_first(self: Storage, rel: str) -> None:
        if old.writer_id in rel:
            raise StorageError("the process died here", location=rel)
        delete(self, rel)

    monkeypatch.setattr(Storage, "delete", dies_first)
    old.append("gen", {"i": "late"})
    with pytest.raises(ConflictError, match="replaced by another run"):
        old.flush()
    monkeypatch.setattr(Storage, "delete", delete)
    run = memory_store.locate(new.run_id)
    [left] = [p for p in run.walk() if old.writer_id in p]
    [told] = [p.problem for p in verify_run(run) if p.location == left]
    assert told.endswith("written for a run this one replaced; `repair` deletes it")
    report = repair_run(run)
    assert f"{left}: removed (written for a run this one replaced)" in report.actions
    assert report.salvaged_records == 0
    assert [r["i"] for r in memory_store.open_run(new.run_id).records("gen")] == [0, 1, 2]
    assert verify_run(run) == []


def test_a_writer_cannot_commit_into_a_run_another_writer_finished(any_store: Store) -> None:
    """COMMIT-11: once a run is finished, its SHA256SUMS lists every committed byte; a
    second writer's later commit would make it stale, so it is refused unless it reopens
    the run, and the finished run stays as it was."""
    w1 = any_store.create_run("two", heartbeat_interval=None)
    w1.append("gen", {"i": 1})
    w1.flush()
    w2 = any_store.resume_run(w1.run_id, heartbeat_interval=None)
    w2.append("gen", {"i": 2})
    done = w1.finish()
    with pytest.raises(ConflictError, match=r"finished \(completed\) since this writer read it"):
        w2.close()
    with pytest.raises(InvalidInputError, match="closed"):
        w2.append("gen", {"i": 4})
    run = any_store.locate(w1.run_id)
    assert any_store.open_run(w1.run_id).manifest.revision == done.revision
    assert [r["i"] for r in any_store.open_run(w1.run_id).records("gen")] == [1]
    assert verify_run(run) == []  # the refused commit's stage file is gone
    again = any_store.resume_run(w1.run_id, heartbeat_interval=None)
    again.append("gen", {"i": 3})
    assert again.finish().status == "completed"
    assert verify_run(any_store.locate(w1.run_id)) == []
    assert [r["i"] for r in any_store.open_run(w1.run_id).records("gen")] == [1, 3]


def test_a_refused_commit_leaves_no_bytes_to_salvage_in_a_file_it_had_committed_to(
    store: Store,
) -> None:
    """COMMIT-11 on local disk: the refused writer appended to a file it had committed to
    before; the refused frames are cut, so a resume does not salvage the dropped records."""
    w1 = store.create_run("two", heartbeat_interval=None, flush_interval=None)
    w1.append("gen", {"i": 1})
    w1.flush()
    w2 = store.resume_run(w1.run_id, heartbeat_interval=None, flush_interval=None)
    w2.append("gen", {"i": 2})
    w2.flush()
    w2.append("gen", {"i": 3})
    w1.finish()
    with pytest.raises(ConflictError, match="finished"):
        w2.flush()
    with contextlib.suppress(ConflictError):
        w2.close()  # as the process would at exit: its lock goes
    assert verify_run(store.locate(w1.run_id)) == []
    again = store.resume_run(w1.run_id, heartbeat_interval=None)
    assert again.finish().status == "completed"
    assert sorted(r["i"] for r in store.open_run(w1.run_id).records("gen")) == [1, 2]


def test_a_refused_writer_keeps_what_a_repair_listed_before_the_run_finished(
    memory_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-11 with COMMIT-8 on an object store: between storing its object and its
    commit, a repair listed the writer's object, then another writer finished the run. The
    refused writer deletes only what the newest revision does not list."""
    w1 = memory_store.create_run("two", heartbeat_interval=None, flush_interval=None)
    w1.append("gen", {"i": 1})
    w1.flush()
    w2 = memory_store.resume_run(w1.run_id, heartbeat_interval=None, flush_interval=None)
    w2.append("gen", {"i": 2})
    run = memory_store.locate(w1.run_id)
    commit = run_module.commit_locked

    def meanwhile(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(run_module, "commit_locked", commit)
        assert repair_run(run).salvaged_records == 1
        w1.finish()
        return commit(*args, **kwargs)

    monkeypatch.setattr(run_module, "commit_locked", meanwhile)
    with pytest.raises(ConflictError, match="finished"):
        w2.flush()
    assert verify_run(run) == []
    assert sorted(r["i"] for r in memory_store.open_run(w1.run_id).records("gen")) == [1, 2]


def test_close_after_a_passing_storage_failure_can_be_called_again(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a refusal for good (ConflictError) stops a writer whose last commit failed; a
    storage failure leaves it open, so calling close again commits what it holds."""
    w = any_store.create_run("flaky", heartbeat_interval=None)
    w.append("gen", {"i": 1})
    create = Storage.create_exclusive
    failures = iter([StorageError("the connection dropped")])

    def flaky(self: Storage, rel: str, data: bytes) -> bool:
        for exc in failures:
            raise exc
        return create(self, rel, data)

    monkeypatch.setattr(Storage, "create_exclusive", flaky)
    with pytest.raises(StorageError, match="connection dropped"):
        w.close()
    w.close()
    assert [r["i"] for r in any_store.open_run(w.run_id).records("gen")] == [1]
