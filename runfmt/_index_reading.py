"""How the index reads a store: run stamps, manifests summarized into rows, stage files
scanned for cache keys. Local stores are read with `os` directly (no fsspec import, so
that ``runfmt ls`` starts fast); any other store through `runfmt.storage.Storage`.
"""

from __future__ import annotations

import json
import operator
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

import orjson

from runfmt._local import open_regular
from runfmt.errors import FormatError, RunfmtError, RunNotFoundError, StageFileError
from runfmt.format import names
from runfmt.format.records import MAX_DEPTH, too_deep

if TYPE_CHECKING:
    from runfmt.storage import Storage

__all__ = [
    "RACY_NS",
    "RUN_STATUSES",
    "UNREADABLE",
    "Changes",
    "FileWork",
    "KeyedFile",
    "LocalSource",
    "Row",
    "Source",
    "Stamp",
    "StorageSource",
    "is_racy",
    "moment_key",
    "pending",
    "scan_file",
    "summarize",
    "time_key",
    "unreadable",
]

REMOTE_REQUESTS = 16
"""Requests in flight at once when reconciling with a remote store."""
T = TypeVar("T")
R = TypeVar("R")
UNREADABLE = "unreadable"
"""The status listed for a run whose manifest cannot be read (its ``problem`` says why)."""
RUN_STATUSES = ("running", "completed", "failed", "cancelled")
"""`runfmt.format.manifest.RUN_STATUSES`, not imported from there: it loads jsonschema,
which ``runfmt ls`` must not wait for."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_COUNT = 2**63 - 1
"""The largest count or integer counter the index stores (SQLite integers; MAN-5, COMMIT-5)."""
RACY_NS = 3_000_000_000
"""A run whose ``_manifests/`` changed this recently is re-read at the next refresh,
since a later commit within the same timestamp tick would leave its stamp unchanged."""
Stamp = int | str
"""What tells that a run changed: on local disk the change time (ns) of its ``_manifests/``;
text when it was taken otherwise (``racy:``, ``bare:``, ``rev:`` on object stores)."""
_change_ns = operator.attrgetter("st_mtime_ns" if sys.platform == "win32" else "st_ctime_ns")
"""The inode change time: every entry added or removed changes it, and unlike the modification
time no copy can set it back. Windows reports the creation time there: its mtime instead."""


KEYS_PENDING = "keys:"
"""Prefix of the stamp of a run listed but whose new records' keys are not indexed yet: a
listing takes it as the stamp behind it, a refresh with keys (the cache's) as changed."""


DENIED = "denied"
"""The stamp of a run folder this process may not look into: listed as unreadable."""


def pending(stamp: Stamp) -> str:
    return f"{KEYS_PENDING}{stamp}"


def is_racy(stamp: Stamp) -> bool:
    """Whether the run changed too recently for its stamp to show a later change."""
    return isinstance(stamp, str) and stamp.startswith("racy:")


_TIMESTAMP = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8})(?:\.([0-9]{1,9}))?Z")


def time_key(value: object) -> str | None:
    """A MAN-9 timestamp as text that sorts as the times do, to the nanosecond
    (``YYYY-MM-DDTHH:MM:SS.fffffffff``); None for anything else."""
    found = _TIMESTAMP.fullmatch(value) if isinstance(value, str) else None
    if found is None:
        return None
    return f"{found[1]}.{(found[2] or '').ljust(9, '0')}"


def moment_key(moment: datetime) -> str:
    """`time_key` of an aware time; one that is no MAN-9 time in UTC sorts before or after
    every one."""
    try:
        m = moment.astimezone(UTC)
    except OverflowError:
        return "" if moment.year == 1 else "~"
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:"
            f"{m.second:02d}.{m.microsecond:06d}000")  # fmt: skip


class Changes(NamedTuple):
    """What a reconciling pass over the store found."""

    present: int
    """How many runs the store holds."""
    changed: list[tuple[str, Stamp]]
    """The runs to read again, with their new stamp."""
    gone: set[str]
    """The indexed runs that are no longer in the store."""


class Source:
    """How the index reads a store: local disk directly, anything else through `Storage`."""

    url: str

    def run_names(self) -> list[str]:
        raise NotImplementedError

    def stamp(self, run_id: str) -> Stamp | None:
        """A value that changes whenever the run commits; None when it is not a run."""
        raise NotImplementedError

    def changes(self, known: Mapping[str, Stamp], keys: bool = True) -> Changes:
        """The store's runs compared with the ``known`` stamps: which changed (or are racy),
        with their new stamp, and which known ones are no longer runs. With ``keys``, a run
        whose keys are pending counts as changed."""
        present = self.run_names()
        changed: list[tuple[str, Stamp]] = []
        gone = set(known).difference(present)
        for run_id, stamp in zip(present, self.map(self.stamp, present), strict=True):
            indexed = known.get(run_id)
            if stamp is None:
                if run_id in known:
                    gone.add(run_id)
            elif is_racy(stamp) or (indexed != stamp and (keys or indexed != pending(stamp))):
                changed.append((run_id, stamp))
        return Changes(len(present), changed, gone)

    def manifest(self, run_id: str) -> tuple[int, bytes]:
        """The newest manifest revision's number and bytes (the listing rule of COMMIT-7)."""
        raise NotImplementedError

    def open_range(self, run_id: str, path: str, start: int) -> Any:
        raise NotImplementedError

    def read_range(self, run_id: str, path: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    def size(self, run_id: str, path: str) -> int | None:
        """The size of a run's file, or None when it is gone: one stat (or info) call."""
        raise NotImplementedError

    def where(self, run_id: str, path: str = "") -> str:
        raise NotImplementedError

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items``, in order (concurrently where each call waits on the network)."""
        return [fn(item) for item in items]


def _no_revision(has_manifest_file: bool) -> NoReturn:
    """A folder without revisions is a damaged run with ``manifest.json``, else no run."""
    if has_manifest_file:
        raise FormatError(
            "no revisions in _manifests/ (LAYOUT-2)",
            hint="the folder was copied without _manifests/; copy it whole",
        )
    raise RunNotFoundError("no revision and no manifest.json: not a run (LAYOUT-2)")


def _change_ns_or_none(path: str) -> int | None:
    """The change time of ``path``, or None when it cannot be stat'ed (gone, no folder)."""
    try:
        return int(_change_ns(os.stat(path)))
    except OSError:
        return None


def _stamp_of(st: os.stat_result, racy: int) -> Stamp:
    """A stamp from the stat of ``_manifests/``: ``racy:`` when changed after ``racy`` (ns)."""
    changed: int = _change_ns(st)
    return f"racy:{changed}" if changed > racy else changed


class _Listing(NamedTuple):
    runs: list[str]
    paths: list[str]
    """Each run's ``_manifests/`` folder, the path a refresh stats."""
    run_set: frozenset[str]


class LocalSource(Source):
    def __init__(self, root: str) -> None:
        self.url = root
        self._listing: tuple[tuple[int, int, int], _Listing] | None = None

    def _run_folders(self, racy: int) -> _Listing:
        """The store's folders named like runs (links excluded), listed again only when
        the store folder's own stat changed: adding, removing or renaming an entry changes
        its change time (POSIX; unlike its mtime, no copy or ``touch`` sets it back), so an
        unchanged, non-racy stat means the same names."""
        try:
            st = os.stat(self.url)
        except FileNotFoundError:
            return _Listing([], [], frozenset())
        stamp = (st.st_ino, _change_ns(st), st.st_nlink)
        if self._listing is not None and self._listing[0] == stamp:
            return self._listing[1]
        with os.scandir(self.url) as entries:
            folders = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        runs = names.run_ids(folders)
        suffix = "/" + names.MANIFESTS_DIR
        listing = _Listing(runs, [f"{self.url}/{r}{suffix}" for r in runs], frozenset(runs))
        self._listing = (stamp, listing) if stamp[1] <= racy else None
        return listing

    def stamp(self, run_id: str) -> Stamp | None:
        try:
            st = os.stat(f"{self.url}/{run_id}/{names.MANIFESTS_DIR}")
        except OSError:
            return self._bare_stamp(run_id)
        return _stamp_of(st, time.time_ns() - RACY_NS)

    def changes(self, known: Mapping[str, Stamp], keys: bool = True) -> Changes:
        """One stat per run, of its ``_manifests/``, and one of the store folder: the whole
        cost of a refresh that finds nothing new, a case told at C speed (every stamp as
        indexed, none racy) before any run is looked at one by one."""
        racy = time.time_ns() - RACY_NS
        runs, paths, run_set = self._run_folders(racy)
        gone = set(known.keys() - run_set)
        stamps: Sequence[int | None]
        try:
            exact: list[int] = list(map(_change_ns, map(os.stat, paths)))
        except OSError:
            stamps = list(map(_change_ns_or_none, paths))
        else:
            if max(exact, default=0) <= racy and exact == list(map(known.get, runs)):
                return Changes(len(runs), [], gone)
            stamps = exact
        get = known.get
        changed: list[tuple[str, Stamp]] = []
        present = 0
        for run_id, ns in zip(runs, stamps, strict=True):
            if ns is None:
                bare = self._bare_stamp(run_id)
                if bare is None:
                    if run_id in known:
                        gone.add(run_id)
                    continue
                present += 1
                if get(run_id) != bare and (keys or get(run_id) != pending(bare)):
                    changed.append((run_id, bare))
                continue
            present += 1
            if ns > racy:
                changed.append((run_id, f"racy:{ns}"))
            elif get(run_id) != ns and (keys or get(run_id) != pending(ns)):
                changed.append((run_id, ns))
        return Changes(present, changed, gone)

    def _bare_stamp(self, run_id: str) -> str | None:
        """The stamp of a folder with ``manifest.json`` but no ``_manifests/``, or that this
        process may not look into (both unreadable runs); None for a folder holding neither."""
        try:
            st = os.stat(f"{self.url}/{run_id}/{names.MANIFEST_FILE}")
        except PermissionError:
            return DENIED
        except OSError:
            return None
        return f"bare:{st.st_mtime_ns}:{st.st_size}"

    def manifest(self, run_id: str) -> tuple[int, bytes]:
        folder = f"{self.url}/{run_id}/{names.MANIFESTS_DIR}"
        try:
            found = list(filter(None, map(names.parse_revision_file, os.listdir(folder))))
        except FileNotFoundError:
            found = []
        if not found:
            _no_revision(os.path.exists(f"{self.url}/{run_id}/{names.MANIFEST_FILE}"))
        newest = max(found)
        path = f"{self.url}/{run_id}/{names.revision_file(newest)}"
        if os.path.islink(folder):  # the file itself is opened without following a link
            raise FormatError("path goes through a link (LAYOUT-5)", location=path)
        with open_regular(path) as f:
            return newest, f.read()

    def _file(self, run_id: str, path: str) -> str:
        run = os.path.realpath(os.path.join(self.url, run_id))
        full = os.path.join(run, *path.split("/"))
        if os.path.realpath(full) != full:
            raise FormatError("path goes through a link (LAYOUT-5)", location=full)
        return full

    def open_range(self, run_id: str, path: str, start: int) -> Any:
        f = open_regular(self._file(run_id, path))
        f.seek(start)
        return f

    def read_range(self, run_id: str, path: str, start: int, end: int) -> bytes:
        with open_regular(self._file(run_id, path)) as f:
            f.seek(start)
            return f.read(end - start)

    def size(self, run_id: str, path: str) -> int | None:
        try:
            return os.stat(f"{self.url}/{run_id}/{path}").st_size
        except OSError:
            return None

    def where(self, run_id: str, path: str = "") -> str:
        rel = f"{run_id}/{path}" if path else run_id
        return f"{self.url}{os.sep}{rel.replace('/', os.sep)}"


class StorageSource(Source):
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.url = storage.url

    def run_names(self) -> list[str]:
        return [e.name for e in self.storage.list() if e.is_dir and names.is_run_id(e.name)]

    def _newest(self, run_id: str) -> tuple[int, str] | None:
        """The newest revision's number and version (`Entry.version`)."""
        listing = self.storage.list(f"{run_id}/{names.MANIFESTS_DIR}")
        found = [(revision, e.version) for e in listing
                 if (revision := names.parse_revision_file(e.name)) is not None]  # fmt: skip
        return max(found, default=None)

    def stamp(self, run_id: str) -> Stamp | None:
        newest = self._newest(run_id)
        if newest is not None:
            return f"rev:{newest[0]}:{newest[1]}"
        size = self.storage.size(f"{run_id}/{names.MANIFEST_FILE}")
        return None if size is None else f"bare:{size}"

    def manifest(self, run_id: str) -> tuple[int, bytes]:
        newest = self._newest(run_id)
        if newest is None:
            _no_revision(self.storage.exists(f"{run_id}/{names.MANIFEST_FILE}"))
        revision = newest[0]
        return revision, self.storage.read(f"{run_id}/{names.revision_file(revision)}")

    def _checked(self, run_id: str, path: str) -> str:
        rel = f"{run_id}/{path}"
        if not self.storage.inside(rel):
            raise FormatError("path leaves the run folder (LAYOUT-5)", location=self.where(run_id))
        return rel

    def open_range(self, run_id: str, path: str, start: int) -> Any:
        f = self.storage.open_read(self._checked(run_id, path))
        f.seek(start)
        return f

    def read_range(self, run_id: str, path: str, start: int, end: int) -> bytes:
        return self.storage.read_range(self._checked(run_id, path), start, end)

    def size(self, run_id: str, path: str) -> int | None:
        return self.storage.size(self._checked(run_id, path))

    def where(self, run_id: str, path: str = "") -> str:
        return self.storage.where(f"{run_id}/{path}" if path else run_id)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) < 2:
            return [fn(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(REMOTE_REQUESTS, len(items))) as pool:
            return list(pool.map(fn, items))


class KeyedFile(NamedTuple):
    """A listed file of a stage with a key field."""

    path: str
    stage: str
    key_field: str
    record_schema_version: str
    bytes: int
    sha256: str
    ordinal: int
    """The file's place in its stage's list: later files hold later records."""


@dataclass(slots=True)
class Row:
    run_id: str
    stamp: Stamp
    listed: dict[str, Any]
    """What the index lists of the run (`runfmt.index.RunSummary` members)."""
    keyed: list[KeyedFile]
    created_key: str | None = None
    """The creation time as `time_key`."""
    partial: bool = False
    """Whether some of its keyed files could not be indexed: the next refresh reads it again."""
    keys_pending: bool = False
    """Whether its new records' keys were left for a refresh with keys (`KEYS_PENDING`)."""
    replace: bool = False
    """Whether what was indexed of the run is dropped, not added to: a rebuild, or a stage
    whose key field or record schema version changed (a hand-made revision)."""

    @property
    def problem(self) -> str | None:
        problem: str | None = self.listed["problem"]
        return problem

    @property
    def identity(self) -> tuple[Any, ...]:
        """What a run's folder keeps for life: a change means another run took its name."""
        return self.listed["created_at"], self.listed["config_hash"]

    @property
    def values(self) -> tuple[Any, ...]:
        """The runs table's columns after ``run_id`` and ``stamp``."""
        d = self.listed
        return (d["revision"], d["name"], d["status"], d["created_at"], self.created_key,
                d["updated_at"], d["finished_at"], d["heartbeat_at"], d["config_hash"],
                d["error"], orjson.dumps(d).decode(), d["problem"])  # fmt: skip


@dataclass(slots=True)
class FileWork:
    """A keyed file's newly scanned bytes: what was indexed before (length, sha256), whether
    that is dropped (a replaced file), and where the (key, frame start, frame end, line)
    found wait to be stored."""

    file: KeyedFile
    seen: tuple[int, str] | None
    reset: bool
    scan: tuple[int, int] | None
    """The first and last rowid of the rows of the connection's ``temp.scan`` table holding
    the entries found (spilled there, so that a run of millions of keys is never held in
    memory); None when not scanned (keys pending): a reset then only drops the old entries."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def summarize(run_id: str, stamp: Stamp, revision: int, data: bytes) -> Row:
    """The index row of manifest revision ``revision``, with the checks the index relies on.

    Full schema validation is `runfmt verify`'s job (a few milliseconds a manifest, too
    slow for a rebuild); a manifest failing these checks is re-read with
    `decode_manifest` so that its row names the exact problem.
    """
    try:
        doc = orjson.loads(data)
        _check(isinstance(doc, dict), "not an object")
        _check(data.count(b"{") + data.count(b"[") <= MAX_DEPTH or not too_deep(doc), "depth")
        version = doc.get("format_version")
        _check(isinstance(version, str) and version.split(".")[0] == "1", "format version")
        _check(not doc.get("required_features"), "required features")
        _check(doc.get("run_id") == run_id, "run id")
        _check(doc.get("revision") == revision and type(doc["revision"]) is int, "revision")
        strings = ("name", "status", "created_at", "updated_at", "config_hash")
        _check(all(isinstance(doc.get(k), str) for k in strings), "types")
        status, finished, error = doc["status"], doc.get("finished_at"), doc.get("error")
        heartbeat = doc.get("heartbeat_at")
        _check(status in RUN_STATUSES, "status")
        _check((status == "running") == (finished is None), "finished_at")
        _check(finished is None or isinstance(finished, str), "finished_at")
        _check(error is None or (isinstance(error, str) and status in ("failed", "cancelled")),
               "error")  # fmt: skip
        _check(heartbeat is None or isinstance(heartbeat, str), "heartbeat_at")
        tags, counters = doc.get("tags"), doc.get("counters")
        _check(isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values()), "tags")
        _check(isinstance(counters, dict), "counters")
        _check(all(type(v) in (int, float) for v in counters.values()), "counters")
        big = [k for k, v in counters.items() if type(v) is float and abs(v) > _MAX_COUNT]
        if big:  # orjson reads an integer beyond 64 bits as a float: no counter may be one
            exact = json.loads(data)["counters"]
            _check(all(type(exact[k]) is float for k in big), "counters")
        stages: list[list[Any]] = []
        keyed: list[KeyedFile] = []
        paths: set[str] = set()
        for s in doc["stages"]:
            stage, key_field, schema = s["name"], s["key_field"], s["record_schema_version"]
            files = s["files"]
            _check(isinstance(stage, str) and isinstance(schema, str), "stage")
            _check(all(stage != other[0] for other in stages), "stage listed twice")
            _check(isinstance(s["status"], str), "stage status")
            _check(key_field is None or isinstance(key_field, str), "key field")
            total = failures = size = 0
            for ordinal, f in enumerate(files):
                n, fails, b, sha = f["records"], f["failures"], f["bytes"], f["sha256"]
                _check(type(n) is int and type(fails) is int and type(b) is int, "file counts")
                _check(min(n, fails, b) >= 0, "file counts")
                _check(isinstance(sha, str) and _SHA256.fullmatch(sha) is not None, "sha256")
                _check(f["path"] not in paths, "file listed twice")
                paths.add(f["path"])
                total, failures, size = total + n, failures + fails, size + b
                _check(max(total, failures, size) <= _MAX_COUNT, "file counts")
                if key_field is not None:
                    _check(names.parse_stage_file(f["path"])[0] == stage, "file path")
                    keyed.append(KeyedFile(f["path"], stage, key_field, schema, b, sha, ordinal))
            stages.append([stage, s["status"], schema, key_field, len(files), total, failures,
                           size])  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
        return unreadable(run_id, stamp, _problem(data, run_id, revision))
    listed = {
        "revision": revision, "name": doc["name"], "status": status,
        "created_at": doc["created_at"], "updated_at": doc["updated_at"],
        "finished_at": finished, "heartbeat_at": heartbeat,
        "config_hash": doc["config_hash"], "error": error, "problem": None,
        "tags": tags, "counters": counters, "stages": stages,
    }  # fmt: skip
    return Row(run_id, stamp, listed, keyed, time_key(doc["created_at"]))


def _problem(data: bytes, run_id: str, revision: int) -> str:
    from runfmt.format.manifest import decode_manifest
    from runfmt.format.validate import folder_name_problem

    try:
        manifest = decode_manifest(data)
    except RunfmtError as exc:
        return exc.problem
    misnamed = folder_name_problem(manifest, run_id)
    if misnamed is not None:
        return misnamed
    if manifest.revision != revision:
        return f"file holds revision {manifest.revision}, not {revision} (MAN-3)"
    return "manifest is not readable by this version of runfmt's index"


def unreadable(run_id: str, stamp: Stamp, problem: str) -> Row:
    listed = {
        "revision": 0, "name": "", "status": UNREADABLE, "created_at": None,
        "updated_at": None, "finished_at": None, "heartbeat_at": None, "config_hash": None,
        "error": None, "problem": problem, "tags": {}, "counters": {}, "stages": [],
    }  # fmt: skip
    return Row(run_id, stamp, listed, [])


def scan_file(
    source: Source, run_id: str, file: KeyedFile, start: int
) -> Iterator[tuple[str, int, int, int]]:
    """(key, frame start, frame end, line) of the non-failure keyed records of ``file`` from
    ``start`` to its listed length. A header that does not carry the stage's declaration
    makes the file unreadable, as to every reader (FRAME-2)."""
    from runfmt.format.frames import DECLARATION_DIFFERS, DataFrame, FrameDecoder, declares
    from runfmt.format.records import decode_lines, is_failure, record_key

    decoder = FrameDecoder(start=start)
    remaining = file.bytes - start
    with source.open_range(run_id, file.path, start) as stream:
        while remaining:
            chunk = stream.read(min(1 << 20, remaining))
            if not chunk:
                raise StageFileError("file is shorter than its listed length (CHECK-1)")
            remaining -= len(chunk)
            for event in decoder.decode(chunk):
                if not isinstance(event, DataFrame):
                    if event.get("stage") != file.stage:
                        raise StageFileError("header names another stage (FRAME-2)")
                    if not declares(event, file.record_schema_version, file.key_field):
                        raise StageFileError(f"{DECLARATION_DIFFERS} (FRAME-2)")
                    continue
                for line, record in enumerate(decode_lines(event.content)):
                    key = record_key(record, file.key_field)
                    if key is not None and not is_failure(record):
                        yield key, event.start, event.end, line
    decoder.close()
