"""Shared fixtures. Area-specific fixtures live in ``tests/fixtures_*.py`` modules listed here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest

from runfmt.store import Store

pytest_plugins: list[str] = []


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
