"""The run commands of the CLI: demo, show, cat, verify, repair, schema.

Success paths go through typer's CliRunner; exit codes, stderr messages and the
absence of tracebacks go through the real entry point (`main`, in-process or as
``python -m runfmt``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import pytest
import typer.main
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

import runfmt
from runfmt import check
from runfmt.check import verify_run
from runfmt.cli import _app_for, app, main, print_json
from runfmt.demo import STAGES, DemoResult, write_demo_run
from runfmt.format.frames import FrameEncoder
from runfmt.format.schemas import SCHEMA_NAMES, load_schema

RUN_COMMANDS = ("demo", "show", "cat", "verify", "repair", "schema")
SHOW_FIELDS = {
    "run_id", "name", "location", "status", "error", "revision", "format_version",
    "created_at", "updated_at", "finished_at", "config", "config_hash", "tags", "counters",
    "stages", "artifacts", "totals", "writer", "health", "completed_through_stage",
    "heartbeat_at", "forked_from", "forked_at_stage",
}  # fmt: skip


def invoke(store: Path | str, *args: str) -> Result:
    return CliRunner().invoke(app, ["--store", str(store), *args])


def run_main(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run the real entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.delenv("RUNFMT_STORE", raising=False)
    monkeypatch.setattr(sys, "argv", ["runfmt", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return code if isinstance(code, int) else 1, out, err


def python_m(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runfmt", *args],
        cwd=cwd,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RUNFMT_STORE"},
    )


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoResult]:
    """A store holding one demo run; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("demo") / "runs"
    return root, write_demo_run(runfmt.Store(root))


@pytest.fixture
def copied(demo_store: tuple[Path, DemoResult], tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the demo store, and the id of its run."""
    root, result = demo_store
    shutil.copytree(root, tmp_path / "runs")
    return tmp_path / "runs", result.run_id


# help


def test_every_command_module_is_loaded() -> None:
    import runfmt.cli

    modules = {p.stem for p in Path(runfmt.cli.__file__).parent.glob("_*.py")} - {"__init__"}
    assert modules == set(runfmt.cli._AREAS)


def test_command_annotations_are_not_strings() -> None:
    """typer evaluates string annotations for each command it builds (slow start-up)."""
    apps = [app, *(g.typer_instance for g in app.registered_groups if g.typer_instance)]
    callbacks = [c.callback for a in apps for c in a.registered_commands]
    assert len(callbacks) > 15
    for callback in [app.registered_callback.callback, *callbacks]:  # type: ignore[union-attr]
        assert callback is not None
        hints = inspect.get_annotations(callback)
        assert not [k for k, v in hints.items() if isinstance(v, str)], callback


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--version"], monkeypatch, capsys) == (0, f"runfmt {runfmt.__version__}\n", "")


def test_a_run_folder_given_as_store_is_bad_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`runfmt -s runs/RUN ls` would list nothing and put an index inside the run."""
    store = runfmt.Store(tmp_path / "runs")
    run = store.create_run("r")
    run.finish()
    folder = str(tmp_path / "runs" / run.run_id)
    for command in (["ls"], ["status"], ["verify"], ["show", folder]):
        code, _, err = run_main(["--store", folder, *command], monkeypatch, capsys)
        assert code == 2, command
        assert "is a run folder, not a store" in err
    assert run_main(["--store", folder, "ls", "--help"], monkeypatch, capsys)[0] == 0
    assert not (tmp_path / "runs" / run.run_id / ".runfmt").exists()
    code, _, err = run_main(["--store", f"{folder}/stages", "ls"], monkeypatch, capsys)
    assert code == 2
    assert f"is inside the run {folder}, not a store" in err


def test_a_run_is_read_by_its_path_from_inside_its_folder(tmp_path: Path) -> None:
    """The default store ./runs would lie in the run there: RUN given as a path needs no
    store; a command that creates runs is refused, and nothing is written in the run."""
    store = runfmt.Store(tmp_path / "runs")
    with store.create_run("r") as w:
        w.append("gen", {"i": 1})
    folder = tmp_path / "runs" / w.run_id
    before = sorted(folder.rglob("*"))
    for args in (["verify", "."], ["show", "."], ["cat", ".", "gen"], ["repair", "."]):
        proc = python_m(*args, cwd=folder)
        assert proc.returncode == 0, (args, proc.stderr)
    proc = python_m("demo", cwd=folder / "stages")
    assert proc.returncode == 1
    assert f"inside the run folder {folder}, not a store" in proc.stderr
    assert sorted(folder.rglob("*")) == before


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(_JSON)
def test_json_output_is_written_item_by_item_as_json_dumps_writes_it(value: Any) -> None:
    """`--json` listings stream their items (`ls --json` of 50,000 runs held 573 MB): the
    text must stay what one `json.dumps` of the whole document makes."""
    expected = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    inputs = [value, iter(value)] if isinstance(value, list) else [value]
    for given_value in inputs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_json(given_value)
        assert out.getvalue() == expected


def test_help_lists_every_command_with_help_text(tmp_path: Path) -> None:
    proc = python_m("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert set(RUN_COMMANDS) <= set(commands)
    for name, command in commands.items():
        assert name in proc.stdout
        assert (command.help or "").strip(), f"command {name!r} has no help text"
        for param in command.params:
            if param.name not in ("help", "ctx"):
                assert getattr(param, "help", None), f"{name} {param.name} has no help text"


# demo


def test_demo_writes_a_completed_multi_stage_run_and_shows_it(tmp_path: Path) -> None:
    result = invoke(tmp_path / "runs", "demo", "--items", "120")
    assert result.exit_code == 0, result.output
    (run_id,) = runfmt.Store(tmp_path / "runs").run_ids()
    manifest = runfmt.Store(tmp_path / "runs").open_run(run_id).manifest
    total = sum(s.records for s in manifest.stages)
    assert manifest.status == "completed"
    assert [s.name for s in manifest.stages] == list(STAGES)
    assert all(s.status == "completed" and s.key_field == "key" for s in manifest.stages)
    assert f"wrote run {run_id}" in result.stdout
    assert "status    completed" in result.stdout
    assert f"reused 0 of {total} results from earlier runs" in result.stdout
    for stage in manifest.stages:
        assert re.search(rf"^{stage.name} +completed +{stage.records} ", result.stdout, re.M)


def test_demo_run_is_realistic(demo_store: tuple[Path, DemoResult]) -> None:
    root, result = demo_store
    run = runfmt.Store(root).open_run(result.run_id)
    m = run.manifest
    assert {"model", "temperature", "dataset", "seed"} <= set(m.config)
    assert m.tags["purpose"] == "demo"
    assert m.counters["tokens_in"] > 0
    assert m.counters["cost_usd"] > 0
    assert 300 <= result.total == sum(s.records for s in m.stages)
    generated = list(run.records("generate"))
    errors = [r for r in generated if r.get("_error") is not None]
    assert len(errors) == 2
    assert m.stage("generate").failures == 2  # type: ignore[union-attr]
    assert all(r["_error"]["type"] == "RateLimitError" for r in errors)
    for stage in STAGES:
        keys = [r["key"] for r in run.records(stage)]
        assert len(set(keys)) == len(keys)
        assert all(k.startswith("k1:") for k in keys)
    summary = json.loads(run.read_artifact("summary.json"))
    scored = list(run.records("score"))
    assert summary["scored"] == len(scored)
    assert summary["accuracy"] == round(sum(r["score"] for r in scored) / len(scored), 4)
    assert run.read_artifact("scores.csv").decode().count("\n") == len(scored) + 1


def test_demo_is_deterministic_given_its_seed(demo_store: tuple[Path, DemoResult]) -> None:
    root, first = demo_store
    store = runfmt.Store(root.parent / "again")
    same = store.open_run(write_demo_run(store).run_id)
    other = store.open_run(write_demo_run(store, seed=1).run_id)
    original = runfmt.Store(root).open_run(first.run_id)
    for stage in STAGES:
        assert list(same.records(stage)) == list(original.records(stage))
    assert set(other.keys("generate")).isdisjoint(original.keys("generate"))


def test_demo_asks_reuse_for_every_item_and_skips_the_work_it_returns(
    demo_store: tuple[Path, DemoResult], tmp_path: Path
) -> None:
    root, first = demo_store
    earlier = runfmt.Store(root).open_run(first.run_id)
    committed = {
        (stage, r["key"]): r
        for stage in STAGES
        for r in earlier.records(stage)
        if r.get("_error") is None
    }
    asked: list[tuple[str, str]] = []

    def reuse(stage: str, key: str) -> dict[str, Any] | None:
        asked.append((stage, key))
        return committed.get((stage, key))

    store = runfmt.Store(tmp_path / "runs")
    second = write_demo_run(store, reuse=reuse)
    assert len(asked) == second.total == first.total
    assert second.reused == len(committed)
    assert second.computed == first.total - len(committed)
    run = store.open_run(second.run_id)
    for stage in STAGES:
        assert list(run.records(stage)) == list(earlier.records(stage))
    assert run.manifest.counters.get("tokens_in", 0) == 0


# show


def test_show_json_is_a_stable_object(demo_store: tuple[Path, DemoResult]) -> None:
    root, first = demo_store
    result = invoke(root, "show", first.run_id, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    manifest = runfmt.Store(root).open_run(first.run_id).manifest
    assert set(doc) == SHOW_FIELDS
    assert doc["run_id"] == first.run_id
    assert doc["status"] == "completed"
    assert doc["config"] == manifest.config
    assert doc["counters"] == dict(manifest.counters)
    assert [(s["name"], s["records"], s["failures"]) for s in doc["stages"]] == [
        (s.name, s.records, s.failures) for s in manifest.stages
    ]
    assert {a["name"] for a in doc["artifacts"]} == {"summary.json", "scores.csv"}
    assert doc["totals"]["records"] == first.total
    assert doc["totals"]["files"] == len(manifest.listed_paths())
    assert doc["totals"]["bytes"] == sum(manifest.listed_paths().values())


def test_show_text_has_identity_config_stages_and_artifacts(
    demo_store: tuple[Path, DemoResult],
) -> None:
    root, first = demo_store
    result = invoke(root, "show", first.run_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"run       {first.run_id}\n" in out
    assert '  model = "demo-llm-7b"\n' in out
    assert "tags      dataset=arith-mix model=demo-llm-7b purpose=demo\n" in out
    assert "\nstages\nstage     status     records  failures" in out
    assert "\nartifacts\n" in out
    assert "summary.json" in out
    assert "error" not in out.split("\nstages\n")[0]


def test_show_reads_a_copied_folder_with_no_store(
    demo_store: tuple[Path, DemoResult], tmp_path: Path
) -> None:
    root, first = demo_store
    folder = tmp_path / "elsewhere" / "my-run"
    shutil.copytree(root / first.run_id, folder)
    result = invoke(tmp_path / "no-store-here", "show", str(folder), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["location"] == str(folder)
    assert not (tmp_path / "no-store-here").exists()


def test_show_reports_a_failed_run_with_its_error(tmp_path: Path) -> None:
    store = runfmt.Store(tmp_path / "runs")
    writer = store.create_run("broken", {"model": "m"})
    writer.append("generate", {"x": 1})
    writer.fail("ValueError: model server went away")
    result = invoke(tmp_path / "runs", "show", writer.run_id)
    assert result.exit_code == 0, result.output
    assert "status    failed\n" in result.stdout
    assert "error     ValueError: model server went away\n" in result.stdout


def test_listings_escape_control_characters(tmp_path: Path) -> None:
    """A tag, error or hand-edited name cannot fake a line of output or send the terminal
    escapes."""
    store = runfmt.Store(tmp_path / "runs")
    writer = store.create_run("eval", {"k": "v\nstatus    completed"}, tags={"t": "\x1b]0;x\x07"})
    writer.fail("boom\nstatus    completed")
    shown = invoke(tmp_path / "runs", "show", writer.run_id).stdout
    assert "error     boom\\nstatus    completed\n" in shown
    assert "t=\\x1b]0;x\\x07" in shown
    assert [line for line in shown.splitlines() if line.startswith("status")] == [
        "status    failed"
    ]
    assert "\x1b" not in shown

    newest = max((tmp_path / "runs" / writer.run_id / "_manifests").glob("*.json"))
    doc = json.loads(newest.read_bytes())
    newest.write_text(json.dumps(doc | {"name": "a\x1b[2Jb"}))
    other = store.create_run("b", {"k": "\x1b[2J"}).finish().run_id
    for args in (["ls"], ["status"], ["gc", "--keep-last", "0"], ["diff", writer.run_id, other]):
        listed = invoke(tmp_path / "runs", *args).stdout
        assert "a\\x1b[2Jb" in listed, args
        assert "\x1b" not in listed, args


def test_errors_escape_control_characters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path or a message quoting a damaged file cannot send the terminal escapes."""
    odd = str(tmp_path / "a\x1b[31mb")
    for args in (["--store", odd, "verify"], ["verify", odd]):
        code, _, err = run_main(args, monkeypatch, capsys)
        assert code == 1
        assert "a\\x1b[31mb" in err, args
        assert "\x1b" not in err, args
    monkeypatch.setattr(runfmt.Store, "open_run", _raises_quoting_bytes)
    code, _, err = run_main(["--store", str(tmp_path), "show", "x"], monkeypatch, capsys)
    assert code == 1
    assert err == "runfmt: error: damaged \\x1b[2J\\n here\n"


def _raises_quoting_bytes(*args: object, **kwargs: object) -> None:
    raise runfmt.errors.StorageError("damaged \x1b[2J\n here")


# cat


def test_cat_prints_the_stage_as_json_lines(demo_store: tuple[Path, DemoResult]) -> None:
    root, first = demo_store
    records = list(runfmt.Store(root).open_run(first.run_id).records("score"))
    result = invoke(root, "cat", first.run_id, "score")
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == records
    limited = invoke(root, "cat", first.run_id, "score", "--limit", "3")
    assert [json.loads(line) for line in limited.stdout.splitlines()] == records[:3]
    assert invoke(root, "cat", first.run_id, "score", "-n", "0").stdout == ""


def test_cat_writes_artifact_bytes(demo_store: tuple[Path, DemoResult]) -> None:
    root, first = demo_store
    expected = (root / first.run_id / "artifacts" / "scores.csv").read_bytes()
    for name in ("scores.csv", "artifacts/scores.csv"):
        result = invoke(root, "cat", first.run_id, "--artifact", name)
        assert result.exit_code == 0, result.output
        assert result.stdout_bytes == expected


@pytest.mark.parametrize("command", ["cat", "ls", "dump"])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, command: str) -> None:
    """`runfmt ... | head -1`: exit 0 and nothing on stderr, like the last line wanted."""
    store = runfmt.Store(tmp_path / "runs")
    with store.create_run("big", flush_every=None) as writer:
        writer.extend("lines", ({"i": i, "text": "x" * 100} for i in range(5000)))
    for i in range(300):
        store.create_run(f"run-{i}", flush_every=None).finish()
    args = {"cat": [writer.run_id, "lines"], "ls": ["--json"], "dump": [writer.run_id]}[command]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runfmt", "--store", str(tmp_path / "runs"), command, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.read(1)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""


@pytest.mark.parametrize(("command", "code"), [("ls", 0), ("verify", 1), ("cat", 0), ("show", 0)])
def test_a_closed_stdout_keeps_the_commands_exit_code(
    tmp_path: Path, command: str, code: int
) -> None:
    """`runfmt verify | true`: the reader is gone before the first write; the output is
    dropped without a word about the pipe, and the exit code is still the command's own."""
    store = runfmt.Store(tmp_path / "runs")
    with store.create_run("good") as good:
        good.append("score", {"i": 1})
    with store.create_run("bad") as bad:
        bad.append("score", {"i": 2})
    stage_file = next((tmp_path / "runs" / bad.run_id).glob("stages/score/*.zst"))
    stage_file.write_bytes(stage_file.read_bytes() + b"x")
    args = {"ls": [], "verify": [], "cat": [good.run_id, "score"], "show": [good.run_id]}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "runfmt", "--store", str(tmp_path / "runs"), command,
             *args[command]],
            stdout=write_end, stderr=subprocess.PIPE, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == code
    assert proc.stderr == (b"runfmt: error: 1 problem in 1 of 2 runs\n" if code else b"")


@pytest.mark.parametrize(("command", "code"), [("ls", 0), ("verify", 1), ("demo", 0)])
def test_no_stdout_at_all_keeps_the_commands_exit_code(
    tmp_path: Path, command: str, code: int
) -> None:
    """`runfmt verify >&-`: Python starts with no ``sys.stdout``; the output is lost, the
    exit code is the command's own, and no traceback is written."""
    store = runfmt.Store(tmp_path / "runs")
    with store.create_run("bad") as bad:
        bad.append("score", {"i": 2})
    stage_file = next((tmp_path / "runs" / bad.run_id).glob("stages/score/*.zst"))
    stage_file.write_bytes(stage_file.read_bytes() + b"x")
    proc = subprocess.run(
        [sys.executable, "-m", "runfmt", "--store", str(tmp_path / "runs"), command],
        stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert b"Traceback" not in proc.stderr


def test_output_in_an_encoding_without_the_names_is_escaped(tmp_path: Path) -> None:
    """A terminal that cannot show a name (``LC_ALL=C`` with UTF-8 mode off, or
    ``PYTHONIOENCODING=ascii``) gets backslash escapes, and JSON ``\\u`` escapes."""
    store = runfmt.Store(tmp_path / "runs")
    with store.create_run("héllo €") as run:
        run.append("score", {"answer": "é"})
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    for args in (["ls"], ["status"], ["show", run.run_id], ["ls", "--json"],
                 ["report", "--format", "json"]):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "runfmt", "--store", str(tmp_path / "runs"), *args],
            capture_output=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert (proc.returncode, proc.stderr) == (0, b""), args
        proc.stdout.decode("ascii")
        if args == ["ls", "--json"]:
            assert json.loads(proc.stdout)[0]["name"] == "héllo €"
        elif "json" in args:
            assert json.loads(proc.stdout)["runs"][0]["name"] == "héllo €"
        else:
            assert b"h\\xe9llo \\u20ac" in proc.stdout, args


# schema


def test_schema_lists_names_and_prints_each(tmp_path: Path) -> None:
    listing = invoke(tmp_path, "schema")
    assert listing.exit_code == 0
    assert [line.split("\t")[0] for line in listing.stdout.splitlines()] == list(SCHEMA_NAMES)
    as_json = json.loads(invoke(tmp_path, "schema", "--json").stdout)
    assert as_json == [{"name": n, "$id": load_schema(n)["$id"]} for n in SCHEMA_NAMES]
    for name in SCHEMA_NAMES:
        result = invoke(tmp_path, "schema", name)
        assert result.exit_code == 0
        assert json.loads(result.stdout) == load_schema(name)


# failure paths through the real entry point


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["show", "no-such-run"], 1, "no run 'no-such-run'"),
        (["cat", "{run}", "judge"], 1, "run has no stage 'judge' (stages: generate, parse, score)"),
        (["cat", "{run}", "--artifact", "nope.txt"], 1, "run has no artifact 'nope.txt'"),
        (["cat", "{run}"], 2, "give either a STAGE or --artifact NAME"),
        (["cat", "{run}", "score", "--artifact", "scores.csv"], 2, "give either a STAGE"),
        (["verify", "no-such-run"], 1, "no run 'no-such-run'"),
        (["schema", "nope"], 2, "unknown schema 'nope'"),
        (["show"], 2, "Missing argument"),
        (["cat", "{run}", "score", "--limit", "-1"], 2, "--limit"),
        (["ls", "--since", "3000000d"], 2, "over 1,000 years"),
        (["ls", "--status", "Completed"], 2, "unknown status 'Completed'"),
        (["ls", "--status", "abandoned"], 2, "`runfmt status --status abandoned` lists"),
        (["gc", "--older-than", "3000000d"], 2, "over 1,000 years"),
        (["report", "--output", "/nonexistent/r.md"], 1, "No such file or directory"),
        (["export", "{run}", "/nonexistent/r.tar"], 1, "No such file or directory"),
        (["--store", "{file}", "ls"], 2, "is a file, not a store folder"),
        (["fork", "{run}", "score", "--run-id", "BAD ID"], 2, "Invalid value for --run-id"),
        (["import", "{file}.tar", "--run-id", "BAD ID"], 2, "Invalid value for --run-id"),
        (
            ["--store", "{file}/runs", "demo", "--items", "3"],
            2,
            "is inside the run ",
        ),
    ],
)
def test_user_errors_exit_with_a_message_and_no_traceback(
    demo_store: tuple[Path, DemoResult],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    root, first = demo_store
    file = str(root / first.run_id / "manifest.json")
    args = [a.replace("{run}", first.run_id).replace("{file}", file) for a in args]
    exit_code, out, err = run_main(["--store", str(root), *args], monkeypatch, capsys)
    assert exit_code == code
    assert message in err
    assert "Traceback" not in err + out


def test_bad_store_url_is_bad_usage_not_a_crash(tmp_path: Path) -> None:
    proc = python_m("--store", "nosuchproto://bucket/runs", "show", "r1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown protocol 'nosuchproto'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "runfmt", "ls"], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "RUNFMT_STORE": "file://"}, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "'file://' names no folder or bucket" in proc.stderr
    assert not (tmp_path / ".runfmt").exists()


def test_unknown_run_end_to_end(tmp_path: Path) -> None:
    proc = python_m("--store", str(tmp_path / "runs"), "cat", "r1", "score", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("runfmt: error: ")
    assert "no run 'r1'" in proc.stderr
    assert "Traceback" not in proc.stderr


# verify and repair


def test_verify_passes_on_a_sound_store(demo_store: tuple[Path, DemoResult]) -> None:
    root, first = demo_store
    result = invoke(root, "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok    {first.run_id}\nchecked 1 run: 0 with problems\n"
    assert json.loads(invoke(root, "verify", "--json").stdout) == []


@pytest.mark.parametrize(
    "args",
    [["ls"], ["ls", "--name", "x*"], ["ls", "--tag", "k=v"], ["status"],
     ["status", "--status", "failed"]],
)  # fmt: skip
def test_a_listing_of_a_missing_folder_says_so(tmp_path: Path, args: list[str]) -> None:
    """A mistyped --store must not read as an empty store, nor as filters matching nothing
    (`verify` fails on it: tests/test_cli_usage.py)."""
    result = invoke(tmp_path / "typo", *args)
    assert result.exit_code == 0
    assert result.stdout == f"no runs in {tmp_path / 'typo'}: no such folder\n"
    assert not (tmp_path / "typo").exists()


def test_report_of_a_missing_folder_warns(tmp_path: Path) -> None:
    result = invoke(tmp_path / "typo", "report", "-f", "csv")
    assert result.exit_code == 0
    assert result.stderr == f"runfmt: warning: no runs in {tmp_path / 'typo'}: no such folder\n"
    assert result.stdout.splitlines() == ["run_id,name,status,created_at"]


def test_empty_listings_say_whether_filters_matched(tmp_path: Path) -> None:
    store = runfmt.Store(tmp_path / "runs")
    store.create_run("only").finish()
    assert invoke(tmp_path / "runs", "ls", "--name", "x*").stdout == (
        f"no runs in {tmp_path / 'runs'} match\n"
    )
    assert invoke(tmp_path / "runs", "status", "--status", "failed").stdout == (
        f"no runs in {tmp_path / 'runs'} match\n"
    )
    assert invoke(tmp_path / "runs", "ls", "--limit", "0").stdout == ""


def test_ls_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert invoke(tmp_path / "empty", "ls").stdout == f"no runs in {tmp_path / 'empty'}\n"
    said = invoke("memory://typo-in-memory/runs", "ls").stdout
    assert said == "no runs in memory:///typo-in-memory/runs: no such folder\n"


def test_verify_of_an_empty_store(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    result = invoke(tmp_path / "runs", "verify")
    assert result.exit_code == 0
    assert result.stdout.startswith("no runs in ")


def test_store_wide_verify_names_a_run_copied_in_under_another_name(
    copied: tuple[Path, str],
) -> None:
    """LAYOUT-1: a store lists only folders named as run ids; a copy renamed by hand is
    named, with what to do, instead of passing unseen."""
    root, run_id = copied
    shutil.copytree(root / run_id, root / "My copy")
    result = invoke(root, "verify")
    assert result.exit_code == 0, result.output
    assert (
        "skip  My copy: holds a run, but a store lists only folders named as run ids "
        "(LAYOUT-1): rename it to its run id" in result.stdout.splitlines()
    )


def test_store_wide_verify_skips_folders_that_hold_no_run(
    copied: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LAYOUT-2, §9.3 row 1: a folder with neither a revision nor manifest.json (made by hand,
    or left by a crash while creating a run) is not a run: verify of the store names it and
    exits by the runs alone; one with only manifest.json is a damaged run; a non-run folder
    the user names fails."""
    root, run_id = copied
    (root / "empty-folder").mkdir()
    (root / "locked").mkdir()
    (root / "locked" / ".writer-x.lock").touch()
    (root / "crashed" / "_manifests").mkdir(parents=True)
    (root / "crashed" / "_manifests" / ".tmp-0a1b").write_bytes(b"{")
    not_a_run = "not a run: no revision and no manifest.json (LAYOUT-2)"
    result = invoke(root, "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"ok    {run_id}",
        f"skip  locked: {not_a_run}",
        f"skip  empty-folder: {not_a_run}",
        f"skip  crashed: {not_a_run}",
        "checked 1 run: 0 with problems",
    ]
    assert (invoke(root, "verify", "--json").stdout, result.stderr) == ("[]\n", "")

    (root / "damaged").mkdir()
    shutil.copy(root / run_id / "manifest.json", root / "damaged")
    result = invoke(root, "verify", "--json")
    assert result.exit_code == 1
    assert [(p["run"], p["rule"]) for p in json.loads(result.stdout)] == [("damaged", "LAYOUT-2")]
    code, _, err = run_main(["--store", str(root), "show", "damaged"], monkeypatch, capsys)
    assert code == 1
    assert err.startswith(f"runfmt: error: {root / 'damaged'}: no revisions in _manifests/ ")

    for args in (["verify", "crashed"], ["verify", str(root / "crashed")], ["repair", "crashed"]):
        code, out, err = run_main(["--store", str(root), *args], monkeypatch, capsys)
        assert (code, out, err) == (1, "", f"runfmt: error: {root / 'crashed'}: {not_a_run}\n")
    code, _, err = run_main(["--store", str(root), "verify", "empty-folder"], monkeypatch, capsys)
    assert (code, err) == (1, f"runfmt: error: {root / 'empty-folder'}: {not_a_run} (give a run "
                              "id from `runfmt ls`, or the path of a run folder)\n")  # fmt: skip


def test_verify_of_several_runs_checks_each_even_when_one_names_no_run(
    copied: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo, or a renamed copy (LAYOUT-1), among the RUNs fails the command but does not
    stop it from checking the others."""
    root, run_id = copied
    other = "20200101-000000000-00000001"
    shutil.copytree(root / run_id, root / other)
    args = ["--store", str(root), "verify", "no-such-run", run_id, other]
    code, out, err = run_main(args, monkeypatch, capsys)
    assert code == 1
    assert out.splitlines() == [
        f"ok    {run_id}",
        "checked 1 run: 0 with problems, 2 could not be checked",
    ]
    errors = err.splitlines()
    assert errors[0].startswith(f"runfmt: error: {root}: no run 'no-such-run'")
    assert errors[1].startswith(f"runfmt: error: {root / other}: manifest names run {run_id!r}")
    assert errors[2] == "runfmt: error: 2 of 3 RUNs name no run that could be checked"


def test_verify_names_the_corrupted_file_and_exits_1(
    copied: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, run_id = copied
    (stage_file,) = (root / run_id / "stages" / "score").iterdir()
    data = bytearray(stage_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    stage_file.write_bytes(bytes(data))
    sound = runfmt.Store(root).open_run(run_id).manifest
    other = runfmt.Store(root).create_run("other", {})
    other.finish()

    code, out, err = run_main(["--store", str(root), "verify"], monkeypatch, capsys)
    assert code == 1
    assert f"{stage_file}: sha256 of the listed bytes does not match (CHECK-1)\n" in out
    assert f"FAIL  {run_id}: " in out
    assert f"ok    {other.run_id}\n" in out
    assert "checked 2 runs: 1 with problems" in out
    assert err.startswith("runfmt: error: ")
    assert "in 1 of 2 runs" in err

    code, out, _ = run_main(["--store", str(root), "verify", "--json", run_id], monkeypatch, capsys)
    assert code == 1
    problems = json.loads(out)
    assert {p["rule"] for p in problems} >= {"CHECK-1"}
    assert all(p["location"] == str(stage_file) and p["run"] == run_id for p in problems)

    code, out, err = run_main(["--store", str(root), "repair", run_id], monkeypatch, capsys)
    assert code == 1
    assert str(stage_file) in out
    assert "left after repair" in err
    assert runfmt.Store(root).open_run(run_id).manifest == sound


def test_an_unreadable_manifest_is_named_by_show_and_verify(
    copied: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, run_id = copied
    newest = sorted((root / run_id / "_manifests").iterdir())[-1]
    newest.write_text('{"format": "runfmt", broken')

    code, out, err = run_main(["--store", str(root), "show", run_id], monkeypatch, capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"runfmt: error: {newest}: not valid JSON")
    assert "Traceback" not in err

    code, out, err = run_main(["--store", str(root), "verify", run_id], monkeypatch, capsys)
    assert code == 1
    assert out.startswith(f"{newest}: not valid JSON")
    assert out.count("(MAN-1)") == 1, "the rule is named once"
    assert f"FAIL  {run_id}: 1 problem; `runfmt repair {root / run_id}` fixes 1\n" in out


def test_verify_leaves_a_live_writers_uncommitted_data_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT-8, COMMIT-12, ERR-3: what a live writer has not committed yet (bytes past a
    listed length, an unlisted stage file) is no problem, and repair leaves it alone, so
    verify must not offer to repair it; once the writer is gone, or when its lock cannot be
    probed (another user's run), it is repairable."""
    store = runfmt.Store(tmp_path / "runs")
    w = store.create_run("live", run_id="live", flush_every=None, flush_interval=None)
    w.append("gen", {"i": 0})
    listed = w.flush().stages[0].files[0].path
    with Path(w.storage.path(listed)).open("ab") as f:
        f.write(FrameEncoder().encode(b'{"i": 1}\n'))
    unlisted = f"stages/gen/part-000002-{w.writer_id}.jsonl.zst"
    Path(w.storage.path(unlisted)).write_bytes(b"junk")
    w.add_artifact("big.bin", b"staged until the next commit")
    assert verify_run(w.storage) == []
    result = invoke(tmp_path / "runs", "verify")
    assert (result.exit_code, result.stdout) == (0, (
        f"ok    live (being written by live writer {w.writer_id}: uncommitted data not checked)\n"
        "checked 1 run: 0 with problems\n"
    ))  # fmt: skip
    assert invoke(tmp_path / "runs", "repair", "live").exit_code == 0
    uncommitted = {(listed, "COMMIT-8", True), (unlisted, "LAYOUT-4", True)}
    uncommitted.add(("artifacts/big.bin", "LAYOUT-4", True))
    with monkeypatch.context() as m:
        m.setattr(check, "live_writers", Mock(side_effect=PermissionError(13, "denied")))
        assert {(p.location, p.rule, p.repairable) for p in verify_run(w.storage)} == uncommitted

    w.discard()
    assert {(p.location, p.rule, p.repairable) for p in verify_run(w.storage)} == uncommitted
    fixes = f"`runfmt repair {tmp_path / 'runs' / 'live'}` fixes 3\n"
    assert fixes in invoke(tmp_path / "runs", "verify").stdout


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import runfmt, runfmt.run
    store = runfmt.Store(sys.argv[1])
    writer = store.create_run("crashy", run_id="crashy", flush_every=None, flush_interval=None)
    stage = writer.stage("gen", key_field="key")
    stage.extend({"key": runfmt.compute_key(i), "i": i} for i in range(10))
    writer.flush()
    stage.extend({"key": runfmt.compute_key(i), "i": i} for i in range(10, 25))
    runfmt.run.commit_locked = lambda *args, **kwargs: os._exit(9)  # dies before committing
    writer.flush()
    """
)


@pytest.fixture
def crashed(tmp_path: Path) -> Path:
    """A store whose run ``crashy`` has 10 committed records and 15 written after the commit."""
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_WRITER)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs")], check=False, timeout=60
    )
    assert proc.returncode == 9
    return tmp_path / "runs"


def test_repair_salvages_a_crashed_run(crashed: Path) -> None:
    before = invoke(crashed, "verify", "crashy")
    assert before.exit_code == 1
    assert "bytes past the committed length (COMMIT-8)" in before.stdout
    assert f"`runfmt repair {crashed / 'crashy'}` fixes 1" in before.stdout

    result = invoke(crashed, "repair", "crashy")
    assert result.exit_code == 0, result.output
    assert "salvaged 15 records" in result.stdout
    assert result.stdout.endswith("ok    crashy: consistent\n")
    assert invoke(crashed, "verify", "crashy").exit_code == 0
    lines = invoke(crashed, "cat", "crashy", "gen").stdout.splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(25))
    assert invoke(crashed, "repair", "crashy").stdout.startswith("nothing to repair\n")


def test_repair_drop_keeps_only_committed_records(crashed: Path) -> None:
    result = invoke(crashed, "repair", "crashy", "--drop")
    assert result.exit_code == 0, result.output
    assert "cut " in result.stdout
    lines = invoke(crashed, "cat", "crashy", "gen").stdout.splitlines()
    assert [json.loads(line)["i"] for line in lines] == list(range(10))


def test_demo_then_show_end_to_end(tmp_path: Path) -> None:
    demo = python_m("demo", "--items", "50", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    (run_id,) = [name for name in os.listdir(tmp_path / "runs") if not name.startswith(".")]
    show = python_m("show", run_id, "--json", cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["status"] == "completed"
    verify = python_m("verify", cwd=tmp_path)
    assert (verify.returncode, verify.stderr) == (0, "")


def _command_names(typer_app: typer.Typer) -> list[str]:
    return [c.name or c.callback.__name__ for c in typer_app.registered_commands]  # type: ignore[union-attr]


def test_a_command_is_built_alone_and_usage_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`main` builds only the invoked command; help, typos and no command see all of them."""
    every = _command_names(app)
    assert _command_names(_app_for(["--store", "ls", "-o", "a=b", "show", "RUN"])) == ["show"]
    index_only = _app_for(["-s", str(tmp_path), "index", "rebuild"])
    assert _command_names(index_only) == []
    assert [g.name for g in index_only.registered_groups] == ["index"]
    for args in ([], ["--help"], ["--store", "x"], ["lss"], ["--store=x", "nope", "ls"]):
        assert _app_for(args) is app
    assert _command_names(app) == every
    code, _, err = run_main(["--store", str(tmp_path), "lss"], monkeypatch, capsys)
    assert (code, "Did you mean 'ls'" in err) == (2, True)
    code, out, _ = run_main(["--store", str(tmp_path), "ls", "--json"], monkeypatch, capsys)
    assert (code, json.loads(out)) == (0, [])


def test_messages_name_what_was_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed -o names the option; a file that is no tar says so on one line; the demo
    on a memory:// store offers no next command, as the store ends with the process."""
    said = CliRunner().invoke(app, ["-o", "foo", "ls"])
    assert said.exit_code == 2
    assert "'-o' / '--storage-option': expected KEY=VALUE" in said.output
    bogus = tmp_path / "bogus.tar"
    bogus.write_text("not a tar")
    code, _, err = run_main(["--store", str(tmp_path / "runs"), "import", str(bogus)],
                            monkeypatch, capsys)  # fmt: skip
    assert code == 1
    assert "not a tar archive" in err
    assert "\\n" not in err
    said = invoke("memory://demo-next", "demo", "--items", "3")
    assert said.exit_code == 0
    assert "next:" not in said.stdout
    assert "memory:// store ends with this process" in said.stdout
