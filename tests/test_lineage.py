"""Lineage: records (``_parents``) and artifacts (``parents``) name what they were made
from; the API and `runfmt lineage` walk it, reporting dangling parents and cycles."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from runfmt.cli import app
from runfmt.errors import InvalidInputError
from runfmt.format.lineage import Parent, parse_parents
from runfmt.lineage import MAX_DEPTH, artifact_lineage, lineage
from runfmt.store import Store


def rec(stage: str, key: str) -> dict[str, str]:
    return {"stage": stage, "key": key}


@pytest.fixture
def run_id(store: Store) -> str:
    """generate <- parse <- score, an artifact parent, a dangling parent and a cycle."""
    w = store.create_run("lin", run_id="lin", heartbeat_interval=None)
    for stage in ("generate", "parse", "score"):
        w.stage(stage, key_field="key")
    w.add_artifact("prompt.txt", b"Q: ...")
    w.append("generate", {"key": "a", "_error": "timeout"})
    w.append(
        "generate", {"key": "a", "text": "4", "_parents": [{"artifact": "artifacts/prompt.txt"}]}
    )
    w.append("parse", {"key": "a", "value": 4, "_parents": [rec("generate", "a")]})
    w.append("score", {"key": "a", "_parents": [rec("parse", "a"), rec("generate", "a")]})
    w.append("score", {"key": "dangling", "_parents": [rec("parse", "zz"), rec("nostage", "a")]})
    w.append("score", {"key": "c1", "_parents": [rec("score", "c2")]})
    w.append("score", {"key": "c2", "_parents": [rec("score", "c1")]})
    w.add_artifact("plot.png", b"\x89PNG", parents=[rec("score", "a")])
    w.finish()
    return "lin"


def refs(node: Any) -> list[str]:
    return [str(n.ref) for n in node.walk()]


def test_lineage_walks_records_and_artifacts(store: Store, run_id: str) -> None:
    """LIN-2 resolution; LIN-3: a reference reached twice is expanded once."""
    root = lineage(store.open_run(run_id), "score", "a")
    assert refs(root) == [
        "score/a", "parse/a", "generate/a", "artifacts/prompt.txt", "generate/a",
    ]  # fmt: skip
    assert root.problems() == []
    generate = root.parents[0].parents[0]
    assert generate.record == {
        "key": "a", "text": "4", "_parents": [{"artifact": "artifacts/prompt.txt"}]
    }, "the last non-failure record with the key is the parent"  # fmt: skip
    assert root.parents[1].repeated
    assert root.parents[1].parents == []
    assert generate.parents[0].artifact is not None
    assert generate.parents[0].artifact.media_type == "text/plain"


def test_dangling_parents_are_reported_on_their_node(store: Store, run_id: str) -> None:
    problems = lineage(store.open_run(run_id), "score", "dangling").problems()
    assert problems == [
        "parse/zz: dangling: no committed record with this key",
        "nostage/a: dangling: the run has no stage 'nostage'",
    ]


def test_cycles_are_reported_and_not_followed(store: Store, run_id: str) -> None:
    root = lineage(store.open_run(run_id), "score", "c1")
    assert root.problems() == ["score/c1: cycle: score/c1 -> score/c2 -> score/c1"]


def test_artifact_lineage(store: Store, run_id: str) -> None:
    root = artifact_lineage(store.open_run(run_id), "plot.png")
    assert refs(root)[:3] == ["artifacts/plot.png", "score/a", "parse/a"]
    assert store.open_run(run_id).artifact("plot.png").parents == (rec("score", "a"),)


def test_max_depth_stops_the_walk(store: Store, run_id: str) -> None:
    root = lineage(store.open_run(run_id), "score", "a", max_depth=1)
    cut = root.parents[0]
    assert (cut.cut, cut.problem, cut.parents) == (True, None, [])
    assert root.problems() == []
    assert root.to_json()["parents"][0]["cut"] is True
    assert root.to_json()["parents"][0]["record"] is None
    for depth in (0, -1, 1.5, True):
        with pytest.raises(
            InvalidInputError, match=f"max_depth must be a whole number >= 1, not {depth!r}"
        ):
            lineage(store.open_run(run_id), "score", "a", max_depth=depth)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="max_depth"):
            artifact_lineage(store.open_run(run_id), "plot.png", max_depth=depth)  # type: ignore[arg-type]


def test_a_chain_deeper_than_the_walk_goes_is_cut_and_shown(store: Store) -> None:
    """A chain of 150 parents is followed MAX_DEPTH deep, printed and written as JSON; a
    deeper walk is bad input."""
    with store.create_run("chain", heartbeat_interval=None) as w:
        w.stage("step", key_field="id")
        w.append("step", {"id": "s0"})
        for i in range(1, 150):
            w.append("step", {"id": f"s{i}", "_parents": [{"stage": "step", "key": f"s{i - 1}"}]})
    root = lineage(store.open_run(w.run_id), "step", "s149")
    [cut] = [n for n in root.walk() if n.cut]
    assert cut.ref.key == f"s{149 - MAX_DEPTH}"
    with pytest.raises(InvalidInputError, match=f"at most {MAX_DEPTH}"):
        lineage(store.open_run(w.run_id), "step", "s149", max_depth=MAX_DEPTH + 1)
    runner = CliRunner()
    for args in ([], ["--json"]):
        result = runner.invoke(app, ["--store", store.url, "lineage", w.run_id, "step", "s149",
                                     *args])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert (
            "cut at --max-depth 100 (walk on from a cut record: runfmt lineage RUN step "
            f"s{149 - MAX_DEPTH})" in result.stderr
        )
    too_deep = ["--store", store.url, "lineage", w.run_id, "step", "s149", "--max-depth", "101"]
    assert runner.invoke(app, too_deep).exit_code == 2


def test_json_nodes_of_records_always_carry_a_record(store: Store, run_id: str) -> None:
    """A record node has a ``record`` member, null when dangling; an artifact node none."""
    doc = lineage(store.open_run(run_id), "score", "dangling").to_json()
    assert [p["record"] for p in doc["parents"]] == [None, None]
    assert doc["record"]["key"] == "dangling"
    art = artifact_lineage(store.open_run(run_id), "plot.png").to_json()
    assert "record" not in art
    assert art["parents"][0]["record"]["key"] == "a"


def test_unknown_root_is_an_error(store: Store, run_id: str) -> None:
    reader = store.open_run(run_id)
    with pytest.raises(InvalidInputError, match="no committed record with key 'zz'"):
        lineage(reader, "score", "zz")
    with pytest.raises(InvalidInputError, match="no stage 'judge'"):
        lineage(reader, "judge", "a")
    with pytest.raises(InvalidInputError, match="no artifact"):
        artifact_lineage(reader, "missing.bin")


def test_stage_without_key_field(store: Store) -> None:
    w = store.create_run("lin", run_id="nokey", heartbeat_interval=None)
    w.stage("score", key_field="key")
    w.append("raw", {"v": 1})
    w.append("score", {"key": "a", "_parents": [rec("raw", "x")]})
    w.finish()
    reader = store.open_run("nokey")
    assert lineage(reader, "score", "a").problems() == [
        "raw/x: dangling: stage 'raw' has no key field"
    ]
    with pytest.raises(InvalidInputError, match="no key field"):
        lineage(reader, "raw", "x")


@pytest.mark.parametrize(
    ("parents", "message"),
    [
        ({"stage": "a", "key": "b"}, "must be a list"),
        ([{"stage": "a"}], "not a parent reference"),
        ([{"stage": "a", "key": "b", "extra": 1}], "not a parent reference"),
        ([{"stage": "Bad", "key": "b"}], "NAME-2"),
        ([{"stage": "a", "key": ""}], "non-empty string"),
        ([{"stage": "a", "key": 3}], "non-empty string"),
        ([{"artifact": "elsewhere/x"}], "not under artifacts/"),
        ([{"artifact": "artifacts/../x"}], "NAME-5"),
        (["score/a"], "not a parent reference"),
        ([rec("a", "b")] * 10_001, "at most 10000"),
    ],
)
def test_malformed_parents_are_refused_at_write_time(
    store: Store, parents: Any, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_parents(parents)
    w = store.create_run("lin", heartbeat_interval=None)
    w.append("score", {"key": "ok"})
    with pytest.raises(InvalidInputError, match=message):
        w.append("score", {"key": "bad", "_parents": parents})
    with pytest.raises(InvalidInputError, match=message):
        w.add_artifact("x.bin", b"x", parents=parents)
    m = w.finish()
    assert (m.stage("score").records, m.artifacts) == (1, ())  # type: ignore[union-attr]


def test_malformed_parents_in_stored_records_are_reported(store: Store) -> None:
    w = store.create_run("lin", run_id="raw", heartbeat_interval=None)
    stage = w.stage("score", key_field="key")
    stage._chunks.append(b'{"key":"a","_parents":"parse/a"}\n')
    stage._records += 1
    w.finish()
    root = lineage(store.open_run("raw"), "score", "a")
    assert root.problems() == ["score/a: malformed parents: _parents must be a list, not str"]


def test_parent_repr() -> None:
    assert str(Parent(stage="s", key="k")) == "s/k"
    assert str(Parent(artifact="artifacts/x")) == "artifacts/x"


def test_lineage_cli(store: Store, run_id: str) -> None:
    ok = CliRunner().invoke(app, ["--store", store.url, "lineage", run_id, "score", "a"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.splitlines()[:3] == ["score/a", "  parse/a", "    generate/a"]
    assert "artifacts/prompt.txt  (text/plain, 6 bytes)" in ok.output
    as_json = CliRunner().invoke(
        app, ["--store", store.url, "lineage", run_id, "score", "a", "--json"]
    )
    doc = json.loads(as_json.output)
    assert (doc["stage"], doc["key"], doc["parents"][0]["stage"]) == ("score", "a", "parse")
    bad = CliRunner().invoke(app, ["--store", store.url, "lineage", run_id, "score", "c1"])
    assert bad.exit_code == 1
    assert "cycle: score/c1 -> score/c2 -> score/c1" in bad.output


def test_the_demo_records_their_lineage(store: Store) -> None:
    """Every scored item of the demo walks back to its parse and its generation."""
    from runfmt.demo import write_demo_run

    reader = store.open_run(write_demo_run(store).run_id)
    for record in reader.records("score"):
        node = lineage(reader, "score", record["key"])
        [parse] = node.parents
        [generate] = parse.parents
        assert (parse.ref.stage, generate.ref.stage) == ("parse", "generate")
        assert parse.record is not None
        assert generate.record is not None
        assert generate.record["item_id"] == record["item_id"]
        assert not node.problems()
