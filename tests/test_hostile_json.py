"""Any edit of a manifest, a stage header or a record that leaves valid JSON gives a verdict
or a `RunfmtError`, never another exception; and what `verify` passes, the reader reads.

Each case copies a small run and changes one JSON value: at random (hypothesis: replaced
by any JSON value, a member removed or added, then the library and the CLI are checked),
or every value in turn replaced by each of its `twins` (``3.0`` for ``3``: the values a
lax check lets through). A changed stage file is listed honestly in the manifest, so only
the format's rules can catch the change.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runfmt
from runfmt.check import repair_run, verify_run
from runfmt.cli import main
from runfmt.errors import RunfmtError
from runfmt.format.frames import HEADER_MAGIC, PREFIX
from runfmt.storage import Storage
from runfmt.store import Store

Json = Any
Path_ = tuple[str | int, ...]

QUIET: dict[str, Any] = {"flush_every": None, "flush_interval": None, "heartbeat_interval": None}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1.0, 3.0, 0.5, 1e300]),
    st.text(max_size=12),
    st.sampled_from(["", "1.0", "2.0", "0.9", "completed", "running", "failed", "score",
                     "../x", "a/b", "1970-01-01T00:00:00Z", "2026-02-30T00:00:00Z",
                     "x" * 300, "\u0000", "\ud800", "0" * 64, "stages/score/x.jsonl.zst"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(doc: Json, at: Path_ = ()) -> Iterator[Path_]:
    """Every place in ``doc`` a value sits, ``()`` being the document itself."""
    yield at
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths(value, (*at, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from paths(value, (*at, i))


def twins(value: Json) -> list[Json]:
    """Values of other JSON types that a lax reader takes for ``value``: ``3.0`` or ``"3"``
    for ``3``, ``1`` for ``true``, ``[x]`` for ``x``."""
    if isinstance(value, bool):
        return [int(value), str(value).lower()]
    if isinstance(value, int):
        return [float(value), str(value), value + 2**64, -value]
    if isinstance(value, float):
        return [int(value), str(value)]
    if isinstance(value, str):
        return [[value], value.upper(), value + "\n", " " + value]
    return [None, [], {}]


def edit(doc: Json, data: st.DataObject) -> Json:
    """``doc`` with one value replaced or removed, or one member added."""
    at = data.draw(st.sampled_from(list(paths(doc))), label="at")
    how = data.draw(st.sampled_from(["replace", "remove", "add"]), label="how")
    if not at:
        return data.draw(VALUES, label="document") if how == "replace" else doc
    parent = doc
    for step in at[:-1]:
        parent = parent[step]
    last = at[-1]
    if how == "replace":
        parent[last] = data.draw(VALUES, label="value")
    elif how == "remove":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][data.draw(st.text(max_size=8), label="name")] = data.draw(VALUES)
    return doc


def dumps(doc: Json) -> bytes:
    """``doc`` as JSON, unpaired surrogates escaped (valid JSON text, not valid UTF-8 text)."""
    return json.dumps(doc, indent=2).encode() + b"\n"


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run and a resumable (closed, unfinished) one, each with a keyed stage."""
    store = Store(tmp_path_factory.mktemp("hostile") / "runs")
    with store.create_run("done", {"m": 1}, tags={"k": "v"}, **QUIET) as w:
        w.stage("score", key_field="id").extend([{"id": "a", "v": 1}, {"id": "b", "_error": "x"}])
        w.stage("score").complete()
        w.add_artifact("notes.txt", b"notes")
    left = store.create_run("left", **QUIET)
    left.stage("gen", key_field="id").extend([{"id": "a", "out": [1, {"t": None}]}])
    left.close()
    return {"finished": Path(store.url) / w.run_id, "running": Path(store.url) / left.run_id}


def copy_of(templates: dict[str, Path], which: str, tmp: Path) -> Path:
    """A copy of a template run, alone in a fresh store."""
    shutil.rmtree(tmp / "store", ignore_errors=True)
    run_dir = tmp / "store" / templates[which].name
    shutil.copytree(templates[which], run_dir)
    return run_dir


def newest_revision(run_dir: Path) -> Path:
    return sorted((run_dir / "_manifests").glob("*.json"))[-1]


def stage_file(run_dir: Path) -> Path:
    return next((run_dir / "stages").glob("*/*.jsonl.zst"))


def relist(run_dir: Path, data: bytes) -> None:
    """Write the stage file's new bytes and list them in the newest revision, as written."""
    path = stage_file(run_dir)
    path.write_bytes(data)
    rel = path.relative_to(run_dir).as_posix()
    rev = newest_revision(run_dir)
    doc = json.loads(rev.read_bytes())
    for stage in doc["stages"]:
        for f in stage["files"]:
            if f["path"] == rel:
                f.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    rev.write_bytes(dumps(doc))
    (run_dir / "manifest.json").write_bytes(dumps(doc))
    (run_dir / "SHA256SUMS").unlink(missing_ok=True)


def split_stage_file(data: bytes) -> tuple[Json, bytes]:
    """The header document and the data frames that follow it."""
    size = struct.unpack_from("<I", data, len(PREFIX) + 4)[0]
    start = len(PREFIX) + 8
    return json.loads(data[start : start + size]), data[start + size :]


def header_frame(doc: Json) -> bytes:
    body = dumps(doc).strip()
    return PREFIX + struct.pack("<II", HEADER_MAGIC, len(body)) + body


def cli(*args: str) -> tuple[int, str]:
    """The real entry point in-process: (exit code, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["runfmt", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    finally:
        sys.argv = argv
    return code, out.getvalue() + err.getvalue()


def library_verdict(run_dir: Path) -> list[Any] | None:
    """`verify_run`'s problems (None: it raised a `RunfmtError`), having checked that a run
    it passes reads whole and is listed by the index as it is."""
    try:
        problems = verify_run(Storage(str(run_dir)))
    except RunfmtError:
        problems = None
    reader_error: RunfmtError | None = None
    try:
        reader = runfmt.open_run(run_dir)
        for stage in reader.manifest.stages:
            for _ in reader.records(stage.name):
                pass
    except RunfmtError as exc:
        reader_error = exc
    if problems == []:
        assert reader_error is None, f"verify passed, the reader failed: {reader_error}"
    shutil.rmtree(run_dir.parent / ".runfmt", ignore_errors=True)  # revisions were edited in place
    store = Store(run_dir.parent)
    try:
        [summary] = store.index.runs()
        summary.to_json()
        for stage in ("score", "gen"):
            store.cache.get(stage, "a")
            store.cache.contains(stage, ["a", "b"])
    except RunfmtError:
        assert problems != [], "verify passed, the index failed"
    else:
        assert summary.problem is None or problems != [], "verify passed, the index did not"
    finally:
        store.index.close()
    return problems


def check_verdicts(run_dir: Path) -> None:
    """Only `RunfmtError`s; a run `verify` passes reads whole; the CLI agrees, exits 0 or 1."""
    problems = library_verdict(run_dir)
    code, output = cli("verify", str(run_dir))
    assert "Traceback" not in output
    assert code == (0 if problems == [] else 1), output
    code, output = cli("dump", str(run_dir))
    assert "Traceback" not in output
    assert code in (0, 1), output


HOSTILE = settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@HOSTILE
@given(which=st.sampled_from(["finished", "running"]), data=st.data())
def test_any_edit_of_the_newest_revision(
    templates: dict[str, Path], tmp_path: Path, which: str, data: st.DataObject
) -> None:
    run_dir = copy_of(templates, which, tmp_path)
    rev = newest_revision(run_dir)
    changed = dumps(edit(json.loads(rev.read_bytes()), data))
    rev.write_bytes(changed)
    if data.draw(st.booleans(), label="manifest.json too"):
        (run_dir / "manifest.json").write_bytes(changed)
    check_verdicts(run_dir)


@HOSTILE
@given(which=st.sampled_from(["finished", "running"]), data=st.data())
def test_any_edit_of_a_stage_header(
    templates: dict[str, Path], tmp_path: Path, which: str, data: st.DataObject
) -> None:
    run_dir = copy_of(templates, which, tmp_path)
    header, frames = split_stage_file(stage_file(run_dir).read_bytes())
    relist(run_dir, header_frame(edit(header, data)) + frames)
    check_verdicts(run_dir)


def decode(frames: bytes) -> list[Json]:
    return [json.loads(line) for line in zstandard.decompress(frames).splitlines()]


def recompress(frames: bytes, change: Callable[[list[Json]], list[Json]]) -> bytes:
    records = change(decode(frames))
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    return zstandard.ZstdCompressor(write_checksum=True).compress(payload)


@HOSTILE
@given(which=st.sampled_from(["finished", "running"]), data=st.data())
def test_any_edit_of_a_record(
    templates: dict[str, Path], tmp_path: Path, which: str, data: st.DataObject
) -> None:
    run_dir = copy_of(templates, which, tmp_path)
    header, frames = split_stage_file(stage_file(run_dir).read_bytes())

    def one_record(records: list[Json]) -> list[Json]:
        i = data.draw(st.integers(0, len(records) - 1), label="record")
        records[i] = edit(records[i], data)
        return records

    relist(run_dir, header_frame(header) + recompress(frames, one_record))
    check_verdicts(run_dir)


def with_each_twin(doc: Json) -> Iterator[tuple[Path_, Json, Json]]:
    """``doc`` with one value replaced by one of its `twins`, for every value and twin."""
    for at in paths(doc):
        if not at:
            continue
        parent = doc
        for step in at[:-1]:
            parent = parent[step]
        original = parent[at[-1]]
        for twin in twins(original):
            parent[at[-1]] = twin
            yield at, twin, doc
        parent[at[-1]] = original


def failures(run_dir: Path, write: Callable[[Json], None], doc: Json) -> list[str]:
    """What each twin of each value in ``doc`` did to the library, if anything but a
    verdict or a `RunfmtError`."""
    found = []
    for at, twin, changed in with_each_twin(doc):
        write(changed)
        try:
            library_verdict(run_dir)
        except Exception as exc:
            found.append(f"{'/'.join(map(str, at))} = {twin!r}: {type(exc).__name__}: {exc}")
    return found


@pytest.mark.parametrize("which", ["finished", "running"])
def test_every_twin_of_every_manifest_value(
    templates: dict[str, Path], tmp_path: Path, which: str
) -> None:
    run_dir = copy_of(templates, which, tmp_path)
    rev = newest_revision(run_dir)
    assert failures(run_dir, lambda doc: rev.write_bytes(dumps(doc)),
                    json.loads(rev.read_bytes())) == []  # fmt: skip


@pytest.mark.parametrize("which", ["finished", "running"])
def test_every_twin_of_every_header_value(
    templates: dict[str, Path], tmp_path: Path, which: str
) -> None:
    run_dir = copy_of(templates, which, tmp_path)
    header, frames = split_stage_file(stage_file(run_dir).read_bytes())
    assert failures(run_dir, lambda doc: relist(run_dir, header_frame(doc) + frames), header) == []


@pytest.mark.parametrize("which", ["finished", "running"])
def test_every_twin_of_every_record_value(
    templates: dict[str, Path], tmp_path: Path, which: str
) -> None:
    run_dir = copy_of(templates, which, tmp_path)
    header, frames = split_stage_file(stage_file(run_dir).read_bytes())

    def write(changed: list[Json]) -> None:
        relist(run_dir, header_frame(header) + recompress(frames, lambda _: changed))

    assert failures(run_dir, write, decode(frames)) == []


def _deep(depth: int) -> bytes:
    """JSON arrays nested ``depth`` levels deep."""
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("depth", [300, 3000])
@pytest.mark.parametrize("where", ["config", "stage status"])
def test_a_manifest_nested_too_deep_is_refused_by_every_reader(
    templates: dict[str, Path], tmp_path: Path, where: str, depth: int
) -> None:
    """MAN-1, ERR-1: a manifest nesting more than 254 levels is invalid; readers refuse it
    with a ManifestError, and the index lists the run as unreadable instead of failing."""
    run_dir = copy_of(templates, "finished", tmp_path)
    doc = json.loads(newest_revision(run_dir).read_bytes())
    if where == "config":
        doc["config"] = {"deep": "@"}
    else:
        doc["stages"][0]["status"] = "@"
    data = dumps(doc).replace(b'"@"', _deep(depth))
    newest_revision(run_dir).write_bytes(data)
    (run_dir / "manifest.json").write_bytes(data)
    check_verdicts(run_dir)
    problem = verify_run(Storage(str(run_dir)))[0]
    assert where == "stage status" or (problem.rule, problem.problem) == (
        "MAN-1",
        "objects and arrays nest more than 254 levels deep",
    )
    store = str(run_dir.parent)
    for args in (["ls"], ["status"], ["report"], ["show", run_dir.name], ["index", "rebuild"]):
        code, output = cli("--store", store, *args)
        assert "Traceback" not in output
        assert code in (0, 1), output
    assert "unreadable" in cli("--store", store, "ls")[1]


@pytest.mark.parametrize("depth", [255, 1000])
def test_a_record_nested_too_deep_is_reported_and_refused_not_crashed_on(
    templates: dict[str, Path], tmp_path: Path, depth: int
) -> None:
    """REC-3: a record nesting more than 254 levels is no conforming writer's; verify names
    its line, and readers that write it out again refuse it (ERR-1) instead of crashing."""
    run_dir = copy_of(templates, "finished", tmp_path)
    data = stage_file(run_dir).read_bytes()
    _, frames = split_stage_file(data)
    payload = b'{"id":"a","v":' + _deep(depth - 1) + b'}\n{"id":"b","_error":"x"}\n'
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(payload)
    relist(run_dir, data[: len(data) - len(frames)] + frame)
    problems = verify_run(Storage(str(run_dir)))
    [deep] = [p for p in problems if p.rule == "REC-3"]
    assert deep.location.endswith(".jsonl.zst:1")
    export = ["export", str(run_dir), str(tmp_path / "out.jsonl"), "--stage", "score"]
    for args in (["cat", str(run_dir), "score"], ["dump", str(run_dir)], export):
        done = subprocess.run([sys.executable, "-m", "runfmt", *args], capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert "Traceback" not in done.stderr
        assert done.returncode == 1, done.stderr


@pytest.mark.parametrize(("depth", "salvaged"), [(254, 1), (255, 0)])
def test_salvage_keeps_no_record_nested_too_deep(
    templates: dict[str, Path], tmp_path: Path, depth: int, salvaged: int
) -> None:
    """COMMIT-8: salvage keeps valid frames only, and a record nesting more than 254 levels
    (REC-3) is invalid: repair committed one, which its own verify then reported."""
    run_dir = copy_of(templates, "running", tmp_path)
    payload = b'{"id":"c","v":' + _deep(depth - 1) + b"}\n"
    with stage_file(run_dir).open("ab") as f:
        f.write(zstandard.ZstdCompressor(write_checksum=True).compress(payload))
    report = repair_run(Storage(str(run_dir)))
    assert report.salvaged_records == salvaged
    assert verify_run(Storage(str(run_dir))) == []
    assert len(list(runfmt.open_run(run_dir).records("gen"))) == 1 + salvaged


def _nested(depth: int) -> dict[str, Any]:
    """Objects nested ``depth`` levels deep, counting the outermost."""
    outer = inner = {}
    for _ in range(depth - 1):
        inner["c"] = {}
        inner = inner["c"]
    return outer


@pytest.mark.parametrize("depth", [255, 1000, 5000])
def test_writers_refuse_what_nests_too_deep_with_an_invalid_input_error(
    tmp_path: Path, depth: int
) -> None:
    """REC-3, MAN-1: a record, a key's inputs or a config nested too deep is an
    InvalidInputError that says so (never a RecursionError), and the run is as it was."""
    from runfmt.errors import InvalidInputError
    from runfmt.format.keys import compute_key

    store = Store(tmp_path / "runs")
    with pytest.raises(InvalidInputError, match="nests objects and arrays more than"):
        compute_key(_nested(depth))
    with pytest.raises(InvalidInputError, match="nests objects and arrays more than"):
        store.create_run("deep", _nested(depth - 1))
    assert Store(tmp_path / "runs").run_ids() == []
    w = store.create_run("ok", _nested(253), **QUIET)
    with pytest.raises(InvalidInputError, match=r"more than 254 levels deep \(REC-3\)"):
        w.append("gen", _nested(depth))
    w.append("gen", _nested(254))
    w.finish()
    assert list(runfmt.open_run(w.storage.root).records("gen")) == [_nested(254)]
