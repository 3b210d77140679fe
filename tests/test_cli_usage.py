"""CLI usage a user trips on: huge counts, a missing or mistyped store, global options after
the command, units, unchecked RUNs in JSON, lineage cuts, held locks, import and export
targets; through the real entry point, so exit codes, stderr and the absence of
tracebacks are what a user sees."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runfmt
from runfmt.errors import InvalidInputError
from runfmt.units import parse_size
from tests.test_cli import run_main


@pytest.fixture
def one_run(tmp_path: Path) -> tuple[Path, str]:
    """A store with one finished run: stage ``s`` keyed by ``key``, records a <- b <- c."""
    root = tmp_path / "runs"
    w = runfmt.Store(root).create_run("chain", run_id="chain", heartbeat_interval=None)
    w.stage("s", key_field="key")
    w.append("s", {"key": "a"})
    w.append("s", {"key": "b", "_parents": [{"stage": "s", "key": "a"}]})
    w.append("s", {"key": "c", "_parents": [{"stage": "s", "key": "b"}]})
    w.finish()
    return root, "chain"


HUGE = "999999999999999999999"


@pytest.mark.parametrize(
    "args",
    [["ls", "--limit", HUGE], ["status", "--limit", HUGE], ["cat", "chain", "s", "--limit", HUGE],
     ["report", "--limit", HUGE], ["gc", "--keep-last", HUGE]],
)  # fmt: skip
def test_a_huge_count_option_is_a_usage_error(
    one_run: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
) -> None:
    """SQLite holds at most 2**63 - 1: `ls --limit 10**21` was a traceback (OverflowError)."""
    root, _ = one_run
    code, out, err = run_main(["--store", str(root), *args], monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert f"{args[-2]}" in err
    assert "is too large: give at most 9223372036854775807" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "option"),
    [(["-s", "s3:/team/runs", "ls"], "--store"), (["sync", "SRC", "gs:/team/runs"], "DST"),
     (["sync", "s3:/team/runs", "DST"], "SRC"), (["sync", "SRC", "s3:team/runs"], "DST")],
)  # fmt: skip
def test_a_url_with_one_slash_is_bad_usage(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    option: str,
) -> None:
    """``s3:/team/runs`` names a local folder ``s3:``: refused, never written there."""
    monkeypatch.chdir(tmp_path)
    runfmt.Store(tmp_path / "SRC").create_run("a").finish()
    code, _, err = run_main(args, monkeypatch, capsys)
    assert code == 2
    assert f"Invalid value for {option}:" in err
    assert "URL missing a slash" in err
    assert "://team/runs" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SRC"]
    with pytest.raises(InvalidInputError, match="missing a slash"):
        runfmt.Store("s3:/team/runs")
    assert runfmt.Store(f"file:{tmp_path}/SRC").run_ids() != []


@pytest.mark.parametrize(
    ("url", "message"),
    [("bogus://x/runs", "unknown protocol 'bogus'"), ("file://", "names no folder or bucket"),
     ("memory:///", "names no folder or bucket"), ("S3://b/runs", "write s3://b/runs"),
     ("simplecache::s3://b/runs", "chains filesystems")],
)  # fmt: skip
def test_a_url_of_no_known_protocol_or_with_no_path_is_refused(url: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        runfmt.Store(url)


def test_status_lists_newest_first_by_creation_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ids need not sort by time (--run-id, open_or_create): `status` was in id order."""
    root = tmp_path / "runs"
    store = runfmt.Store(root)
    store.create_run("old", run_id="z-old", created_at="2020-01-01T00:00:00.000000Z").finish()
    store.create_run("mid", run_id="a-mid", created_at="2021-01-01T00:00:00.000000Z").finish()
    newest = store.create_run("new")
    newest.finish()
    code, out, _ = run_main(["--store", str(root), "status", "--json"], monkeypatch, capsys)
    assert code == 0
    assert [s["run_id"] for s in json.loads(out)] == [newest.run_id, "a-mid", "z-old"]
    code, out, _ = run_main(["--store", str(root), "status", "--limit", "1"], monkeypatch, capsys)
    assert code == 0
    assert out.startswith(f"{newest.run_id}  new  completed")
    assert len(out.splitlines()) == 1
    code, out, _ = run_main(["--store", str(root), "ls", "--json"], monkeypatch, capsys)
    assert [s["run_id"] for s in json.loads(out)] == [newest.run_id, "a-mid", "z-old"]


def test_a_missing_store_fails_the_commands_that_check_or_change_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --store must not pass `verify` in CI, nor read as an empty store to gc,
    `index rebuild` (which built an index in :memory:) or `cache get`."""
    typo = tmp_path / "typo"
    said = f"runfmt: error: {typo}: no such folder (check --store or RUNFMT_STORE)\n"
    for args in (["verify"], ["gc", "--keep-last", "0"], ["gc", "--keep-last", "0", "--yes"],
                 ["index", "rebuild"], ["cache", "get", "score", "k1:0"]):  # fmt: skip
        code, out, err = run_main(["--store", str(typo), *args], monkeypatch, capsys)
        assert (code, out, err) == (1, "", said), args
    code, out, err = run_main(["--store", str(typo), "verify", "--json"], monkeypatch, capsys)
    assert code == 1
    assert json.loads(out) == [
        {"run": None, "location": str(typo), "problem": "no such folder", "rule": None,
         "repairable": False}
    ]  # fmt: skip
    # a fresh machine's default ./runs does not exist yet: ls is an empty listing
    code, out, err = run_main(["--store", str(typo), "ls"], monkeypatch, capsys)
    assert (code, out, err) == (0, f"no runs in {typo}: no such folder\n", "")
    code, out, err = run_main(["--store", str(typo), "ls", "--json"], monkeypatch, capsys)
    assert (code, out, err) == (0, "[]\n", "")
    assert not typo.exists()


def test_verify_json_names_each_run_that_could_not_be_checked(
    one_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, run_id = one_run
    (root / "not-a-run").mkdir()
    code, out, err = run_main(
        ["--store", str(root), "verify", "nope", "--json"], monkeypatch, capsys
    )
    assert code == 1
    assert json.loads(out) == [
        {"run": "nope", "location": str(root), "rule": None, "repairable": False,
         "problem": "no run 'nope' (give a run id from `runfmt ls`, or the path of a run folder)"}
    ]  # fmt: skip
    assert err.startswith(f"runfmt: error: {root}: no run 'nope'")
    args = ["--store", str(root), "verify", "nope", run_id, str(root / "not-a-run"), "--json"]
    code, out, _ = run_main(args, monkeypatch, capsys)
    assert code == 1
    entries = json.loads(out)
    assert [(e["run"], e["rule"]) for e in entries] == [
        ("nope", None),
        (str(root / "not-a-run"), "LAYOUT-2"),
    ]
    assert entries[1]["location"] == str(root / "not-a-run")


def test_a_lineage_cut_at_max_depth_is_not_a_problem(
    one_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, run_id = one_run
    args = ["--store", str(root), "lineage", run_id, "s", "c", "--max-depth", "1"]
    code, out, err = run_main(args, monkeypatch, capsys)
    assert code == 0, err
    assert out == "s/c\n  s/b  ... (not followed: deeper than --max-depth 1)\n"
    assert err == "runfmt: note: 1 branch cut at --max-depth 1 (raise it to follow further)\n"
    code, out, err = run_main([*args, "--json"], monkeypatch, capsys)
    assert code == 0
    cut = json.loads(out)["parents"][0]
    assert (cut["key"], cut["problem"], cut["cut"]) == ("b", None, True)
    code, out, err = run_main([*args[:-2], "--max-depth", "3"], monkeypatch, capsys)
    assert (code, out) == (0, "s/c\n  s/b\n    s/a\n")
    assert err == ""


@pytest.mark.parametrize(
    ("args", "option"),
    [(["ls", "--store", "{root}"], "--store"), (["ls", "-s", "{root}"], "-s"),
     (["ls", "--store={root}"], "--store"), (["verify", "-o", "anon=true"], "-o"),
     (["index", "rebuild", "--storage-option", "k=v"], "--storage-option"),
     (["status", "--single-writer"], "--single-writer")],
)  # fmt: skip
def test_a_global_option_after_the_command_says_where_it_goes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    option: str,
) -> None:
    args = [a.replace("{root}", str(tmp_path)) for a in args]
    code, out, err = run_main(args, monkeypatch, capsys)
    assert (code, out) == (2, "")
    command = " ".join(args[: 2 if args[0] == "index" else 1])
    assert (
        f"Error: {option} is a global option: give it before the command "
        f"(runfmt {option} ... {command})\n"
    ) in err
    assert "Possible options" not in err
    code, _, err = run_main(["ls", "--nope"], monkeypatch, capsys)
    assert (code, "No such option: --nope" in err) == (2, True)


def test_import_of_a_folder_and_export_into_a_missing_folder_say_what_is_wrong(
    one_run: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, run_id = one_run
    code, out, err = run_main(["--store", str(root), "import", str(tmp_path)], monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert err == (
        f"runfmt: error: {tmp_path} is a folder: import takes a run archive (FILE.tar, "
        "FILE.tar.gz, FILE.tgz) or a stage file (FILE.jsonl.zst, FILE.jsonl); "
        "to copy a run folder into the store use `runfmt sync FOLDER STORE`\n"
    )
    odd = tmp_path / "runs.csv"
    odd.write_text("a,b\n")
    code, _, err = run_main(["--store", str(root), "import", str(odd)], monkeypatch, capsys)
    assert code == 1
    assert err.startswith(
        f"runfmt: error: {odd}: unknown stage file type: import takes a run archive (FILE.tar, "
    )
    missing = tmp_path / "nonexist" / "x.tar"
    args = ["--store", str(root), "export", run_id, str(missing)]
    code, out, err = run_main(args, monkeypatch, capsys)
    assert (code, out) == (1, "")
    assert err == (
        f"runfmt: error: {missing}: cannot write: No such file or directory (its folder "
        f"{missing.parent} does not exist)\n"
    )
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        args = ["--store", str(root), "export", run_id, str(readonly / "x.tar")]
        code, _, err = run_main(args, monkeypatch, capsys)
    finally:
        readonly.chmod(0o755)
    if code == 1:  # as root, the folder is writable anyway
        assert ".tmp-" not in err
        assert err.startswith(f"runfmt: error: {readonly / 'x.tar'}: cannot write")


def test_gc_max_size_needs_a_unit(
    one_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--max-size 10 --yes` meant 10 bytes: every run deleted."""
    root, run_id = one_run
    for size in ("10", "10 ", "1.5"):
        args = ["--store", str(root), "gc", "--max-size", size, "--yes"]
        code, out, err = run_main(args, monkeypatch, capsys)
        assert (code, out) == (2, ""), size
        assert f"size {size!r} has no unit" in err
        assert "10GB, 512MiB, 100B" in err
    assert (root / run_id).is_dir()
    code, out, _ = run_main(["--store", str(root), "gc", "--max-size", "10B"], monkeypatch, capsys)
    assert (code, out.startswith("would delete 1 run(s), ")) == (0, True)
    with pytest.raises(InvalidInputError, match="has no unit"):
        parse_size("10", unit_required=True)
    assert parse_size("2048") == 2048  # the library's default is unchanged
    assert parse_size("10b", unit_required=True) == 10
    with pytest.raises(InvalidInputError):
        parse_size("10i")  # was a ValueError from str.index


def test_demo_next_command_names_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "my runs"
    code, out, _ = run_main(["--store", str(root), "demo", "--items", "3"], monkeypatch, capsys)
    assert code == 0
    run_id = out.split()[2]
    assert out.splitlines()[-1] == f"next: runfmt -s '{root}' cat {run_id} score | head -3"
    url = str(tmp_path / "secret")
    args = ["-s", url, "-o", "secret_key=hunter2", "-o", "endpoint_url=http://x", "demo"]
    code, out, _ = run_main([*args, "--items", "3"], monkeypatch, capsys)
    assert code == 0
    run_id = out.split()[2]
    assert "hunter2" not in out
    assert out.splitlines()[-2:] == [
        f"next: runfmt -s {url} -o 'secret_key=***' -o endpoint_url=http://x cat {run_id} "
        "score | head -3",
        "(*** stands for the value you gave: secrets are not printed)",
    ]
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["demo", "--items", "3"], monkeypatch, capsys)
    assert code == 0
    assert out.splitlines()[-1].startswith("next: runfmt cat ")


def test_a_held_commit_lock_is_announced_and_its_timeout_says_what_to_do(
    one_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runfmt.cli import _runs
    from runfmt.locking import commit_lock

    root, run_id = one_run
    run = runfmt.Store(root).storage.child(run_id)
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with commit_lock(run, 5.0):
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait(5)
    threading.Timer(2.5, release.set).start()
    try:
        start = time.monotonic()
        code, out, err = run_main(["--store", str(root), "repair", run_id], monkeypatch, capsys)
    finally:
        release.set()
        holder.join()
    assert code == 0, err
    assert time.monotonic() - start >= 2.0
    assert err == (
        f"runfmt: waiting for the commit lock of {run_id}, held by another process "
        "(up to 60 s)...\n"
    )
    assert out.splitlines()[-1] == f"ok    {run_id}: consistent"

    monkeypatch.setattr(_runs, "REPAIR_LOCK_WAIT", 1.6)
    release.clear()
    taken.clear()
    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait(5)
    try:
        code, out, err = run_main(["--store", str(root), "repair", run_id], monkeypatch, capsys)
    finally:
        release.set()
        holder.join()
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith(f"runfmt: waiting for the commit lock of {run_id}")
    assert lines[1] == (
        f"runfmt: error: {run.path('.lock')}: another writer held the commit lock for over "
        "1.6 s (a live process is writing this run: let it finish or stop it, then run the "
        f"command again; `lsof {run.path('.lock')}` names it)"
    )
    assert "lock_timeout" not in err


@pytest.mark.parametrize("args", [["ls"], ["verify"], ["demo"], ["cache", "get", "s", "k"]])
def test_a_store_that_is_a_file_is_bad_usage(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "afile").write_text("hi")
    result = subprocess.run(
        [sys.executable, "-m", "runfmt", "--store", str(tmp_path / "afile"), *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "afile is a file, not a store folder" in result.stderr
    assert (tmp_path / "afile").read_text() == "hi"


def test_messages_name_what_the_user_can_give(
    one_run: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The names `cat --artifact` takes, `demo --seed`'s range, a missing `fork --config`."""
    root, run_id = one_run
    w = runfmt.Store(root).resume_run(run_id, heartbeat_interval=None)
    w.add_artifact("summary.json", b"{}")
    w.finish()
    code, _, err = run_main(["--store", str(root), "cat", run_id, "--artifact", "nope"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 1
    assert "(artifacts: summary.json)" in err
    seed = ["--store", str(root), "demo", "--seed", str(2**53)]
    code, _, err = run_main(seed, monkeypatch, capsys)
    assert code == 2
    assert "--seed" in err
    code, _, err = run_main(["--store", str(root), "fork", run_id, "s", "--config", "nope.json"],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 2
    assert "nope.json: cannot read the config: No such file or directory" in err
    assert run_main(["--store", str(root), "ls"], monkeypatch, capsys)[1].count("\n") == 2


@pytest.mark.parametrize(
    ("damage", "advice"),
    [("flip", "restore the damaged files from a copy of the run"),
     ("stray", "move away or delete the files no revision lists")],
)  # fmt: skip
def test_repair_says_what_to_do_about_what_it_leaves(
    one_run: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    advice: str,
) -> None:
    root, run_id = one_run
    if damage == "flip":
        [f] = (root / run_id / "stages" / "s").glob("*.jsonl.zst")
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01
        f.write_bytes(bytes(data))
    else:
        (root / run_id / "notes.txt").write_text("mine")
    code, _, err = run_main(["--store", str(root), "repair", run_id], monkeypatch, capsys)
    assert code == 1
    assert f"left after repair ({advice})" in err


@pytest.mark.parametrize(
    ("signum", "code", "said", "background"),
    [
        (signal.SIGINT, 130, "runfmt: interrupted", False),
        (signal.SIGTERM, 143, "runfmt: terminated", False),
        (signal.SIGTERM, 143, "runfmt: terminated", True),
    ],
)
def test_ctrl_c_and_sigterm_say_the_command_was_stopped(
    tmp_path: Path, signum: int, code: int, said: str, background: bool
) -> None:
    """Exit 130 (Ctrl-C) or 143 (SIGTERM: `timeout`, `docker stop`) with a line on stderr;
    the demo run it stopped is cancelled and verifies. So too in a script's background job
    (``cmd &``), which starts with Ctrl-C ignored."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "runfmt", "--store", str(runs), "demo", "--items", "100000"]
    if background:
        cmd = ["sh", "-c", 'trap \'\' INT; exec "$0" "$@"', *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(runs.glob("*/_manifests")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert said in err
    assert "Traceback" not in err
    [run] = runfmt.Store(runs).run_ids()
    assert runfmt.Store(runs).open_run(run).manifest.status == "cancelled"
