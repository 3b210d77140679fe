"""The README against the code: its examples run, every command and option is documented,
and every ``--json`` document has the members the README lists."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

import runfmt
from runfmt.cli import app

README = Path(__file__).parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = TEXT.index(f"\n## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start : end if end != -1 else len(TEXT)]


def _invoke(store: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["--store", str(store), *args])
    assert result.exit_code in (0, 1), (args, result.output)
    return result.stdout


def test_python_api_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _section("Python API").split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNFMT_STORE", raising=False)
    exec(compile(code, "README.md", "exec"), {})
    assert "completed [('generate', 2, 0), ('score', 1, 1)]" in capsys.readouterr().out
    (run_id,) = runfmt.Store(tmp_path / "runs").run_ids()
    assert CliRunner().invoke(app, ["--store", "runs", "verify", run_id]).exit_code == 0


def test_index_example_runs_after_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNFMT_STORE", raising=False)
    assert CliRunner().invoke(app, ["demo"]).exit_code == 0
    code = _section("Index and cross-run cache").split("```python\n", 1)[1].split("```", 1)[0]
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "demo-eval completed" in out
    (run_id,) = runfmt.Store(tmp_path / "runs").run_ids()
    assert run_id in out


def test_compare_example_runs_after_two_demos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNFMT_STORE", raising=False)
    for seed in ("1", "2"):
        assert CliRunner().invoke(app, ["demo", "--seed", seed]).exit_code == 0
    section = _section("Inspect, compare and manage runs")
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    n, *_ = capsys.readouterr().out.split()
    assert int(n) > 0


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Every command below ``group`` (typer's own click), by its words."""
    ctx = group.context_class(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if hasattr(command, "list_commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


COMMANDS = dict(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_and_option_is_documented(path: str) -> None:
    """Each command has a ``**`runfmt COMMAND ...`**`` paragraph, and that paragraph (up to
    the next one) names each of the command's options, long and short."""
    blocks = re.split(r"(?=\*\*`runfmt )", TEXT)[1:]
    text = "".join(b for b in blocks if re.match(rf"\*\*`runfmt {path}[ `]", b))
    assert text, f"`runfmt {path}` has no paragraph in the README"
    options = [
        name
        for param in COMMANDS[path].params
        if param.param_type_name == "option"
        for name in (*param.opts, *param.secondary_opts)
        if name != "--help"
    ]
    missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert missing == [], f"`runfmt {path}`: README does not name {missing}"


def _documented_members() -> dict[str, set[str]]:
    """The JSON output table: command -> the first member list of its row."""
    table = TEXT[TEXT.index("| command | document | members |") :]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("| `"):
            break
        command, _, members = line.split(" | ", 2)
        found = re.search(r"`\{?([^`{}]+)\}?`", members)
        assert found, line
        rows[command.strip("| `")] = set(found.group(1).split())
    return rows


def _members(doc: Any) -> set[str]:
    return set(doc[0] if isinstance(doc, list) else doc)


def test_every_json_document_has_the_members_the_readme_lists(tmp_path: Path) -> None:
    store = tmp_path / "runs"
    assert CliRunner().invoke(app, ["--store", str(store), "demo"]).exit_code == 0
    assert CliRunner().invoke(app, ["--store", str(store), "demo"]).exit_code == 0
    b, a = runfmt.Store(store).run_ids()
    key = next(runfmt.Store(store).open_run(a).records("score"))["key"]
    shutil.copytree(store / a, tmp_path / "copy")
    (tmp_path / "copy" / "manifest.json").unlink()

    def doc(*args: str) -> Any:
        return json.loads(_invoke(store, *args))

    outputs = {
        "ls": doc("ls", "--json"),
        "status": doc("status", "--json"),
        "verify": doc("verify", str(tmp_path / "copy"), "--json"),
        "cache get": doc("cache", "get", "score", key, "--json"),
        "lineage": doc("lineage", a, "score", key, "--json"),
        "gc": doc("gc", "--keep-last", "1", "--json"),
        "index rebuild": doc("index", "rebuild", "--json"),
        "report --format json": json.loads(_invoke(store, "report", "--format", "json")),
        "diff": doc("diff", a, b, "--json"),
        "compare": doc("compare", a, b, "--stage", "score", "--field", "correct", "--json"),
        "fork": doc("fork", a, "parse", "--json"),
        "sync": doc("sync", str(store), str(tmp_path / "backup"), "--json"),
        "schema": doc("schema", "--json"),
    }
    _invoke(store, "export", a, str(tmp_path / "a.tar"))
    outputs["import"] = doc("import", str(tmp_path / "a.tar"), "--run-id", "imported", "--json")
    documented = _documented_members()
    assert set(documented) == {*outputs, "show"}
    for command, output in outputs.items():
        assert _members(output) == documented[command], command
