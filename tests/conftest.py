"""Shared fixtures. Area-specific fixtures live in ``tests/fixtures_*.py`` modules listed here."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from unittest.mock import Mock

import fsspec
import pytest
from hypothesis import HealthCheck, settings

import runfmt.run
from runfmt.run import RunWriter
from runfmt.store import Store

pytest_plugins: list[str] = ["tests.fixtures_tools", "tests.fixtures_s3", "tests.fixtures_manage"]


settings.register_profile(
    "runfmt", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # timing checks fail spuriously on a loaded 2-core machine
settings.load_profile("runfmt")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Collecting no test at all is a failure (exit 1), never pytest's ambiguous exit 5."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """An empty store in a fresh local folder."""
    return Store(tmp_path_factory.mktemp("store") / "runs")


@pytest.fixture
def memory_store() -> Iterator[Store]:
    """An empty store on fsspec ``memory://``, removed afterwards (memory:// is process-global)."""
    url = f"memory://runfmt-test-{uuid.uuid4().hex}"
    yield Store(url)
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture
def flush_without_commit() -> Callable[[RunWriter], None]:
    """A flush that writes its frames and fails before its revision exists, as a crash
    there would leave them (COMMIT-8)."""

    def flush(writer: RunWriter) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runfmt.run, "commit_locked", Mock(side_effect=OSError("disk gone")))
            with pytest.raises(OSError, match="disk gone"):
                writer.flush()

    return flush
