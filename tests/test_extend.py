"""`StageWriter.extend` (encodes a batch at once) behaves exactly like `append` per record."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runfmt.errors import InvalidInputError
from runfmt.format.records import encode_many, encode_record
from runfmt.run import RunWriter
from runfmt.store import Store

odd_scalars = st.sampled_from(
    ["null", "},{", "}\n{", '"_parents":', math.nan, math.inf, -0.0, 1e308, uuid.UUID(int=1)]
)
odd_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats()
    | st.text(max_size=6)
    | odd_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
records_with_oddities = st.dictionaries(
    st.text(max_size=4) | st.sampled_from(["null", "},{"]), odd_values, max_size=5
)

TRICKY: list[dict[str, Any]] = [
    {"key": "a", "score": 0.5, "error": None},
    {"key": "b", "text": "null or nullable", "n": None},
    {"key": None, "nested": {"x": None, "y": [None, 1.5, -0.0]}},
    {"key": "c", "_error": "timeout", "tokens": 12},
    {"key": "d", "_error": None, "ok": True},
    {"unkeyed": 1},
]


def _write(store: Store, how: str, records: list[dict[str, Any]], **options: Any) -> RunWriter:
    writer = store.create_run("extend", **options)
    stage = writer.stage("s", key_field="key")
    if how == "append":
        for record in records:
            stage.append(record)
    else:
        stage.extend(records)
    return writer


@pytest.mark.parametrize("flush_every", [None, 7, 1000])
def test_extend_commits_what_append_commits(store: Store, flush_every: int | None) -> None:
    records = [dict(r, i=i) for i in range(10) for r in TRICKY]
    manifests = []
    for how in ("append", "extend"):
        writer = _write(store, how, records, flush_every=flush_every, flush_interval=None)
        writer.close()
        reader = store.open_run(writer.run_id)
        assert list(reader.records("s")) == records
        manifests.append(reader.manifest)
    files = [[(f.records, f.failures) for f in m.stages[0].files] for m in manifests]
    assert files[0] == files[1]
    assert manifests[0].revision == manifests[1].revision


@pytest.mark.parametrize(
    "bad",
    [
        {"key": "x", "v": math.nan},
        {"key": "x", "v": None, "w": [math.inf]},
        {"key": ""},
        {"key": 7},
        {"key": "k" * 1025},
        {1: "non-string member name"},
        {"key": "x", "_parents": "not a list of references"},
        {"key": "x", "blob": "b" * (64 << 20)},
        ["not", "an", "object"],
    ],
)
def test_a_bad_record_in_extend_keeps_those_before_it(store: Store, bad: Any) -> None:
    """The error names the bad record's position in what extend was given, across the
    batches extend cuts at flushes."""
    writer = store.create_run("extend", flush_every=2, flush_interval=None)
    stage = writer.stage("s", key_field="key")
    good = [{"key": f"ok{i}"} for i in range(3)]
    with pytest.raises(InvalidInputError) as refused:
        stage.extend([*good, bad, {"key": "never"}])
    assert refused.value.problem.startswith("record 3 given to extend (counted from 0; ")
    assert stage.pending == 1
    writer.close()
    assert [r["key"] for r in store.open_run(writer.run_id).records("s")] == [
        "ok0",
        "ok1",
        "ok2",
    ]


def test_records_before_a_failing_iterable_are_kept(store: Store) -> None:
    def records() -> Iterator[dict[str, Any]]:
        yield {"i": 0}
        yield {"i": 1}
        raise RuntimeError("source failed")

    writer = store.create_run("extend", flush_every=None, flush_interval=None)
    stage = writer.stage("s")
    with pytest.raises(RuntimeError, match="source failed"):
        stage.extend(records())
    assert stage.pending == 2


def test_encode_many_matches_encode_record_or_declines() -> None:
    assert encode_many(TRICKY, "key") == b"".join(encode_record(r, "key") for r in TRICKY)
    assert encode_many([{"a": 1}, {"a": math.nan}]) is None
    assert encode_many([{"a": None, "u": uuid.uuid4()}]) is None
    assert encode_many([{"a": 1}, {"b": [None, math.inf]}]) is None
    assert encode_many([{"a": 1.5, "b": -math.inf}]) is None
    assert encode_many([]) is None
    huge = [{"a": 1e308}, {"a": 1e308, "b": -1e308}]  # their sum overflows: checked one by one
    assert encode_many(huge) == b"".join(map(encode_record, huge))


@pytest.mark.parametrize(
    "batch",
    [
        [{"a": "},{"}, {"b": 1}],  # a record boundary's bytes inside a string
        [{"a": [{"x": 1}, {"y": 2}]}, {"b": 2}],  # and between two objects in an array
        [{"}},{{": 1}, {}],
        [{}, {}, {}],
        [{"s": "null", "f": 1.5}, {"f": -0.0, "n": None}],  # "null" that is no None
        [{"f": 2.5, "n": None, "t": "x"}, {"f": 1e300 * 10, "n": None}],
        [{"f": math.nan, "s": "null"}],
    ],
)
def test_encode_many_splits_lines_only_at_record_boundaries(batch: list[dict[str, Any]]) -> None:
    lines = encode_many(batch)
    if any(isinstance(v, float) and not math.isfinite(v) for r in batch for v in r.values()):
        assert lines is None
    else:
        assert lines == b"".join(map(encode_record, batch))


@settings(max_examples=200)
@given(st.lists(records_with_oddities, min_size=1, max_size=6))
def test_encode_many_is_encode_record_or_none(batch: list[dict[str, Any]]) -> None:
    """Never a line `encode_record` would not write, never a record it would refuse."""
    lines = encode_many(batch)
    try:
        expected = b"".join(map(encode_record, batch))
    except InvalidInputError:
        assert lines is None
        return
    assert lines in (None, expected)
    if all(type(v) in (str, int, bool, type(None)) for r in batch for v in r.values()):
        assert lines == expected  # flat records without floats never take the slow path


def test_frames_are_cut_after_the_line_reaching_the_target(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines from `append` and `extend` share frames; each frame ends at a line."""
    monkeypatch.setattr("runfmt.run.FRAME_TARGET", 100)
    writer = store.create_run("frames", flush_every=None, flush_interval=None)
    stage = writer.stage("s")
    stage.append({"i": -1, "pad": "x" * 40})
    stage.extend([{"i": i, "pad": "y" * (i % 50)} for i in range(40)])
    stage.append({"i": 99})
    writer.close()
    run = store.open_run(writer.run_id)
    assert [r["i"] for r in run.records("s")] == [-1, *range(40), 99]
    frames = [[len(encode_record(r)) for r in batch] for batch in run.record_batches("s")]
    assert len(frames) > 5
    for i, sizes in enumerate(frames):
        assert sum(sizes[:-1]) < 100
        assert sum(sizes) >= 100 or i == len(frames) - 1
