"""`StageWriter.extend` (encodes a batch at once) behaves exactly like `append` per record."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from runfmt.errors import InvalidInputError
from runfmt.format.records import encode_many, encode_record
from runfmt.run import RunWriter
from runfmt.store import Store

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
    writer = store.create_run("extend", flush_every=None, flush_interval=None)
    stage = writer.stage("s", key_field="key")
    with pytest.raises(InvalidInputError):
        stage.extend([{"key": "ok1"}, {"key": "ok2"}, bad, {"key": "never"}])
    assert stage.pending == 2
    writer.close()
    assert [r["key"] for r in store.open_run(writer.run_id).records("s")] == ["ok1", "ok2"]


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
    assert encode_many(TRICKY, "key") == [encode_record(r, "key") for r in TRICKY]
    assert encode_many([{"a": 1}, {"a": math.nan}]) is None
    assert encode_many([{"a": None, "u": uuid.uuid4()}]) is None
    assert encode_many([{"a": 1}, {"b": [None, math.inf]}]) is None
