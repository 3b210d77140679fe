"""The architecture as a test: which module may import what, read from the source with `ast`."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "runfmt"
FORMAT_THIRD_PARTY = {"zstandard", "jsonschema", "orjson", "rfc8785"}
ONLY_IN = {
    "fsspec": {"runfmt/storage.py"},
    "filelock": {"runfmt/locking.py", "runfmt/run.py"},
}


def modules() -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) > 10
    return found


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    return imports_of(path.read_text("utf-8"), module_name(path), path.name == "__init__.py")


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module ``source`` imports, at any depth (lazy imports included)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


@pytest.mark.parametrize("path", [p for p in modules() if p.parent.name == "format"], ids=rel)
def test_format_core_imports_only_stdlib_codecs_and_itself(path: Path) -> None:
    allowed_runfmt = ("runfmt.errors", "runfmt.format")
    bad = sorted(
        name
        for name in imports(path)
        if not (
            top(name) in sys.stdlib_module_names
            or top(name) in FORMAT_THIRD_PARTY
            or name == "runfmt"
            or name.startswith(allowed_runfmt)
        )
    )
    assert bad == [], f"{rel(path)} is pure core and may not import {bad}"


def test_nothing_outside_the_cli_imports_it() -> None:
    offenders = [
        rel(p)
        for p in modules()
        if "cli" not in p.relative_to(PACKAGE).parts
        and p.name != "__main__.py"
        and any(name == "runfmt.cli" or name.startswith("runfmt.cli.") for name in imports(p))
    ]
    assert offenders == []


@pytest.mark.parametrize("library", ONLY_IN)
def test_storage_and_locking_libraries_stay_in_their_module(library: str) -> None:
    users = {rel(p) for p in modules() if any(top(n) == library for n in imports(p))}
    assert users <= ONLY_IN[library], f"{library} imported by {sorted(users - ONLY_IN[library])}"


def test_the_import_reader_sees_relative_and_lazy_imports() -> None:
    source = (
        "from . import names\nfrom ..errors import X\nimport os.path\ndef f():\n    import fsspec\n"
    )
    found = imports_of(source, "runfmt.format.x")
    assert {"runfmt.format.names", "runfmt.errors", "os.path", "fsspec"} <= found
    assert "runfmt.cli" in imports_of("from . import cli", "runfmt", is_package=True)
