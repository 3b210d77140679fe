"""Run lifecycle: statuses, progress, completed_through_stage, heartbeats and abandonment,
deterministic ids, the existing-run policy and `runfmt status`."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import pytest
from typer.testing import CliRunner

import runfmt.run
from runfmt.check import verify_run
from runfmt.cli import app
from runfmt.errors import (
    ConflictError,
    InvalidInputError,
    ManifestError,
    RunExistsError,
)
from runfmt.format import names
from runfmt.format.keys import compute_key
from runfmt.format.manifest import decode_manifest, encode_manifest, to_json
from runfmt.format.names import is_run_id
from runfmt.lifecycle import (
    ABANDON_AFTER,
    Policy,
    deterministic_run_id,
    health,
    now,
    parse_timestamp,
    summarize,
)
from runfmt.run import RunWriter, load_manifest, unpublish
from runfmt.store import Store

CONFIG = {"model": "m1", "temperature": 0.0}


def write_stage(writer: object, stage: str, n: int, failures: int = 0) -> None:
    for i in range(n):
        record = {"key": f"q{i}", "v": i}
        if i < failures:
            record["_error"] = "timeout"
        writer.append(stage, record)  # type: ignore[attr-defined]


# statuses and progress


@pytest.mark.parametrize(
    ("finish", "status", "error"),
    [
        (lambda w: w.finish(), "completed", None),
        (lambda w: w.fail("boom: model down"), "failed", "boom: model down"),
        (lambda w: w.cancel(), "cancelled", None),
    ],
)
def test_final_statuses_and_per_stage_progress(store: Store, finish, status, error) -> None:
    """LIFE-1: health is the status; progress comes from the manifest. LIFE-5: a stage
    is declared running, and only finishing as completed completes it."""
    w = store.create_run("eval", CONFIG, heartbeat_interval=None)
    w.stage("generate", key_field="key")
    write_stage(w, "generate", 10, failures=3)
    assert w.flush().stage("generate").status == "running"  # type: ignore[union-attr]
    m = finish(w)
    assert (m.status, m.error) == (status, error)
    expected = "completed" if status == "completed" else "running"
    assert m.stage("generate").status == expected  # type: ignore[union-attr]
    assert m.finished_at is not None
    summary = summarize(load_manifest(store.locate(m.run_id)), now())
    assert summary.health == status
    assert [(s.name, s.records, s.failures) for s in summary.stages] == [("generate", 10, 3)]


def test_exception_in_with_block_fails_the_run_with_the_error(store: Store) -> None:
    w = store.create_run("eval", heartbeat_interval=None)

    def crash() -> None:
        with w:
            w.append("generate", {"v": 1})
            raise RuntimeError("judge crashed")

    with pytest.raises(RuntimeError):
        crash()
    m = load_manifest(store.locate(w.run_id))
    assert (m.status, m.error) == ("failed", "RuntimeError: judge crashed")
    assert m.stage("generate").records == 1  # type: ignore[union-attr]


# completed_through_stage


def test_until_stage_completes_the_run_through_that_stage(store: Store) -> None:
    w = store.create_run("eval", CONFIG, until_stage="generate", heartbeat_interval=None)
    write_stage(w, "generate", 4)
    m = w.finish()
    assert (m.status, m.completed_through_stage) == ("completed", "generate")
    assert m.stage("generate").status == "completed"  # type: ignore[union-attr]
    assert summarize(m, now()).health == "completed"


def test_finishing_completes_the_stages_this_writer_took_up_through_the_stage(
    store: Store,
) -> None:
    """LIFE-5: stages declared after the one finished through, and a stage only a dead
    writer took up, keep their status."""
    dead = store.create_run("eval", CONFIG, heartbeat_interval=None)
    write_stage(dead, "prepare", 1)
    dead.flush()
    dead.discard()
    w = store.resume_run(dead.run_id, heartbeat_interval=None)
    write_stage(w, "generate", 2)
    w.stage("score")
    w.stage("judge")
    m = w.finish(through_stage="score")
    assert [(s.name, s.status) for s in m.stages] == [
        ("prepare", "running"), ("generate", "completed"), ("score", "completed"),
        ("judge", "running"),
    ]  # fmt: skip
    assert m.completed_through_stage == "score"


def test_resume_keeps_through_stage_until_the_full_run_completes(store: Store) -> None:
    w = store.create_run("eval", CONFIG, heartbeat_interval=None)
    write_stage(w, "generate", 2)
    first = w.finish(through_stage="generate")
    w = store.resume_run(first.run_id, heartbeat_interval=None)
    assert (w.manifest.status, w.manifest.completed_through_stage) == ("running", "generate")
    write_stage(w, "score", 2)
    m = w.finish()
    assert (m.status, m.completed_through_stage) == ("completed", None)
    assert [s.status for s in m.stages] == ["completed", "completed"]


def test_finish_through_unknown_stage_is_refused_and_run_stays_open(store: Store) -> None:
    w = store.create_run("eval", heartbeat_interval=None)
    write_stage(w, "generate", 1)
    with pytest.raises(InvalidInputError, match="no such stage"):
        w.finish(through_stage="score")
    assert w.finish().status == "completed"


QUIET = {"flush_interval": None, "heartbeat_interval": None}


def test_failing_a_run_another_writer_finished_through_a_stage_keeps_it(store: Store) -> None:
    """LIFE-2: finishing as failed keeps completed_through_stage, the newest revision's (not
    the one this writer read before the other finished the run)."""
    first = store.create_run("r", **QUIET)
    first.append("gen", {"i": 1})
    second = store.resume_run(first.run_id, **QUIET)
    assert first.finish(through_stage="gen").completed_through_stage == "gen"
    failed = second.fail("judge down")
    assert (failed.status, failed.completed_through_stage) == ("failed", "gen")
    reopened = store.resume_run(first.run_id, **QUIET)
    assert reopened.manifest.completed_through_stage == "gen", "reopening keeps it"
    assert reopened.finish().completed_through_stage is None, "completing in full removes it"


def test_finishing_leaves_a_stage_this_writer_committed_as_failed(store: Store) -> None:
    """LIFE-5: only stages still running are completed."""
    writer = store.create_run("r", **QUIET)
    writer.append("gen", {"i": 1})
    writer.stage("gen").fail()
    writer.flush()
    writer.append("judge", {"i": 1})
    finished = writer.finish()
    assert [(s.name, s.status) for s in finished.stages] == [
        ("gen", "failed"), ("judge", "completed")]  # fmt: skip


def test_finishing_through_a_stage_another_writer_declared_since(store: Store) -> None:
    first = store.create_run("r", **QUIET)
    second = store.resume_run(first.run_id, **QUIET)
    second.append("gen", {"i": 1})
    second.flush()
    first.append("judge", {"i": 1})
    first.close()
    finished = second.finish(through_stage="judge")
    assert (finished.status, finished.completed_through_stage) == ("completed", "judge")
    assert [(s.name, s.status) for s in finished.stages] == [
        ("gen", "completed"), ("judge", "completed")]  # fmt: skip


def test_finishing_through_a_stage_follows_the_runs_stage_order(store: Store) -> None:
    """LIFE-5: "declared after" is the run's order (the manifest's), not the order this
    writer declared its stages in: a stage another writer declared first comes first."""
    first = store.create_run("r", **QUIET)
    second = store.resume_run(first.run_id, **QUIET)
    second.append("log", {"i": 1})
    second.append("judge", {"i": 1})
    second.append("gen", {"i": 1})
    first.append("judge", {"i": 2})
    first.flush()
    finished = second.finish(through_stage="log")
    assert [(s.name, s.status) for s in finished.stages] == [
        ("judge", "completed"), ("log", "completed"), ("gen", "running")]  # fmt: skip
    first.discard()


def test_finishing_completes_what_the_newest_revision_shows_running(store: Store) -> None:
    """LIFE-5 is decided against the revision the commit merges into: a stage another
    writer failed after this writer last read the run keeps failed."""
    first = store.create_run("r", **QUIET)
    first.append("gen", {"i": 1})
    first.flush()
    second = store.resume_run(first.run_id, **QUIET)
    second.append("gen", {"i": 2})
    first.stage("gen").fail()
    first.close()
    finished = second.finish()
    assert [(s.name, s.status) for s in finished.stages] == [("gen", "failed")]


def test_a_refused_record_takes_up_no_stage(store: Store) -> None:
    """REC-3, LIFE-5: a writer whose only record for a stage of the run was refused did
    not take that stage up, so finishing leaves it as another writer left it."""
    first = store.create_run("r", **QUIET)
    first.append("log", {"i": 1})
    first.flush()
    second = store.resume_run(first.run_id, **QUIET)
    with pytest.raises(InvalidInputError):
        second.extend("log", [{"x": float("nan")}])
    second.append("judge", {"i": 1})
    finished = second.finish(through_stage="judge")
    assert [(s.name, s.status) for s in finished.stages] == [
        ("log", "running"), ("judge", "completed")]  # fmt: skip
    first.discard()


@pytest.mark.parametrize("bad", [[1], {"x": float("nan")}])
def test_a_refused_first_record_declares_no_stage(store: Store, bad: object) -> None:
    """REC-3: a refused record changes nothing, not even the stage it was for."""
    writer = store.create_run("r", **QUIET)
    with pytest.raises(InvalidInputError):
        writer.append("fresh", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        writer.extend("other", [bad])  # type: ignore[list-item]
    writer.extend("kept", [{"i": 1}])
    with pytest.raises(InvalidInputError):
        writer.extend("half", [{"i": 1}, bad])  # type: ignore[list-item]
    assert [(s.name, s.records) for s in writer.finish().stages] == [("kept", 1), ("half", 1)]


def test_a_crash_finishing_a_run_finished_meanwhile_leaves_no_stale_sums(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-11: finishing again deletes the other finish's SHA256SUMS before committing,
    so a crash before the new one is written leaves state 9 (no SHA256SUMS, no problem)."""
    first = store.create_run("r", **QUIET)
    second = store.resume_run(first.run_id, **QUIET)
    first.fail("boom")

    def crash(*args: object) -> NoReturn:
        raise KeyboardInterrupt

    monkeypatch.setattr(runfmt.run, "write_sums", crash)
    with pytest.raises(KeyboardInterrupt):
        second.finish()
    second.discard()
    storage = store.locate(first.run_id)
    assert load_manifest(storage).status == "completed"
    assert not storage.exists(names.SUMS_FILE)
    assert verify_run(storage) == []


def test_until_stage_must_be_a_stage_name(store: Store) -> None:
    with pytest.raises(InvalidInputError, match="NAME-2"):
        store.create_run("eval", until_stage="Bad Stage", heartbeat_interval=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"completed_through_stage": "nope"}, "not a stage of the run"),
        ({"completed_through_stage": "generate", "status": "completed"}, "not completed"),
        ({"forked_from": "other-run"}, "go together"),
        ({"forked_at_stage": "generate"}, "go together"),
    ],
)
def test_manifest_lifecycle_rules_are_checked(store: Store, change, message) -> None:
    w = store.create_run("eval", heartbeat_interval=None)
    write_stage(w, "generate", 1)
    w.close()
    doc = to_json(load_manifest(store.locate(w.run_id)))
    doc.update(change)
    with pytest.raises(ManifestError, match=message):
        decode_manifest(json.dumps(doc).encode())


def test_manifest_without_new_members_re_encodes_byte_for_byte(store: Store) -> None:
    w = store.create_run("eval", heartbeat_interval=None)
    m = replace(w.manifest, heartbeat_at=None)
    data = encode_manifest(m)
    assert b"heartbeat_at" not in data
    assert b"forked_from" not in data
    assert encode_manifest(decode_manifest(data)) == data
    w.close()


# heartbeats and abandonment


def test_the_finishing_and_the_reopening_commit_set_heartbeat_at(store: Store) -> None:
    """LIFE-3: every commit of a writer sets heartbeat_at to its time, the one that
    finishes the run and the one that reopens it included."""
    w = store.create_run("eval", heartbeat_interval=None)
    write_stage(w, "generate", 1)
    done = w.finish()
    assert done.heartbeat_at == done.updated_at
    reopened = store.resume_run(done.run_id, heartbeat_interval=None)
    m = reopened.manifest
    assert (m.status, m.revision) == ("running", done.revision + 1)
    assert m.heartbeat_at == m.updated_at
    reopened.close()


def test_every_commit_and_the_heartbeat_thread_refresh_heartbeat_at(store: Store) -> None:
    w = store.create_run("eval", heartbeat_interval=0.05)
    first = w.manifest.heartbeat_at
    assert first == w.manifest.created_at
    deadline = time.monotonic() + 5
    while load_manifest(w.storage).heartbeat_at == first and time.monotonic() < deadline:
        time.sleep(0.02)
    beat = load_manifest(w.storage)
    assert beat.heartbeat_at is not None
    assert beat.heartbeat_at > first
    w.append("generate", {"v": 1})
    flushed = w.flush()
    assert flushed.heartbeat_at is not None
    assert flushed.heartbeat_at >= beat.heartbeat_at
    m = w.finish()
    revision = load_manifest(w.storage).revision
    time.sleep(0.2)
    assert load_manifest(w.storage).revision == revision, "heartbeats stop when the writer closes"
    assert m.status == "completed"


def test_repair_commit_is_not_a_heartbeat(store: Store) -> None:
    from runfmt.check import repair_run
    from runfmt.format.manifest import ChangeSet
    from runfmt.run import commit

    w = store.create_run("eval", heartbeat_interval=None)
    beat = w.manifest.heartbeat_at
    m = commit(w.storage, ChangeSet(tags={"x": "y"}), 5.0)
    assert (m.heartbeat_at, m.revision) == (beat, 2)
    repair_run(w.storage)
    assert load_manifest(w.storage).heartbeat_at == beat
    w.close()


def test_running_run_without_heartbeat_becomes_abandoned(store: Store) -> None:
    """LIFE-4: abandoned after 300 s without a heartbeat; a reading, never stored."""
    w = store.create_run("eval", heartbeat_interval=None)
    m = w.manifest
    seen = parse_timestamp(m.heartbeat_at or "")
    assert health(m, seen + timedelta(seconds=ABANDON_AFTER)) == "running"
    assert health(m, seen + timedelta(seconds=ABANDON_AFTER + 1)) == "abandoned"
    old = replace(m, heartbeat_at=None, updated_at="2020-01-01T00:00:00Z")
    assert health(old, now()) == "abandoned", "runs without heartbeat_at fall back to updated_at"
    done = replace(m, status="completed")
    assert health(done, seen + timedelta(days=365)) == "completed"
    w.close()


@pytest.mark.parametrize("interval", [0, -1, 101, float("nan")])
def test_heartbeat_interval_outside_the_threshold_is_refused(store: Store, interval) -> None:
    w = store.create_run("eval", heartbeat_interval=None)
    with pytest.raises(InvalidInputError, match="heartbeat_interval"):
        store.resume_run(w.run_id, heartbeat_interval=interval)
    w.close()


def test_timestamps_with_nanoseconds_parse() -> None:
    assert parse_timestamp("2026-11-01T12:00:00.123456789Z").microsecond == 123456
    assert parse_timestamp("2026-11-01T12:00:00Z").second == 0


# deterministic ids


def test_deterministic_run_id_is_stable_and_in_the_grammar() -> None:
    """POLICY-1, with the spec's example and each of its steps."""
    rid = deterministic_run_id("My Eval: GSM8K (v2)", CONFIG)
    assert (
        rid
        == "my-eval-gsm8k-v2-ea2e4d8313ed044f"
        == f"my-eval-gsm8k-v2-{compute_key(CONFIG)[3:19]}"
    )
    suffix = compute_key({})[3:19]
    assert deterministic_run_id("a" * 82 + " b b b", {}) == f"{'a' * 82}-{suffix}"
    assert deterministic_run_id("İstanbul", {}) == f"i-stanbul-{suffix}"
    assert deterministic_run_id("\u212aelvin", {}) == f"kelvin-{suffix}"
    assert rid == deterministic_run_id("My Eval: GSM8K (v2)", {"temperature": 0.0, "model": "m1"})
    assert rid != deterministic_run_id("My Eval: GSM8K (v2)", {**CONFIG, "model": "m2"})
    for name in ("x" * 500, "!!!", "ÜNÏ", "-a-", "a.b_c"):
        assert is_run_id(deterministic_run_id(name, {}))
        assert len(deterministic_run_id(name, {})) <= 100
    assert deterministic_run_id("???", {}).startswith("run-")


# existing-run policy


@pytest.mark.parametrize("policy", ["auto", "error"])
def test_a_deterministic_id_whose_folder_holds_another_run_is_refused(
    store: Store, policy: str
) -> None:
    """LAYOUT-1: the folder under the id holds a copy of another run; resuming would write
    to the run its manifest names, so the policy refuses it and changes nothing."""
    other = store.create_run("other", heartbeat_interval=None)
    write_stage(other, "generate", 1)
    other.finish()
    rid = deterministic_run_id("eval", CONFIG)
    shutil.copytree(Path(store.url) / other.run_id, Path(store.url) / rid)
    before = sorted(p.name for p in (Path(store.url) / other.run_id / "_manifests").iterdir())
    with pytest.raises(ManifestError, match="LAYOUT-1"):
        store.open_or_create("eval", CONFIG, policy=policy, heartbeat_interval=None)
    assert sorted(p.name for p in (Path(store.url) / other.run_id / "_manifests").iterdir()) == (
        before
    )


def test_auto_creates_then_reuses_a_completed_run(store: Store) -> None:
    """POLICY-2."""
    opened = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.action == "created"
    assert opened.run_id == deterministic_run_id("eval", CONFIG)
    assert opened.writer is not None
    write_stage(opened.writer, "generate", 3)
    opened.writer.finish()
    again = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert (again.action, again.writer) == ("reused", None)
    assert sum(1 for _ in again.reader.records("generate")) == 3


def test_auto_resumes_an_incomplete_run_without_losing_records(store: Store) -> None:
    opened = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.writer is not None
    write_stage(opened.writer, "generate", 3)
    opened.writer.close()
    again = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert again.action == "resumed"
    assert again.writer is not None
    assert again.reader.manifest.stage("generate").records == 3  # type: ignore[union-attr]
    again.writer.append("generate", {"key": "q3"})
    m = again.writer.finish()
    assert m.stage("generate").records == 4  # type: ignore[union-attr]


def test_auto_resumes_failed_runs(store: Store) -> None:
    opened = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.writer is not None
    opened.writer.fail("crash")
    again = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert again.action == "resumed"
    assert again.writer is not None
    assert (again.writer.manifest.status, again.writer.manifest.error) == ("running", None)
    again.writer.close()


def test_auto_with_until_stage_reuses_or_continues(store: Store) -> None:
    first = store.open_or_create("eval", CONFIG, until_stage="generate", heartbeat_interval=None)
    assert first.writer is not None
    write_stage(first.writer, "generate", 2)
    assert first.writer.finish().completed_through_stage == "generate"
    same = store.open_or_create("eval", CONFIG, until_stage="generate", heartbeat_interval=None)
    assert same.action == "reused"
    more = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert more.action == "resumed", "a run completed only through generate is continued"
    assert more.writer is not None
    write_stage(more.writer, "score", 2)
    more.writer.finish()
    full = store.open_or_create("eval", CONFIG, until_stage="generate", heartbeat_interval=None)
    assert full.action == "reused"


def test_error_policy_refuses_an_existing_run(store: Store) -> None:
    """POLICY-3."""
    opened = store.open_or_create("eval", CONFIG, policy="error", heartbeat_interval=None)
    assert opened.writer is not None
    opened.writer.finish()
    with pytest.raises(RunExistsError, match="exists"):
        store.open_or_create("eval", CONFIG, policy="error", heartbeat_interval=None)


def test_rerun_replaces_the_old_run(store: Store) -> None:
    """POLICY-4: the old data is deleted, no hidden folder is left."""
    opened = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.writer is not None
    write_stage(opened.writer, "generate", 5)
    old = opened.writer.finish()
    again = store.open_or_create("eval", CONFIG, policy="rerun", heartbeat_interval=None)
    assert (again.action, again.run_id) == ("rerun", old.run_id)
    assert again.writer is not None
    assert (again.writer.manifest.revision, again.writer.manifest.stages) == (1, ())
    again.writer.finish()
    assert store.run_ids() == [old.run_id]
    assert not any(p.name.startswith(".rerun-") for p in Path(store.url).iterdir())
    assert not (Path(store.url) / old.run_id / "stages").exists()


def test_rerun_refuses_while_a_writer_is_alive(store: Store) -> None:
    opened = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.writer is not None
    write_stage(opened.writer, "generate", 2)
    opened.writer.flush()
    with pytest.raises(ConflictError, match="live writer"):
        store.open_or_create("eval", CONFIG, policy="rerun", heartbeat_interval=None)
    assert opened.writer.finish().stage("generate").records == 2  # type: ignore[union-attr]


def test_rerun_on_memory_store(memory_store: Store) -> None:
    opened = memory_store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.writer is not None
    write_stage(opened.writer, "generate", 2)
    opened.writer.finish()
    again = memory_store.open_or_create("eval", CONFIG, policy="rerun", heartbeat_interval=None)
    assert again.writer is not None
    assert again.writer.finish().stages == ()


@pytest.mark.parametrize("policy", ["auto", "rerun"])
def test_a_removal_cut_short_on_an_object_store_leaves_nothing_in_the_next_run(
    memory_store: Store, policy: Policy
) -> None:
    """POLICY-4: a removal killed after its revisions went leaves data no revision lists;
    the next run created under the id deletes it, so that run verifies."""
    opened = memory_store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert opened.writer is not None
    write_stage(opened.writer, "generate", 2)
    opened.writer.add_artifact("a.txt", b"a")
    opened.writer.finish()
    storage = memory_store.locate(opened.run_id)
    unpublish(storage)
    storage.delete(names.SUMS_FILE)
    again = memory_store.open_or_create("eval", CONFIG, policy=policy, heartbeat_interval=None)
    assert (again.action, again.run_id) == ("created" if policy == "auto" else "rerun",
                                            opened.run_id)  # fmt: skip
    assert again.writer is not None
    write_stage(again.writer, "generate", 1)
    again.writer.finish()
    assert verify_run(storage) == []
    assert len(list(memory_store.open_run(opened.run_id).records("generate"))) == 1


def test_existing_run_with_another_config_is_a_conflict(store: Store) -> None:
    w = store.create_run("eval", {"model": "m1"}, run_id="fixed-id", heartbeat_interval=None)
    w.finish()
    with pytest.raises(ConflictError, match="another config"):
        store.open_or_create("eval", {"model": "m2"}, run_id="fixed-id")


def test_unknown_policy_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInputError, match="auto, error or rerun"):
        store.open_or_create("eval", CONFIG, policy="replace")  # type: ignore[arg-type]
    assert store.run_ids() == []


# config snapshots


def test_runs_sharing_a_config_are_found_by_hash(store: Store) -> None:
    for name, config in (("a", CONFIG), ("b", CONFIG), ("c", {"model": "m2"})):
        store.create_run(name, config, heartbeat_interval=None).finish()
    found = store.runs_with_config(CONFIG)
    assert sorted(r.manifest.name for r in found) == ["a", "b"]
    assert [r.run_id for r in store.runs_with_config(compute_key(CONFIG))] == [
        r.run_id for r in found
    ]
    assert found[0].manifest.config == CONFIG
    with pytest.raises(InvalidInputError, match="config hash"):
        store.runs_with_config("sha256:abc")


# runfmt status


def test_status_prints_one_line_per_run(store: Store) -> None:
    done = store.create_run("done-run", CONFIG, heartbeat_interval=None)
    write_stage(done, "generate", 4, failures=1)
    done.finish(through_stage="generate")
    live = store.create_run("live-run", CONFIG, heartbeat_interval=None)
    write_stage(live, "generate", 2)
    live.flush()
    result = CliRunner().invoke(app, ["--store", store.url, "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    line = next(x for x in lines if "done-run" in x)
    assert "completed through generate" in line
    assert "generate 4 (1 failed)" in line
    assert "running" in next(x for x in lines if "live-run" in x)
    result = CliRunner().invoke(app, ["--store", store.url, "status", "--json", "--limit", "1"])
    doc = json.loads(result.output)
    assert len(doc) == 1
    assert set(doc[0]) >= {"run_id", "health", "stages", "age_seconds", "idle_seconds"}
    none = CliRunner().invoke(app, ["--store", store.url, "status", "--limit", "0"])
    assert (none.exit_code, none.output) == (0, "")
    live.close()


def test_status_shows_abandoned_runs(store: Store) -> None:
    w = store.create_run("dead", heartbeat_interval=None)
    w.close()
    run = Path(w.storage.root)
    for path in [run / "manifest.json", *(run / "_manifests").iterdir()]:
        doc = json.loads(path.read_bytes())
        doc["heartbeat_at"] = doc["updated_at"] = "2026-01-01T00:00:00Z"
        path.write_text(json.dumps(doc, indent=2) + "\n")
    result = CliRunner().invoke(app, ["--store", store.url, "status", "--status", "abandoned"])
    assert result.exit_code == 0
    assert "abandoned" in result.output
    assert "dead" in result.output
    store.create_run("alive", heartbeat_interval=None).finish()
    both = CliRunner().invoke(
        app, ["--store", store.url, "status", "--status", "abandoned", "--status", "completed"]
    )
    assert ("dead" in both.output, "alive" in both.output) == (True, True)
    one = CliRunner().invoke(app, ["--store", store.url, "status", "--status", "completed"])
    assert ("dead" in one.output, "alive" in one.output) == (False, True)
    shown = CliRunner().invoke(app, ["--store", store.url, "show", w.run_id, "--json"])
    assert json.loads(shown.output)["health"] == "abandoned"


def test_status_shows_a_writer_holding_its_lock_as_running_whatever_its_clock(
    store: Store,
) -> None:
    """LIFE-4 is a reading of the stamps; on local disk a held lock (COMMIT-12) tells."""
    w = store.create_run("behind", heartbeat_interval=None)
    run = Path(w.storage.root)
    for path in [run / "manifest.json", *(run / "_manifests").iterdir()]:
        doc = json.loads(path.read_bytes())
        doc["heartbeat_at"] = doc["updated_at"] = "2026-01-01T00:00:00Z"
        path.write_text(json.dumps(doc, indent=2) + "\n")
    shown = CliRunner().invoke(app, ["--store", store.url, "status", "--json"])
    assert [r["health"] for r in json.loads(shown.output)] == ["running"]
    shown = CliRunner().invoke(app, ["--store", store.url, "show", w.run_id, "--json"])
    assert json.loads(shown.output)["health"] == "running"
    w.close()
    shown = CliRunner().invoke(app, ["--store", store.url, "status", "--json"])
    assert [r["health"] for r in json.loads(shown.output)] == ["abandoned"]


def test_status_filters_by_config_and_reports_bad_input(store: Store) -> None:
    store.create_run("a", CONFIG, heartbeat_interval=None).finish()
    store.create_run("b", {"other": 1}, heartbeat_interval=None).finish()
    result = CliRunner().invoke(
        app, ["--store", store.url, "status", "--config", compute_key(CONFIG)]
    )
    assert result.exit_code == 0
    assert len(result.output.splitlines()) == 1
    bad = CliRunner().invoke(app, ["--store", store.url, "status", "--status", "zombie"])
    assert bad.exit_code == 2
    bad = CliRunner().invoke(app, ["--store", store.url, "status", "--config", "garbage"])
    assert bad.exit_code == 2
    assert "--config" in bad.output


def test_status_exits_1_on_an_unreadable_run(store: Store) -> None:
    w = store.create_run("ok", heartbeat_interval=None)
    w.finish()
    broken = Path(store.url) / "20260101-000000000-deadbeef" / "_manifests"
    broken.mkdir(parents=True)
    (broken / "00000001.json").write_text("{not json")
    result = CliRunner().invoke(app, ["--store", store.url, "status"])
    assert result.exit_code == 1
    assert "unreadable" in result.output
    assert "ok" in result.output

    def status(*args: str) -> tuple[int, list[dict[str, Any]]]:
        out = CliRunner().invoke(app, ["--store", store.url, "status", "--json", *args])
        return out.exit_code, json.loads(out.stdout)

    code, doc = status("--status", "unreadable")
    assert code == 1
    assert [(r["run_id"], r["health"]) for r in doc] == [
        ("20260101-000000000-deadbeef", "unreadable")
    ]
    assert "00000001.json" in doc[0]["problem"]
    assert set(doc[0]) == set(status("--status", "completed")[1][0])
    code, doc = status("--status", "completed")
    assert (code, [r["run_id"] for r in doc]) == (0, [w.run_id])
    code, doc = status()
    assert (code, [r["health"] for r in doc], doc[0]["problem"]) == (
        1,
        ["completed", "unreadable"],
        None,
    )


def test_status_reads_only_the_runs_it_shows(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status --limit N` takes the newest runs from the index and reads N of them (a store
    of 50,000 runs took 32 s): every unreadable run is still shown."""
    ids = [store.create_run(f"r{i}", heartbeat_interval=None).finish().run_id for i in range(5)]
    broken = Path(store.url) / "20200101-000000000-deadbeef" / "_manifests"
    broken.mkdir(parents=True)
    (broken / "00000001.json").write_text("{not json")
    opened: list[str] = []
    open_run = Store.open_run

    def counting(self: Store, run: str) -> Any:
        opened.append(str(run))
        return open_run(self, run)

    monkeypatch.setattr(Store, "open_run", counting)
    out = CliRunner().invoke(app, ["--store", store.url, "status", "--json", "--limit", "2"])
    assert out.exit_code == 1
    doc = json.loads(out.stdout)
    assert [r["run_id"] for r in doc] == [ids[4], ids[3], "20200101-000000000-deadbeef"]
    assert sorted(opened) == sorted([ids[4], ids[3], "20200101-000000000-deadbeef"])


def test_status_of_an_empty_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "none"), "status"])
    assert result.exit_code == 0
    assert "no runs" in result.output


def test_auto_loser_of_a_creation_race_resumes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POLICY-2: two processes create the same id; COMMIT-3 picks one, the other resumes."""
    import runfmt.lifecycle

    winner = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert winner.writer is not None
    winner.writer.close()
    monkeypatch.setattr(runfmt.lifecycle, "_existing", lambda storage, run_id: None)
    loser = store.open_or_create("eval", CONFIG, heartbeat_interval=None)
    assert (loser.action, loser.run_id) == ("resumed", winner.run_id)
    assert loser.writer is not None
    loser.writer.close()
    with pytest.raises(RunExistsError):
        store.open_or_create("eval", CONFIG, policy="error", heartbeat_interval=None)


def test_heartbeat_thread_stops_when_the_run_is_gone(store: Store) -> None:
    """A heartbeat never recreates a deleted run folder (a lock file would)."""
    import shutil

    w = store.create_run("eval", heartbeat_interval=0.02)
    shutil.rmtree(w.storage.root)
    time.sleep(0.2)
    assert not Path(w.storage.root).exists()
    w._release()


def test_a_with_block_whose_finish_is_refused_fails_the_run(store: Store) -> None:
    """An ``until_stage`` the run never declared makes the normal exit's finish refuse:
    the block's records are kept, the run is failed with that reason, the writer released."""
    with (
        pytest.raises(InvalidInputError, match="cannot complete through stage 'generation'"),
        store.create_run("typo", until_stage="generation", **QUIET) as writer,
    ):
        writer.append("generate", {"i": 1})
    m = store.open_run(writer.run_id).manifest
    assert (m.status, m.stage("generate").records) == ("failed", 1)
    assert m.error is not None
    assert m.error.startswith("InvalidInputError: ")
    with pytest.raises(InvalidInputError, match="closed"):
        writer.append("generate", {"i": 2})


@pytest.mark.parametrize("salvage", [True, False])
def test_resume_salvages_records_with_their_counter_deltas_or_drops_both(
    store: Store, flush_without_commit: Callable[[RunWriter], None], salvage: bool
) -> None:
    """COMMIT-8: a flush whose frames were written but whose commit never happened leaves
    whole frames that salvage keeps with the counter frame among them (FRAME-6); with
    ``salvage=False`` both go, so a job computes both again."""
    writer = store.create_run("tokens", **QUIET)
    writer.append("gen", {"i": 0})
    writer.count("tokens", 10)
    writer.flush()
    writer.append("gen", {"i": 1})
    writer.count("tokens", 10)
    flush_without_commit(writer)
    writer.discard()
    again = store.resume_run(writer.run_id, salvage=salvage, **QUIET)
    m = again.finish()
    assert (m.stage("gen").records, m.counters["tokens"]) == ((2, 20) if salvage else (1, 10))
