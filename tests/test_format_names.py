"""The name grammar (NAME-1..5): one table of accepted and refused names per kind."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runfmt.errors import InvalidInputError
from runfmt.format import names

RUN_IDS = {
    "20261122-205300123-0a1b2c3d": True,
    "a": True,
    "my-run.v2_final": True,
    "0": True,
    "a" * 100: True,
    "a" * 101: False,
    "": False,
    "Run1": False,
    "-run": False,
    "run-": False,
    "run.": False,
    ".hidden": False,
    "a/b": False,
    "a:b": False,
    "a b": False,
    "..": False,
    "run\n": False,
    "é": False,
    "con": False,
    "aux.1": False,
    "lpt9.v2": False,
    "con1": True,
    "my.aux": True,
    "nul-x": True,
    "com0": True,
}

STAGE_NAMES = {
    "score": True,
    "s": True,
    "generate_v2": True,
    "parse-json": True,
    "s" + "x" * 63: True,
    "s" + "x" * 64: False,
    "": False,
    "Score": False,
    "2score": False,
    "_score": False,
    "sco.re": False,
    "sco/re": False,
    "sco:re": False,
    "score ": False,
    "aux": False,
    "nul": False,
    "com1": False,
    "auxiliary": True,
    "aux_metrics": True,
}

WRITER_IDS = {
    "0a1b2c3d": True,
    "w": True,
    "x" * 32: True,
    "x" * 33: False,
    "": False,
    "A1": False,
    "a-b": False,
}

ARTIFACT_NAMES = {
    "model.bin": True,
    "plots/loss.png": True,
    "a/b/c/d.txt": True,
    "README": True,
    "x_": True,
    "": False,
    "/abs": False,
    "../escape": False,
    "a/../b": False,
    "a//b": False,
    "a/./b": False,
    ".hidden": False,
    "dir/": False,
    "c:x": False,
    "a\\b": False,
    "con": False,
    "CON.txt": False,
    "lpt1.log": False,
    "plots/Aux.png": False,
    "aux/x": False,
    "aux2.log": True,
    "x.con": True,
    "trailing.": False,
    "\u212aelvin.txt": False,  # KELVIN SIGN, which case-folds to k
    "long\u017f.txt": False,  # LONG S, which case-folds to s
    "\u0130ndex.md": False,
    "new\nline": False,
    "a" * 201: False,
}

CASES: list[tuple[Callable[[object], str], dict[str, bool], str]] = [
    (names.validate_run_id, RUN_IDS, "NAME-1"),
    (names.validate_stage_name, STAGE_NAMES, "NAME-2"),
    (names.validate_writer_id, WRITER_IDS, "NAME-3"),
    (names.validate_artifact_name, ARTIFACT_NAMES, "NAME-5"),
]


@pytest.mark.parametrize(
    ("validate", "value", "ok", "rule"),
    [(v, value, ok, rule) for v, table, rule in CASES for value, ok in table.items()],
    ids=lambda x: repr(x)[:30] if isinstance(x, str | bool) else getattr(x, "__name__", None),
)
def test_name_grammar(validate: Callable[[object], str], value: str, ok: bool, rule: str) -> None:
    if ok:
        assert validate(value) == value
        return
    with pytest.raises(InvalidInputError) as info:
        validate(value)
    assert repr(value)[:20] in str(info.value) or len(value) > 100
    assert rule in str(info.value)


@pytest.mark.parametrize("value", [None, 3, b"run", ["a"]])
def test_non_strings_are_refused(value: object) -> None:
    for validate, _, _ in CASES:
        with pytest.raises(InvalidInputError):
            validate(value)


def test_is_run_id_agrees_with_validate() -> None:
    for value, ok in RUN_IDS.items():
        assert names.is_run_id(value) is ok


STAGE_PATHS = {
    "stages/score/part-000001-0a1b2c3d.jsonl.zst": ("score", 1, "0a1b2c3d"),
    "stages/s/part-1234567-w.jsonl.zst": ("s", 1234567, "w"),
    "stages/score/part-00001-0a1b2c3d.jsonl.zst": None,
    "stages/score/part-000000-0a1b2c3d.jsonl.zst": None,
    "stages/score/part-0000000-0a1b2c3d.jsonl.zst": None,
    "stages/Score/part-000001-0a1b2c3d.jsonl.zst": None,
    "stages/score/part-000001-0A1B.jsonl.zst": None,
    "stages/score/part-000001-0a1b2c3d.jsonl": None,
    "stages/score/sub/part-000001-w.jsonl.zst": None,
    "stages/../part-000001-w.jsonl.zst": None,
    "other/score/part-000001-w.jsonl.zst": None,
    "score/part-000001-w.jsonl.zst": None,
}


@pytest.mark.parametrize(("path", "expected"), STAGE_PATHS.items())
def test_parse_stage_file(path: str, expected: tuple[str, int, str] | None) -> None:
    if expected is None:
        with pytest.raises(InvalidInputError, match="NAME-"):
            names.parse_stage_file(path)
        return
    stage, parsed = names.parse_stage_file(path)
    assert (stage, parsed.seq, parsed.writer) == expected


@settings(max_examples=50)
@given(
    stage=st.from_regex(r"\A[a-z][a-z0-9_-]{0,63}\Z"),
    seq=st.integers(min_value=1, max_value=10**9),
    writer=st.from_regex(r"\A[a-z0-9]{1,32}\Z"),
)
def test_stage_file_format_parse_round_trip(stage: str, seq: int, writer: str) -> None:
    path = names.format_stage_file(stage, seq, writer)
    assert names.parse_stage_file(path) == (stage, names.StageFileName(seq, writer))


def test_a_runs_stage_files_are_numbered_from_1() -> None:
    with pytest.raises(InvalidInputError, match="NAME-4"):
        names.format_stage_file("score", 0, "w")


@given(
    created=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(9999, 1, 1)),
    entropy=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_generated_run_ids_are_valid(created: datetime, entropy: int) -> None:
    assert names.is_run_id(names.format_run_id(created.replace(tzinfo=UTC), entropy))


def test_run_ids_sort_by_creation_time() -> None:
    times = [datetime(2026, 1, 1, 0, 0, 0, ms * 1000, tzinfo=UTC) for ms in (1, 10, 999)]
    times.append(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    ids = [names.format_run_id(t, 0xFFFFFFFF - i) for i, t in enumerate(times)]
    assert sorted(ids) == ids


@pytest.mark.parametrize(
    ("name", "revision"),
    [
        ("00000001.json", 1),
        ("123456789.json", 123456789),
        ("00000000.json", None),
        ("0000001.json", None),
        (".tmp-00000001.json", None),
        ("00000001.json.bak", None),
        ("0000000\u0661.json", None),
        ("+0000001.json", None),
        ("0000 001.json", None),
        ("00000001.JSON", None),
    ],
)
def test_revision_files(name: str, revision: int | None) -> None:
    assert names.parse_revision_file(name) == revision
    if revision is not None and len(name) == 13:
        assert names.revision_file(revision) == f"_manifests/{name}"


def test_revision_zero_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        names.revision_file(0)
