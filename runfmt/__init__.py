"""runfmt: a filesystem-native format for the runs of evaluations, experiments and pipelines.

Open a `Store`, create a run, write records to stages, read them back::

    import runfmt

    store = runfmt.Store("./runs")
    with store.create_run("my-eval", {"model": "m1"}) as run:
        run.append("score", {"key": "q1", "correct": True})
    for record in store.open_run(run.run_id).records("score"):
        print(record)
"""

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
from runfmt.format.keys import canonical_json, compute_key
from runfmt.format.manifest import ArtifactEntry, FileEntry, Manifest, StageEntry
from runfmt.format.validate import Problem
from runfmt.run import RunReader, RunWriter, StageWriter
from runfmt.store import Store, open_run

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
    "open_run",
]
