"""Misuse of the API gets an `InvalidInputError` at the call that names what was wrong and
where, and writes nothing; paths and folders that hold no run are told apart."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runfmt.errors import InvalidInputError, RunNotFoundError, StorageError
from runfmt.store import Store, open_run
from tests.test_cli import run_main

QUIET: dict[str, Any] = {"flush_every": None, "flush_interval": None, "heartbeat_interval": None}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"flush_evry": 5}, "unknown writer option 'flush_evry'"),
        ({"flush_every": 0}, "flush_every must be"),
        ({"flush_every": "10"}, "flush_every must be"),
        ({"flush_interval": -1}, "flush_interval must be"),
        ({"flush_interval": "5"}, "flush_interval must be"),
        ({"lock_timeout": -1}, "lock_timeout must be"),
        ({"compression_level": 23}, "compression_level must be"),
        ({"heartbeat_interval": 1000}, "heartbeat_interval must be"),
        ({"until_stage": "Bad Name"}, "stage name"),
    ],
)
def test_bad_writer_options_are_refused_before_a_run_is_made(
    store: Store, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        store.create_run("x", **options)
    assert store.run_ids() == []
    with store.create_run("src", **QUIET) as w:
        w.stage("a").complete()
    with pytest.raises(InvalidInputError, match=message):
        store.fork_run(w.run_id, "a", **options)
    assert store.run_ids() == [w.run_id]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.create_run("x", [1, 2]), "config must be a mapping"),
        (lambda s: s.create_run("x", tags=["a"]), "tags must be a mapping"),
        (lambda s: s.index.runs(tags="a=b"), "tags must be a mapping"),
        (lambda s: s.index.runs(limit=-1), "limit must be"),
        (lambda s: s.index.runs(limit="5"), "limit must be"),
        (lambda s: s.cache.get("score", 5), "a cache key is a string"),
        (lambda s: Store(s.url, storage_options="x"), "storage_options must be a mapping"),
        (lambda s: Store(123), "a store is a path or URL"),
    ],
)
def test_arguments_of_the_wrong_type_are_refused_at_the_call(
    store: Store, call: Any, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        call(store)
    assert store.run_ids() == []


def test_a_limit_beyond_sqlite_integers_means_no_limit(store: Store) -> None:
    with store.create_run("x", **QUIET):
        pass
    assert len(store.index.runs(limit=10**30)) == 1


def test_stage_declarations_of_the_wrong_type_are_refused(store: Store) -> None:
    with store.create_run("x", **QUIET) as w:
        with pytest.raises(InvalidInputError, match="key_field must be a string"):
            w.stage("a", key_field=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="record_schema_version must be a string"):
            w.stage("b", record_schema_version=2)  # type: ignore[arg-type]
        w.stage("c").append({"k": 1})
    assert [s.name for s in store.open_run(w.run_id).manifest.stages] == ["c"]


def test_a_closed_writer_refuses_counts_tags_and_stages(store: Store) -> None:
    w = store.create_run("x", **QUIET)
    w.finish()
    for call in (lambda: w.count("c"), lambda: w.tag(a="b"), lambda: w.stage("late")):
        with pytest.raises(InvalidInputError, match="this writer is closed"):
            call()
    manifest = store.open_run(w.run_id).manifest
    assert (manifest.counters, manifest.tags, manifest.stages) == ({}, {}, ())


def test_an_integer_counter_beyond_64_bits_is_refused_at_the_call(store: Store) -> None:
    """COMMIT-5: the writer is not wedged, the run commits and finishes."""
    with store.create_run("x", **QUIET) as w:
        w.count("big", 2**62)
        with pytest.raises(InvalidInputError, match=r"'big' would reach .* beyond a 64-bit") as e:
            w.count("big", 2**62)
        assert e.value.location == w.storage.where()
        w.count("big", 2**62 - 1)
        w.append("s", {"i": 0})
    run = store.open_run(w.run_id)
    assert (run.manifest.status, run.manifest.counters) == ("completed", {"big": 2**63 - 1})


def test_record_errors_name_the_stage_and_the_member(store: Store) -> None:
    with store.create_run("x", **QUIET) as w:
        with pytest.raises(InvalidInputError, match=r"member 'a\.b\[1\]' is NaN") as e:
            w.append("score", {"a": {"b": [1, float("nan")]}})
        assert e.value.location == w.storage.where("stages/score")
        with pytest.raises(InvalidInputError, match="member 'when' is not JSON-serializable") as e:
            w.extend("score", [{"ok": 1}, {"when": object()}])
        assert e.value.hint
        assert e.value.location == w.storage.where("stages/score")
    assert list(store.open_run(w.run_id).records("score")) == [{"ok": 1}]


def test_keys_of_a_stage_without_a_key_field_is_an_error(store: Store) -> None:
    with store.create_run("x", **QUIET) as w:
        w.append("plain", {"id": "a"})
        w.stage("keyed", key_field="id").extend([{"id": "a"}, {"id": "b", "_error": 1}])
    reader = store.open_run(w.run_id)
    assert reader.keys("keyed") == {"a"}
    with pytest.raises(InvalidInputError, match="has no key field"):
        reader.keys("plain")
    assert reader.keys("judge") == set()  # not declared yet: nothing done
    with pytest.raises(InvalidInputError, match="NAME-2"):
        reader.keys("Not A Stage")


def test_what_a_run_path_names_is_told_apart(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By a store and by `runfmt.open_run`, which has none."""
    with store.create_run("x", **QUIET) as w:
        w.append("s", {"a": 1})
    run_dir = Path(store.url) / w.run_id
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / "no-revision" / "_manifests").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for given, message in [
        (run_dir / "manifest.json", f"is a file, not a run folder.*holds it: {run_dir}"),
        (run_dir / "_manifests" / "00000002.json", f"holds it: {run_dir}"),
        (run_dir / "stages", f"not a run: .*holds it: {run_dir}"),
        (next((run_dir / "stages" / "s").iterdir()), f"is a file, .*holds it: {run_dir}"),
        (tmp_path / "notes.txt", r"is a file, not a run folder \(give .*the path of a run"),
        ("notes.txt", r"is a file, not a run folder"),
        (Path(store.url), "is a store, not a run folder"),
        (tmp_path / "empty", r"not a run: no revision and no manifest.json \(LAYOUT-2\)"),
        (tmp_path / "no-revision", r"not a run: no revision and no manifest.json \(LAYOUT-2\)"),
    ]:
        for open_it in (store.open_run, open_run):
            with pytest.raises(RunNotFoundError, match=message):
                open_it(given)
    for open_it in (store.open_run, open_run):
        with pytest.raises(RunNotFoundError, match="no such folder") as missing:
            open_it(tmp_path / "gone")
        assert missing.value.location == str(tmp_path / "gone")
    with pytest.raises(RunNotFoundError, match="no run 'nope'"):
        store.open_run("nope")
    for open_it in (store.open_run, open_run):
        with pytest.raises(InvalidInputError, match="not NoneType"):
            open_it(None)  # type: ignore[arg-type]


def test_a_store_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(InvalidInputError, match="is a file, not a store folder"):
        Store(tmp_path / "afile")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:hunter2@127.0.0.1:1/runs",
        "http://user:hunter2@127.0.0.1:1/runs",  # the backend's root holds the scheme
        "s3://AKIAX:hunter2@bkt/runs",  # boto quotes the bucket name without its "://"
    ],
)
def test_a_password_in_a_store_url_is_never_shown(url: str) -> None:
    with pytest.raises(StorageError) as e:
        Store(url, {"endpoint_url": "http://127.0.0.1:1"} if url[:2] == "s3" else None).run_ids()
    assert "hunter2" not in f"{e.value} {e.value.location}"
    assert ":<redacted>@" in str(e.value)
    assert "://" not in str(e.value).replace("://", "", 1).split(":<redacted>")[0]


@pytest.mark.parametrize("options", [{"client_kwargs": 5}, {"config_kwargs": "x"}, {"bogus": 1}])
def test_a_storage_option_the_backend_refuses_is_a_storage_error(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Backends raise AttributeError or TypeError for such options: no traceback."""
    store = Store("s3://bkt/runs", {"endpoint_url": "http://127.0.0.1:1", **options})
    with pytest.raises(StorageError) as e:
        store.run_ids()
    assert "storage option" in e.value.hint
    code, _, err = run_main(["-s", "s3://bkt/runs", "-o", "endpoint_url=http://127.0.0.1:1",
                             *(f"-o{k}={v}" for k, v in options.items()), "ls"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 1
    assert err.startswith("runfmt: error: s3://bkt/runs: ")
    assert "Traceback" not in err


def test_a_password_in_a_store_url_is_not_in_its_repr() -> None:
    store = Store("memory://user:hunter2@host/runs")
    assert "hunter2" not in repr(store) + repr(store.storage) + store.storage.where("a")


def test_a_damaged_index_is_rebuilt(store: Store) -> None:
    """A runfmt index file missing a table or a column is rebuilt with a warning."""
    with store.create_run("x", **QUIET) as w:
        w.stage("s", key_field="k").append({"k": "a"})
    index_file = Path(store.url) / ".runfmt" / "index.sqlite"
    for damage in ("DROP TABLE runs", "ALTER TABLE cache DROP COLUMN line"):
        store.index.runs()
        store.index.close()
        with sqlite3.connect(index_file) as con:
            con.execute(damage)
        fresh = Store(store.url)
        assert fresh.cache.get("s", "a") is not None, damage
        assert [r.run_id for r in fresh.index.runs()] == [w.run_id]
        fresh.index.close()


def _as_unprivileged() -> list[str]:
    """A command prefix that runs without root's power to read any file."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to test permissions as root")
    caps = "-dac_override,-dac_read_search,-fowner"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_a_run_folder_that_cannot_be_read_is_listed_as_unreadable(store: Store) -> None:
    """ls lists it; status shows it and exits 1; verify of the store checks the other runs
    and names it as not checked; nothing calls it gone."""
    with store.create_run("x", **QUIET) as w:
        pass
    with store.create_run("y", **QUIET) as other:
        pass
    run_dir = Path(store.url) / w.run_id
    run_dir.chmod(0)
    try:
        cli = [*_as_unprivileged(), sys.executable, "-m", "runfmt", "--store", store.url]

        def runfmt(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run([*cli, *args], capture_output=True, text=True, check=False)
            assert "Traceback" not in done.stderr
            return done

        ls = runfmt("ls", "--json")
        listed = {r["run_id"]: r for r in json.loads(ls.stdout)}
        assert (ls.returncode, listed[w.run_id]["status"]) == (0, "unreadable")
        assert "permission denied" in listed[w.run_id]["problem"]
        show = runfmt("show", w.run_id)
        assert show.returncode == 1
        assert "permission denied" in show.stderr
        status = runfmt("status", "--json")
        health = {r["run_id"]: r["health"] for r in json.loads(status.stdout)}
        assert status.returncode == 1
        assert health == {w.run_id: "unreadable", other.run_id: "completed"}
        assert runfmt("status", "--status", "unreadable", "--limit", "0").returncode == 1
        verify = runfmt("verify")
        assert verify.returncode == 1
        assert f"ok    {other.run_id}" in verify.stdout
        assert "1 could not be checked" in verify.stdout
        assert "Permission denied" in verify.stderr
        [entry] = json.loads(runfmt("verify", "--json").stdout)
        assert (entry["run"], entry["repairable"]) == (w.run_id, False)
    finally:
        run_dir.chmod(0o755)
