"""The cross-run cache: a committed record found by its key in any run of the store.

Served by the store's `runfmt.index.Index`. Only records that a run's newest
manifest revision lists are indexed; failure records (a non-null ``_error``,
REC-5) never are; a lookup matches the stage name and, unless told otherwise,
the record schema version ``"1"`` (the writer's default), so a stage written
with a new record schema version never hits records of the old one. When
several runs hold a key, the newest run wins.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from runfmt.errors import InvalidInputError, RunfmtError
from runfmt.format.frames import DataFrame, FrameDecoder
from runfmt.format.records import Record, is_failure
from runfmt.index import Index, log_warning

__all__ = ["DEFAULT_VERSION", "Cache", "CacheHit", "Provenance"]

DEFAULT_VERSION = "1"
"""The record schema version a lookup asks for by default: the writer's default."""
_CANDIDATES = 8
_FRAMES = 4
"""Decoded frames kept for reuse (writers make frames near 1 MiB)."""
_FRAME_BYTES = 16 << 20
"""The content bytes kept beyond the newest frame, which is always kept (the spec caps a
frame at 64 MiB): so at most max(16 MiB, one frame) of content is held."""

_COLUMNS = (
    "f.created_key, f.run_id, f.ordinal, c.frame_start, c.line, "
    "f.path, f.record_schema_version, c.frame_end, f.key_field"
)
"""A candidate: its rank (`_rank`), then the rest of its provenance and its key field."""
_JOIN = " FROM cache AS c JOIN files AS f ON f.file_id = c.file_id "
_LOOKUP = "SELECT " + _COLUMNS + _JOIN + "WHERE c.stage = ? AND c.key = ? {version}"
_CONTAINS = (
    "SELECT DISTINCT c.key" + _JOIN
    + "WHERE c.stage = ? AND c.key IN (SELECT value FROM json_each(?)) {version}"
)  # fmt: skip
_MANY = (
    "SELECT c.key, " + _COLUMNS + _JOIN
    + "WHERE c.stage = ? AND c.key IN (SELECT value FROM json_each(?)) {version}"
)  # fmt: skip
_VERSION = "AND f.record_schema_version = ? "
_SQL = {
    (name, versioned): sql.format(version=_VERSION if versioned else "")
    for name, sql in (("lookup", _LOOKUP), ("contains", _CONTAINS), ("many", _MANY))
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


_Frame = tuple[str, str, int, int]
"""A frame's run id, path, start and end."""


def _frame(where: Provenance) -> _Frame:
    return where.run_id, where.path, where.frame_start, where.frame_end


def _rank(candidate: Sequence[Any]) -> tuple[Any, ...]:
    """Newest run first; within a run, the last record written: the later file in its
    stage's list, then the later frame and line."""
    created_key, run_id, ordinal, start, line = candidate[:5]
    return created_key or "", run_id, ordinal, start, line


class Cache:
    """Cross-run lookups by key. Get it as ``Store.cache``.

    The first lookup refreshes the index; later ones use it as it stands, so
    call `refresh` to see runs committed since (a miss only costs a recompute).
    ``record_schema_version=None`` matches any version.

    The few frames read last are kept, so gets of keys in the same frame decompress
    it once: the first get finds its line by the key's bytes, a second one splits the
    frame into lines for those that follow. A kept frame is served only while its file
    still exists and is long enough (one stat, or one size request on an object store).
    Safe to share across threads, like the index.
    """

    def __init__(self, index: Index) -> None:
        self.index = index
        self._fresh = False
        self._frames: OrderedDict[_Frame, _Kept] = OrderedDict()
        self._frames_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Cache({self.index!r})"

    def refresh(self) -> None:
        """Index what was committed since the last refresh."""
        self.index.refresh()
        self._fresh = True

    def _ensure(self) -> None:
        if not self._fresh:
            self.refresh()

    def _provenance(self, stage: str, candidate: Sequence[Any]) -> tuple[Provenance, str]:
        """A candidate's provenance and the key field of its stage."""
        _, run_id, _, start, line, path, version, end, key_field = candidate
        where = self.index.where(run_id, path)
        return Provenance(run_id, stage, path, version, start, end, line, where), key_field

    def _candidates(self, stage: str, key: str, version: str | None) -> list[tuple[Any, ...]]:
        """The index rows of ``key``, best first (`_rank`)."""
        _check_query(stage, version)
        if not isinstance(key, str):
            raise InvalidInputError(f"a cache key is a string, not {type(key).__name__}",
                                    hint="compute one with runfmt.compute_key")  # fmt: skip
        self._ensure()
        if version is None:
            rows = self.index.query(_SQL["lookup", False], (stage, key))
        else:
            rows = self.index.query(_SQL["lookup", True], (stage, key, version))
        if len(rows) > 1:
            rows.sort(key=_rank, reverse=True)
        return rows

    def lookup(
        self, stage: str, key: str, *, record_schema_version: str | None = DEFAULT_VERSION
    ) -> Provenance | None:
        """Where the newest committed record with ``key`` is, from the index alone."""
        rows = self._candidates(stage, key, record_schema_version)
        return self._provenance(stage, rows[0])[0] if rows else None

    def get(
        self, stage: str, key: str, *, record_schema_version: str | None = DEFAULT_VERSION
    ) -> CacheHit | None:
        """The newest committed, non-failure record with ``key`` in ``stage``, or None.

        Reads the one zstd frame that holds it (its checksum is verified), unless
        that frame is one of the few kept from earlier calls. A candidate whose
        file no longer matches the index is skipped and its run re-indexed; after a
        few such candidates, the index is asked again.
        """
        tried: set[tuple[Any, ...]] = set()
        while True:
            rows = self._candidates(stage, key, record_schema_version)
            fresh = [row for row in rows if row not in tried][:_CANDIDATES]
            if not fresh:
                return None
            for row in fresh:
                where, key_field = self._provenance(stage, row)
                record = _record(self._line(self._kept(where), where, key), key_field, key)
                if record is not None:
                    return CacheHit(key, record, where)
                tried.add(row)
                self.index.run(where.run_id, keys=True)

    def get_many(
        self,
        stage: str,
        keys: Iterable[str],
        *,
        record_schema_version: str | None = DEFAULT_VERSION,
    ) -> dict[str, CacheHit]:
        """The hits among ``keys`` (misses are absent), by the rules of `get`.

        One index query for all of them; each frame holding a hit is read once.
        A key whose newest candidate no longer matches its file falls back to `get`.
        """
        _check_query(stage, record_schema_version)
        wanted = _strings(keys)
        if not wanted:
            return {}
        self._ensure()
        version = record_schema_version
        params: list[Any] = [stage, orjson.dumps(wanted).decode()]
        params += [version] if version is not None else []
        newest: dict[str, tuple[Any, ...]] = {}
        for row in self.index.query(_SQL["many", version is not None], params):
            key = row[0]
            if key not in newest or _rank(row[1:]) > _rank(newest[key][1:]):
                newest[key] = row
        by_frame: dict[_Frame, list[tuple[str, Provenance, str]]] = {}
        for key, row in newest.items():
            where, key_field = self._provenance(stage, row[1:])
            by_frame.setdefault(_frame(where), []).append((key, where, key_field))
        hits: dict[str, CacheHit] = {}
        for frame in sorted(by_frame):
            found = by_frame[frame]
            kept = self._kept(found[0][1])
            for key, where, key_field in found:
                record = _record(self._line(kept, where, key), key_field, key)
                hit = (
                    CacheHit(key, record, where)
                    if record is not None
                    else self.get(stage, key, record_schema_version=version)
                )
                if hit is not None:
                    hits[key] = hit
        return {key: hits[key] for key in wanted if key in hits}

    def record(
        self, stage: str, key: str, *, record_schema_version: str | None = DEFAULT_VERSION
    ) -> Record | None:
        """`get` without the provenance: a ready-made ``reuse(stage, key)`` hook."""
        hit = self.get(stage, key, record_schema_version=record_schema_version)
        return None if hit is None else hit.record

    def _line(self, kept: _Kept | None, where: Provenance, key: str) -> bytes | None:
        """Line ``where.line`` of a frame, None when there is no such line.

        The first time, the line is found by its key, at C speed; later, for the gets
        that follow in written order, the frame is split into lines once and kept so.
        """
        if kept is None:
            return None
        if not kept.searched:
            kept.searched = True
            found = _line_with_key(kept.content, where.line, key)
            if found is not None:
                return found
        with self._frames_lock:
            if kept.lines is None:
                kept.lines, kept.content = kept.content.split(b"\n"), b""
        lines = kept.lines
        return lines[where.line] if where.line < len(lines) - 1 else None

    def _kept(self, where: Provenance) -> _Kept | None:
        """The frame holding ``where``: kept from an earlier read while its file is still
        long enough, else read (checksum verified); None when unreadable."""
        frame = _frame(where)
        with self._frames_lock:
            kept = self._frames.get(frame)
            if kept is not None:
                self._frames.move_to_end(frame)
        if kept is not None:
            try:
                size = self.index.file_size(where.run_id, where.path)
            except (RunfmtError, OSError):
                size = None
            if size is not None and size >= where.frame_end:
                return kept
            with self._frames_lock:
                self._frames.pop(frame, None)
            return None
        try:
            data = self.index.read_range(where.run_id, where.path, where.frame_start,
                                         where.frame_end)  # fmt: skip
            decoder = FrameDecoder(start=where.frame_start)
            frames = [e for e in decoder.decode(data) if isinstance(e, DataFrame)]
            decoder.close()
        except FileNotFoundError:  # the run was removed or replaced since it was indexed
            return None
        except (RunfmtError, OSError) as exc:
            log_warning("runfmt: %s: the frame holding cached records is unreadable, skipped: "
                        "%s (run `runfmt verify`)", where.location, exc)  # fmt: skip
            return None
        if len(frames) != 1:
            return None
        kept = _Kept(frames[0].content)
        with self._frames_lock:
            self._frames[frame] = kept
            self._frames.move_to_end(frame)
            held = sum(k.size for k in self._frames.values())
            while len(self._frames) > 1 and (len(self._frames) > _FRAMES or held > _FRAME_BYTES):
                held -= self._frames.popitem(last=False)[1].size
        return kept

    def stages(self) -> list[str]:
        """The keyed stages that have indexed records, sorted."""
        return [s for (s,) in self.index.query("SELECT DISTINCT stage FROM files ORDER BY 1")]

    def contains(
        self,
        stage: str,
        keys: Iterable[str],
        *,
        record_schema_version: str | None = DEFAULT_VERSION,
    ) -> set[str]:
        """Which of ``keys`` have a committed record in ``stage``: one query for all of them."""
        _check_query(stage, record_schema_version)
        self._ensure()
        wanted = _strings(keys)
        if not wanted:
            return set()
        version = record_schema_version
        sql = _SQL["contains", version is not None]
        params: list[Any] = [stage, orjson.dumps(wanted).decode()]
        params += [version] if version is not None else []
        return {row[0] for row in self.index.query(sql, params)}


def _check_query(stage: object, version: object) -> None:
    if not isinstance(stage, str):
        raise InvalidInputError(f"a stage name is a string, not {type(stage).__name__}")
    if version is not None and not isinstance(version, str):
        raise InvalidInputError(
            f"record_schema_version is a string or None, not {type(version).__name__}"
        )


def _strings(keys: Iterable[str]) -> list[str]:
    """``keys`` without repeats, in order; InvalidInputError unless all are strings."""
    if isinstance(keys, str):
        raise InvalidInputError("keys must be a collection of keys, not one string",
                                hint=f"pass [{keys!r:.60}] for one key")  # fmt: skip
    wanted = list(keys)
    if not all(isinstance(k, str) for k in wanted):
        raise InvalidInputError("cache keys must be strings")
    return list(dict.fromkeys(wanted))


class _Kept:
    """A decoded frame kept for later gets: its content, then its lines once split."""

    __slots__ = ("content", "lines", "searched", "size")

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.size = len(content)
        self.lines: list[bytes] | None = None
        self.searched = False


def _line_with_key(content: bytes, line: int, key: str) -> bytes | None:
    """Line ``line`` of ``content`` when the first line holding ``key`` as a JSON string is
    that one (as runfmt writes keys; other escapes of it are found by splitting)."""
    at = content.find(orjson.dumps(key))
    if at < 0:
        return None
    start = content.rfind(b"\n", 0, at) + 1
    end = content.find(b"\n", at)
    if end < 0 or content.count(b"\n", 0, start) != line:
        return None
    return content[start:end]


def _record(line: bytes | None, key_field: str, key: str) -> Record | None:
    """The record of ``line`` if it is not a failure and its key field is ``key``."""
    if line is None:
        return None
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or is_failure(record) or record.get(key_field) != key:
        return None
    return record
