"""The package as users get it: a wheel built from this tree carries the JSON Schemas, and
an installed wheel (not the editable checkout) loads them and runs the command line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ("manifest", "stage-header")


def run(*cmd: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree, so the checkout gets no build/ or egg-info."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("runfmt", "schemas"):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src)
    [built] = out.glob("runfmt-*.whl")
    return built


def test_the_wheel_ships_schemas_cli_and_type_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for schema in SCHEMAS:
        assert f"runfmt/schemas/{schema}.schema.json" in names
    for module in ("runfmt/cli/__init__.py", "runfmt/format/manifest.py", "runfmt/py.typed"):
        assert module in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "runfmt = runfmt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    for schema in SCHEMAS:
        shipped = json.loads(zipfile.ZipFile(wheel).read(f"runfmt/schemas/{schema}.schema.json"))
        assert shipped == json.loads((ROOT / "schemas" / f"{schema}.schema.json").read_bytes())


def test_an_installed_wheel_loads_its_schemas(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
        "--no-index", "--no-build-isolation", wheel)  # fmt: skip
    probe = (
        "import json, runfmt\n"
        "from runfmt.format.schemas import load_schema, schema_errors\n"
        "print(json.dumps({'file': runfmt.__file__,\n"
        "    'ids': [load_schema(n)['$id'] for n in ('manifest', 'stage-header')],\n"
        "    'errors': schema_errors('manifest', {'format': 'runfmt'})[:1]}))\n"
    )
    seen = json.loads(run(python, "-I", "-c", probe, cwd=tmp_path).stdout)
    assert Path(seen["file"]).resolve().is_relative_to(venv.resolve())
    assert [i.rsplit("/", 1)[1] for i in seen["ids"]] == [f"{s}.schema.json" for s in SCHEMAS]
    assert "required property" in seen["errors"][0]
    shown = run(venv / "bin" / "runfmt", "schema", "stage-header", cwd=tmp_path).stdout
    assert json.loads(shown)["$id"] == seen["ids"][1]


def readme_commands() -> list[str]:
    """The shell commands in the README's ``sh`` code blocks."""
    text = (ROOT / "README.md").read_text("utf-8")
    return [c.strip() for c in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    [check] = [c for c in readme_commands() if "pytest" in c and "ruff" in c]
    lines = (ROOT / ".ci" / "run").read_text("utf-8").strip().splitlines()
    assert lines[-1] == check
    assert "-n 2" in check
    assert "set -euo pipefail" in lines


def test_collecting_no_tests_fails_the_run_with_exit_1() -> None:
    session = SimpleNamespace(exitstatus=pytest.ExitCode.NO_TESTS_COLLECTED)
    conftest.pytest_sessionfinish(session, session.exitstatus)  # type: ignore[arg-type]
    assert session.exitstatus == 1
