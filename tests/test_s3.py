"""runfmt on an S3 API server: create-only commits, many writer processes, options and secrets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import register_implementation
from typer.testing import CliRunner

from runfmt.check import verify_run
from runfmt.cli import app
from runfmt.errors import InvalidInputError, ReadOnlyError, StorageError
from runfmt.format import names
from runfmt.storage import Storage
from runfmt.store import Store
from runfmt.sync import sync
from tests.fixtures_s3 import cli_options
from tests.test_cli import run_main

SECRET = "s3cr3t-value-never-shown"


def test_create_exclusive_has_one_winner_per_race(s3_url: str, s3_options: dict[str, Any]) -> None:
    storage = Storage(s3_url, s3_options)
    for race in range(30):
        wins: list[int] = []
        barrier = threading.Barrier(4)

        def attempt(
            k: int, race: int = race, wins: list[int] = wins, barrier: threading.Barrier = barrier
        ) -> None:
            barrier.wait()
            if storage.create_exclusive(f"race/{race:03d}.json", str(k).encode()):
                wins.append(k)

        threads = [threading.Thread(target=attempt, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert storage.read(f"race/{race:03d}.json") == str(wins[0]).encode()


_WORKER = textwrap.dedent(
    """
    import json, sys
    from runfmt.run import RunWriter, load_manifest
    from runfmt.store import Store
    url, run_id, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run = Store(url, json.loads(sys.argv[4])).locate(run_id)
    writer = RunWriter(run, load_manifest(run), flush_every=None, flush_interval=None)
    for step in range(4):
        writer.extend("work", [{"worker": worker, "step": step, "n": n} for n in range(10)])
        writer.flush()
    writer.close()
    """
)


def test_writer_processes_appending_to_one_run_lose_no_commit(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    store = Store(s3_url, s3_options)
    first = store.create_run("array-job", {"workers": 4})
    first.close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, s3_url, first.run_id, str(k), json.dumps(s3_options)]
        )
        for k in range(3)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    reader = store.open_run(first.run_id)
    got = sorted((r["worker"], r["step"], r["n"]) for r in reader.records("work"))
    assert got == [(w, s, n) for w in range(3) for s in range(4) for n in range(10)]
    assert len(reader.stage("work").files) == 12
    assert verify_run(reader.storage) == []


def test_errors_never_show_secrets_or_endpoint() -> None:
    options = {
        "endpoint_url": "http://127.0.0.1:9/private-endpoint",
        "key": "runfmt-key-id-shown-nowhere",
        "secret": SECRET,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    storage = Storage("s3://bucket/prefix", options)
    with pytest.raises(StorageError) as caught:
        storage.read("manifest.json")
    text = str(caught.value)
    assert "private-endpoint" not in text
    assert SECRET not in text
    assert caught.value.__cause__ is None or SECRET not in str(caught.value.__cause__)


def test_cli_errors_never_show_secrets(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "runfmt",
            "-s", "s3://bucket/prefix",
            "-o", "endpoint_url=http://127.0.0.1:9/private-endpoint",
            "-o", f"secret={SECRET}",
            "-o", "key=runfmt-key-id-shown-nowhere",
            "-o", 'config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1}',
            "show", "20260101-000000000-00000000",
        ],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "runfmt: error:" in result.stderr
    for shown in (result.stdout, result.stderr):
        assert SECRET not in shown
        assert "private-endpoint" not in shown
        assert "runfmt-key-id-shown-nowhere" not in shown
    assert not any(
        SECRET in p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file()
    )


class _ClientError(Exception):
    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class _CompatFS(MemoryFileSystem):
    """An S3-compatible server as s3fs reports it: a 412 without the condition named is a
    plain OSError, and a first conditional write meets a concurrent one (409)."""

    protocol = "s3compat"
    root_marker = "/"
    conflicts = 1

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        if mode == "create" and _CompatFS.conflicts:
            _CompatFS.conflicts -= 1
            raise OSError(5, "conflict") from _ClientError("ConditionalRequestConflict", 409)
        if mode == "create" and self.exists(path):
            raise OSError(22, "pre-condition failed") from _ClientError("PreconditionFailed", 412)
        super().pipe_file(path, value, **kw)


register_implementation("s3compat", _CompatFS, clobber=True)


def test_refused_create_only_puts_count_as_lost_races() -> None:
    storage = Storage("s3compat://races", single_writer=True)
    assert storage.create_exclusive("a.json", b"1") is False
    assert storage.create_exclusive("a.json", b"1") is True
    assert storage.create_exclusive("a.json", b"2") is False
    assert storage.read("a.json") == b"1"


class _NoCreateFS(MemoryFileSystem):
    """A backend whose create-only write is a check-then-write (like fsspec's generic one)."""

    protocol = "nocreate"
    root_marker = "/"


register_implementation("nocreate", _NoCreateFS, clobber=True)


def test_backend_without_exclusive_create_needs_single_writer() -> None:
    with pytest.raises(ReadOnlyError, match="COMMIT-10") as caught:
        Store("nocreate://refused").create_run("x")
    assert "single_writer" in caught.value.hint
    with Store("nocreate://allowed", single_writer=True).create_run("x") as writer:
        writer.append("gen", {"n": 1})
    reader = Store("nocreate://allowed").open_run(writer.run_id)
    assert list(reader.records("gen")) == [{"n": 1}]

    runner = CliRunner()
    refused = runner.invoke(app, ["-s", "nocreate://cli", "demo"])
    assert refused.exit_code != 0
    allowed = runner.invoke(app, ["-s", "nocreate://cli", "--single-writer", "demo"])
    assert allowed.exit_code == 0, allowed.output


def _cli(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "runfmt", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_commands_work_on_a_bucket(
    s3_url: str, s3_env: dict[str, str], s3_options: dict[str, Any], tmp_path: Path
) -> None:
    env = {**s3_env, "RUNFMT_STORE": s3_url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    _cli(env, "demo")
    listed = json.loads(_cli(env, "ls", "--json").stdout)
    assert len(listed) == 1
    run_id = listed[0]["run_id"]
    runner = CliRunner()
    opts = cli_options(s3_options)

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, ["-s", s3_url, *opts, *args])
        assert result.exit_code == code, result.output
        return result.stdout

    assert run_id in invoke("show", run_id)
    reader = Store(s3_url, s3_options).open_run(run_id)
    stage = reader.manifest.stages[0].name
    lines = invoke("cat", run_id, stage).splitlines()
    assert [json.loads(line) for line in lines] == list(reader.records(stage))
    invoke("verify", run_id)
    reader.storage.delete(names.MANIFEST_FILE)
    invoke("verify", run_id, code=1)
    invoke("repair", run_id)
    invoke("verify", run_id)
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert written, "the index of a remote store lives in the user cache directory"
    for secret in (s3_env["AWS_SECRET_ACCESS_KEY"], s3_env["FSSPEC_S3_ENDPOINT_URL"]):
        assert not any(secret.encode() in data for data in written)


def test_reading_from_a_bucket_fetches_only_what_it_needs(
    s3_url: str, s3_options: dict[str, Any], s3_requests: Callable[[], list[str]]
) -> None:
    store = Store(s3_url, s3_options)
    with store.create_run("read-me") as writer:
        for stage in ("generate", "score"):
            writer.extend(stage, [{"i": i, "stage": stage} for i in range(50)])
    reader = store.open_run(writer.run_id)
    runner = CliRunner()
    opts = cli_options(s3_options)
    served = s3_requests()
    assert runner.invoke(app, ["-s", s3_url, *opts, "show", writer.run_id]).exit_code == 0
    assert not [r for r in s3_requests()[len(served) :] if "/stages/" in r]
    served = s3_requests()
    result = runner.invoke(app, ["-s", s3_url, *opts, "cat", writer.run_id, "score"])
    assert len(result.stdout.splitlines()) == 50
    fetched = [r for r in s3_requests()[len(served) :] if "/stages/" in r]
    assert fetched
    assert all("/stages/score/" in r for r in fetched)
    assert len(fetched) <= 2 * len(reader.stage("score").files)


def test_a_walk_leaves_no_listing_behind_for_exists_to_trust(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    """s3fs's find() fills its listing cache; another client's delete must still show."""
    storage = Storage(s3_url, s3_options)
    storage.put("run/stages/a.bin", b"x")
    assert storage.walk("run") == {"stages/a.bin": 1}
    other = Storage(s3_url, {**s3_options, "skip_instance_cache": True})
    assert other.fs is not storage.fs
    other.delete("run/stages/a.bin")
    assert not storage.exists("run/stages/a.bin")
    assert storage.size("run/stages/a.bin") is None


def test_ls_tells_a_missing_bucket_from_an_empty_store(
    s3_url: str, s3_options: dict[str, Any]
) -> None:
    opts = cli_options(s3_options)
    for url, said in (
        (
            "s3://no-such-bucket-runfmt/runs",
            "no runs in s3://no-such-bucket-runfmt/runs: no such bucket\n",
        ),
        (f"{s3_url}/empty", f"no runs in {s3_url}/empty\n"),
    ):
        result = CliRunner().invoke(app, ["-s", url, *opts, "ls"])
        assert (result.exit_code, result.stdout) == (0, said)


def test_an_unreachable_endpoint_is_no_missing_bucket(
    s3_url: str,
    s3_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only a bucket the service says is not there is "no such bucket": a failure to ask
    (no connection, an error, refused credentials) is said as it is."""
    assert Storage("s3://no-such-bucket-runfmt/runs", s3_options).missing() == "bucket"
    assert Storage(f"{s3_url}/empty", s3_options).missing() is None
    down = {**s3_options, "endpoint_url": "http://127.0.0.1:1",
            "config_kwargs": {"retries": {"max_attempts": 1}}}  # fmt: skip
    with pytest.raises(StorageError) as failed:
        Storage(s3_url, down).missing()
    assert "no such bucket" not in str(failed.value)
    opts = cli_options(down)
    for command in (["verify"], ["gc", "--keep-last", "1"], ["index", "rebuild"]):
        code, _, err = run_main(["-s", s3_url, *opts, *command], monkeypatch, capsys)
        assert code == 1, command
        assert "no such bucket" not in err, (command, err)
        assert "connect" in err.lower(), (command, err)


def test_a_run_folder_in_a_bucket_is_no_store_to_write_to(
    s3_url: str,
    s3_options: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """LAYOUT-2: runs created in a run folder (or a folder inside one) would land in that run;
    on a bucket it is found before a run is created, and a writing command says bad usage."""
    with Store(s3_url, s3_options).create_run("r") as writer:
        writer.append("gen", {"i": 1})
    folder = f"{s3_url}/{writer.run_id}"
    for inside in (folder, f"{folder}/stages/gen"):
        with pytest.raises(InvalidInputError, match=f"run folder {folder}, not a store|is a run"):
            Store(inside, s3_options).create_run("other")
    opts = cli_options(s3_options)
    for command in (["demo"], ["fork", writer.run_id, "gen"]):
        code, _, err = run_main(["-s", folder, *opts, *command], monkeypatch, capsys)
        assert code == 2, (command, err)
        assert "is a run folder, not a store" in err
    assert verify_run(Storage(folder, s3_options)) == []
    assert Store(s3_url, s3_options).run_ids() == [writer.run_id]


def test_folder_markers_in_a_bucket_are_no_files(s3_url: str, s3_options: dict[str, Any]) -> None:
    """STORE-3: zero-byte keys ending in "/" (the AWS console's "Create folder", some sync
    tools) are folders to every S3 browser: a run holding them verifies and reads."""
    store = Store(s3_url, s3_options)
    with store.create_run("marked") as w:
        w.append("score", {"i": 1})
        w.add_artifact("a.txt", b"a")
    root = store.locate(w.run_id).path()
    for folder in ("", "_manifests/", "artifacts/", "stages/", "stages/score/"):
        store.storage.fs.pipe_file(f"{root}/{folder}", b"")
    assert verify_run(store.locate(w.run_id)) == []
    assert [r["i"] for r in store.open_run(w.run_id).records("score")] == [1]


def test_writing_to_a_missing_bucket_names_it(
    s3_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store("s3://no-such-bucket-runfmt/runs", s3_options)
    with pytest.raises(StorageError, match="no such bucket 'no-such-bucket-runfmt'") as e:
        store.create_run("x")
    assert "create it first" in e.value.hint
    opts = cli_options(s3_options)
    code, _, err = run_main(["-s", "s3://no-such-bucket-runfmt/runs", *opts, "demo"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 1
    assert "no such bucket 'no-such-bucket-runfmt'" in err


def test_sync_into_a_missing_bucket_says_so_once(
    s3_options: dict[str, Any], tmp_path: Path
) -> None:
    src = Store(tmp_path / "src")
    src.create_run("a").finish()
    with pytest.raises(StorageError, match="the destination's bucket does not exist") as e:
        sync(src.url, "s3://no-such-bucket-runfmt/runs", dst_options=s3_options)
    assert e.value.location == "s3://no-such-bucket-runfmt/runs"


def test_a_run_url_read_from_a_local_store_takes_its_storage_options(
    s3_url: str,
    s3_options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`runfmt -o endpoint_url=... show s3://bucket/runs/RUN` with the default local store:
    the options are for that URL (not silently dropped, which would reach another
    endpoint), as they are for sync."""
    with Store(s3_url, s3_options).create_run("remote") as w:
        w.append("score", {"i": 1})
    url = f"{s3_url}/{w.run_id}"
    reader = Store(tmp_path / "runs", s3_options).open_run(url)
    assert [r["i"] for r in reader.records("score")] == [1]
    opts = cli_options(s3_options)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main([*opts, "show", url], monkeypatch, capsys)
    assert code == 0, err
    assert w.run_id in out


def test_a_destination_inside_a_run_in_a_bucket_is_refused(
    s3_url: str, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    """SYNC-1 on an object store: a prefix inside a run folder is no store."""
    with Store(s3_url, s3_options).create_run("host") as host:
        host.append("score", {"i": 1})
    local = Store(tmp_path / "src")
    with local.create_run("mine") as w:
        w.append("score", {"i": 2})
    for inside in ("", "/artifacts", "/stages/score"):
        with pytest.raises(InvalidInputError, match="run folder"):
            sync(f"{local.url}/{w.run_id}", f"{s3_url}/{host.run_id}{inside}",
                 dst_options=s3_options)  # fmt: skip
    assert verify_run(Store(s3_url, s3_options).locate(host.run_id)) == []
