"""Standard tools for hand-inspection tests: found, else installed, else the test fails under CI.

`zstd`, `zstdcat` and `jq` come from Debian packages (``apt-get install``), DuckDB from
pip. Without ``CI=true`` a tool that cannot be had skips the test; with it, the test
fails, so a CI run never passes by skipping.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from filelock import FileLock

__all__ = ["duckdb_module", "require_tool", "unavailable"]

_APT_PACKAGES = {"zstd": "zstd", "zstdcat": "zstd", "jq": "jq", "sha256sum": "coreutils"}
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "runfmt-test-install.lock"


def unavailable(what: str, detail: str) -> None:
    """Fail the test under CI (CI=true), else skip it: a missing tool never passes silently."""
    message = f"{what} is not available and could not be installed: {detail}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _apt_install(package: str) -> str:
    if shutil.which("apt-get") is None:
        return "apt-get not found"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *wait, package]):
        done = subprocess.run(sudo + cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            return f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-500:]}"
    return ""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        with FileLock(_INSTALL_LOCK):
            path = shutil.which(name)
            detail = "" if path else _apt_install(_APT_PACKAGES.get(name, name))
        path = path or shutil.which(name)
        if path is None:
            unavailable(f"the `{name}` command", detail or "not on PATH after installing")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    """Return a function that gives the path of a command-line tool, installing it if missing."""
    return _tool


@pytest.fixture(scope="session")
def duckdb_module() -> ModuleType:
    """The ``duckdb`` Python package, pip-installed if missing."""
    try:
        return importlib.import_module("duckdb")
    except ImportError:
        with FileLock(_INSTALL_LOCK):
            done = subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "duckdb"],
                capture_output=True,
                text=True,
                check=False,
            )
        importlib.invalidate_caches()
        try:
            return importlib.import_module("duckdb")
        except ImportError:
            unavailable("the duckdb package", done.stderr.strip()[-500:])
            raise
