"""The cross-run cache: committed records by key, with provenance, from any run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import fsspec
import pytest
from typer.testing import CliRunner

from runfmt import _index_reading as reading
from runfmt import cache as cache_module
from runfmt.cache import Cache
from runfmt.cli import app, main
from runfmt.errors import InvalidInputError
from runfmt.format.keys import compute_key
from runfmt.store import Store

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "RACY_NS", 0)


def write_scores(
    store: Store, keys: list[str], *, version: str = "1", fail: tuple[str, ...] = ()
) -> str:
    with store.create_run("eval", {"keys": keys}) as writer:
        stage = writer.stage("score", key_field="key", record_schema_version=version)
        for key in keys:
            error = {"_error": "timeout"} if key in fail else {}
            stage.append({"key": key, "score": len(key), **error})
        writer.append("notes", {"key": keys[0], "text": "stage without a key field"})
    return writer.run_id


def test_get_returns_the_committed_record_with_provenance(store: Store) -> None:
    run_id = write_scores(store, ["a", "bb", "ccc"])
    hit = store.cache.get("score", "bb")
    assert hit is not None
    assert hit.record == {"key": "bb", "score": 2}
    p = hit.provenance
    assert (p.run_id, p.stage, p.record_schema_version, p.line) == (run_id, "score", "1", 1)
    assert p.path.startswith("stages/score/part-")
    assert Path(p.location).is_file()
    assert store.cache.lookup("score", "bb") == p
    assert store.cache.record("score", "bb") == {"key": "bb", "score": 2}


def test_misses(store: Store) -> None:
    write_scores(store, ["a", "b"], fail=("b",))
    assert store.cache.get("score", "zzz") is None
    assert store.cache.get("score", "b") is None, "a failure record is never a hit"
    assert store.cache.get("notes", "a") is None, "a stage without key field has no entries"
    assert store.cache.get("other", "a") is None


def test_contains_answers_many_keys_at_once(store: Store) -> None:
    write_scores(store, [f"k{i}" for i in range(100)], fail=("k7",))
    asked = [f"k{i}" for i in range(0, 200, 7)]
    assert store.cache.contains("score", asked) == {f"k{i}" for i in range(0, 100, 7)} - {"k7"}
    assert store.cache.contains("score", []) == set()
    with pytest.raises(InvalidInputError):
        store.cache.contains("score", [1])  # type: ignore[list-item]


def test_record_schema_version_must_match(store: Store) -> None:
    write_scores(store, ["a"], version="1")
    write_scores(store, ["b"], version="2")
    cache = store.cache
    assert cache.get("score", "a") is not None
    assert cache.get("score", "b") is None
    assert cache.get("score", "a", record_schema_version="2") is None
    assert cache.get("score", "b", record_schema_version="2") is not None
    assert cache.contains("score", ["a", "b"], record_schema_version=None) == {"a", "b"}


def test_newest_run_wins(store: Store) -> None:
    write_scores(store, ["a"])
    newer = write_scores(store, ["a", "b"])
    hit = store.cache.get("score", "a")
    assert hit is not None
    assert hit.provenance.run_id == newer


def test_only_committed_records_and_incremental_indexing(store: Store) -> None:
    writer = store.create_run("eval", {})
    stage = writer.stage("score", key_field="key")
    stage.extend({"key": f"k{i}"} for i in range(10))
    writer.flush()
    stage.append({"key": "pending"})
    cache = store.cache
    assert cache.get("score", "k3") is not None
    assert cache.get("score", "pending") is None, "buffered, not committed"

    writer.flush()
    stats = store.index.refresh()
    assert (stats.read, stats.cache_entries) == (1, 1), "only the new bytes are scanned"
    assert cache.get("score", "pending") is not None
    writer.finish()
    assert store.index.query("SELECT count(*) FROM cache") == [(11,)]


def test_deleted_or_rewritten_runs_stop_hitting(store: Store, tmp_path: Path) -> None:
    run_id = write_scores(store, ["a"])
    cache = store.cache
    assert cache.get("score", "a") is not None
    shutil.rmtree(Path(store.url) / run_id)
    assert cache.get("score", "a") is None, "the stale entry is checked and dropped"
    assert store.index.runs() == []


def test_a_hit_behind_more_stale_candidates_than_one_round_checks(store: Store) -> None:
    oldest = write_scores(store, ["a"])
    cache = store.cache
    assert cache.get("score", "a") is not None
    newer = [write_scores(store, ["a"]) for _ in range(cache_module._CANDIDATES + 3)]
    store.index.refresh()
    assert cache.get("score", "a").provenance.run_id == newer[-1]
    for run_id in newer:
        shutil.rmtree(Path(store.url) / run_id)
    hit = cache.get("score", "a")
    assert hit is not None
    assert hit.provenance.run_id == oldest
    assert [run.run_id for run in store.index.runs()] == [oldest]


@pytest.fixture(params=["local", "memory"])
def any_store(request: pytest.FixtureRequest) -> Store:
    """The local store, then the memory:// one."""
    found: Store = request.getfixturevalue("store" if request.param == "local" else "memory_store")
    return found


def count_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The (run id, frame start) of every frame the index reads from now on."""
    reads: list[tuple[str, int]] = []
    read_range = store.index.read_range

    def counted(run_id: str, path: str, start: int, end: int) -> bytes:
        reads.append((run_id, start))
        return read_range(run_id, path, start, end)

    monkeypatch.setattr(store.index, "read_range", counted)
    return reads


def remove_run(store: Store, run_id: str) -> None:
    if store.url.startswith("memory://"):
        fsspec.filesystem("memory").rm(f"{store.url}/{run_id}", recursive=True)
    else:
        shutil.rmtree(Path(store.url) / run_id)


def test_consecutive_gets_in_one_frame_read_it_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"k{i}" for i in range(50)]
    write_scores(store, keys)
    cache = store.cache
    cache.refresh()
    reads = count_reads(store, monkeypatch)
    assert [cache.record("score", k) for k in keys] == [{"key": k, "score": len(k)} for k in keys]
    assert len(reads) == 1


def test_a_get_finds_its_line_whatever_else_holds_the_key(store: Store) -> None:
    """The first get in a frame looks for the key's bytes: a line that holds them but is
    not the indexed one, or a key written with escapes, still gets the indexed line."""
    with store.create_run("eval") as writer:
        stage = writer.stage("score", key_field="key")
        stage.append({"key": "a", "ref": "b"})
        stage.append({"key": "b", "score": 1})
    assert Cache(store.index).record("score", "b") == {"key": "b", "score": 1}

    cache = Cache(store.index)
    content = b'{"ref":"c"}\n{"key":"\\u0063"}\n{"key":"d"}\n'
    for line, key in ((1, "c"), (0, "c"), (2, "d"), (1, "d")):
        kept = cache_module._Kept(content)
        where = cache_module.Provenance("r", "s", "p", "1", 0, 1, line, "")
        assert cache._line(kept, where, key) == content.split(b"\n")[line]
    kept = cache_module._Kept(content)
    assert cache._line(kept, where._replace(line=3), "d") is None, "no such line"


def test_only_the_last_few_frames_are_kept(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = cache_module._FRAMES
    runs = [write_scores(store, [f"r{i}"]) for i in range(kept + 1)]
    cache = store.cache
    cache.refresh()
    reads = count_reads(store, monkeypatch)
    for _ in range(2):
        assert all(cache.get("score", f"r{i}") for i in range(kept))
    assert [r for r, _ in reads] == runs[:kept], "the last frames are kept"
    for _ in range(2):
        assert all(cache.get("score", f"r{i}") for i in range(kept + 1))
    assert len(reads) == kept + 1 + (kept + 1), "cycling through one frame more reads each"


def test_a_kept_frame_whose_file_is_gone_is_not_served(any_store: Store) -> None:
    store = any_store
    older = write_scores(store, ["a", "b"])
    newer = write_scores(store, ["a"])
    cache = store.cache
    hit = cache.get("score", "a")
    assert hit is not None
    assert hit.provenance.run_id == newer
    remove_run(store, newer)
    hit = cache.get("score", "a")
    assert hit is not None
    assert hit.provenance.run_id == older, "the other run's record"
    assert [r.run_id for r in store.index.runs(refresh=False)] == [older], "re-indexed"
    remove_run(store, older)
    assert cache.get("score", "a") is None
    assert cache.get_many("score", ["a", "b"]) == {}


def test_a_kept_frame_of_a_truncated_file_is_not_served(store: Store) -> None:
    write_scores(store, ["a"])
    cache = store.cache
    hit = cache.get("score", "a")
    assert hit is not None
    with open(hit.provenance.location, "r+b") as f:
        f.truncate(hit.provenance.frame_end - 1)
    assert cache.get("score", "a") is None


def test_a_damaged_frame_is_skipped_with_a_warning(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame damaged after it was indexed: the get misses and says why, once per read."""
    write_scores(store, ["a"])
    where = store.cache.lookup("score", "a")
    assert where is not None
    data = bytearray(Path(where.location).read_bytes())
    data[where.frame_end - 2] ^= 1  # in the frame's checksum
    Path(where.location).write_bytes(bytes(data))
    assert Store(store.url).cache.get("score", "a") is None
    (warning,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warning.startswith(f"runfmt: {where.location}: the frame holding cached records")
    assert "runfmt verify" in warning


def test_get_many_is_get_for_each_key(any_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store = any_store
    older = write_scores(store, ["a", "b", "c", "f"], fail=("f",))
    newer = write_scores(store, ["b", "c", "g"], fail=("c",))
    keys = ["a", "b", "c", "f", "g", "zz", "a"]
    reads = count_reads(store, monkeypatch)
    many = Cache(store.index).get_many("score", iter(keys))
    assert sorted(run_id for run_id, _ in reads) == [older, newer], "each frame read once"
    assert many == {k: hit for k in keys if (hit := store.cache.get("score", k)) is not None}
    assert list(many) == ["a", "b", "c", "g"]
    runs = {k: hit.provenance.run_id for k, hit in many.items()}
    assert runs == {"a": older, "b": newer, "c": older, "g": newer}
    assert store.cache.get_many("score", keys, record_schema_version="2") == {}
    assert store.cache.get_many("score", []) == {}

    remove_run(store, newer)
    many = store.cache.get_many("score", keys)
    assert {k: hit.provenance.run_id for k, hit in many.items()} == {
        "a": older,
        "b": older,
        "c": older,
    }


@pytest.mark.parametrize("keys", [[1], ["a", None], [b"a"]])
def test_get_many_wants_string_keys(store: Store, keys: list[object]) -> None:
    write_scores(store, ["a"])
    with pytest.raises(InvalidInputError, match="cache keys must be strings"):
        store.cache.get_many("score", keys)  # type: ignore[arg-type]


def test_get_many_refuses_one_string_for_its_keys(store: Store) -> None:
    write_scores(store, ["a"])
    with pytest.raises(InvalidInputError, match="not one string"):
        store.cache.get_many("score", "ab")
    with pytest.raises(InvalidInputError, match="not one string"):
        store.cache.contains("score", "a")


@pytest.mark.parametrize(
    ("stage", "version", "message"),
    [(None, "1", "a stage name is a string"), (5, "1", "a stage name is a string"),
     ("score", 1, "record_schema_version is a string or None")],
)  # fmt: skip
def test_lookups_refuse_a_stage_or_version_of_another_type(
    store: Store, stage: object, version: object, message: str
) -> None:
    write_scores(store, ["a"])
    for lookup in (store.cache.get, store.cache.lookup, store.cache.record):
        with pytest.raises(InvalidInputError, match=message):
            lookup(stage, "a", record_schema_version=version)  # type: ignore[arg-type]
    for many in (store.cache.get_many, store.cache.contains):
        with pytest.raises(InvalidInputError, match=message):
            many(stage, ["a"], record_schema_version=version)  # type: ignore[arg-type]


def test_cli_cache_get(store: Store) -> None:
    key = compute_key({"question": 1})
    run_id = write_scores(store, [key])
    result = runner.invoke(app, ["--store", store.url, "cache", "get", "score", key, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["record"] == {"key": key, "score": len(key)}
    assert doc["provenance"]["run_id"] == run_id

    result = runner.invoke(app, ["--store", store.url, "cache", "get", "score", key])
    assert run_id in result.stdout
    assert '"score"' in result.stdout

    result = runner.invoke(
        app, ["--store", store.url, "cache", "get", "score", key, "--record-schema-version", "9"]
    )
    assert result.exit_code == 1


def test_cli_cache_miss_exits_1(
    store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_scores(store, ["a"])
    monkeypatch.setattr(sys, "argv", ["runfmt", "--store", store.url, "cache", "get", "score", "x"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no committed record with key 'x' in stage 'score'" in err
    assert "keyed stages" not in err

    monkeypatch.setattr(sys, "argv", ["runfmt", "--store", store.url, "cache", "get", "scroe", "a"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no run the index could read has a keyed stage 'scroe' (keyed stages: 'score';" in err

    argv = ["runfmt", "--store", store.url, "cache", "get", "score", "a"]
    monkeypatch.setattr(sys, "argv", [*argv, "--record-schema-version", "2"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert (
        "no committed record with key 'a' in stage 'score' of record schema version '2'; "
        "one of version '1' exists (drop --record-schema-version)"
    ) in capsys.readouterr().err


def test_demo_twice_reuses_the_first_runs_results(store: Store) -> None:
    first = runner.invoke(app, ["--store", store.url, "demo", "--items", "40"])
    assert first.exit_code == 0, first.output
    assert "reused 0 of" in first.stdout
    second = runner.invoke(app, ["--store", store.url, "demo", "--items", "40"])
    assert second.exit_code == 0, second.output
    line = next(x for x in second.stdout.splitlines() if x.startswith("reused "))
    reused, total = int(line.split()[1]), int(line.split()[3])
    assert 0 < reused < total, "everything but the failures is reused"

    runs = store.index.runs()
    assert len(runs) == 2
    assert [s.records for s in runs[0].stages] == [s.records for s in runs[1].stages]


def test_a_key_value_that_breaks_rec_6_is_no_key(store: Store) -> None:
    """REC-6: a non-conforming writer's "" (or over 1,024 characters) is no key: the cache
    never returns it, and verify reports it."""
    from runfmt.check import verify_run
    from runfmt.storage import Storage

    case = Path(__file__).parent / "conformance" / "invalid" / "record-key-empty" / "run"
    run_id = json.loads((case / "manifest.json").read_text())["run_id"]
    shutil.copytree(case, Path(store.url) / run_id)
    assert store.cache.get("generate", "k1:q1") is not None
    assert store.cache.get("generate", "") is None
    assert store.cache.contains("generate", ["", "k1:q1"]) == {"k1:q1"}
    [problem] = verify_run(Storage(str(Path(store.url) / run_id)))
    assert (problem.rule, problem.location.rsplit(":", 1)[1]) == ("REC-6", "2")
