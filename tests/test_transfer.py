"""`runfmt export` / `runfmt import`: a stage as one file, a run as one tar, checked on import."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runfmt import transfer
from runfmt.check import verify_run
from runfmt.errors import (
    ChecksumMismatchError,
    FormatError,
    InvalidInputError,
    ManifestError,
    RunExistsError,
    StageFileError,
    StorageError,
    UnsupportedFormatError,
)
from runfmt.format.frames import PREFIX, encode_header, iter_frames
from runfmt.storage import AppendFile
from runfmt.store import Store
from runfmt.transfer import export_run, export_stage, import_run, import_stage, read_stage_file
from tests.conformance import builder
from tests.fixtures_manage import Cli, MakeRun

SCORES = [{"id": f"q{i}", "correct": i % 3 == 0, "text": "é" * (i % 5)} for i in range(40)] + [
    {"id": "q99", "_error": "timeout"}
]


@pytest.fixture
def source(store: Store, make_run: MakeRun) -> str:
    writer = store.create_run(
        "eval", {"model": {"name": "m1"}}, tags={"team": "x"}, run_id="src-run"
    )
    writer.stage("score", key_field="id", record_schema_version="2").extend(SCORES)
    writer.stage("gen").extend([{"n": i} for i in range(5)])
    writer.flush()
    writer.stage("gen").extend([{"n": 5}])
    writer.count("cost_usd", 0.5)
    writer.add_artifact("plots/a.txt", b"hello", "text/plain")
    writer.stage("score").complete()
    writer.finish("failed", "boom")
    return writer.run_id


@pytest.fixture
def other(tmp_path: Path) -> Store:
    return Store(tmp_path / "other")


def records(store: Store, run: str, stage: str) -> list[dict[str, object]]:
    return list(store.open_run(run).records(stage))


def test_stage_round_trip_through_a_zst_file(
    store: Store, source: str, other: Store, tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    """EXP-1: a stage export is a stage file with an export header; its records come back."""
    path = tmp_path / "score.jsonl.zst"
    assert export_stage(store.open_run(source), "score", path) == len(SCORES)
    assert path.read_bytes().startswith(PREFIX)
    header = next(iter_frames(path.read_bytes()))
    assert isinstance(header, dict)
    assert header["stage"] == "score"
    assert header["key_field"] == "id"
    assert header["export"]["records"] == 41
    assert header["export"]["failures"] == 1
    plain = subprocess.run([require_tool("zstdcat"), str(path)], capture_output=True, check=True)
    assert [json.loads(line) for line in plain.stdout.splitlines()] == SCORES
    result = import_stage(other, path, name="copied")
    run = other.open_run(result.run_id)
    assert result.stages == {"score": 41}
    assert run.manifest.name == "copied"
    assert run.manifest.tags == {"imported_from": "src-run"}
    assert run.stage("score").key_field == "id"
    assert run.stage("score").record_schema_version == "2"
    assert run.stage("score").failures == 1
    assert records(other, result.run_id, "score") == SCORES
    assert verify_run(run.storage) == []


def test_stage_import_into_an_existing_run_keeps_its_status(
    store: Store, source: str, make_run: MakeRun, tmp_path: Path
) -> None:
    path = tmp_path / "gen.jsonl"
    export_stage(store.open_run(source), "gen", path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"n": i} for i in range(6)
    ]
    target = make_run(store, "t", {}, {"gen": (None, [{"n": -1}])})
    import_stage(store, path, run=target, stage="gen")
    run = store.open_run(target)
    assert run.manifest.status == "completed"
    assert [r["n"] for r in run.records("gen")] == [-1, 0, 1, 2, 3, 4, 5]
    assert verify_run(run.storage) == []


def test_plain_jsonl_needs_a_stage_and_may_name_a_key(
    store: Store, tmp_path: Path, cli: Cli
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"k": "a", "v": 1}\n\n{"k": "b", "v": 2}\n')
    code, _, err = cli(store, "import", str(path))
    assert code == 2, "bad usage"
    assert "plain JSON Lines name no stage" in err
    with pytest.raises(InvalidInputError, match="plain JSON Lines name no stage"):
        import_stage(store, path)
    code, out, _ = cli(store, "import", str(path), "--stage", "s", "--key-field", "k", "--json")
    assert code == 0
    run = store.open_run(json.loads(out)["run_id"])
    assert run.stage("s").key_field == "k"
    assert run.keys("s") == {"a", "b"}


def test_bad_jsonl_lines_are_refused_with_their_line(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(StageFileError, match="not a JSON object") as info:
        import_stage(store, path, stage="s")
    assert info.value.location.endswith("bad.jsonl:2")
    assert store.run_ids() == []


def test_tampered_stage_file_is_refused_and_nothing_is_written(
    store: Store, source: str, make_run: MakeRun, tmp_path: Path
) -> None:
    """EXP-1: frames, counts and sha256 are checked before anything is written."""
    good = tmp_path / "score.jsonl.zst"
    export_stage(store.open_run(source), "score", good)
    target = make_run(store, "t", {}, {"score": ("id", [{"id": "z", "correct": 1}])})
    data = bytearray(good.read_bytes())
    data[-10] ^= 0x01
    flipped = tmp_path / "flipped.jsonl.zst"
    flipped.write_bytes(bytes(data))
    with pytest.raises(StageFileError, match=r"corrupt zstd frame|checksum"):
        import_stage(store, flipped, run=target)
    gen = tmp_path / "gen.jsonl.zst"
    export_stage(store.open_run(source), "gen", gen)
    head_end = (
        len(PREFIX)
        + 8
        + int.from_bytes(good.read_bytes()[len(PREFIX) + 4 : len(PREFIX) + 8], "little")
    )
    gen_head_end = (
        len(PREFIX)
        + 8
        + int.from_bytes(gen.read_bytes()[len(PREFIX) + 4 : len(PREFIX) + 8], "little")
    )
    swapped = tmp_path / "swapped.jsonl.zst"
    swapped.write_bytes(good.read_bytes()[:head_end] + gen.read_bytes()[gen_head_end:])
    with pytest.raises(ChecksumMismatchError, match="file holds 6 records"):
        import_stage(store, swapped, run=target)
    truncated = tmp_path / "cut.jsonl.zst"
    truncated.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(StageFileError, match="truncated"):
        import_stage(store, truncated, run=target)
    run = store.open_run(target)
    assert run.manifest.revision == 2
    assert run.stage("score").records == 1


def test_wrong_stage_is_refused(store: Store, source: str, tmp_path: Path, cli: Cli) -> None:
    """EXP-1: a stage export is not imported under another stage name."""
    path = tmp_path / "score.jsonl.zst"
    export_stage(store.open_run(source), "score", path)
    code, out, err = cli(store, "import", str(path), "--stage", "parse")
    assert code == 1
    assert out == ""
    assert "the file holds stage 'score', not 'parse'" in err
    assert "omit --stage" in err


def test_run_archive_round_trip(store: Store, source: str, other: Store, tmp_path: Path) -> None:
    """EXP-2, EXP-4: the archive is the run folder; the import keeps identity, data and status."""
    archive = tmp_path / "run.tar"
    export_run(store.open_run(source), archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "src-run/manifest.json" in names
    assert "src-run/SHA256SUMS" in names
    assert "src-run/_manifests/00000001.json" in names
    assert "src-run/artifacts/plots/a.txt" in names
    result = import_run(other, archive)
    assert result.run_id == "src-run"
    assert result.stages == {"score": 41, "gen": 6}
    a, b = store.open_run(source).manifest, other.open_run("src-run").manifest
    assert (b.name, b.config, b.config_hash, b.tags, b.counters, b.created_at) == (
        a.name,
        a.config,
        a.config_hash,
        a.tags,
        a.counters,
        a.created_at,
    ), "an old run imported today is not listed as the newest"
    assert (b.status, b.error) == ("failed", "boom")
    assert [
        (s.name, s.status, s.key_field, s.record_schema_version, s.records, s.failures)
        for s in b.stages
    ] == [
        (s.name, s.status, s.key_field, s.record_schema_version, s.records, s.failures)
        for s in a.stages
    ]
    assert records(other, "src-run", "score") == SCORES
    assert other.open_run("src-run").read_artifact("plots/a.txt") == b"hello"
    assert verify_run(other.open_run("src-run").storage) == []


def test_a_run_completed_through_a_stage_keeps_it_and_its_lineage(
    store: Store, other: Store, tmp_path: Path
) -> None:
    """EXP-4, LIFE-2, LIN-1: stage statuses, ``completed_through_stage`` and an artifact's
    parents come through export and import, and through an import into such a run."""
    w = store.create_run("thr", until_stage="gen", heartbeat_interval=None)
    w.stage("gen", key_field="key").append({"key": "a"})
    w.stage("parse", key_field="key").append({"key": "b"})
    w.add_artifact("plot.txt", b"x", parents=[{"stage": "gen", "key": "a"}])
    w.finish()
    archive = tmp_path / "run.tar"
    export_run(store.open_run(w.run_id), archive)
    import_run(other, archive)
    a, b = store.open_run(w.run_id).manifest, other.open_run(w.run_id).manifest

    def shape(m: Any) -> Any:
        return (m.completed_through_stage, [(s.name, s.status) for s in m.stages],
                [a.parents for a in m.artifacts])  # fmt: skip

    assert shape(b) == shape(a) == ("gen", [("gen", "completed"), ("parse", "running")],
                                    [({"stage": "gen", "key": "a"},)])  # fmt: skip
    export_stage(store.open_run(w.run_id), "gen", tmp_path / "gen.jsonl")
    import_stage(other, tmp_path / "gen.jsonl", run=w.run_id, stage="extra")
    assert other.open_run(w.run_id).manifest.completed_through_stage == "gen"
    assert verify_run(other.locate(w.run_id)) == []


def test_a_stage_file_with_a_record_the_writer_refuses_changes_nothing(
    store: Store, source: str, make_run: MakeRun, tmp_path: Path
) -> None:
    """A record the writer would refuse (here a key that is no string) is found before
    anything is written: the finished target run stays as it was."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"key": "a"}\n{"key": 5}\n')
    target = make_run(store, "t", {}, {"gen": ("key", [{"key": "x"}])})
    before = store.open_run(target).manifest
    with pytest.raises(InvalidInputError, match=r"record 2 \(counted from 1\): record key field"):
        import_stage(store, path, run=target, stage="gen")
    after = store.open_run(target).manifest
    assert (after.revision, after.status) == (before.revision, "completed")
    assert verify_run(store.locate(target)) == []


def test_archive_of_a_running_run_holds_only_committed_bytes(
    store: Store, other: Store, tmp_path: Path
) -> None:
    """EXP-2: only what the newest revision lists, cut to its listed length."""
    writer = store.create_run("live", {}, run_id="live-run")
    writer.extend("s", [{"i": i} for i in range(3)])
    writer.flush()
    writer.stage("s").append({"i": 3})
    writer.stage("s")._write(writer.storage, writer._encoder)
    export_run(store.open_run("live-run"), tmp_path / "live.tar")
    writer.close()
    import_run(other, tmp_path / "live.tar")
    run = other.open_run("live-run")
    assert run.manifest.status == "running"
    assert [r["i"] for r in run.records("s")] == [0, 1, 2]


def _rewrite(archive: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> None:
    with tarfile.open(archive) as src, tarfile.open(target, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            new = change(info.name, data)
            if new is None:
                continue
            info.size = len(new)
            dst.addfile(info, io.BytesIO(new))


def test_tampered_archive_is_refused_and_nothing_imported(
    store: Store, source: str, other: Store, tmp_path: Path, cli: Cli
) -> None:
    """EXP-3: listed files and SHA256SUMS are checked before anything is written."""
    archive = tmp_path / "run.tar"
    export_run(store.open_run(source), archive)

    def flip(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if "/stages/score/" in name else data

    bad = tmp_path / "bad.tar"
    _rewrite(archive, bad, flip)
    with pytest.raises(ChecksumMismatchError, match="do not match the length and sha256") as info:
        import_run(other, bad)
    assert "stages/score/part-" in info.value.location
    assert other.run_ids() == []

    def drop(name: str, data: bytes) -> bytes | None:
        return None if name.endswith("plots/a.txt") else data

    _rewrite(archive, bad, drop)
    code, _, err = cli(other, "import", str(bad))
    assert code == 1
    assert "listed file is missing from the archive" in err

    def manifest(name: str, data: bytes) -> bytes:
        return data + b" " if name.endswith("/manifest.json") else data

    _rewrite(archive, bad, manifest)
    with pytest.raises(ChecksumMismatchError, match="does not match SHA256SUMS") as info:
        import_run(other, bad)
    assert info.value.location.endswith("bad.tar:manifest.json")
    assert other.run_ids() == []


def test_unsafe_archive_members_are_refused(other: Store, tmp_path: Path) -> None:
    """EXP-3: absolute paths, "..", links and devices are refused."""
    bad = tmp_path / "evil.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("run/../../evil")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FormatError, match="unsafe archive member"):
        import_run(other, bad)
    with tarfile.open(bad, "w") as tar:
        link = tarfile.TarInfo("run/manifest.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(FormatError, match="unsafe archive member"):
        import_run(other, bad)
    (tmp_path / "not.tar").write_bytes(b"plain text, no tar")
    with pytest.raises(FormatError, match="not a tar archive"):
        import_run(other, tmp_path / "not.tar")


def test_a_folder_of_the_users_named_as_the_run_is_never_written_or_removed(
    store: Store, source: str, other: Store, tmp_path: Path
) -> None:
    """EXP-3: a folder that holds no run but is named as the imported one is refused before
    anything is written, and stays as it was."""
    archive = tmp_path / "run.tar"
    export_run(store.open_run(source), archive)
    mine = Path(other.url) / source
    (mine / "stages" / "gen").mkdir(parents=True)
    (mine / "notes.txt").write_text("years of work")
    with pytest.raises(RunExistsError, match="holds no run"):
        import_run(other, archive)
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "notes.txt", "stages", "stages/gen"]  # fmt: skip
    assert import_run(other, archive, run_id="copy-2").run_id == "copy-2"


def test_an_archive_import_killed_midway_leaves_no_run(
    store: Store, source: str, other: Store, tmp_path: Path
) -> None:
    """EXP-3: on local disk an import appears whole or not at all; a killed one leaves a
    hidden folder that is never listed and that an import removes once it is a minute old
    and no importer holds its lock."""
    archive = tmp_path / "run.tar"
    export_run(store.open_run(source), archive)
    code = (
        "import sys, time\n"
        "from runfmt import store, transfer\n"
        "real = transfer._write_run\n"
        "def written(archive, writer):\n"
        "    counts = real(archive, writer)\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
        "    return counts\n"
        "transfer._write_run = written\n"
        "transfer.import_run(store.Store(sys.argv[1]), sys.argv[2])\n"
    )
    args = [sys.executable, "-c", code, other.url, str(archive)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "written\n"
        proc.kill()
    assert Store(other.url).run_ids() == []
    assert [r.run_id for r in Store(other.url).index.runs()] == []
    [leftover] = Path(other.url).glob(".import-*")
    assert import_run(other, archive, run_id="copy-1").run_id == "copy-1"
    assert leftover.exists(), "a build folder under a minute old may be a live import's"
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    assert import_run(other, archive).run_id == source
    assert verify_run(other.locate(source)) == []
    assert not [p for p in Path(other.url).iterdir() if p.name.startswith(".import-")]


def test_an_import_that_cannot_create_its_run_leaves_no_build_folder(
    store: Store, source: str, other: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "run.tar"
    export_run(store.open_run(source), archive)

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise InvalidInputError("no run for you")

    monkeypatch.setattr(Store, "_create_run", refused)
    with pytest.raises(InvalidInputError, match="no run for you"):
        import_run(other, archive)
    assert not [p for p in Path(other.url).iterdir() if p.name.startswith(".import-")]


def test_existing_run_id_is_refused_then_imported_under_a_new_id(
    store: Store, source: str, tmp_path: Path, cli: Cli
) -> None:
    """EXP-3: an existing run is never replaced."""
    archive = tmp_path / "run.tar"
    code, _, err = cli(store, "export", source, str(archive))
    assert code == 0
    assert "exported run src-run" in err
    code, out, err = cli(store, "import", str(archive))
    assert code == 1
    assert out == ""
    assert "run src-run exists in the store" in err
    assert "--run-id" in err
    with pytest.raises(RunExistsError):
        import_run(store, archive)
    code, out, _ = cli(store, "import", str(archive), "--run-id", "copy-2")
    assert code == 0
    assert "imported into run copy-2 (score: 41, gen: 6)" in out
    assert records(store, "copy-2", "score") == SCORES


def test_cli_stage_export_and_usage_errors(
    store: Store, source: str, tmp_path: Path, cli: Cli
) -> None:
    out_file = tmp_path / "s.jsonl.zst"
    code, _, err = cli(store, "export", source, str(out_file), "--stage", "score")
    assert code == 0
    assert "exported 41 records of src-run/score" in err
    assert read_stage_file(out_file).records == 41
    (tmp_path / "x.csv").write_text("a,b\n")
    cases = [
        (["export", source, str(tmp_path / "x.zip")], 2, "a run exports to FILE.tar"),
        (["export", source, str(tmp_path / "x.tar"), "--stage", "score"], 2, "FILE.jsonl.zst"),
        (["export", source, str(tmp_path / "x.jsonl"), "--stage", "nope"], 1, "no stage 'nope'"),
        (["export", "no-such-run", str(tmp_path / "x.tar")], 1, "no run 'no-such-run'"),
        (["import", str(tmp_path / "missing.tar")], 1, "no such file"),
        (["import", str(out_file), "--run-id", "x"], 2, "--run-id is for run archives"),
        (["import", str(out_file), "--into", source, "--name", "n"], 2, "give one"),
        (["import", str(out_file), "--into", "no-such-run"], 1, "no run 'no-such-run'"),
        (["import", str(tmp_path / "x.csv")], 1, "unknown stage file type"),
    ]
    for args, code, message in cases:
        got, _, err = cli(store, *args)
        assert (got, message in err) == (code, True), (args, err)
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_export_replaces_an_existing_file_only_with_force(
    store: Store, source: str, tmp_path: Path, cli: Cli
) -> None:
    out = tmp_path / "run.tar"
    out.write_bytes(b"an earlier export")
    code, _, err = cli(store, "export", source, str(out))
    assert (code, f"{out} exists; pass --force to replace it" in err) == (1, True)
    assert out.read_bytes() == b"an earlier export"
    code, _, _ = cli(store, "export", source, str(out), "--force")
    assert code == 0
    assert tarfile.is_tarfile(out)


def test_cli_export_onto_a_full_disk_names_the_file_and_what_to_do(
    store: Store, source: str, tmp_path: Path, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transfer, "export_run", full)
    out = tmp_path / "run.tar"
    code, _, err = cli(store, "export", source, str(out))
    assert code == 1
    assert f"{out}: cannot write: No space left on device (in {tmp_path}); free space" in err


def test_conflicting_declaration_is_refused_before_the_run_changes(
    store: Store, source: str, make_run: MakeRun, tmp_path: Path, cli: Cli
) -> None:
    path = tmp_path / "score.jsonl.zst"
    export_stage(store.open_run(source), "score", path)
    target = make_run(store, "t", {}, {"score": ("qid", [{"qid": "z", "correct": 1}])})
    before = store.open_run(target).manifest
    code, _, err = cli(store, "import", str(path), "--into", target)
    assert code == 1
    assert "is declared with key field 'qid'" in err
    after = store.open_run(target).manifest
    assert (after.revision, after.status) == (before.revision, "completed")
    plain = tmp_path / "more.jsonl"
    plain.write_text('{"qid": "y", "correct": 0}\n')
    import_stage(store, plain, run=target, stage="score")
    assert store.open_run(target).keys("score") == {"y", "z"}


def test_memory_store_round_trip(
    store: Store, source: str, memory_store: Store, tmp_path: Path
) -> None:
    export_run(store.open_run(source), tmp_path / "run.tar")
    import_run(memory_store, tmp_path / "run.tar")
    export_run(memory_store.open_run(source), tmp_path / "again.tar")
    export_stage(memory_store.open_run(source), "score", tmp_path / "s.jsonl.zst")
    assert read_stage_file(tmp_path / "s.jsonl.zst").records == len(SCORES)
    assert records(memory_store, source, "score") == SCORES


def test_export_refuses_a_damaged_run_and_leaves_no_file(
    store: Store, source: str, tmp_path: Path
) -> None:
    run = store.open_run(source)
    path = run.stage("score").files[0].path
    data = bytearray(run.storage.read(path))
    data[-5] ^= 0x01
    run.storage.put(path, bytes(data))
    with pytest.raises(ChecksumMismatchError) as info:
        export_run(run, tmp_path / "run.tar")
    assert info.value.location.endswith(path.replace("/", os.sep))
    assert not (tmp_path / "run.tar").exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_stage_export_from_a_newer_major_version_is_refused(
    store: Store, source: str, tmp_path: Path
) -> None:
    good = tmp_path / "score.jsonl.zst"
    export_stage(store.open_run(source), "score", good)
    raw = good.read_bytes()
    header = next(iter_frames(raw))
    assert isinstance(header, dict)
    start = len(PREFIX) + 8 + int.from_bytes(raw[len(PREFIX) + 4 : len(PREFIX) + 8], "little")
    newer = tmp_path / "newer.jsonl.zst"
    newer.write_bytes(PREFIX + encode_header({**header, "format_version": "2.0"}) + raw[start:])
    with pytest.raises(UnsupportedFormatError, match="newer than this reader"):
        import_stage(store, newer, name="x")


def test_an_archive_gets_sha256sums_made_from_the_manifest(
    store: Store, source: str, other: Store, tmp_path: Path
) -> None:
    """EXP-2, CHECK-3: a damaged SHA256SUMS is not carried into the archive, which imports
    as a valid run."""
    sums = Path(store.url) / source / "SHA256SUMS"
    good = sums.read_bytes()
    sums.write_bytes(good.replace(b"  ", b" ", 1))
    export_run(store.open_run(source), tmp_path / "run.tar")
    imported = import_run(other, tmp_path / "run.tar")
    assert verify_run(other.locate(imported.run_id)) == []


def test_a_run_whose_revision_was_changed_is_not_exported(
    store: Store, source: str, tmp_path: Path
) -> None:
    """COMMIT-14: SHA256SUMS vouches for manifest.json, not for the changed revision: the
    archive would carry the change as intact."""
    rev = sorted((Path(store.url) / source / "_manifests").glob("*.json"))[-1]
    rev.write_bytes(rev.read_bytes().replace(b'"name": "eval"', b'"name": "evil"'))
    with pytest.raises(ManifestError, match="COMMIT-14"):
        export_run(store.open_run(source), tmp_path / "run.tar")
    assert not (tmp_path / "run.tar").exists()


def test_an_archived_record_the_writer_refuses_is_named_in_its_file(
    store: Store, other: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXP-3: a record no writer would write, in a run that verifies, fails the import by its
    place in its file."""
    monkeypatch.setattr(builder, "SUITE", tmp_path / "suite")
    case = builder.Case("valid", "refused", "", [])
    case.stage("score", key_field="key")
    good = [{"key": f"k{i}"} for i in range(1501)]
    path = case.file("score", [good, [{"key": "b", "_parents": "a"}]])
    case.finish()
    shutil.copytree(case.write() / "run", Path(store.url) / builder.RUN_ID)
    assert verify_run(store.locate(builder.RUN_ID)) == []
    archive = tmp_path / "run.tar"
    export_run(store.open_run(builder.RUN_ID), archive)
    refused = r"record 1502 \(counted from 1\): _parents"
    with pytest.raises(InvalidInputError, match=refused) as info:
        import_run(other, archive)
    assert info.value.location.endswith(path)
    assert other.run_ids() == []


def test_a_stage_import_that_fails_midway_leaves_no_run(
    store: Store, source: str, other: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the records are written: the run the import made is removed."""
    path = tmp_path / "score.jsonl.zst"
    export_stage(store.open_run(source), "score", path)

    def refuse(self: AppendFile, data: bytes) -> None:
        raise StorageError("No space left on device", location=self.path)

    monkeypatch.setattr(AppendFile, "write", refuse)
    with pytest.raises(StorageError, match="No space left"):
        import_stage(other, path, name="copied")
    assert other.run_ids() == []
    assert [p.name for p in Path(other.url).iterdir() if not p.name.startswith(".")] == []
