"""Bad input gives a clear error that names the file or rule, and nothing stored is lost:
bad records and names, hostile manifests and folders, newer formats, flipped or cut bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

import runfmt
from runfmt.check import repair_run, verify_run
from runfmt.cli import main
from runfmt.errors import (
    FormatError,
    InvalidInputError,
    ManifestError,
    RunfmtError,
    RunNotFoundError,
    StorageError,
    UnsupportedFormatError,
)
from runfmt.format.frames import PREFIX, FrameEncoder, encode_header
from runfmt.format.manifest import parse_timestamp
from runfmt.format.validate import header_problem
from runfmt.run import MAX_RECORD_BYTES
from runfmt.storage import Storage
from runfmt.store import Store
from runfmt.transfer import export_run, import_run
from tests.conformance import builder
from tests.conformance.builder import skippable

QUIET: dict[str, Any] = {"flush_every": None, "flush_interval": None, "heartbeat_interval": None}
RECORDS = [{"id": f"q{i}", "v": i} for i in range(3)]


@pytest.fixture
def run_dir(store: Store) -> Path:
    """A small completed run: one stage file of a few hundred bytes, one artifact."""
    with store.create_run("small", {"m": 1}, **QUIET) as w:
        w.extend("score", RECORDS)
        w.add_artifact("notes.txt", b"some notes")
    return Path(store.url) / w.run_id


def stage_file(run_dir: Path) -> Path:
    [f] = (run_dir / "stages" / "score").glob("*.jsonl.zst")
    return f


def newest_revision(run_dir: Path) -> Path:
    return sorted((run_dir / "_manifests").glob("*.json"))[-1]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")}  # fmt: skip


def rewrite_manifest(run_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the newest revision and manifest.json alike, as a hostile or newer writer would."""
    rev = newest_revision(run_dir)
    doc = json.loads(rev.read_bytes())
    edit(doc)
    data = json.dumps(doc, indent=2).encode() + b"\n"
    rev.write_bytes(data)
    (run_dir / "manifest.json").write_bytes(data)


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """Run the real entry point in-process: (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["runfmt", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    code = info.value.code
    return code if isinstance(code, int) else 1, out + err


# bad records and names


@pytest.mark.parametrize(
    "record",
    [["not", "an", "object"], "text", {"x": float("nan")}, {"x": float("-inf")}, {1: "int key"},
     {"when": __import__("datetime").datetime(2026, 1, 1)}, {"x": {1, 2}}, {"x": b"raw"}],
    ids=["list", "str", "nan", "-inf", "int-key", "datetime", "set", "bytes"],
)  # fmt: skip
def test_a_bad_record_is_refused_and_the_run_stays_as_it_was(store: Store, record: Any) -> None:
    w = store.create_run("eval", **QUIET)
    w.extend("score", RECORDS)
    w.flush()
    before = snapshot(Path(store.url) / w.run_id)
    with pytest.raises(InvalidInputError, match="JSON"):
        w.append("score", record)
    assert snapshot(Path(store.url) / w.run_id) == before
    w.append("score", {"id": "after"})
    w.finish()
    assert [r["id"] for r in store.open_run(w.run_id).records("score")] == [
        "q0",
        "q1",
        "q2",
        "after",
    ]


@pytest.mark.parametrize("bulk", [False, True], ids=["append", "extend"])
def test_a_record_too_large_for_a_frame_is_refused_and_the_writer_goes_on(
    store: Store, bulk: bool
) -> None:
    w = store.create_run("eval", **QUIET)
    overhead = len(b'{"id":"big","t":""}\n')
    filler = [{"id": f"f{i}", "t": "y" * 1015} for i in range(1000)]
    w.extend("score", filler)

    def add(record: dict[str, str]) -> None:
        if bulk:
            w.extend("score", [record])
        else:
            w.append("score", record)

    biggest = {"id": "big", "t": "x" * (MAX_RECORD_BYTES - overhead)}
    w.append("score", biggest)
    too_big = {"id": "big", "t": "x" * (MAX_RECORD_BYTES - overhead + 1)}
    with pytest.raises(InvalidInputError, match=f"over the {MAX_RECORD_BYTES}-byte limit"):
        add(too_big)
    w.append("score", {"id": "after"})
    w.finish()
    reader = store.open_run(w.run_id)
    assert [r["id"] for r in reader.records("score")][-3:] == ["f999", "big", "after"]
    assert verify_run(reader.storage) == []


@pytest.mark.parametrize(
    "run_id", ["Upper", "a/b", "../escape", "a:b", ".hidden", "-x", "x" * 101, "con", "aux.2"]
)
def test_a_bad_run_id_is_refused_before_anything_is_written(store: Store, run_id: str) -> None:
    with pytest.raises(InvalidInputError, match="NAME-1"):
        store.create_run("eval", run_id=run_id, **QUIET)
    assert not Path(store.url).exists() or list(Path(store.url).iterdir()) == []


@pytest.mark.parametrize(
    "name", ["", "x" * 201, "tab\there", "line\nbreak", "bell\x07", "c1\x85", " ", "\u3000 "]
)
def test_a_bad_run_name_is_refused(store: Store, name: str) -> None:
    with pytest.raises(InvalidInputError, match="run name"):
        store.create_run(name, **QUIET)


def test_a_name_with_a_control_character_is_read_and_kept_by_an_import(
    run_dir: Path, store: Store, tmp_path: Path
) -> None:
    """MAN-10: writers give no new run such a name; readers and imports take it."""
    rewrite_manifest(run_dir, lambda doc: doc.update(name="a\tb"))
    (run_dir / "SHA256SUMS").unlink()
    assert verify_run(Storage(str(run_dir))) == []
    export_run(runfmt.open_run(run_dir), tmp_path / "run.tar")
    other = Store(tmp_path / "other")
    imported = import_run(other, tmp_path / "run.tar")
    assert other.open_run(imported.run_id).manifest.name == "a\tb"


def test_config_without_a_canonical_form_is_refused(store: Store) -> None:
    with pytest.raises(InvalidInputError, match="canonical JSON"):
        store.create_run("eval", {"lr": float("nan")}, **QUIET)


@pytest.mark.parametrize("label", ["", "a b", "x" * 129, "é", "new\nline"])
def test_a_bad_tag_or_counter_is_refused_and_the_run_stays_readable(
    store: Store, label: str
) -> None:
    """Tag and counter names follow the manifest's grammar and tag values its length, at the
    call: a bad one never reaches a revision, where it would make the run unreadable."""
    w = store.create_run("eval", **QUIET)
    with pytest.raises(InvalidInputError, match="tag name"):
        w.tag(**{label: "v"})
    with pytest.raises(InvalidInputError, match="counter name"):
        w.count(label, 1)
    with pytest.raises(InvalidInputError, match="counter name"):
        w.count(3, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="at most 1024"):
        w.tag(long="x" * 1025)
    with pytest.raises(InvalidInputError, match="tag name"):
        store.create_run("eval", tags={label: "v"}, **QUIET)
    w.tag(good="x" * 1024)
    w.count("cost_usd", 0.5)
    w.append("score", {"id": 1})
    w.finish()
    reader = store.open_run(w.run_id)
    assert (reader.manifest.tags, reader.manifest.counters) == ({"good": "x" * 1024},
                                                                {"cost_usd": 0.5})  # fmt: skip
    assert verify_run(reader.storage) == []


def test_a_counter_that_would_overflow_is_refused(store: Store) -> None:
    w = store.create_run("eval", **QUIET)
    w.count("big", 1e308)
    w.flush()
    with pytest.raises(InvalidInputError, match="overflow"):
        w.count("big", 1e308)
    w.finish()
    reader = store.open_run(w.run_id)
    assert reader.manifest.counters == {"big": 1e308}
    assert verify_run(reader.storage) == []


def test_an_error_message_goes_only_with_a_failure_and_fits_the_manifest(store: Store) -> None:
    w = store.create_run("eval", **QUIET)
    with pytest.raises(InvalidInputError, match="MAN-9"):
        w.finish("completed", "not an error")
    with pytest.raises(InvalidInputError, match="at most 65536"):
        w.fail("x" * 65537)
    with pytest.raises(InvalidInputError, match="not 'done'"):
        w.finish("done")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError), store.create_run("eval", **QUIET) as raising:
        raise RuntimeError("y" * 100_000)
    failed = store.open_run(raising.run_id).manifest
    assert (failed.status, len(failed.error or "")) == ("failed", 65536)
    w.fail("x" * 65536)
    for run_id, _ in store.runs():
        assert verify_run(store.locate(run_id)) == []


@pytest.mark.parametrize(
    "stage", ["Score", "1st", "a/b", "../x", "", "s" * 65, "a b", "nul", "lpt1"]
)
def test_a_bad_stage_name_is_refused_and_the_writer_goes_on(store: Store, stage: str) -> None:
    w = store.create_run("eval", **QUIET)
    with pytest.raises(InvalidInputError, match="NAME-2") as info:
        w.append(stage, {"id": 1})
    assert repr(stage)[:20] in str(info.value)
    w.append("score", {"id": 1})
    w.finish()
    reader = store.open_run(w.run_id)
    assert [s.name for s in reader.manifest.stages] == ["score"]
    assert verify_run(reader.storage) == []


# hostile manifests and folders


FILE_PATH = r"\$\.stages\[0\]\.files\[0\]\.path"


def _file(doc: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = doc["stages"][0]["files"][0]
    return entry


@pytest.mark.parametrize(
    ("edit", "rule"),
    [
        (lambda d: _file(d).update(path="stages/score/../../../../etc/passwd"), FILE_PATH),
        (lambda d: _file(d).update(path="/etc/passwd"), FILE_PATH),
        (lambda d: d["artifacts"][0].update(path="artifacts/../../../etc/passwd"), "MAN-6"),
        (lambda d: d["artifacts"][0].update(path="artifacts//etc/passwd"), "MAN-6"),
        (lambda d: d["artifacts"][0].update(path="artifacts/c:/x"), r"\$\.artifacts\[0\]\.path"),
        (lambda d: d["stages"][0].update(name="other"), "MAN-5"),
    ],
    ids=["stage-dotdot", "stage-absolute", "artifact-dotdot", "artifact-absolute",
         "artifact-drive", "file-outside-its-stage"],
)  # fmt: skip
def test_manifest_entries_escaping_the_run_are_refused(
    run_dir: Path, edit: Callable[[dict[str, Any]], None], rule: str
) -> None:
    rewrite_manifest(run_dir, edit)
    rev = newest_revision(run_dir)
    with pytest.raises(ManifestError, match=rule) as info:
        runfmt.open_run(run_dir)
    assert info.value.location == str(rev)
    problems = verify_run(Storage(str(run_dir)))
    assert problems[0].location == str(rev), "first the revision, then the run as repair leaves it"
    repair_run(Storage(str(run_dir)))
    assert verify_run(Storage(str(run_dir))) == [], "every problem verify reported was repairable"


def test_a_symlinked_stage_file_is_never_followed(run_dir: Path, tmp_path: Path) -> None:
    f = stage_file(run_dir)
    outside = tmp_path / "outside.jsonl.zst"
    outside.write_bytes(f.read_bytes())
    f.unlink()
    f.symlink_to(outside)
    rel = f.relative_to(run_dir).as_posix()
    with pytest.raises(FormatError, match="LAYOUT-5") as info:
        list(runfmt.open_run(run_dir).records("score"))
    assert info.value.location == str(f)
    problems = verify_run(Storage(str(run_dir)))
    assert {(p.location, p.rule) for p in problems} == {(rel, "LAYOUT-5")}


def test_a_symlinked_stage_folder_is_never_followed(run_dir: Path, tmp_path: Path) -> None:
    folder = run_dir / "stages" / "score"
    folder.rename(tmp_path / "moved")
    folder.symlink_to(tmp_path / "moved")
    with pytest.raises(FormatError, match="LAYOUT-5"):
        list(runfmt.open_run(run_dir).records("score"))
    problems = verify_run(Storage(str(run_dir)))
    assert ("stages/score", "LAYOUT-5") in {(p.location, p.rule) for p in problems}


def test_a_symlinked_artifact_is_never_followed(run_dir: Path, tmp_path: Path) -> None:
    art = run_dir / "artifacts" / "notes.txt"
    (tmp_path / "secret").write_bytes(art.read_bytes())
    art.unlink()
    art.symlink_to(tmp_path / "secret")
    with pytest.raises(FormatError, match="LAYOUT-5"):
        runfmt.open_run(run_dir).read_artifact("notes.txt")
    assert "LAYOUT-5" in {p.rule for p in verify_run(Storage(str(run_dir)))}


@pytest.mark.parametrize("what", ["_manifests", "newest revision"])
def test_a_symlinked_revision_is_never_followed(
    run_dir: Path, tmp_path: Path, what: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """LAYOUT-5: a revision reached through a link out of the run folder is refused, by
    the reader and by the index, which lists the run as unreadable."""
    link = run_dir / "_manifests" if what == "_manifests" else newest_revision(run_dir)
    moved = tmp_path / "moved"
    link.rename(moved)
    link.symlink_to(moved)
    with pytest.raises(ManifestError, match="LAYOUT-5"):
        runfmt.open_run(run_dir)
    code, out = cli(monkeypatch, capsys, "--store", str(run_dir.parent), "ls", "--json")
    assert code == 0
    assert [r["status"] for r in json.loads(out)] == ["unreadable"]


@pytest.mark.parametrize("name", ["manifest.json", "SHA256SUMS"])
def test_a_linked_copy_or_sums_file_is_repairable_and_replaced(
    run_dir: Path, tmp_path: Path, name: str
) -> None:
    """LAYOUT-5: a link in place of manifest.json or SHA256SUMS counts as missing
    (LAYOUT-2); verify says repair mends it, and repair writes the regular file."""
    before = snapshot(run_dir)
    moved = tmp_path / name
    (run_dir / name).rename(moved)
    (run_dir / name).symlink_to(moved)
    problems = verify_run(Storage(str(run_dir)))
    assert ("LAYOUT-5", True) in {(p.rule, p.repairable) for p in problems}
    assert all(p.repairable for p in problems), problems
    repair_run(Storage(str(run_dir)))
    assert not (run_dir / name).is_symlink()
    assert snapshot(run_dir) == before
    assert verify_run(Storage(str(run_dir))) == []


def test_a_linked_sums_file_in_a_running_run_is_not_called_missing(
    store: Store, tmp_path: Path
) -> None:
    """CHECK-3: a running run has no SHA256SUMS; a link by that name is one to remove."""
    w = store.create_run("running", **QUIET)
    w.append("score", RECORDS[0])
    w.close()
    (tmp_path / "sums").write_text("x")
    (Path(w.storage.path()) / "SHA256SUMS").symlink_to(tmp_path / "sums")
    problems = verify_run(w.storage)
    assert {(p.rule, p.problem) for p in problems} == {
        ("LAYOUT-5", "symbolic link in a run folder"),
        ("CHECK-3", "present in a running run"),
    }
    repair_run(w.storage)
    assert verify_run(w.storage) == []


@pytest.mark.parametrize("target", ["dangling", "folder"])
@pytest.mark.parametrize("name", ["manifest.json", "SHA256SUMS"])
def test_a_link_in_place_of_the_copy_or_sums_is_replaced_wherever_it_points(
    store: Store, tmp_path: Path, name: str, target: str
) -> None:
    """LAYOUT-5: repair replaces such a link whether it dangles or points to a folder (it
    took one to a folder for a folder, and never removed a dangling SHA256SUMS)."""
    w = store.create_run("linked", **QUIET)
    w.append("score", RECORDS[0])
    if name == "SHA256SUMS":
        w.close()
    else:
        w.finish()
    pointed = tmp_path / "elsewhere"
    if target == "folder":
        pointed.mkdir()
    run = Path(w.storage.path())
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(pointed)
    assert all(p.repairable for p in verify_run(w.storage))
    repair_run(w.storage)
    assert verify_run(w.storage) == []
    assert not (run / name).is_symlink()


def test_a_failed_atomic_write_leaves_no_temporary_file(run_dir: Path) -> None:
    """A commit while a folder stands where manifest.json belongs left a .tmp-* file at
    the run's root on every commit."""
    (run_dir / "manifest.json").unlink()
    (run_dir / "manifest.json").mkdir()
    (run_dir / "manifest.json" / "x").write_text("x")
    with pytest.raises(StorageError, match="Is a directory"):
        Storage(str(run_dir)).write_atomic("manifest.json", b"{}")
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]


def test_a_revision_set_aside_twice_keeps_both(run_dir: Path) -> None:
    """§9.3: a revision number set aside once and used again by the next commit is set
    aside under another name the second time: the first bytes are kept."""
    newest = newest_revision(run_dir)
    for text in (b"{first", b"{second"):
        (run_dir / "manifest.json").unlink()  # else repair rewrites the revision from it
        newest.write_bytes(text)
        repair_run(Storage(str(run_dir)))
        assert newest.exists(), "repair committed the same number again"
    kept = {p.read_bytes() for p in (run_dir / "_manifests").glob(".corrupt-*")}
    assert kept == {b"{first", b"{second"}


def test_a_newer_major_format_is_refused_and_left_untouched(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite_manifest(run_dir, lambda d: d.update(format_version="2.0", x_new={"a": 1}))
    before = snapshot(run_dir)
    with pytest.raises(UnsupportedFormatError, match=r"2\.0 is newer.*VER-2") as info:
        runfmt.open_run(run_dir)
    assert "upgrade runfmt" in str(info.value)
    assert info.value.location == str(newest_revision(run_dir))
    with pytest.raises(UnsupportedFormatError):
        repair_run(Storage(str(run_dir)))
    with pytest.raises(UnsupportedFormatError):
        Store(run_dir.parent).resume_run(run_dir.name)
    code, out = cli(monkeypatch, capsys, "verify", str(run_dir))
    assert code == 1
    assert "VER-2" in out
    code, out = cli(monkeypatch, capsys, "repair", str(run_dir))
    assert code == 1
    assert "VER-2" in out
    assert snapshot(run_dir) == before


def test_an_unknown_required_feature_is_refused(run_dir: Path) -> None:
    rewrite_manifest(run_dir, lambda d: d.update(required_features=["encrypted-stages"]))
    with pytest.raises(UnsupportedFormatError, match=r"encrypted-stages.*VER-3"):
        runfmt.open_run(run_dir)


def relist(run_dir: Path, data: bytes, records: int) -> str:
    """Replace the stage file with ``data`` and list it honestly, so only format rules catch it."""
    f = stage_file(run_dir)
    f.write_bytes(data)

    def edit(doc: dict[str, Any]) -> None:
        _file(doc).update(bytes=len(data), records=records, sha256=hashlib.sha256(data).hexdigest())

    rewrite_manifest(run_dir, edit)
    (run_dir / "SHA256SUMS").unlink()
    return f.relative_to(run_dir).as_posix()


def header(run_dir: Path) -> bytes:
    writer = stage_file(run_dir).name.split("-")[2].split(".")[0]
    return PREFIX + encode_header({
        "format": "runfmt-stage", "format_version": "1.0", "run_id": run_dir.name,
        "stage": "score", "seq": 1, "writer": writer, "record_schema_version": "1",
        "key_field": None,
    })  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message", "rule", "line"),
    [
        (b'{"id":"\xff\xfe"}\n', "not valid UTF-8 JSON", "REC-1", 1),
        (b'{"id":1}\n{"id":\n', "not valid UTF-8 JSON", "REC-1", 2),
        (b'{"id":1}\n[1,2]\n', "not a JSON object", "REC-1", 2),
        (b'{"id":1}', "does not end with a newline", "REC-2", None),
    ],
)
def test_bad_lines_name_the_file_and_line(
    run_dir: Path, content: bytes, message: str, rule: str, line: int | None
) -> None:
    rel = relist(run_dir, header(run_dir) + FrameEncoder().encode(content), 2)
    [problem] = verify_run(Storage(str(run_dir)))
    assert problem.location == (rel if line is None else f"{rel}:{line}")
    assert (message in problem.problem, problem.rule) == (True, rule)
    with pytest.raises(FormatError, match=message):
        list(runfmt.open_run(run_dir).records("score"))


def test_a_decompression_bomb_is_refused_before_it_is_inflated(run_dir: Path) -> None:
    bomb = zstandard.ZstdCompressor(write_checksum=True).compress(b"\n" * ((64 << 20) + 1))
    assert len(bomb) < 10_000
    rel = relist(run_dir, header(run_dir) + bomb, 1)
    [problem] = verify_run(Storage(str(run_dir)))
    assert (problem.location, problem.rule) == (rel, "FRAME-4")  # cited once, the rule broken
    assert "FRAME" not in problem.problem
    with pytest.raises(FormatError, match="FRAME-4"):
        list(runfmt.open_run(run_dir).records("score"))


# flipped and cut bytes of every listed file


def flips(data: bytes, every: int = 1) -> Iterator[bytes]:
    for pos in range(0, len(data), every):
        changed = bytearray(data)
        changed[pos] ^= 0x01 if pos % 2 else 0x80
        yield bytes(changed)


def cuts(data: bytes, every: int = 1) -> Iterator[bytes]:
    for length in range(0, len(data), every):
        yield data[:length]


def assert_each_detected(run_dir: Path, rel: str, variants: Iterator[bytes], where: str) -> int:
    path = run_dir / rel
    original = path.read_bytes()
    storage = Storage(str(run_dir))
    n = 0
    try:
        for variant in variants:
            path.write_bytes(variant)
            problems = verify_run(storage)
            assert problems, f"{rel}: change #{n} went unnoticed"
            assert any(p.location.split(":")[0].endswith(where) for p in problems), problems
            n += 1
    finally:
        path.write_bytes(original)
    assert verify_run(storage) == []
    return n


def test_every_byte_flip_and_cut_of_a_stage_file_is_detected(run_dir: Path) -> None:
    rel = stage_file(run_dir).relative_to(run_dir).as_posix()
    data = (run_dir / rel).read_bytes()
    assert len(data) < 400
    assert assert_each_detected(run_dir, rel, flips(data), rel) == len(data)
    assert assert_each_detected(run_dir, rel, cuts(data), rel) == len(data)


def test_the_reader_never_returns_records_from_a_changed_stage_file(run_dir: Path) -> None:
    f = stage_file(run_dir)
    original = f.read_bytes()
    for variant in [*flips(original, 3), *cuts(original, 3)]:
        f.write_bytes(variant)
        with pytest.raises(RunfmtError):
            list(runfmt.open_run(run_dir).records("score"))
    f.write_bytes(original)
    assert list(runfmt.open_run(run_dir).records("score")) == RECORDS


@pytest.mark.parametrize("which", ["manifest.json", "revision", "SHA256SUMS", "artifact"])
def test_flips_and_cuts_of_the_other_listed_files_are_detected(run_dir: Path, which: str) -> None:
    rel = {
        "manifest.json": "manifest.json",
        "revision": newest_revision(run_dir).relative_to(run_dir).as_posix(),
        "SHA256SUMS": "SHA256SUMS",
        "artifact": "artifacts/notes.txt",
    }[which]
    data = (run_dir / rel).read_bytes()
    every = max(1, len(data) // 40)
    assert assert_each_detected(run_dir, rel, flips(data, every), rel) > 0
    assert assert_each_detected(run_dir, rel, cuts(data, max(1, len(data) // 12)), rel) > 0


def test_repair_never_cuts_a_damaged_committed_file(run_dir: Path) -> None:
    f = stage_file(run_dir)
    original = f.read_bytes()
    f.write_bytes(original[:-5])
    report = repair_run(Storage(str(run_dir)))
    rel = f.relative_to(run_dir).as_posix()
    assert [(p.location, p.rule) for p in report.left] == [(rel, "CHECK-1")]
    assert f.read_bytes() == original[:-5]
    f.write_bytes(original)
    assert verify_run(Storage(str(run_dir))) == []
    assert list(runfmt.open_run(run_dir).records("score")) == RECORDS


def repair_with_stray_file(
    store: Store, header: Callable[[str], dict[str, Any]]
) -> tuple[bool, list[str]]:
    """Commit record ``a``, leave an unlisted file holding ``b`` whose header is a matching
    one updated with ``header(run's created_at)`` (None values dropped), and repair:
    whether the file stayed, and the ids read after."""
    w = store.create_run("eval", **QUIET)
    w.append("score", {"id": "a"})
    w.flush()
    w.close()
    run_dir = Path(store.url) / w.run_id
    head = {"format": "runfmt-stage", "format_version": "1.0", "run_id": w.run_id,
            "stage": "score", "seq": 2, "writer": "deadbeef", "record_schema_version": "1",
            "key_field": None, "run_created_at": w.manifest.created_at}  # fmt: skip
    head |= header(w.manifest.created_at)
    body = {k: v for k, v in head.items() if v is not None or k == "key_field"}
    stray = run_dir / "stages" / "score" / "part-000002-deadbeef.jsonl.zst"
    stray.write_bytes(PREFIX + encode_header(body) + FrameEncoder().encode(b'{"id":"b"}\n'))
    repair_run(Storage(str(run_dir)))
    assert verify_run(Storage(str(run_dir))) == []
    return stray.exists(), [r["id"] for r in runfmt.open_run(run_dir).records("score")]


@pytest.mark.parametrize(
    ("header", "salvaged"),
    [({}, True), ({"writer": "other1", "seq": 7}, False), ({"format": "nope"}, False)],
)
def test_repair_salvages_only_a_file_whose_header_matches_it(
    store: Store, header: dict[str, Any], salvaged: bool
) -> None:
    """COMMIT-8: an unlisted stage file is salvaged only when its header is valid and names
    the file's own stage, writer and seq; committed bytes could never be taken back."""
    found = repair_with_stray_file(store, lambda _: header)
    assert found == ((True, ["a", "b"]) if salvaged else (False, ["a"]))


def _nanoseconds(created_at: str) -> str:
    return parse_timestamp(created_at).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def _a_second_later(created_at: str) -> str:
    return (parse_timestamp(created_at) + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.mark.parametrize(
    ("created", "salvaged"),
    [(lambda _: None, True), (lambda c: c, True), (_nanoseconds, True), (_a_second_later, False)],
    ids=["absent", "same", "nanoseconds", "a-second-later"],
)
def test_repair_compares_run_created_at_as_an_instant(
    store: Store, created: Callable[[str], str | None], salvaged: bool
) -> None:
    """COMMIT-8: a header's run_created_at names the run's creation instant, whatever its
    number of fraction digits; only another instant marks a replaced run's file."""
    found = repair_with_stray_file(store, lambda c: {"run_created_at": created(c)})
    assert found == ((True, ["a", "b"]) if salvaged else (False, ["a"]))


def test_repair_rewrites_a_damaged_newest_revision_from_its_intact_copy(run_dir: Path) -> None:
    """The newest revision cut short while ``manifest.json`` still holds it: repair restores
    it from that copy instead of falling back to the previous revision."""
    before = snapshot(run_dir)
    rev = newest_revision(run_dir)
    rev.write_bytes(rev.read_bytes()[:100])
    assert verify_run(Storage(str(run_dir)))
    report = repair_run(Storage(str(run_dir)))
    assert any("rewritten from manifest.json" in a for a in report.actions), report.actions
    assert snapshot(run_dir) == before
    assert verify_run(Storage(str(run_dir))) == []


def _flip_counter(data: bytes) -> bytes:
    """The manifest bytes with one valid-looking change: a counter of 3 made 7 (a bit flip)."""
    assert b'"n": 3' in data or b'"n":3' in data
    return data.replace(b'"n": 3', b'"n": 7').replace(b'"n":3', b'"n":7')


@pytest.fixture
def counted_dir(store: Store) -> Path:
    """A completed run with a counter, so that a flipped bit leaves a valid manifest."""
    with store.create_run("counted", {"m": 1}, **QUIET) as w:
        w.count("n", 3)
        w.extend("score", RECORDS)
    return Path(store.url) / w.run_id


@pytest.mark.parametrize("damaged", ["revision", "manifest.json"])
def test_sha256sums_tells_which_of_revision_and_copy_was_changed(
    counted_dir: Path, damaged: str
) -> None:
    """COMMIT-14: other bytes of the same revision in manifest.json are damage, not a crash;
    SHA256SUMS vouches for one of the two, and repair restores the other from it."""
    before = snapshot(counted_dir)
    copy = counted_dir / "manifest.json"
    target = newest_revision(counted_dir) if damaged == "revision" else copy
    target.write_bytes(_flip_counter(target.read_bytes()))
    [problem] = verify_run(Storage(str(counted_dir)))
    assert problem.location == target.relative_to(counted_dir).as_posix()
    assert (problem.rule, problem.repairable) == ("COMMIT-14", True)
    assert "SHA256SUMS vouches" in problem.problem
    repair_run(Storage(str(counted_dir)))
    assert snapshot(counted_dir) == before
    assert verify_run(Storage(str(counted_dir))) == []


def test_a_revision_and_copy_that_differ_with_nothing_to_tell_are_left_alone(
    counted_dir: Path,
) -> None:
    """COMMIT-14: with no SHA256SUMS to vouch for either, repair must not take the changed
    revision as the truth and rewrite manifest.json (and SHA256SUMS) from it."""
    (counted_dir / "SHA256SUMS").unlink()
    rev = newest_revision(counted_dir)
    rev.write_bytes(_flip_counter(rev.read_bytes()))
    before = snapshot(counted_dir)
    problems = verify_run(Storage(str(counted_dir)))
    [diverged] = [p for p in problems if p.location == "manifest.json"]
    assert (diverged.rule, diverged.repairable) == ("COMMIT-14", False)
    report = repair_run(Storage(str(counted_dir)))
    assert [p.rule for p in report.left] == ["COMMIT-14"]
    assert snapshot(counted_dir) == before
    with pytest.raises(ManifestError, match="COMMIT-14"):
        Store(counted_dir.parent).resume_run(counted_dir.name)
    assert snapshot(counted_dir) == before


def test_another_runs_manifest_and_sums_are_no_evidence(store: Store, counted_dir: Path) -> None:
    """COMMIT-14: a manifest.json and SHA256SUMS copied in from another run vouch for each
    other, not for this run: repair took the other run's later revision as a missing one
    and deleted this run's data. They are stale copies (COMMIT-7, CHECK-3), which repair
    rewrites from the run's own newest revision."""
    with store.create_run("other", {"m": 2}, **QUIET) as w:
        w.count("n", 1)
        for _ in range(5):
            w.extend("score", RECORDS)
            w.flush()
    other = Path(store.url) / w.run_id
    before = snapshot(counted_dir)
    for name in ("manifest.json", "SHA256SUMS"):
        (counted_dir / name).write_bytes((other / name).read_bytes())
    problems = verify_run(Storage(str(counted_dir)))
    assert {(p.location, p.rule, p.repairable) for p in problems} == {
        ("manifest.json", "COMMIT-7", True), ("SHA256SUMS", "CHECK-3", True)}  # fmt: skip
    repair_run(Storage(str(counted_dir)))
    assert snapshot(counted_dir) == before


def test_an_unreadable_revision_is_not_rewritten_from_another_runs_copy(
    store: Store, run_dir: Path
) -> None:
    """Only this run's manifest.json may stand in for its unreadable newest revision: one
    copied from another run at the same revision number is no evidence."""
    with store.create_run("other", {"m": 2}, **QUIET) as w:
        w.extend("score", RECORDS)
    other = Path(store.url) / w.run_id
    rev = newest_revision(run_dir)
    other_rev = other / "_manifests" / rev.name
    assert other_rev.exists()
    (run_dir / "manifest.json").write_bytes(other_rev.read_bytes())
    rev.write_bytes(rev.read_bytes()[:100])
    report = repair_run(Storage(str(run_dir)))
    assert not any("rewritten from manifest.json" in a for a in report.actions)
    assert runfmt.open_run(run_dir).manifest.run_id == run_dir.name


def test_a_missing_newest_revision_is_restored_from_the_copy_sha256sums_vouches_for(
    counted_dir: Path,
) -> None:
    """COMMIT-14: a finished run's final revision deleted, manifest.json (listed in
    SHA256SUMS) still holding it: repair restores the revision instead of rewriting the
    only intact copy from the revision before it."""
    before = snapshot(counted_dir)
    rev = newest_revision(counted_dir)
    rev.unlink()
    [problem] = verify_run(Storage(str(counted_dir)))
    assert (problem.location, problem.rule) == (f"_manifests/{rev.name}", "COMMIT-14")
    repair_run(Storage(str(counted_dir)))
    assert snapshot(counted_dir) == before
    assert verify_run(Storage(str(counted_dir))) == []


def _rerun_copy(store: Store, counted_dir: Path) -> bytes:
    """The manifest of a run created anew under ``counted_dir``'s id (a rerun, POLICY-4),
    at the revision number of ``counted_dir``'s newest, with files of its own."""
    number = int(newest_revision(counted_dir).stem)
    elsewhere = Store(counted_dir.parent.parent / "elsewhere")
    with elsewhere.create_run("rerun", {"m": 1}, run_id=counted_dir.name, **QUIET) as w:
        w.extend("score", [{"key": "other"}])
        while w.manifest.revision < number - 1:
            w.heartbeat()
    return (Path(elsewhere.url) / w.run_id / "manifest.json").read_bytes()


@pytest.mark.parametrize("sums", ["kept", "deleted"])
def test_an_unreadable_only_revision_is_not_rewritten_from_a_reruns_copy(
    store: Store, counted_dir: Path, sums: str
) -> None:
    """§9.3: with no older revision to compare with, a copy of a run with the folder's id is
    this run's only when the files it lists are at hand and any SHA256SUMS was made from it.
    A rerun's copy was taken for this run's; repair then deleted this run's committed files
    as a replaced run's (COMMIT-8)."""
    copy = _rerun_copy(store, counted_dir)
    (counted_dir / "manifest.json").write_bytes(copy)
    if sums == "deleted":
        (counted_dir / "SHA256SUMS").unlink()
    newest = newest_revision(counted_dir)
    for older in (counted_dir / "_manifests").glob("*.json"):
        if older != newest:
            older.unlink()  # a copy that kept only the newest revision (COMMIT-9)
    newest.write_bytes(newest.read_bytes()[:40])
    before = snapshot(counted_dir)
    [problem] = verify_run(Storage(str(counted_dir)))
    assert problem.location.endswith(f"_manifests/{newest.name}")
    assert not problem.repairable
    with pytest.raises(ManifestError):
        repair_run(Storage(str(counted_dir)))
    assert snapshot(counted_dir) == before


def test_verify_says_repair_mends_an_unreadable_newest_revision(run_dir: Path) -> None:
    """ERR-3: an unreadable newest revision is repairable when its copy or an older revision
    stands in for it (§9.3), and not when neither does."""
    newest = newest_revision(run_dir)
    newest.write_bytes(b"{")
    [problem] = verify_run(Storage(str(run_dir)))
    assert problem.repairable, "manifest.json holds the revision"
    (run_dir / "manifest.json").unlink()
    problem, *as_repair_leaves_it = verify_run(Storage(str(run_dir)))
    assert problem.repairable, "an older revision reads"
    assert as_repair_leaves_it, "the older revision lists less than the folder holds"
    assert all(p.repairable for p in as_repair_leaves_it)
    for older in (run_dir / "_manifests").glob("*.json"):
        if older != newest:
            older.write_bytes(b"{")
    problems = verify_run(Storage(str(run_dir)))
    assert len(problems) == len(list((run_dir / "_manifests").glob("*.json")))
    assert not any(p.repairable for p in problems), "every revision is reported, none mended"
    with pytest.raises(ManifestError):
        repair_run(Storage(str(run_dir)))


@pytest.mark.parametrize("older", ["unreadable", "newer format", "newest is a folder"])
def test_repair_changes_nothing_when_no_revision_can_stand_in(run_dir: Path, older: str) -> None:
    """§9.3: with no usable copy and no older revision to go back to, repair changes
    nothing (it set every unreadable revision aside, one by one, before failing); verify
    says so (ERR-3)."""
    (run_dir / "manifest.json").unlink()
    revs = sorted((run_dir / "_manifests").glob("*.json"))
    for rev in revs[:-1]:
        if older == "newer format":
            doc = json.loads(rev.read_bytes())
            doc["required_features"] = ["teleport"]
            rev.write_text(json.dumps(doc))
        elif older == "unreadable":
            rev.write_bytes(b"{")
    if older == "newest is a folder":
        revs[-1].unlink()
        revs[-1].mkdir()
    else:
        revs[-1].write_bytes(b"{")
    before = snapshot(run_dir)
    problems = verify_run(Storage(str(run_dir)))
    assert problems
    assert not any(p.repairable for p in problems)
    with pytest.raises((ManifestError, UnsupportedFormatError)):
        repair_run(Storage(str(run_dir)))
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in (run_dir / "_manifests").iterdir()) == [r.name for r in revs]


@pytest.mark.parametrize("name", ["manifest.json", "SHA256SUMS"])
def test_a_folder_where_the_run_keeps_a_file_is_left_to_the_user(run_dir: Path, name: str) -> None:
    """LAYOUT-2: a folder named manifest.json or SHA256SUMS counts as missing, but repair
    cannot write the file over it (it crashed); it says so and changes nothing else."""
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    (run_dir / name / "notes.txt").write_text("mine")
    if name == "manifest.json":
        problems = verify_run(Storage(str(run_dir)))
        assert (name, "LAYOUT-2", False) in {(p.location, p.rule, p.repairable) for p in problems}
        assert not any(p.repairable for p in problems)
    report = repair_run(Storage(str(run_dir)))
    assert [(p.location, p.rule) for p in report.left] == [(name, "LAYOUT-2")]
    assert (run_dir / name / "notes.txt").read_text() == "mine"


def test_no_problem_is_repairable_beside_a_diverged_copy(store: Store, counted_dir: Path) -> None:
    """ERR-3: repair changes nothing beside a copy that COMMIT-14 cannot judge, so verify
    offers it for no problem (it offered to fix the SHA256SUMS copied in with it)."""
    with store.create_run("other", {"m": 2}, **QUIET) as w:
        while w.manifest.revision < int(newest_revision(counted_dir).stem) - 1:
            w.heartbeat()
    other = Path(store.url) / w.run_id
    assert newest_revision(other).name == newest_revision(counted_dir).name
    for name in ("manifest.json", "SHA256SUMS"):
        (counted_dir / name).write_bytes((other / name).read_bytes())
    problems = verify_run(Storage(str(counted_dir)))
    assert {(p.location, p.rule) for p in problems} == {
        ("manifest.json", "COMMIT-14"), ("SHA256SUMS", "CHECK-3")}  # fmt: skip
    assert not any(p.repairable for p in problems)


def test_two_runs_revisions_in_one_folder_are_left_alone(store: Store, counted_dir: Path) -> None:
    """COMMIT-4, POLICY-4: a rerun's revision on top of the old run's (a copy of the rerun
    cut short over the old folder) is no crash: repair deleted every stage file the older
    revisions list, as data of a run this one replaced. It now changes nothing."""
    number = int(newest_revision(counted_dir).stem) + 1
    elsewhere = Store(counted_dir.parent.parent / "elsewhere")
    with elsewhere.create_run("rerun", {"m": 1}, run_id=counted_dir.name, **QUIET) as w:
        w.extend("score", [{"key": "other"}])
        while w.manifest.revision < number:
            w.heartbeat()
    rerun_rev = Path(elsewhere.url) / w.run_id / "_manifests" / f"{number:08d}.json"
    (counted_dir / "_manifests" / rerun_rev.name).write_bytes(rerun_rev.read_bytes())
    before = snapshot(counted_dir)
    problems = verify_run(Storage(str(counted_dir)))
    assert "COMMIT-4" in {p.rule for p in problems}
    assert not any(p.repairable for p in problems)
    report = repair_run(Storage(str(counted_dir)))
    assert {p.rule for p in report.left} == {"COMMIT-4"}
    assert snapshot(counted_dir) == before


def test_a_vouched_later_copy_whose_files_are_not_here_creates_no_revision(
    store: Store,
) -> None:
    """COMMIT-14: a copy taken while the run finished holds its final manifest.json and
    SHA256SUMS but older stage files; repair created the final revision, listing bytes the
    folder does not hold, and the run could no longer be read."""
    w = store.create_run("finishing", **QUIET)
    w.extend("score", RECORDS)
    w.flush()
    run = Path(w.storage.path())
    copy = store.url + "-copy"
    shutil.copytree(run, Path(copy) / run.name)
    w.extend("score", RECORDS)
    w.finish()
    for name in ("manifest.json", "SHA256SUMS"):
        (Path(copy) / run.name / name).write_bytes((run / name).read_bytes())
    copied = Path(copy) / run.name
    before = snapshot(copied)
    problems = verify_run(Storage(str(copied)))
    assert ("manifest.json", "COMMIT-14") in {(p.location, p.rule) for p in problems}
    assert not any(p.repairable for p in problems)
    repair_run(Storage(str(copied)))
    assert snapshot(copied) == before
    assert list(runfmt.open_run(copied).records("score")) == RECORDS


def test_nothing_is_set_aside_for_a_revision_its_copy_contradicts(counted_dir: Path) -> None:
    """COMMIT-14 before §9.3: an unreadable newest revision, and manifest.json holding the
    revision before it with other bytes. Repair set the newest aside, then found it could
    not judge the copy; it now changes nothing, and verify says so."""
    revs = sorted((counted_dir / "_manifests").glob("*.json"))
    edited = revs[-2].read_bytes().replace(b'"name": "counted"', b'"name": "edited"')
    assert edited != revs[-2].read_bytes()
    (counted_dir / "manifest.json").write_bytes(edited)
    revs[-1].write_bytes(b"{")
    before = snapshot(counted_dir)
    problems = verify_run(Storage(str(counted_dir)))
    assert not any(p.repairable for p in problems)
    with pytest.raises(ManifestError):
        repair_run(Storage(str(counted_dir)))
    assert snapshot(counted_dir) == before


def test_a_user_folder_in_a_listed_artifacts_place_is_not_listed(run_dir: Path) -> None:
    """A folder where a listed artifact belongs holds the user's files, not an uncommitted
    artifact: repair listed them, and the run listed one path as a file and a folder."""
    artifact = run_dir / "artifacts" / "notes.txt"
    artifact.unlink()
    artifact.mkdir()
    (artifact / "mine.txt").write_text("mine")
    problems = verify_run(Storage(str(run_dir)))
    assert ("artifacts/notes.txt/mine.txt", "LAYOUT-4", False) in {
        (p.location, p.rule, p.repairable) for p in problems
    }
    before = snapshot(run_dir)
    repair_run(Storage(str(run_dir)))
    assert snapshot(run_dir) == before


def test_revisions_repair_sets_aside_are_reported_repairable(store: Store) -> None:
    """ERR-3: beside an unreadable newest revision, verify reports the older ones too, as
    repairable when repair sets them aside for the one that reads below them."""
    with store.create_run("three", **QUIET) as w:
        for record in RECORDS:
            w.append("score", record)
            w.flush()
    run_dir = Path(store.url) / w.run_id
    (run_dir / "manifest.json").unlink()
    revs = sorted((run_dir / "_manifests").glob("*.json"))
    assert len(revs) >= 3
    for rev in revs[-2:]:
        rev.write_bytes(b"{")
    problems = verify_run(Storage(str(run_dir)))
    assert {p.location for p in problems} >= {f"_manifests/{revs[-2].name}"}
    assert problems[0].location.endswith(f"_manifests/{revs[-1].name}")
    assert all(p.repairable for p in problems)
    repair_run(Storage(str(run_dir)))
    assert verify_run(Storage(str(run_dir))) == []


def test_a_later_copy_of_another_run_is_stale_not_damage(store: Store, counted_dir: Path) -> None:
    """COMMIT-14 covers a copy of the newest revision's number; another run's later revision
    in manifest.json is a stale copy (COMMIT-7), which repair rewrites."""
    with store.create_run("other", {"m": 2}, **QUIET) as w:
        while w.manifest.revision <= int(newest_revision(counted_dir).stem):
            w.heartbeat()
    before = snapshot(counted_dir)
    (counted_dir / "manifest.json").write_bytes(
        (Path(store.url) / w.run_id / "manifest.json").read_bytes()
    )
    [problem] = verify_run(Storage(str(counted_dir)))
    assert (problem.location, problem.rule, problem.repairable) == (
        "manifest.json", "COMMIT-7", True)  # fmt: skip
    repair_run(Storage(str(counted_dir)))
    assert verify_run(Storage(str(counted_dir))) == []
    assert snapshot(counted_dir) == before


def test_sha256sums_vouches_only_as_a_whole(counted_dir: Path) -> None:
    """COMMIT-14: SHA256SUMS vouches for a manifest when it is what CHECK-3 makes of it; a
    matching manifest.json line beside a changed line is no evidence."""
    sums = counted_dir / "SHA256SUMS"
    lines = sums.read_text().splitlines(keepends=True)
    lines[-1] = ("0" * 64) + lines[-1][64:]
    assert lines[-1].endswith(".jsonl.zst\n")
    sums.write_text("".join(lines))
    rev = newest_revision(counted_dir)
    rev.write_bytes(_flip_counter(rev.read_bytes()))
    before = snapshot(counted_dir)
    problems = verify_run(Storage(str(counted_dir)))
    assert ("manifest.json", "COMMIT-14", False) in {
        (p.location, p.rule, p.repairable) for p in problems
    }
    repair_run(Storage(str(counted_dir)))
    assert snapshot(counted_dir) == before


@pytest.mark.parametrize(
    ("rel", "repairable"),
    [("stages/score/part-000009-dead.jsonl.zst", True), ("stages/unknown/a.jsonl.zst", False),
     ("stages/score/notes.txt", False), ("notes.txt", False)],
)  # fmt: skip
def test_verify_offers_repair_only_for_what_repair_fixes(
    run_dir: Path, rel: str, repairable: bool
) -> None:
    """An unlisted file is repairable only when named as a stage file: repair leaves others
    alone, so verify must not keep recommending it."""
    (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / rel).write_bytes(b"x")
    [problem] = verify_run(Storage(str(run_dir)))
    assert (problem.location, problem.rule, problem.repairable) == (rel, "LAYOUT-4", repairable)
    repair_run(Storage(str(run_dir)))
    assert (run_dir / rel).exists() != repairable


def test_cli_verify_exit_codes_and_messages(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(monkeypatch, capsys, "verify", str(run_dir))[0] == 0
    f = stage_file(run_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    code, out = cli(monkeypatch, capsys, "verify", str(run_dir))
    assert code == 1
    assert f.name in out
    assert "CHECK-1" in out
    code, out = cli(monkeypatch, capsys, "show", str(run_dir.parent / "no-such-run"))
    assert code == 1
    assert "no-such-run" in out
    missing = str(run_dir.parent / "typo")
    code, out = cli(monkeypatch, capsys, "--store", missing, "show", run_dir.name)
    assert code == 1
    assert f"{missing}: no run {run_dir.name!r}: the store has no such folder" in out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
@pytest.mark.parametrize("what", ["stage file", "artifact", "newest revision", "SHA256SUMS"])
@pytest.mark.parametrize("command", ["verify", "dump", "cat", "ls"])
def test_a_fifo_where_a_file_belongs_never_hangs_a_reader(
    run_dir: Path, what: str, command: str
) -> None:
    """ERR-1, LAYOUT-3: a FIFO at a listed path is no file; opening it to read would wait
    for a writer forever. Real processes, so that a hang fails the test instead of it."""
    path = {
        "stage file": stage_file(run_dir),
        "artifact": run_dir / "artifacts" / "notes.txt",
        "newest revision": newest_revision(run_dir),
        "SHA256SUMS": run_dir / "SHA256SUMS",
    }[what]
    path.unlink()
    os.mkfifo(path)
    store, run = str(run_dir.parent), run_dir.name
    args = {"verify": ["verify", run], "dump": ["dump", run], "cat": ["cat", run, "score"],
            "ls": ["ls"]}[command]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "runfmt", "--store", store, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr
    if command == "ls":
        assert done.returncode == 0
        if what == "newest revision":
            assert "not a regular file" in done.stderr
    elif command == "cat" and what in ("artifact", "SHA256SUMS"):
        assert done.returncode == 0
    else:
        assert done.returncode == 1
        assert "regular file" in done.stderr + done.stdout or what not in ("stage file", "artifact")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_where_an_empty_artifact_belongs_is_a_missing_file(store: Store) -> None:
    """LAYOUT-3: a listed path that holds no regular file is missing, whatever its length."""
    with store.create_run("fifo", **QUIET) as w:
        w.add_artifact("empty.txt", b"")
    path = Path(store.url) / w.run_id / "artifacts" / "empty.txt"
    path.unlink()
    os.mkfifo(path)
    problems = verify_run(store.open_run(w.run_id).storage)
    assert [(p.location, p.rule, p.problem) for p in problems] == [
        ("artifacts/empty.txt", "LAYOUT-3", "listed path is not a regular file")
    ]


@pytest.mark.parametrize("what", ["linked file", "linked folder", "fifo"])
def test_a_link_or_fifo_at_a_listed_path_is_no_copy_cut_short(
    run_dir: Path, tmp_path: Path, what: str
) -> None:
    """COMMIT-13 takes back only a copy whose listed files are missing or cut short: a link
    or a FIFO in their place is damage, which no rollback (dropping a stage's committed
    records) may answer. verify does not offer one and repair makes none, nor raises."""
    f = stage_file(run_dir)
    if what == "linked folder":
        f.parent.rename(tmp_path / "moved")
        f.parent.symlink_to(tmp_path / "moved")
    else:
        (tmp_path / "copy").write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(tmp_path / "copy") if what == "linked file" else os.mkfifo(f)
    before = snapshot(run_dir) if what == "linked folder" else None
    problems = verify_run(Storage(str(run_dir)))
    assert problems
    assert not any("rollback" in p.problem for p in problems)
    assert {p.rule for p in problems} == ({"LAYOUT-3"} if what == "fifo" else {"LAYOUT-5"})
    revision = newest_revision(run_dir).name
    report = repair_run(Storage(str(run_dir)), rollback=True)
    assert report.rollback_to is None
    assert newest_revision(run_dir).name == revision
    assert runfmt.open_run(run_dir).manifest.status == "completed"
    if before is not None:
        assert snapshot(run_dir) == before


def test_repair_of_a_folder_that_holds_no_run_changes_nothing(tmp_path: Path) -> None:
    """§9.3 row 1: what a crash while creating a run leaves is not a run; repair refuses it
    before taking the commit lock, so it leaves no lock file behind either."""
    (tmp_path / "_manifests").mkdir()
    (tmp_path / "_manifests" / ".tmp-0a1b").write_bytes(b"{")
    with pytest.raises(RunNotFoundError, match=r"not a run: .*\(LAYOUT-2\)"):
        repair_run(Storage(str(tmp_path)))
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".tmp-0a1b", "_manifests"]


def test_verify_counts_every_key_value_that_breaks_rec_6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ERR-3: one problem for the file names the first bad key value and how many more
    (a run written by a writer that breaks REC-6: no repair salvages such records)."""
    monkeypatch.setattr(builder, "SUITE", tmp_path)
    case = builder.Case("invalid", "bad-keys", "", [])
    case.stage("score", key_field="key")
    bad = [{"key": ""}, {"key": 5}, {"key": "x" * 1025}, {"key": []}, {"key": None}]
    case.file("score", [[{"key": "ok"}, *bad]])
    run_dir = case.write() / "run"
    problems = [p for p in verify_run(Storage(str(run_dir))) if p.rule == "REC-6"]
    assert [(p.location.rsplit(":", 1)[1], p.problem) for p in problems] == [
        ("2", "key field 'key' holds '', not a string of 1 to 1024 characters (and 3 more records)")
    ]


@pytest.mark.parametrize(
    ("stamp", "valid"), [("2026-02-28T00:00:00.5Z", True), ("2026-02-30T00:00:00Z", False)]
)
def test_a_header_run_created_at_must_be_a_real_time(stamp: str, valid: bool) -> None:
    """FRAME-2: run_created_at is a timestamp as MAN-9 defines them."""
    header = {"format": "runfmt-stage", "format_version": "1.0", "run_id": "r1",
              "stage": "score", "seq": 1, "writer": "w1", "record_schema_version": "1",
              "key_field": None, "run_created_at": stamp}  # fmt: skip
    found = header_problem(header, "stages/score/part-000001-w1.jsonl.zst", None)
    assert found == (None if valid else (
        f"invalid header: run_created_at {stamp!r} is not a real time", "FRAME-2"
    ))  # fmt: skip


def test_repair_lists_salvaged_files_by_writer_then_number(store: Store) -> None:
    """COMMIT-8: part-1000000 of a writer comes after its part-999999, as it was written."""
    w = store.create_run("x", **QUIET)
    w.close()
    run_dir = Path(store.url) / w.run_id
    created = store.open_run(w.run_id).manifest.created_at
    (run_dir / "stages" / "s").mkdir(parents=True)
    for seq, writer, rec in ((1000000, "0a0b0c0d", "a2"), (999999, "0a0b0c0d", "a1"),
                             (5, "ffffffff", "b1")):  # fmt: skip
        head = PREFIX + encode_header({
            "format": "runfmt-stage", "format_version": "1.0", "run_id": w.run_id,
            "stage": "s", "seq": seq, "writer": writer, "record_schema_version": "1",
            "key_field": None, "run_created_at": created,
        })  # fmt: skip
        data = head + FrameEncoder().encode(json.dumps({"id": rec}).encode() + b"\n")
        (run_dir / "stages" / "s" / f"part-{seq:06d}-{writer}.jsonl.zst").write_bytes(data)
    assert repair_run(Storage(str(run_dir))).salvaged_records == 3
    assert [r["id"] for r in store.open_run(w.run_id).records("s")] == ["a1", "a2", "b1"]


def test_salvage_keeps_whole_frames_up_to_the_last_data_frame(run_dir: Path) -> None:
    """COMMIT-8: skippable frames between data frames are kept, one after the last data
    frame is cut, and an empty data frame counts as a data frame."""
    f = stage_file(run_dir)
    committed = f.stat().st_size
    enc = FrameEncoder()
    tail = [enc.encode(b'{"id":"q3"}\n'), skippable(b"x"), enc.encode(b'{"id":"q4"}\n'),
            enc.encode(b""), skippable(b"y")]  # fmt: skip
    with f.open("ab") as out:
        out.write(b"".join(tail))
    (run_dir / "SHA256SUMS").unlink()
    report = repair_run(Storage(str(run_dir)))
    assert (report.salvaged_records, report.left) == (2, [])
    assert f.stat().st_size == committed + sum(map(len, tail[:4]))
    ids = [r["id"] for r in runfmt.open_run(run_dir).records("score")]
    assert ids == ["q0", "q1", "q2", "q3", "q4"]
