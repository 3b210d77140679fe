"""The conformance suite run against this implementation (spec §13).

In process for every case (fast), and through the process contract
(``runfmt dump`` / ``runfmt repair`` under ``tests/conformance/run.py``) for a
sample of cases, as another implementation would be run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runfmt import errors
from runfmt.check import repair_run, verify_run
from runfmt.conformance import check_run, normalized_view
from runfmt.format.frames import FrameDecoder, FrameEncoder
from runfmt.format.manifest import FORMAT_VERSION
from runfmt.run import WRITER, RunReader, RunWriter, load_manifest, revisions
from runfmt.storage import Storage
from runfmt.store import Store
from tests.conformance import run as suite
from tests.test_spec import defined_ids

CASES = suite.cases()
CASE_IDS = [c.name for c in CASES]
SAMPLE = (
    "valid/plain-tools-run,valid/multi-frame,invalid/manifest-newer-major,"
    "invalid/symlink-stage-file,invalid/uncommitted-frames"
)


def python_reader(folder: Path) -> suite.Outcome:
    view, problems = check_run(Storage(str(folder), read_only=True))
    if view is None:
        return suite.Outcome(1, "", "\n".join(map(str, problems)))
    return suite.Outcome(0, json.dumps(view), "")


def python_repair(folder: Path) -> suite.Outcome:
    report = repair_run(Storage(str(folder)))
    return suite.Outcome(1 if report.left else 0, "", "\n".join(map(str, report.left)))


def test_suite_has_the_required_cases() -> None:
    names = set(CASE_IDS)
    assert {
        "valid/multi-frame",
        "valid/skippable-between-frames",
        "valid/empty-stage",
        "valid/failure-records",
        "valid/unknown-members",
        "valid/plain-tools-run",
        "invalid/frame-truncated-tail",
        "invalid/manifest-newer-major",
        "invalid/path-escapes-run",
        "invalid/symlink-stage-file",
        "invalid/flipped-byte",
        "invalid/record-not-object",
        "invalid/sha256-mismatch",
        "invalid/duplicate-stage",
    } <= names
    assert {c.meta["built_with"] for c in CASES} == {
        "plain-tools",
        "runfmt-format",
        "runfmt-writer",
    }


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_case_json_is_valid_and_complete(case: suite.Case) -> None:
    schema = json.loads((suite.SUITE / "case.schema.json").read_text())
    jsonschema.validate(case.meta, schema)
    assert case.name.split("/")[0] == case.meta["outcome"]
    has_expected = (case.folder / "expected.json").is_file()
    assert has_expected == (case.valid or case.meta["repairable"])
    defined = set(defined_ids())
    assert set(case.meta["rules"]) <= defined, "case cites rules spec.md does not define"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_python_reader_passes_case(case: suite.Case) -> None:
    results = list(suite.check_case(case, python_reader, python_repair))
    assert [r.error for r in results if r.error] == []


@pytest.mark.parametrize("case", [c for c in CASES if not c.valid], ids=lambda c: c.name)
def test_invalid_case_fails_for_its_own_reason(case: suite.Case, tmp_path: Path) -> None:
    """verify names a rule the case says it breaks, and says repair mends it when the case
    does (ERR-3); reading raises the case's error category."""
    run = suite._copy(case, tmp_path)
    problems = verify_run(Storage(str(run)))
    assert any(rule in str(p) for p in problems for rule in case.meta["rules"]), problems
    assert all(p.repairable for p in problems) == case.meta["repairable"], problems
    for p in problems:
        assert f"({p.rule})" not in p.problem, f"{p}: the rule is named once, by verify"
    raised = _read_everything(run)
    if "error" not in case.meta:
        assert raised is None, f"reading raised {raised!r}, the case expects no error"
        return
    assert isinstance(raised, getattr(errors, case.meta["error"])), raised
    assert raised.location, "the error says where (ERR-2)"


def _read_everything(run: Path) -> errors.RunfmtError | None:
    """Read every committed record and artifact; the error raised (ERR-1), if any."""
    try:
        reader = RunReader(Storage(str(run), read_only=True))
        for stage in reader.manifest.stages:
            list(reader.records(stage.name))
        for artifact in reader.manifest.artifacts:
            reader.read_artifact(artifact.path.removeprefix("artifacts/"))
    except errors.RunfmtError as exc:
        return exc
    return None


def test_valid_cases_keep_config_hash_equal_to_the_config_key() -> None:
    """KEY-4: config_hash is the k1 key of the config, in every valid case."""
    from runfmt import compute_key

    for case in CASES:
        if case.valid:
            view = case.expected()
            assert view["config_hash"] == compute_key(view["config"]), case.name


def test_normalized_view_reads_a_folder_by_path() -> None:
    folder = suite.SUITE / "valid" / "multi-frame" / "run"
    view = normalized_view(folder)
    assert list(view) == [
        "run_id", "name", "format_version", "status", "error", "created_at", "finished_at",
        "config", "config_hash", "tags", "counters", "stages", "artifacts",
    ]  # fmt: skip
    assert [r["frame"] for r in view["stages"][0]["records"]] == [0] * 3 + [1] * 3 + [2] * 3 + [
        3
    ] * 3


def test_cli_dump_prints_problems_and_exits_1_without_traceback(tmp_path: Path) -> None:
    """ERR-2: where and what on stderr, exit 1, no stack trace."""
    run = suite._copy(next(c for c in CASES if c.name == "invalid/flipped-byte"), tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "runfmt", "dump", str(run)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert "CHECK-1" in done.stderr
    assert "Traceback" not in done.stderr


def test_process_contract_through_the_runner(capsys: pytest.CaptureFixture[str]) -> None:
    """The runner drives `runfmt dump` and `runfmt repair` as it would another implementation."""
    cmd = f"{sys.executable} -m runfmt"
    code = suite.main(
        ["--reader", f"{cmd} dump", "--repair", f"{cmd} repair", "--cases", SAMPLE, "--jobs", "2"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "6 passed, 0 failed" in out


def test_runner_reports_a_reader_that_accepts_an_invalid_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cmd = f"{sys.executable} -c 'print(1)'"
    code = suite.main(["--reader", cmd, "--cases", "invalid/sha256-mismatch,valid/minimal"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL invalid/sha256-mismatch (read)" in out
    assert "expected exit 1 for an invalid run, got 0" in out
    assert "FAIL valid/minimal (read)" in out


def test_same_json_keeps_booleans_apart_from_numbers() -> None:
    assert suite.same_json({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not suite.same_json({"a": True}, {"a": 1})
    assert not suite.same_json({"a": 0}, {"a": False})
    assert not suite.same_json({"a": 1}, {"a": 1, "b": None})


def test_plain_tools_rebuild_the_plain_cases(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    """build_plain.sh (printf, zstd, sha256sum) writes runs that verify and read as expected."""
    for tool in ("zstd", "sha256sum"):
        require_tool(tool)
    copy = tmp_path / "conformance"
    copy.mkdir()
    shutil.copy(suite.SUITE / "build_plain.sh", copy)
    done = subprocess.run(
        ["sh", str(copy / "build_plain.sh")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    built = sorted(p.parent.relative_to(copy).as_posix() for p in copy.glob("*/*/case.json"))
    committed = sorted(c.name for c in CASES if c.meta["built_with"] == "plain-tools")
    assert built == committed
    for name in built:
        rebuilt, case = copy / name, suite.SUITE / name
        assert json.loads((rebuilt / "case.json").read_text()) == json.loads(
            (case / "case.json").read_text()
        )
        view, problems = check_run(Storage(str(rebuilt / "run")))
        if name.startswith("valid/"):
            assert problems == []
            assert view == json.loads((case / "expected.json").read_text())
        else:
            assert view is None
            assert problems


# The Python writer against the writer requirements of spec §9.


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_keys_refuse_values_outside_their_domain() -> None:
    """KEY-3: NaN, infinities, integers beyond ±(2^53-1), lone surrogates, non-string names."""
    from runfmt import compute_key

    assert compute_key(2**53 - 1) == compute_key(float(2**53 - 1))
    for bad in (float("nan"), float("inf"), 2**53, -(2**53), {1: 2}, "\ud800", {"a": object()}):
        with pytest.raises(errors.InvalidInputError, match="no canonical JSON form"):
            compute_key(bad)


def test_writer_refuses_bad_records_and_keeps_the_run(store: Store) -> None:
    """REC-3, REC-6: a bad record raises InvalidInputError; what was stored stays as it was."""
    w = store.create_run("bad-records", run_id="bad-records")
    w.stage("gen", key_field="key").append({"key": "k1:a"})
    w.flush()
    before = normalized_view(w.storage.root)
    bad: list[Any] = [["not", "an", "object"], {"x": float("nan")}, {"x": {1, 2}},
                      {"key": 5}, {"key": "x" * 1025}, {"key": ""}]  # fmt: skip
    for record in bad:
        with pytest.raises(errors.InvalidInputError):
            w.append("gen", record)
    w.close()
    assert normalized_view(w.storage.root) == before
    assert verify_run(w.storage) == []


def test_listed_bytes_never_change(store: Store) -> None:
    """COMMIT-1, STORE-2: each flush appends frames; every revision's listed prefix stays intact."""
    w = store.create_run("append", run_id="append", flush_every=None, flush_interval=None)
    prefixes = []
    for i in range(4):
        w.append("gen", {"i": i})
        entry = w.flush().stages[0].files[-1]
        path = Path(w.storage.path(entry.path))
        prefixes.append((entry, path.read_bytes()[: entry.bytes]))
    w.close()
    assert len({e.path for e, _ in prefixes}) == 1, "a local writer appends to its file"
    final = Path(w.storage.path(prefixes[0][0].path)).read_bytes()
    for entry, prefix in prefixes:
        assert final[: entry.bytes] == prefix
        assert hashlib.sha256(prefix).hexdigest() == entry.sha256


def _spy_fsync(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """The run-relative paths ``os.fsync`` is called on from now on, in order."""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append(target.relative_to(root).as_posix() if target != root else ".")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_an_artifact_and_its_new_folders_are_durable_before_the_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-1, ART-1: the new ``artifacts/`` and ``artifacts/plots/`` are synced in their
    parents, the file (written under a temporary name, then linked to its own, ART-1) and
    then its folder, all before the revision that lists it."""
    w = store.create_run("durable", run_id="durable", flush_every=None, flush_interval=None)
    synced = _spy_fsync(monkeypatch, Path(w.storage.root))
    w.add_artifact("plots/loss.png", b"\x89PNG")
    w.flush()
    temp, rev = (
        next(n for n in synced if n.startswith(p)) for p in ("artifacts/plots/.tmp-", "_manifests/")
    )
    assert synced == [".", "artifacts", temp, "artifacts/plots", rev, "_manifests"]


def test_what_a_commit_makes_durable_and_in_which_order(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-1, COMMIT-2, COMMIT-7, COMMIT-11: new folders, the data, then the revision and
    its folder; ``manifest.json`` only when the revision finishes the run, before
    ``SHA256SUMS``."""
    w = store.create_run("durable", run_id="durable", flush_every=None, flush_interval=None)
    root = Path(w.storage.root)
    synced = _spy_fsync(monkeypatch, root)
    w.append("gen", {"i": 1})
    w.flush()
    stage_file = w.manifest.stages[0].files[0].path
    rev2 = [n for n in synced if n.startswith("_manifests/.tmp-")]
    assert synced == [".", "stages", stage_file, "stages/gen", *rev2, "_manifests"], (
        "the new stages/ and stages/gen/ in their parents, the data, the revision"
    )
    synced.clear()
    w.append("gen", {"i": 2})
    w.flush()
    assert synced == [
        stage_file,
        next(n for n in synced if n.startswith("_manifests/")),
        "_manifests",
    ]
    synced.clear()
    w.finish()
    copy = [n for n in synced if n.startswith(".tmp-")]
    assert synced[-4:] == [copy[0], ".", copy[1], "."], "manifest.json, then SHA256SUMS"
    assert (
        Path(root / "manifest.json").read_bytes()
        == Path(root / "_manifests" / "00000004.json").read_bytes()
    )


def test_a_lost_race_rereads_merges_and_takes_the_next_revision(store: Store) -> None:
    """COMMIT-2, COMMIT-3, COMMIT-4, COMMIT-5: revisions are created, never overwritten."""
    w1 = store.create_run("race", run_id="race", flush_every=None, flush_interval=None)
    with pytest.raises(errors.RunExistsError):
        store.create_run("race", run_id="race")
    assert not w1.storage.create_exclusive("_manifests/00000001.json", b"{}")
    w2 = RunWriter(w1.storage, load_manifest(w1.storage), flush_interval=None)
    w2.tag(owner="w2")
    w2.append("gen", {"by": "w2"})
    assert w2.flush().revision == 2
    w1.append("gen", {"by": "w1"})
    merged = w1.flush()
    assert merged.revision == 3, "w1 based on revision 1 lost the race for 2 and took 3"
    assert merged.tags["owner"] == "w2"
    assert len(merged.stages[0].files) == 2
    w1.close()
    w2.close()
    assert verify_run(w1.storage) == []


def test_concurrent_writers_merge_files_and_counters(store: Store) -> None:
    """COMMIT-6: one file per writer; counters are added as deltas, never lost or doubled."""
    w1 = store.create_run("merge", run_id="merge", flush_every=None, flush_interval=None)
    w2 = RunWriter(w1.storage, load_manifest(w1.storage), flush_interval=None)
    for n in range(3):
        for w, cost in ((w1, 1.5), (w2, 2)):
            w.append("gen", {"writer": w.writer_id, "n": n})
            w.count("cost", cost)
            w.flush()
    w1.close()
    w2.close()
    view = normalized_view(w1.storage.root)
    assert view["counters"] == {"cost": 10.5}
    assert view["stages"][0]["files"] == 2
    assert view["stages"][0]["record_count"] == 6


def test_revisions_are_pruned_to_the_newest_32(store: Store) -> None:
    """COMMIT-9: at least the 32 newest revisions are kept; the newest is current."""
    w = store.create_run("prune", run_id="prune", flush_every=1, flush_interval=None)
    for i in range(40):
        w.append("gen", {"i": i})
    w.close()
    kept = revisions(w.storage)
    assert kept == list(range(kept[0], 42))
    assert 32 <= len(kept) < 32 + 8
    assert load_manifest(w.storage).revision == 41


def test_repair_leaves_a_live_writers_tail_alone(store: Store) -> None:
    """COMMIT-12, COMMIT-8: repair skips a live writer's new frames and salvages a dead one's."""
    w = store.create_run("live", run_id="live", flush_every=None, flush_interval=None)
    w.append("gen", {"i": 0})
    entry = w.flush().stages[0].files[0]
    path = Path(w.storage.path(entry.path))
    with path.open("ab") as f:
        f.write(FrameEncoder().encode(b'{"i": 1}\n'))
    size = path.stat().st_size
    report = repair_run(w.storage)
    assert any("still running" in a for a in report.actions)
    assert path.stat().st_size == size
    assert load_manifest(w.storage).stages[0].records == 1
    w.close()
    report = repair_run(w.storage)
    assert report.salvaged_records == 1
    assert verify_run(w.storage) == []
    assert [r["i"] for r in normalized_view(w.storage.root)["stages"][0]["records"]] == [0, 1]


def test_every_revision_runfmt_commits_names_runfmt_as_its_writer(tmp_path: Path) -> None:
    """§4 ``writer`` names the software that wrote the revision: a repair's commit, or a
    resumed writer's, to runs another implementation wrote names runfmt."""
    other = {"name": "conformance-build", "version": "1"}
    case = {c.name: c for c in CASES}
    crashed = suite._copy(case["invalid/uncommitted-frames"], tmp_path)
    assert load_manifest(Storage(str(crashed))).writer == other
    assert repair_run(Storage(str(crashed))).salvaged_records > 0
    assert load_manifest(Storage(str(crashed))).writer == WRITER

    finished = suite._copy(case["valid/completed-run"], tmp_path)
    assert load_manifest(Storage(str(finished))).writer == other
    Store(tmp_path / "store").resume_run(finished).close()
    assert load_manifest(Storage(str(finished))).writer == WRITER


def test_commit_lock_held_elsewhere_times_out(store: Store) -> None:
    """COMMIT-12: local writers queue on the commit lock `.lock`; a long wait is an error."""
    w = store.create_run("locked", run_id="locked", flush_every=None, flush_interval=None)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); time.sleep(30)",
         w.storage.path(".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        w.lock_timeout = 0.2
        w.append("gen", {"i": 0})
        with pytest.raises(errors.LockTimeoutError, match="commit lock"):
            w.flush()
    finally:
        holder.kill()
        holder.wait()
    w.flush()
    w.close()
    assert load_manifest(w.storage).stages[0].records == 1


def test_finish_writes_sums_and_resume_removes_them(
    store: Store, require_tool: Callable[[str], str]
) -> None:
    """COMMIT-11, CHECK-3: `sha256sum -c` checks a finished run; a resumed run has no SHA256SUMS."""
    w = store.create_run("sums", run_id="sums")
    w.append("gen", {"i": 0})
    w.add_artifact("a.txt", b"hello\n")
    w.finish()
    folder = Path(w.storage.root)
    done = subprocess.run(
        [require_tool("sha256sum"), "-c", "--strict", "SHA256SUMS"],
        cwd=folder, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    listed = ["artifacts/a.txt", "manifest.json", w.manifest.stages[0].files[0].path]
    assert sorted(done.stdout.splitlines()) == sorted(f"{p}: OK" for p in listed)
    resumed = store.resume_run("sums")
    assert not (folder / "SHA256SUMS").exists()
    assert load_manifest(resumed.storage).status == "running"
    resumed.finish()
    assert (folder / "SHA256SUMS").exists()
    assert verify_run(resumed.storage) == []


def test_a_new_revision_keeps_unknown_top_level_members(tmp_path: Path) -> None:
    """VER-4: a writer carries over members it does not know."""
    run = suite._copy(next(c for c in CASES if c.name == "valid/unknown-members"), tmp_path)
    w = Store(tmp_path / "store").resume_run(run, flush_interval=None)
    w.append("generate", {"key": "k1:new"})
    w.close()
    doc = json.loads((run / "manifest.json").read_text())
    assert doc["x_future"] == {"nested": True}
    assert doc["revision"] > 3
    assert verify_run(Storage(str(run))) == []


def test_verify_reports_every_problem_with_its_rule(tmp_path: Path) -> None:
    """ERR-3: all problems, each with where, what and the rule, and whether repair fixes it."""
    run = suite._copy(next(c for c in CASES if c.name == "valid/completed-run"), tmp_path)
    _flip(run / "stages/generate/part-000001-a1b2c3d4.jsonl.zst", -10)
    (run / "artifacts/report.txt").unlink()
    (run / "stages/score/part-000009-ffff.jsonl.zst").write_bytes(b"junk")
    (run / "manifest.json").write_text("{}\n")
    problems = verify_run(Storage(str(run)))
    found = {(p.location, p.rule, p.repairable) for p in problems}
    assert {
        ("stages/generate/part-000001-a1b2c3d4.jsonl.zst", "CHECK-1", False),
        ("artifacts/report.txt", "LAYOUT-3", False),
        ("stages/score/part-000009-ffff.jsonl.zst", "LAYOUT-4", True),
        ("manifest.json", "COMMIT-7", True),
    } <= found
    assert all(p.problem for p in problems)


def test_memory_backend_holds_a_valid_run(memory_store: Store) -> None:
    """STORE-1: a backend with STORE-1's operations (fsspec memory://) holds conforming runs."""
    w = memory_store.create_run("mem", {"a": 1}, run_id="mem", flush_every=2)
    for i in range(5):
        w.append("gen", {"i": i})
    w.finish()
    storage = memory_store.locate("mem")
    view, problems = check_run(storage)
    assert problems == []
    assert view is not None
    assert [r["i"] for r in view["stages"][0]["records"]] == list(range(5))


def test_object_store_writes_each_flush_as_a_new_object(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """STORE-3: on S3 no file is appended to; the run verifies there and after a download."""
    bucket = Store(s3_url, s3_options)
    w = bucket.create_run("s3", run_id="s3-run", flush_every=2, flush_interval=None)
    for i in range(5):
        w.append("gen", {"i": i})
    w.finish()
    storage = bucket.locate("s3-run")
    files = load_manifest(storage).stages[0].files
    assert len(files) == 3, "one object per flush"
    view, problems = check_run(storage)
    assert problems == []
    local = tmp_path / "s3-run"
    storage.fs.get(storage.root + "/", str(local), recursive=True)
    assert check_run(Storage(str(local))) == (view, [])


def test_a_commit_keeps_the_later_minor_version_of_its_base(tmp_path: Path) -> None:
    """COMMIT-5, VER-1: a 1.0 writer committing onto a 1.9 run keeps 1.9; its own stage
    file's header names the version it followed."""
    run = suite._copy(next(c for c in CASES if c.name == "valid/newer-minor-version"), tmp_path)
    w = Store(tmp_path / "store").resume_run(run, flush_interval=None)
    w.append("generate", {"key": "k1:new"})
    w.close()
    doc = json.loads((run / "manifest.json").read_text())
    assert doc["format_version"] == "1.9"
    new_file = doc["stages"][0]["files"][-1]["path"]
    assert w.writer_id in new_file
    decoder = FrameDecoder()
    list(decoder.decode((run / new_file).read_bytes()))
    assert decoder.header is not None
    assert decoder.header["format_version"] == FORMAT_VERSION
    assert verify_run(Storage(str(run))) == []
