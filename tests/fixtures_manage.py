"""Fixtures for the commands over many runs (diff, compare, report, gc, export, import).

`cli` runs the real entry point in-process; `make_run` writes a small finished
run; `chromium` gives a headless browser, installed with apt-get when missing
(with ``CI=true`` a browser that cannot be had fails the test, never skips it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import pytest

from runfmt.cli import main
from runfmt.store import Store
from tests.fixtures_tools import unavailable

__all__ = ["Cli", "MakeRun", "chromium", "cli", "make_run"]

_install_lock = threading.Lock()
_BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class Cli(Protocol):
    def __call__(self, store: Store | str, *args: str) -> tuple[int, str, str]: ...


class MakeRun(Protocol):
    def __call__(
        self,
        store: Store,
        name: str,
        config: Mapping[str, Any] | None = ...,
        stages: Mapping[str, tuple[str | None, Sequence[Mapping[str, Any]]]] | None = ...,
        *,
        counters: Mapping[str, float] | None = ...,
        status: str = ...,
        run_id: str | None = ...,
        tags: Mapping[str, str] | None = ...,
    ) -> str: ...


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``runfmt --store STORE ARGS...`` through `main`: (exit code, stdout, stderr)."""

    def run(store: Store | str, *args: str) -> tuple[int, str, str]:
        url = store.url if isinstance(store, Store) else store
        monkeypatch.setattr(sys, "argv", ["runfmt", "--store", url, *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        code = exit_info.value.code
        assert "Traceback" not in err
        return (code if isinstance(code, int) else 1), out, err

    return run


def _make_run(
    store: Store,
    name: str,
    config: Mapping[str, Any] | None = None,
    stages: Mapping[str, tuple[str | None, Sequence[Mapping[str, Any]]]] | None = None,
    *,
    counters: Mapping[str, float] | None = None,
    status: str = "completed",
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    writer = store.create_run(name, config or {}, run_id=run_id, tags=tags)
    for stage, (key_field, records) in (stages or {}).items():
        writer.stage(stage, key_field=key_field).extend(records)
    for counter, value in (counters or {}).items():
        writer.count(counter, value)
    if status == "running":
        writer.close()
    else:
        writer.finish(status)  # type: ignore[arg-type]
    return writer.run_id


@pytest.fixture
def make_run() -> MakeRun:
    """Write a run with the given stages ``{stage: (key_field, records)}``; returns its id."""
    return _make_run


def _install_chromium() -> str:
    if shutil.which("apt-get") is None:
        return "apt-get not found"
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=600"]
    for cmd in (
        ["apt-get", *wait, "update", "-q"],
        ["apt-get", *wait, "install", "-y", "-q", "chromium"],
    ):
        done = subprocess.run(sudo + cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            return f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-500:]}"
    return ""


def _find_browser() -> str | None:
    return next((p for p in map(shutil.which, _BROWSERS) if p), None)


@pytest.fixture(scope="session")
def chromium() -> Callable[..., subprocess.CompletedProcess[str]]:
    """A function running headless Chromium with extra arguments, offline and sandbox-free."""
    path = _find_browser()
    if path is None:
        with _install_lock:
            detail = _install_chromium()
        path = _find_browser()
        if path is None:
            unavailable("headless Chromium", detail or "not on PATH after installing")
    assert path is not None
    browser = path

    def run(*args: str, profile: str) -> subprocess.CompletedProcess[str]:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
        ]
        return subprocess.run(
            [browser, *flags, *args], capture_output=True, text=True, timeout=120, check=False
        )

    return run
