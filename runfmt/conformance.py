"""The reader contract of the conformance suite: a normalized JSON view of a run (spec §13).

Any implementation that prints the same view for every valid case of
``tests/conformance/`` and fails on every invalid one reads runs as this one does.
"""

from __future__ import annotations

import os
from typing import Any

from runfmt.check import verify_run
from runfmt.format.records import is_failure, record_key
from runfmt.format.validate import Problem
from runfmt.run import RunReader
from runfmt.storage import Storage

__all__ = ["check_run", "normalized_view", "view_of"]


def view_of(reader: RunReader) -> dict[str, Any]:
    """The normalized view of a committed run: identity, status, stages and their records.

    Members come in a fixed order; records keep their file order and member order.
    Commit bookkeeping (``revision``, ``updated_at``, ``writer``) is left out, so
    two conforming writers or repairs of the same data give the same view.
    """
    m = reader.manifest
    stages = []
    for stage in m.stages:
        records = [r for batch in reader.record_batches(stage.name) for r in batch]
        kf = stage.key_field
        keys = sorted({k for r in records if (k := record_key(r, kf)) and not is_failure(r)})
        stages.append(
            {
                "name": stage.name,
                "status": stage.status,
                "record_schema_version": stage.record_schema_version,
                "key_field": kf,
                "files": len(stage.files),
                "record_count": stage.records,
                "failures": stage.failures,
                "keys": keys,
                "records": records,
            }
        )
    return {
        "run_id": m.run_id,
        "name": m.name,
        "format_version": m.format_version,
        "status": m.status,
        "error": m.error,
        "created_at": m.created_at,
        "finished_at": m.finished_at,
        "config": dict(m.config),
        "config_hash": m.config_hash,
        "tags": dict(sorted(m.tags.items())),
        "counters": dict(sorted(m.counters.items())),
        "stages": stages,
        "artifacts": [
            {"path": a.path, "bytes": a.bytes, "sha256": a.sha256, "media_type": a.media_type}
            for a in m.artifacts
        ],
    }


def check_run(storage: Storage) -> tuple[dict[str, Any] | None, list[Problem]]:
    """Verify the run, then build its view: ``(view, [])`` when valid, ``(None, problems)``."""
    problems = verify_run(storage)
    if problems:
        return None, problems
    return view_of(RunReader(storage)), []


def normalized_view(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The normalized view of the run folder at a path or URL, read without verifying it first."""
    return view_of(RunReader(Storage(str(location), storage_options, read_only=True)))
