"""runfmt: a filesystem-native format for the runs of evaluations, experiments and pipelines.

Open a `Store`, create a run, write records to stages, read them back::

    import runfmt

    store = runfmt.Store("./runs")
    with store.create_run("my-eval", {"model": "m1"}) as run:
        run.append("score", {"key": "q1", "correct": True})
    for record in store.open_run(run.run_id).records("score"):
        print(record)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runfmt._version import __version__
from runfmt.errors import (
    ChecksumMismatchError,
    ConflictError,
    FormatError,
    IndexStaleError,
    InvalidInputError,
    LockTimeoutError,
    ManifestError,
    ReadOnlyError,
    RunExistsError,
    RunfmtError,
    RunNotFoundError,
    StageFileError,
    StorageError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from runfmt.format.keys import canonical_json, compute_key
    from runfmt.format.manifest import ArtifactEntry, FileEntry, Manifest, StageEntry
    from runfmt.format.validate import Problem
    from runfmt.lifecycle import OpenedRun, deterministic_run_id
    from runfmt.run import RunReader, RunWriter, StageWriter
    from runfmt.store import Store, open_run

_LAZY = {
    "canonical_json": "runfmt.format.keys",
    "compute_key": "runfmt.format.keys",
    "ArtifactEntry": "runfmt.format.manifest",
    "FileEntry": "runfmt.format.manifest",
    "Manifest": "runfmt.format.manifest",
    "StageEntry": "runfmt.format.manifest",
    "Problem": "runfmt.format.validate",
    "OpenedRun": "runfmt.lifecycle",
    "deterministic_run_id": "runfmt.lifecycle",
    "RunReader": "runfmt.run",
    "RunWriter": "runfmt.run",
    "StageWriter": "runfmt.run",
    "Store": "runfmt.store",
    "open_run": "runfmt.store",
}


def __getattr__(name: str) -> Any:
    """Import the heavier parts of the API on first use, so the CLI starts fast."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runfmt' has no attribute {name!r}")


__all__ = [
    "ArtifactEntry",
    "ChecksumMismatchError",
    "ConflictError",
    "FileEntry",
    "FormatError",
    "IndexStaleError",
    "InvalidInputError",
    "LockTimeoutError",
    "Manifest",
    "ManifestError",
    "OpenedRun",
    "Problem",
    "ReadOnlyError",
    "RunExistsError",
    "RunNotFoundError",
    "RunReader",
    "RunWriter",
    "RunfmtError",
    "StageEntry",
    "StageFileError",
    "StageWriter",
    "StorageError",
    "Store",
    "UnsupportedFormatError",
    "__version__",
    "canonical_json",
    "compute_key",
    "deterministic_run_id",
    "open_run",
]
