"""The manifest (MAN-*, VER-*, COMMIT-5/6): round trips, compatibility, and the commit merge."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runfmt.errors import ConflictError, ManifestError, UnsupportedFormatError
from runfmt.format.keys import compute_key
from runfmt.format.manifest import (
    FORMAT_VERSION,
    RUN_STATUSES,
    ArtifactEntry,
    ChangeSet,
    FileEntry,
    Manifest,
    RunStatus,
    StageEntry,
    apply_changes,
    check_compatible,
    decode_manifest,
    encode_manifest,
    later_version,
    same_instant,
    to_json,
)

SHA = "ab" * 32
KEY = compute_key({"model": "m1"})
TS = "2026-11-22T20:00:00.000000Z"
WRITER = {"name": "runfmt-tests", "version": "1"}

ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
run_ids = st.tuples(
    st.text(ALNUM, min_size=1, max_size=6), st.sampled_from(".-_"), st.text(ALNUM, max_size=6)
).map(lambda t: t[0] + t[1] + t[2] if t[2] else t[0])
stage_names = st.tuples(st.sampled_from("abcz"), st.text(ALNUM + "_-", max_size=8)).map("".join)
writers = st.text(ALNUM, min_size=1, max_size=8)
timestamps = st.datetimes(min_value=datetime(1000, 1, 1)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
)
sha256s = st.binary(min_size=32, max_size=32).map(bytes.hex)
label = st.text("AZaz09_.:/-", min_size=1, max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
counters = st.dictionaries(
    label, st.integers(-(10**6), 10**6) | st.floats(-1e6, 1e6, allow_nan=False), max_size=3
)


@st.composite
def file_entries(draw: st.DrawFn, stage: str, seqs: st.SearchStrategy[int]) -> FileEntry:
    records = draw(st.integers(0, 10**6))
    return FileEntry(
        path=f"stages/{stage}/part-{draw(seqs):06d}-{draw(writers)}.jsonl.zst",
        bytes=draw(st.integers(0, 2**40)),
        records=records,
        failures=draw(st.integers(0, records)),
        sha256=draw(sha256s),
    )


@st.composite
def stage_entries(draw: st.DrawFn, name: str) -> StageEntry:
    files = draw(
        st.lists(
            file_entries(name, st.integers(1, 10**7)),
            max_size=3,
            unique_by=lambda f: f.path.casefold(),
        )
    )
    return StageEntry(
        name=name,
        status=draw(st.sampled_from(["running", "completed", "failed"])),
        record_schema_version=draw(st.text(min_size=1, max_size=8)),
        key_field=draw(st.none() | st.text(min_size=1, max_size=8)),
        files=tuple(files),
    )


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    names_ = draw(st.lists(stage_names, max_size=3, unique=True))
    artifact_names = draw(
        st.lists(
            st.lists(stage_names.map("f".__add__), min_size=1, max_size=3).map("/".join),
            max_size=2,
            unique=True,
        )
    )
    status: RunStatus = draw(st.sampled_from(RUN_STATUSES))
    config = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    return Manifest(
        run_id=draw(run_ids),
        name=draw(st.text(min_size=1, max_size=20)),
        revision=draw(st.integers(1, 10**9)),
        status=status,
        created_at=draw(timestamps),
        updated_at=draw(timestamps),
        config=config,
        config_hash=compute_key(config),
        required_features=(),
        error=draw(st.none() | st.text(max_size=30)) if status == "failed" else None,
        finished_at=None if status == "running" else draw(timestamps),
        tags=draw(st.dictionaries(label, st.text(max_size=10), max_size=3)),
        counters=draw(counters),
        stages=tuple(draw(stage_entries(n)) for n in names_),
        artifacts=tuple(
            ArtifactEntry(
                f"artifacts/{a}",
                draw(st.integers(0, 10**9)),
                draw(sha256s),
                draw(st.sampled_from(["application/octet-stream", "image/png"])),
            )
            for a in artifact_names
        ),
        writer={"name": "runfmt-python", "version": "0.1.0"},
        extra=draw(st.dictionaries(stage_names.map("x_".__add__), json_values, max_size=2)),
    )


@settings(max_examples=40)
@given(manifests())
def test_manifest_round_trips(manifest: Manifest) -> None:
    data = encode_manifest(manifest)
    assert data.endswith(b"}\n")
    assert decode_manifest(data) == manifest
    assert encode_manifest(decode_manifest(data)) == data


def base_manifest(**changes: Any) -> Manifest:
    m = Manifest(
        run_id="r1",
        name="eval",
        revision=1,
        status="running",
        created_at=TS,
        updated_at=TS,
        config={"model": "m1"},
        config_hash=KEY,
    )
    return replace(m, **changes)


def doc(**changes: Any) -> dict[str, Any]:
    d = to_json(base_manifest())
    d.update(changes)
    return d


def test_unknown_optional_members_are_kept() -> None:
    data = json.dumps(doc(x_future={"a": [1]}, another=None)).encode()
    m = decode_manifest(data)
    assert m.extra == {"x_future": {"a": [1]}, "another": None}
    assert json.loads(encode_manifest(m))["x_future"] == {"a": [1]}


@pytest.mark.parametrize("version", ["1.0", "1.7", "1.123456789012"])
def test_any_minor_of_the_same_major_is_read(version: str) -> None:
    assert decode_manifest(json.dumps(doc(format_version=version)).encode()).format_version == (
        version
    )


@pytest.mark.parametrize(
    ("a", "b", "later"), [("1.0", "1.9", "1.9"), ("1.10", "1.9", "1.10"), ("1.0", "1.0", "1.0")]
)
def test_a_commit_keeps_the_later_minor_version(a: str, b: str, later: str) -> None:
    """COMMIT-5: versions compare as numbers, never as text."""
    assert later_version(a, b) == later_version(b, a) == later
    base = decode_manifest(json.dumps(doc(format_version=a)).encode())
    new = apply_changes(base, ChangeSet(), base.revision + 1, TS, WRITER)
    assert new.format_version == later_version(a, FORMAT_VERSION)


def test_major_zero_is_no_version() -> None:
    with pytest.raises(UnsupportedFormatError, match=r"0\.3 is not one .* start at 1\.0 \(VER-1\)"):
        decode_manifest(json.dumps(doc(format_version="0.3")).encode())


def test_a_major_too_long_for_an_int_is_newer_not_a_crash() -> None:
    with pytest.raises(UnsupportedFormatError, match="newer than this reader"):
        decode_manifest(json.dumps(doc(format_version="9" * 5000 + ".0")).encode())


def test_a_newer_major_version_is_refused() -> None:
    major = int(FORMAT_VERSION.split(".")[0]) + 1
    with pytest.raises(UnsupportedFormatError, match=r"format version 2\.0 is newer.*VER-2") as e:
        decode_manifest(json.dumps(doc(format_version=f"{major}.0", stages="any")).encode())
    assert "upgrade" in e.value.hint


@pytest.mark.parametrize(
    ("version", "error"),
    [*[(v, UnsupportedFormatError) for v in ("02.0", "2", "00.1")],
     *[(v, ManifestError) for v in ("1.01", "1", "01.0", "1.0 ")]],
)  # fmt: skip
def test_major_is_the_text_before_the_first_dot(version: str, error: type[Exception]) -> None:
    """VER-1: digits before the first `.` decide VER-1/VER-2; a malformed version of a
    supported MAJOR breaks the schema."""
    with pytest.raises(error):
        decode_manifest(json.dumps(doc(format_version=version)).encode())


def test_version_is_checked_before_required_features() -> None:
    """VER-2 then VER-3, both before the schema."""
    with pytest.raises(UnsupportedFormatError, match="VER-2"):
        decode_manifest(json.dumps(doc(format_version="2.0", required_features=["x"])).encode())
    with pytest.raises(UnsupportedFormatError, match="VER-3"):
        decode_manifest(json.dumps(doc(required_features=["x"], stages=1)).encode())


@pytest.mark.parametrize(
    "member",
    [r'"name": "\ud800x"', r'"name": "x\udfff"', '"counters": {"c": 1e400}',
     '"counters": {"c": -1e309}', '"counters": {"c": 2' + "0" * 308 + "}",
     '"counters": {"c": 1' + "0" * 5000 + "}"],
)  # fmt: skip
def test_strings_are_scalar_values_and_numbers_finite_doubles(member: str) -> None:
    """MAN-1, as REC-1 for records; never a crash on a number Python's int refuses."""
    before = json.dumps(doc())
    data = before.replace('"name": "eval"', member, 1).replace('"counters": {}', member, 1)
    assert data != before
    with pytest.raises(ManifestError, match="MAN-1"):
        decode_manifest(data.encode())


@pytest.mark.parametrize("stamp", ["0000-01-01T00:00:00Z", "10000-01-01T00:00:00Z"])
def test_timestamps_are_in_years_1_to_9999(stamp: str) -> None:
    """MAN-9."""
    with pytest.raises(ManifestError):
        decode_manifest(json.dumps(doc(finished_at=stamp, status="completed")).encode())


def test_an_unknown_required_feature_is_refused() -> None:
    with pytest.raises(UnsupportedFormatError, match=r"unknown features time-travel.*VER-3"):
        decode_manifest(json.dumps(doc(required_features=["time-travel"])).encode())
    with pytest.raises(UnsupportedFormatError, match="VER-3"):
        check_compatible("1.0", ["a", "b"])
    check_compatible("1.0", [])


BAD_MANIFESTS = [
    (b'{"a": 1, "a": 2}', "duplicate member 'a'"),
    (b"{\xff}", "not UTF-8"),
    (b'{"revision": NaN}', "NaN is not valid JSON"),
    (b"[1]", "not a JSON object|is not of type 'object'"),
    (json.dumps(doc(revision=0)).encode(), r"\$\.revision"),
    (json.dumps(doc(status="paused")).encode(), r"\$\.status"),
    (json.dumps(doc(run_id="Bad/Id")).encode(), r"\$\.run_id"),
    (json.dumps(doc(config_hash="md5:x")).encode(), r"\$\.config_hash"),
    (json.dumps(doc(counters={"c": "1"})).encode(), r"\$\.counters\.c"),
    # MAN-2, §11.2: integers are JSON integers, and a pattern's $ is the end of the string.
    (json.dumps(doc(revision=1.0)).encode(), r"\$\.revision: 1\.0 is not of type 'integer'"),
    (json.dumps(doc(revision=True)).encode(), r"\$\.revision: True is not of type 'integer'"),
    (json.dumps(doc(run_id="run-1\n")).encode(), r"\$\.run_id: 'run-1\\n' does not match"),
    (json.dumps(doc(tags={"suite\n": "x"})).encode(), r"\$\.tags: 'suite\\n' does not match"),
    (
        json.dumps({k: v for k, v in doc().items() if k != "stages"}).encode(),
        "'stages' is a required",
    ),
    *(
        (json.dumps({k: v for k, v in doc().items() if k != m}).encode(), f"'{m}' is a required")
        for m in ("error", "finished_at")
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_MANIFESTS)
def test_invalid_manifests_are_refused_with_the_rule(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        decode_manifest(data)


def stage_doc(name: str, paths: list[str]) -> dict[str, Any]:
    files = [{"path": p, "bytes": 10, "records": 1, "failures": 0, "sha256": SHA} for p in paths]
    return {
        "name": name,
        "status": "running",
        "record_schema_version": "1",
        "key_field": None,
        "files": files,
    }


def _counting(stage: dict[str, Any], records: int) -> dict[str, Any]:
    for f in stage["files"]:
        f["records"] = records
    return stage


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"stages": [stage_doc("a", []), stage_doc("a", [])]}, "duplicate stage 'a'.*MAN-4"),
        (
            {"stages": [stage_doc("a", ["stages/b/part-000001-w.jsonl.zst"])]},
            "not under stages/a/.*MAN-5",
        ),
        (
            {"stages": [stage_doc("a", ["stages/a/../../x/part-000001-w.jsonl.zst"])]},
            r"\$\.stages\[0\]\.files\[0\]\.path",
        ),
        ({"stages": [stage_doc("a", ["/etc/passwd"])]}, r"\$\.stages\[0\]\.files\[0\]\.path"),
        (
            {"stages": [_counting(stage_doc("a", ["stages/a/part-000001-w.jsonl.zst"]), 2**63)]},
            r"\$\.stages\[0\]\.files\[0\]\.records",
        ),
        (
            {
                "stages": [
                    _counting(
                        stage_doc("a", [f"stages/a/part-00000{i}-w.jsonl.zst" for i in (1, 2)]),
                        2**62,
                    )
                ]
            },
            r"files' records add up past 2\^63-1 \(MAN-5\)",
        ),
        ({"stages": [stage_doc("a", ["stages/a/part-000001-w.jsonl.zst"] * 2)]}, "collides.*MAN-7"),
        ({"counters": {"tokens": 2**70}}, r"\$\.counters\.tokens: .* \(COMMIT-5\)"),
        ({"counters": {"tokens": -(2**63)}}, r"\$\.counters\.tokens: .* \(COMMIT-5\)"),
        (
            {
                "artifacts": [
                    {
                        "path": "artifacts/../../etc/passwd",
                        "bytes": 1,
                        "sha256": SHA,
                        "media_type": "text/plain",
                    }
                ]
            },
            "bad segment '..'.*MAN-6",
        ),
        (
            {
                "artifacts": [
                    {
                        "path": "artifacts//abs",
                        "bytes": 1,
                        "sha256": SHA,
                        "media_type": "text/plain",
                    }
                ]
            },
            "MAN-6",
        ),
        (
            {
                "artifacts": [
                    {
                        "path": f"artifacts/{n}",
                        "bytes": 1,
                        "sha256": SHA,
                        "media_type": "text/plain",
                    }
                    for n in ("Plot.png", "plot.PNG")
                ]
            },
            "collides.*MAN-7",
        ),
        (
            {
                "artifacts": [
                    {
                        "path": "artifacts/report.txt",
                        "bytes": 1,
                        "sha256": SHA,
                        "media_type": "text/plain",
                        "parents": [{"artifact": "artifacts/../x"}],
                    }
                ]
            },
            r"\$\.artifacts\[0\]\.parents: .*bad segment '\.\.'.*\(LIN-1\)",
        ),
    ],
)
def test_manifest_rules_name_the_member_and_rule(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        decode_manifest(json.dumps(doc(**changes)).encode())


def test_every_problem_is_listed() -> None:
    with pytest.raises(ManifestError) as info:
        decode_manifest(json.dumps(doc(revision=0, status="paused", name="")).encode())
    for member in ("$.revision", "$.status", "$.name"):
        assert member in info.value.problem


# apply_changes: the merge every commit performs


@st.composite
def change_sequences(draw: st.DrawFn) -> list[tuple[str, ChangeSet]]:
    """Commits of several writers, each extending only its own files, in some interleaving."""
    writer_ids = draw(st.lists(writers, min_size=1, max_size=3, unique=True))
    sizes: dict[str, int] = {}
    out = []
    for _ in range(draw(st.integers(1, 8))):
        w = draw(st.sampled_from(writer_ids))
        stage = draw(st.sampled_from(["gen", "score"]))
        changes = ChangeSet(stages={stage: StageEntry(stage)})
        for _ in range(draw(st.integers(0, 2))):
            path = f"stages/{stage}/part-{draw(st.integers(1, 3)):06d}-{w}.jsonl.zst"
            sizes[path] = sizes.get(path, 0) + draw(st.integers(0, 1000))
            changes.files[path] = FileEntry(path, sizes[path], sizes[path] // 10, 0, SHA)
        changes.counters = draw(counters)
        out.append((w, changes))
    return out


@settings(max_examples=50)
@given(base_counters=counters, commits=change_sequences())
def test_merge_sums_counters_and_never_loses_a_file(
    base_counters: dict[str, float], commits: list[tuple[str, ChangeSet]]
) -> None:
    m = base_manifest(counters=base_counters)
    latest: dict[str, FileEntry] = {}
    for i, (_, changes) in enumerate(commits):
        m = apply_changes(m, changes, m.revision + 1, TS, WRITER)
        latest.update(changes.files)
        assert m.revision == i + 2
        listed = {f.path: f for s in m.stages for f in s.files}
        assert listed == latest
        assert all(f.path.startswith(f"stages/{s.name}/") for s in m.stages for f in s.files)
    for name in {*base_counters, *(k for _, c in commits for k in c.counters)}:
        expected = base_counters.get(name, 0) + sum(c.counters.get(name, 0) for _, c in commits)
        assert m.counters[name] == pytest.approx(expected)
    assert len({s.name for s in m.stages}) == len(m.stages)
    decode_manifest(encode_manifest(m))


def test_a_file_listed_longer_elsewhere_cannot_shrink() -> None:
    path = "stages/score/part-000001-w1.jsonl.zst"
    m = apply_changes(
        base_manifest(),
        ChangeSet(
            stages={"score": StageEntry("score")}, files={path: FileEntry(path, 100, 5, 0, SHA)}
        ),
        2,
        TS,
        WRITER,
    )
    with pytest.raises(ConflictError, match="lists more bytes"):
        apply_changes(m, ChangeSet(files={path: FileEntry(path, 50, 2, 0, SHA)}), 3, TS, WRITER)


def test_a_stage_redeclared_differently_is_a_conflict() -> None:
    m = apply_changes(
        base_manifest(), ChangeSet(stages={"s": StageEntry("s", key_field="id")}), 2, TS, WRITER
    )
    redeclared = ChangeSet(stages={"s": StageEntry("s", key_field="id")})
    assert apply_changes(m, redeclared, 3, TS, WRITER)
    other = ChangeSet(stages={"s": StageEntry("s", record_schema_version="2")})
    with pytest.raises(ConflictError, match="stage 's' is declared"):
        apply_changes(m, other, 3, TS, WRITER)


@pytest.mark.parametrize(
    ("status", "through", "expected"),
    [
        ("completed", None, ["completed", "failed", "completed", "completed", "running"]),
        ("completed", "c", ["completed", "failed", "completed", "running", "running"]),
        ("failed", None, ["running", "failed", "running", "running", "running"]),
    ],
)
def test_completing_marks_the_writers_running_stages_in_the_revisions_order(
    status: RunStatus, through: str | None, expected: list[str]
) -> None:
    """LIFE-5 against the base merged into: its order (base's stages, then new ones),
    running stages only, ``stage_status`` winning, none taken up by other writers."""
    base = base_manifest(
        stages=(
            StageEntry("a"),
            StageEntry("f", status="failed"),
            StageEntry("c"),
            StageEntry("other"),
        )
    )
    changes = ChangeSet(
        stages={"b": StageEntry("b"), "c": StageEntry("c")},
        status=status,
        completed_through_stage=through,
        stage_status={through: "completed"} if through else {},
        complete_running=frozenset({"a", "b", "c", "f"}),
    )
    merged = apply_changes(base, changes, 2, TS, WRITER)
    by_name = {s.name: s.status for s in merged.stages}
    assert [by_name[n] for n in ("a", "f", "c", "b", "other")] == expected
    assert [s.name for s in merged.stages] == ["a", "f", "c", "other", "b"]


def test_a_revision_names_the_software_that_committed_it() -> None:
    """§4: ``writer`` is the software that wrote the revision, not the one that created the run."""
    base = base_manifest(writer={"name": "another-implementation", "version": "9"})
    assert apply_changes(base, ChangeSet(tags={"k": "v"}), 2, TS, WRITER).writer == WRITER


def test_status_error_and_finish_time() -> None:
    later = "2026-11-22T21:00:00.000000Z"
    failed = apply_changes(
        base_manifest(), ChangeSet(status="failed", error="boom"), 2, later, WRITER
    )
    assert (failed.status, failed.error, failed.finished_at) == ("failed", "boom", later)
    tagged = apply_changes(failed, ChangeSet(tags={"k": "v"}), 3, TS, WRITER)
    assert (tagged.status, tagged.error, tagged.finished_at) == ("failed", "boom", later)
    resumed = apply_changes(failed, ChangeSet(status="running"), 3, TS, WRITER)
    assert (resumed.status, resumed.finished_at) == ("running", None)
    assert not ChangeSet()
    assert ChangeSet(counters={"c": 1})


def test_validated_bytes_are_remembered_safely_across_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes validated once are not validated again, in a bounded memory that threads share
    (its eviction raised 'dictionary changed size during iteration' under threads); an
    invalid manifest is never remembered as valid."""
    import sys
    import threading

    import runfmt.format.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "_VALID_KEPT", 16)
    monkeypatch.setattr(manifest_module, "_VALID", {})
    blobs = [encode_manifest(base_manifest(revision=n)) for n in range(1, 401)]
    bad = encode_manifest(base_manifest()).replace(b'"revision": 1', b'"revision": 0')
    failures: list[BaseException] = []

    def decode_all(offset: int) -> None:
        try:
            for data in blobs[offset:] + blobs[:offset]:
                decode_manifest(data)
                with pytest.raises(ManifestError):
                    decode_manifest(bad)
        except BaseException as exc:
            failures.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=decode_all, args=(i * 100,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []
    assert len(manifest_module._VALID) <= 16


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("2026-11-22T20:00:52Z", "2026-11-22T20:00:52.000000000Z", True),
        ("2026-11-22T20:00:52.5Z", "2026-11-22T20:00:52.500Z", True),
        ("2026-11-22T20:00:52.5021537Z", "2026-11-22T20:00:52.502153Z", False),
        ("2026-11-22T20:00:52.502153700Z", "2026-11-22T20:00:52.5021537Z", True),
        ("2026-11-22T20:00:52.000000001Z", "2026-11-22T20:00:52Z", False),
    ],
)
def test_same_instant_compares_timestamps_to_the_nanosecond(a: str, b: str, same: bool) -> None:
    """COMMIT-8: a header's run_created_at names the run's created_at as times, not text."""
    assert same_instant(a, b) is same
    assert same_instant(b, a) is same
