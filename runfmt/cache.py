"""The cross-run cache: a committed record found by its key in any run of the store.

Served by the store's `runfmt.index.Index`. Only records that a run's newest
manifest revision lists are indexed; failure records (a non-null ``_error``,
REC-5) never are; a lookup matches the stage name and, unless told otherwise,
the record schema version ``"1"`` (the writer's default), so a stage written
with a new record schema version never hits records of the old one. When
several runs hold a key, the newest run wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import orjson

from runfmt.errors import InvalidInputError, RunfmtError
from runfmt.format.frames import DataFrame, FrameDecoder
from runfmt.format.records import Record, is_failure
from runfmt.index import Index

__all__ = ["DEFAULT_VERSION", "Cache", "CacheHit", "Provenance"]

DEFAULT_VERSION = "1"
"""The record schema version a lookup asks for by default: the writer's default."""
_CANDIDATES = 8

_LOOKUP = (
    "SELECT f.created_ts, f.run_id, f.path, f.record_schema_version, c.frame_start, c.frame_end,"
    " c.line FROM cache AS c JOIN files AS f ON f.file_id = c.file_id "
    "WHERE c.stage = ? AND c.key = ? {version}"
)
_CONTAINS = (
    "SELECT DISTINCT c.key FROM cache AS c JOIN files AS f ON f.file_id = c.file_id "
    "WHERE c.stage = ? AND c.key IN (SELECT value FROM json_each(?)) {version}"
)
_VERSION = "AND f.record_schema_version = ? "
_SQL = {
    (name, versioned): sql.format(version=_VERSION if versioned else "")
    for name, sql in (("lookup", _LOOKUP), ("contains", _CONTAINS))
    for versioned in (False, True)
}


class Provenance(NamedTuple):
    """Where a cached record is: run, stage, file, and its position in the file."""

    run_id: str
    stage: str
    path: str
    record_schema_version: str
    frame_start: int
    """Byte offset of the zstd frame holding the record."""
    frame_end: int
    line: int
    """0-based line of the record within its frame."""
    location: str
    """The path or URL of the stage file."""

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


class CacheHit(NamedTuple):
    """A committed record with the key asked for, and where it came from."""

    key: str
    record: Record
    provenance: Provenance

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "record": self.record, "provenance": self.provenance.to_json()}


class Cache:
    """Cross-run lookups by key. Get it as ``Store.cache``.

    The first lookup refreshes the index; later ones use it as it stands, so
    call `refresh` to see runs committed since (a miss only costs a recompute).
    ``record_schema_version=None`` matches any version.
    """

    def __init__(self, index: Index) -> None:
        self.index = index
        self._fresh = False

    def __repr__(self) -> str:
        return f"Cache({self.index!r})"

    def refresh(self) -> None:
        """Index what was committed since the last refresh."""
        self.index.refresh()
        self._fresh = True

    def _ensure(self) -> None:
        if not self._fresh:
            self.refresh()

    def _candidates(
        self, stage: str, key: str, version: str | None, limit: int
    ) -> list[Provenance]:
        self._ensure()
        sql = _SQL["lookup", version is not None]
        rows = self.index.query(sql, [stage, key, *([version] if version is not None else [])])
        if len(rows) > 1:
            rows.sort(key=lambda r: (r[0] or 0.0, r[1]), reverse=True)
        return [
            Provenance(run_id, stage, path, v, start, end, line, self.index.where(run_id, path))
            for _, run_id, path, v, start, end, line in rows[:limit]
        ]

    def lookup(
        self, stage: str, key: str, *, record_schema_version: str | None = DEFAULT_VERSION
    ) -> Provenance | None:
        """Where the newest committed record with ``key`` is, from the index alone."""
        found = self._candidates(stage, key, record_schema_version, 1)
        return found[0] if found else None

    def get(
        self, stage: str, key: str, *, record_schema_version: str | None = DEFAULT_VERSION
    ) -> CacheHit | None:
        """The newest committed, non-failure record with ``key`` in ``stage``, or None.

        Reads the one zstd frame that holds it (its checksum is verified). A
        candidate whose file no longer matches the index is re-indexed and skipped.
        """
        for where in self._candidates(stage, key, record_schema_version, _CANDIDATES):
            record = self._read(where)
            key_field = self._key_field(where)
            if record is not None and key_field is not None and record.get(key_field) == key:
                return CacheHit(key, record, where)
            self.index.run(where.run_id)
        return None

    def record(
        self, stage: str, key: str, *, record_schema_version: str | None = DEFAULT_VERSION
    ) -> Record | None:
        """`get` without the provenance: a ready-made ``reuse(stage, key)`` hook."""
        hit = self.get(stage, key, record_schema_version=record_schema_version)
        return None if hit is None else hit.record

    def _key_field(self, where: Provenance) -> str | None:
        summary = self.index.run(where.run_id, refresh=False)
        stage = summary.stage(where.stage) if summary else None
        return stage.key_field if stage else None

    def _read(self, where: Provenance) -> Record | None:
        try:
            data = self.index.read_range(where.run_id, where.path, where.frame_start,
                                         where.frame_end)  # fmt: skip
            decoder = FrameDecoder(start=where.frame_start)
            frames = [e for e in decoder.feed(data) if isinstance(e, DataFrame)]
            decoder.close()
            lines = frames[0].content.split(b"\n") if len(frames) == 1 else []
            record = orjson.loads(lines[where.line]) if where.line < len(lines) - 1 else None
        except (RunfmtError, OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(record, dict) or is_failure(record):
            return None
        return record

    def contains(
        self,
        stage: str,
        keys: Iterable[str],
        *,
        record_schema_version: str | None = DEFAULT_VERSION,
    ) -> set[str]:
        """Which of ``keys`` have a committed record in ``stage``: one query for all of them."""
        self._ensure()
        wanted = list(keys)
        if not wanted:
            return set()
        if not all(isinstance(k, str) for k in wanted):
            raise InvalidInputError("cache keys must be strings")
        version = record_schema_version
        sql = _SQL["contains", version is not None]
        params: list[Any] = [stage, orjson.dumps(wanted).decode()]
        params += [version] if version is not None else []
        return {row[0] for row in self.index.query(sql, params)}
