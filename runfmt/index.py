"""The store index: a derived SQLite database that lists runs and finds cached records fast.

Nothing in it is authoritative (spec §12): deleting it loses nothing, and
`Index.refresh` reconciles it with the store at the cost of one listing of the
store and one stat per run (a listing of ``_manifests/`` per run on object
stores); only runs whose stamp changed are re-read, and only the stage bytes
committed since the last refresh are scanned for cache keys.

A local store keeps its index in ``<store>/.runfmt/index.sqlite``; a remote or
read-only store in the user cache directory, under a hash of the store URL.
The database uses WAL journaling on local disks and the rollback journal on
network filesystems, where WAL's shared memory is unsafe.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, NoReturn, TypeVar

import orjson

from runfmt._index_reading import (
    RUN_STATUSES,
    UNREADABLE,
    FileWork,
    LocalSource,
    Row,
    Source,
    Stamp,
    StorageSource,
    is_racy,
    moment_key,
    pending,
    scan_file,
    summarize,
    time_key,
    unreadable,
)
from runfmt._local import NotAFileError
from runfmt.errors import (
    FormatError,
    InvalidInputError,
    RunfmtError,
    RunNotFoundError,
    StorageError,
)
from runfmt.format import names

if TYPE_CHECKING:
    from runfmt.storage import Storage

__all__ = [
    "SCHEMA_VERSION",
    "Index",
    "RefreshStats",
    "RunSummary",
    "StageSummary",
    "index_location",
    "is_network_filesystem",
]

T = TypeVar("T")

SCHEMA_VERSION = 10
"""Version of the index's tables and of what they hold (``PRAGMA user_version``; 10:
creation times sort to the nanosecond); another version is rebuilt."""
APPLICATION_ID = 0x52554E46
"""``PRAGMA application_id`` of a runfmt index ("RUNF"): anything else is a foreign file."""
CACHE_KIB = 32768
"""SQLite page cache per connection: enough for the key index of a million cache entries."""
BATCH_RUNS = 500
"""Runs re-read per write transaction, so other processes wait briefly."""
_NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph",
     "glusterfs", "lustre", "gpfs", "beegfs", "davfs", "sshfs", "fuse"}
)  # fmt: skip
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL = 5, 6, 10, 13
_TEMP_IN_MEMORY = 2
"""``PRAGMA temp_store`` for temporary tables in memory."""
_CORRUPT_CODES = frozenset({_SQLITE_IOERR, 11, 26})  # and SQLITE_CORRUPT, SQLITE_NOTADB
_JOURNALS = ("-wal", "-shm", "-journal")
_DAMAGE = ("no such table", "no such column", "has no column named", "Could not decode")
"""What SQLite says of a file whose tables or text a process other than runfmt changed."""

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs(
    run_id TEXT PRIMARY KEY,
    stamp NOT NULL,  -- an integer or text (Stamp): no type affinity, so ints stay ints
    revision INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT,
    created_key TEXT,  -- time_key: sorts as the times do
    updated_at TEXT,
    finished_at TEXT,
    heartbeat_at TEXT,
    config_hash TEXT,
    error TEXT,
    detail TEXT NOT NULL,
    problem TEXT
);
CREATE INDEX runs_newest ON runs(created_key DESC, run_id DESC);
CREATE INDEX runs_stamp ON runs(run_id, stamp);
CREATE TABLE files(
    file_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    created_key TEXT,  -- time_key: sorts as the times do
    path TEXT NOT NULL,
    stage TEXT NOT NULL,
    key_field TEXT NOT NULL,
    record_schema_version TEXT NOT NULL,
    ordinal INTEGER NOT NULL,  -- the file's place in its stage's list
    indexed_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    UNIQUE(run_id, path)
);
CREATE TABLE cache(
    stage TEXT NOT NULL,
    key TEXT NOT NULL,
    file_id INTEGER NOT NULL,
    frame_start INTEGER NOT NULL,
    frame_end INTEGER NOT NULL,
    line INTEGER NOT NULL
);
CREATE INDEX cache_key ON cache(stage, key);
CREATE INDEX cache_file ON cache(file_id);
"""

_SCAN_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS scan(key TEXT, start INTEGER, end INTEGER, line INTEGER)"
)
"""Where a refresh puts the cache entries it scans until it stores them (`FileWork.scan`)."""
_SCHEMA_OBJECTS = frozenset(
    (kind.lower(), name, statement)
    for statement in map(str.strip, _SCHEMA.split(";"))
    for kind, name in re.findall(r"^CREATE (TABLE|INDEX) (\w+)", statement)
)
"""The tables and indexes of `_SCHEMA` as SQLite keeps them (``sqlite_master``): an index
file whose objects differ (one missing, a column dropped) is damaged."""
_RUN_COLUMNS = "run_id, detail"
_INDEXED_FILES = (
    "SELECT path, indexed_bytes, sha256, key_field, record_schema_version FROM files WHERE run_id=?"
)
_MAX_LIMIT = 2**63 - 1
"""The largest LIMIT SQLite takes; a larger ``limit`` means no limit."""
_STATUSES = frozenset((*RUN_STATUSES, UNREADABLE))
_ATTEMPTS = 5
"""Tries of an index operation whose file another process deletes, replaces or damages."""
_ROUNDS = 5
"""Reads of one run while other processes index it at the same time (`Index._reindex`)."""
_RETRY = "retry"
"""The stamp of a run indexed only in part (a file that could not be scanned yet, a
concurrent refresh): it equals no stamp a store gives, so the next refresh reads it again."""


class StageSummary(NamedTuple):
    """A stage's declaration and committed totals, as the newest revision lists them."""

    name: str
    status: str
    record_schema_version: str
    key_field: str | None
    files: int
    records: int
    failures: int
    bytes: int


class _Field(Generic[T]):
    """A `RunSummary` member, read from its JSON on first access."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, summary: RunSummary, owner: type | None = None) -> T:
        value: T = summary._fields()[self._name]
        return value


class RunSummary:
    """A run as the index lists it. ``problem`` is set (and ``status`` is ``"unreadable"``)
    when the run's manifest could not be read.

    Members other than ``run_id`` are decoded from one JSON column on first
    access, so listing 10,000 runs only pays for what is looked at.
    """

    __slots__ = ("_decoded", "_detail", "run_id")

    revision: _Field[int] = _Field()
    name: _Field[str] = _Field()
    status: _Field[str] = _Field()
    created_at: _Field[str | None] = _Field()
    updated_at: _Field[str | None] = _Field()
    finished_at: _Field[str | None] = _Field()
    heartbeat_at: _Field[str | None] = _Field()
    config_hash: _Field[str | None] = _Field()
    error: _Field[str | None] = _Field()
    problem: _Field[str | None] = _Field()
    tags: _Field[Mapping[str, str]] = _Field()
    counters: _Field[Mapping[str, float | int]] = _Field()
    stages: _Field[tuple[StageSummary, ...]] = _Field()

    def __init__(self, row: tuple[str, str]) -> None:
        self.run_id, self._detail = row
        self._decoded: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RunSummary({self.run_id!r}, name={self.name!r}, status={self.status!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunSummary) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def _fields(self) -> dict[str, Any]:
        if self._decoded is None:
            decoded = orjson.loads(self._detail)
            decoded["stages"] = tuple(StageSummary(*s) for s in decoded["stages"])
            self._decoded = decoded
        return self._decoded

    @property
    def records(self) -> int:
        return sum(s.records for s in self.stages)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.stages)

    def stage(self, name: str) -> StageSummary | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``runfmt ls --json`` prints per run)."""
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "revision": self.revision,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "heartbeat_at": self.heartbeat_at,
            "config_hash": self.config_hash,
            "error": self.error,
            "tags": dict(self.tags),
            "counters": dict(self.counters),
            "records": self.records,
            "bytes": self.bytes,
            "stages": [s._asdict() for s in self.stages],
            "problem": self.problem,
        }


@dataclass(frozen=True, slots=True)
class RefreshStats:
    """What one `Index.refresh` did."""

    runs: int
    read: int
    removed: int
    cache_entries: int
    seconds: float


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def is_network_filesystem(path: str, mounts: str | None = None) -> bool:
    """Whether ``path`` lies on a network filesystem (NFS, CIFS/SMB, FUSE, ...).

    Reads ``/proc/mounts`` (or ``mounts``, its text); where there is none, assumes
    a local disk. ``$RUNFMT_INDEX_JOURNAL`` (``wal`` or ``delete``) overrides the
    journal mode chosen from this.
    """
    if mounts is None:
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
                mounts = f.read()
        except OSError:
            return False
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount(fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type in _NETWORK_FS or best_type.split(".")[0] in _NETWORK_FS


def _user_cache_dir() -> str:
    explicit = os.environ.get("RUNFMT_CACHE_DIR")
    if explicit:
        return explicit
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "runfmt")


def _public_url(url: str) -> str:
    """The URL without credentials (a ``user:password@`` part). A user without a password
    stays: in ``abfs://container@account`` it names the container."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@:]*:[^/@]*@", r"\1", url)


def index_location(url: str, *, local: bool, read_only: bool = False, endpoint: str = "") -> str:
    """Where the index of the store at ``url`` (on service ``endpoint``, if named) lives: a
    file path, or ``:memory:``.

    ``memory://`` stores and local stores that do not exist yet get an in-memory index; a
    local store whose index this process may not write (another user's store) is indexed in
    the user cache, like a read-only one.
    """
    if local and not read_only:
        if not os.path.isdir(url):
            return ":memory:"
        folder = os.path.join(url, ".runfmt")
        path = os.path.join(folder, "index.sqlite")
        if all(os.access(p, os.W_OK) for p in (url, folder, path) if p == url or os.path.exists(p)):
            return path
    if url.startswith("memory://"):
        return ":memory:"
    import hashlib

    place = _public_url(url) + (f" at {_public_url(endpoint)}" if endpoint else "")
    digest = hashlib.sha256(place.encode()).hexdigest()[:32]
    return os.path.join(_user_cache_dir(), "index", f"{digest}.sqlite")


class Index:
    """The SQLite index of one store. Get it as ``Store.index``.

    Every listing query refreshes the index first unless asked not to
    (``refresh=False``); cache lookups use it as it stands (see `runfmt.cache`).
    """

    def __init__(self, source: Source, path: str, *, timeout: float = 30.0) -> None:
        self._source = source
        self.path = path
        self.timeout = timeout
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._opened_ino: int | None = None
        self._stamps: tuple[sqlite3.Connection, int, dict[str, Stamp]] | None = None

    @classmethod
    def for_storage(cls, storage: Storage, *, timeout: float = 30.0) -> Index:
        """The index of the store rooted at ``storage``; reading it creates no store folder
        (a local store that does not exist yet is indexed in memory, `index_location`)."""
        source: Source = LocalSource(storage.root) if storage.is_local else StorageSource(storage)
        path = index_location(storage.url, local=storage.is_local, read_only=storage.read_only,
                              endpoint=storage.endpoint)  # fmt: skip
        return cls(source, path, timeout=timeout)

    @classmethod
    def for_url(
        cls,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        read_only: bool = False,
        timeout: float = 30.0,
    ) -> Index:
        """Like `for_storage`; a local path is served without importing the storage layer."""
        local = url.removeprefix("file://")
        if "://" not in local:
            root = os.path.abspath(local)
            return cls(LocalSource(root), index_location(root, local=True, read_only=read_only),
                       timeout=timeout)  # fmt: skip
        from runfmt.storage import Storage

        return cls.for_storage(Storage(url, storage_options, read_only=read_only), timeout=timeout)

    def __repr__(self) -> str:
        return f"Index({self._source.url!r}, path={self.path!r})"

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    # the database file

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            self._con = self._open()
        return self._con

    def _open(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                if not os.path.exists(self.path):
                    self._create_file()
                elif not os.path.isfile(self.path):
                    raise OSError("it is not a regular file")
            except OSError as exc:
                log_warning("runfmt: cannot keep the index at %s (%s); indexing in memory",
                            self.path, exc)  # fmt: skip
                self.path = ":memory:"
        for attempt in range(_ATTEMPTS):
            time.sleep(0.005 * attempt)  # another process may be creating the file again
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                  check_same_thread=False)  # fmt: skip
            try:
                problem = self._prepare(con)
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                if not _is_corrupt(exc) or _out_of_space(exc, self.path):
                    con.close()
                    raise
                problem = f"is corrupt ({exc})"
            if problem is None:
                with contextlib.suppress(OSError):
                    self._opened_ino = os.stat(self.path).st_ino
                return con
            con.close()
            log_warning("runfmt: the index %s %s; rebuilding it from the store", self.path, problem)
            self._discard()
        raise self._unsettled()

    def _prepare(self, con: sqlite3.Connection) -> str | None:
        """Set the connection up; a reason to discard the file, or None when it is usable."""
        con.create_function("fnmatchcase", 2, fnmatch.fnmatchcase, deterministic=True)
        con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        con.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            return "is not a runfmt index (a foreign SQLite file)"
        if app_id == APPLICATION_ID and version > SCHEMA_VERSION:
            return f"was written by a newer runfmt (index version {version} > {SCHEMA_VERSION})"
        if app_id == APPLICATION_ID and version < SCHEMA_VERSION:
            return f"has an older layout (index version {version})"
        self._set_journal(con)
        if app_id == APPLICATION_ID:
            found = con.execute("SELECT type, name, sql FROM sqlite_master")
            if {row for row in found if not row[1].startswith("sqlite_")} != _SCHEMA_OBJECTS:
                return "is damaged (its tables or indexes are not runfmt's)"
            return None
        con.execute("BEGIN IMMEDIATE")
        try:
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and tables:
                con.execute("ROLLBACK")
                return "is not a runfmt index (a foreign SQLite file)"
            if app_id == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(
                    "INSERT INTO meta VALUES ('store', ?)", (_public_url(self._source.url),)
                )
                con.execute(f"PRAGMA application_id={APPLICATION_ID}")
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return None

    def _set_journal(self, con: sqlite3.Connection) -> None:
        if self.path == ":memory:":
            return
        given = os.environ.get("RUNFMT_INDEX_JOURNAL", "")
        wanted = given.lower()
        if wanted not in ("wal", "delete"):
            if given:
                log_warning("runfmt: RUNFMT_INDEX_JOURNAL=%s is neither wal nor delete; ignored",
                            given)  # fmt: skip
            wanted = "delete" if is_network_filesystem(self.path) else "wal"
        if con.execute("PRAGMA journal_mode").fetchone()[0] != wanted:
            try:
                con.execute(f"PRAGMA journal_mode={wanted}")
            except sqlite3.OperationalError as exc:
                log_warning("runfmt: the index %s stays in its journal mode, not %s: %s",
                            self.path, wanted, exc)  # fmt: skip
        con.execute("PRAGMA synchronous=NORMAL")

    def _create_file(self) -> None:
        """Create an empty index file, first deleting the journals that a deleted one left:
        SQLite would pair them with the new file (a disk I/O error)."""
        from runfmt.locking import file_lock

        with file_lock(self.path + ".lock", self.timeout):
            if os.path.exists(self.path):
                return
            for suffix in _JOURNALS:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)
            with open(self.path, "ab"):
                pass

    def _moved(self) -> bool:
        """Whether the index file was deleted or replaced since this process opened it."""
        if self._con is None or self.path == ":memory:":
            return False
        try:
            return os.stat(self.path).st_ino != self._opened_ino
        except FileNotFoundError:
            return True

    def _discard(self) -> None:
        """Delete the index file (and its journals) unless another process replaced it already."""
        if self.path == ":memory:":
            return
        from runfmt.locking import file_lock

        with file_lock(self.path + ".lock", self.timeout):
            try:
                ino = os.stat(self.path).st_ino
            except FileNotFoundError:
                return
            if self._opened_ino is not None and ino != self._opened_ino:
                return
            for suffix in ("", *_JOURNALS):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The connection; a corrupt file found on the way is discarded and rebuilt."""
        with self._lock:
            try:
                yield self._connection()
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                self._failed(exc)

    def _failed(self, exc: sqlite3.Error | UnicodeDecodeError) -> NoReturn:
        """Translate a SQLite error; `_Retry` when the file was deleted or replaced (it is
        opened again) or is corrupt (it is discarded first)."""
        if self._moved():
            self.close()
            raise _Retry from None
        trouble = (
            "no space left to keep the index at %s (%s)"
            if _out_of_space(exc, self.path)
            else f"the index at %s stayed locked by another process for {self.timeout:g} s (%s)"
            if _is_locked(exc)
            else None
        )
        if trouble is not None:
            log_warning(f"runfmt: {trouble}; indexing in memory", self.path, exc)
            self.close()
            self.path = ":memory:"
            raise _Retry from None
        if not _is_corrupt(exc):
            raise _translate(exc, self.path) from exc
        log_warning("runfmt: the index %s is corrupt (%s); rebuilding it from the store",
                    self.path, exc)  # fmt: skip
        self.close()
        self._discard()
        self._opened_ino = None
        raise _Retry from None

    def _retrying(self, fn: Any, *args: Any) -> Any:
        for _ in range(_ATTEMPTS):
            try:
                return fn(*args)
            except _Retry:
                continue
        raise self._unsettled()

    def _unsettled(self) -> StorageError:
        return StorageError(
            f"the index file was deleted, replaced or damaged {_ATTEMPTS} times while in use",
            location=self.path,
            hint="another process keeps changing it: retry; the run folders are untouched",
        )

    # reconciling

    def refresh(self, *, keys: bool = True) -> RefreshStats:
        """Bring the index in line with the store: new, changed and removed runs.

        ``keys=False`` (what listing does) leaves the keys of new records for the next
        refresh with keys, the cache's: a listing after a large write stays fast.
        """
        result: RefreshStats = self._retrying(self._refresh, keys)
        return result

    def rebuild(self) -> RefreshStats:
        """Index the whole store again, trusting nothing indexed.

        Every run is read and scanned again and its entries replaced, a batch of runs per
        transaction: a listing in another process meanwhile sees each run as it was
        indexed before or after, never missing.
        """
        result: RefreshStats = self._retrying(lambda: self._refresh(True, fresh=True))
        return result

    def _refresh(self, keys: bool, fresh: bool = False) -> RefreshStats:
        """`refresh`; with ``fresh``, every run is changed (`rebuild`)."""
        started = time.perf_counter()
        with self._lock:
            if self._moved():
                self.close()
        with self._db() as con:
            known = self._indexed_stamps(con)
            present, changed, gone = self._source.changes({} if fresh else known, keys)
            if fresh:
                gone = known.keys() - {run_id for run_id, _ in changed}
            changed.sort()  # run ids sort by creation time: rows are stored in listing order
            entries = 0
            raced: list[str] = []
            if gone and not changed:
                self._write(con, [], {}, gone, known)
            for i in range(0, len(changed), BATCH_RUNS):
                batch = changed[i : i + BATCH_RUNS]
                read = self._source.map(self._read_run, batch)
                rows = [row for row in read if row is not None]
                not_runs = {b[0] for b, row in zip(batch, read, strict=True) if row is None}
                present -= len(not_runs)
                work = self._file_work(con, rows, keys, fresh)
                gone_now = (gone if i == 0 else set()) | not_runs
                written, lost = self._write(con, rows, work, gone_now, known)
                entries += written
                raced += lost
            for run_id in raced:
                entries += self._reindex(con, run_id, keys)
        return RefreshStats(present, len(changed), len(gone), entries,
                            time.perf_counter() - started)  # fmt: skip

    def _indexed_stamps(self, con: sqlite3.Connection) -> dict[str, Stamp]:
        """Each indexed run's stamp, kept from the last refresh while no other connection
        has written (SQLite's ``data_version``): a refresh that finds nothing new reads
        no row."""
        version: int = con.execute("PRAGMA data_version").fetchone()[0]
        if self._stamps is None or self._stamps[:2] != (con, version):
            self._stamps = (con, version, dict(con.execute("SELECT run_id, stamp FROM runs")))
        return self._stamps[2]

    def _read_run(self, change: tuple[str, Stamp]) -> Row | None:
        """The run's row; None when the folder is not a run (yet): no revision and no
        ``manifest.json`` (LAYOUT-2), as a creation or a copy in progress leaves it."""
        run_id, stamp = change
        try:
            revision, data = self._source.manifest(run_id)
        except RunNotFoundError:
            return None
        except NotAFileError:
            return unreadable(run_id, stamp, "cannot read its newest revision: not a regular file")
        except FileNotFoundError:
            return unreadable(run_id, stamp, "manifest revision vanished while indexing")
        except FormatError as exc:
            return unreadable(run_id, stamp, exc.problem)
        except PermissionError:
            return unreadable(run_id, stamp, "permission denied: cannot read its newest revision")
        except OSError as exc:
            return unreadable(run_id, stamp, f"cannot read its newest revision: {exc}")
        return summarize(run_id, stamp, revision, data)

    def _file_work(
        self, con: sqlite3.Connection, rows: Sequence[Row], keys: bool, fresh: bool = False
    ) -> dict[str, list[FileWork]]:
        """For each run, the committed stage bytes not yet scanned for cache keys, scanned;
        all of them for a run whose entries are replaced (`Row.replace`: ``fresh``, or a
        stage declared anew).

        A file that cannot be scanned (a copy still in progress, damage) is left out and
        its run marked `Row.partial`, so that the next refresh tries again. Without
        ``keys`` nothing is scanned: the run is marked `Row.keys_pending`, and only the
        entries of replaced files are dropped.
        """
        work: dict[str, list[FileWork]] = {}
        if keys:
            con.execute(_SCAN_TABLE)
            con.execute("DELETE FROM temp.scan")  # what an interrupted refresh left
        for row in rows:
            row.replace = fresh
            if not row.keyed:
                continue
            indexed: dict[str, tuple[int, str]] = {}
            if not fresh:
                declared = {f.path: (f.key_field, f.record_schema_version) for f in row.keyed}
                for path, size, sha, *was in con.execute(_INDEXED_FILES, (row.run_id,)):
                    indexed[path] = size, sha
                    row.replace = row.replace or declared.get(path, tuple(was)) != tuple(was)
                if row.replace:
                    indexed = {}
            items = []
            for file in row.keyed:
                seen = indexed.get(file.path)
                if seen == (file.bytes, file.sha256):
                    continue
                reset = seen is not None and seen[0] >= file.bytes
                if not keys:
                    row.keys_pending = True
                    if reset:
                        items.append(FileWork(file, seen, reset, None))
                    continue
                start = seen[0] if seen is not None and not reset else 0
                found = scan_file(self._source, row.run_id, file, start)
                try:
                    scan = self._spill(con, found)
                except (RunfmtError, OSError) as exc:
                    why = (
                        "the listed file is missing" if isinstance(exc, FileNotFoundError) else exc
                    )  # a backend's FileNotFoundError may only name the path
                    log_warning("runfmt: %s: not indexed for the cache (tried again at the "
                                "next refresh): %s", self._source.where(row.run_id, file.path),
                                why)  # fmt: skip
                    row.partial = True
                    continue
                items.append(FileWork(file, seen, reset, scan))
            work[row.run_id] = items
        return work

    def _spill(
        self, con: sqlite3.Connection, entries: Iterator[tuple[str, int, int, int]]
    ) -> tuple[int, int]:
        """Put ``entries`` in ``temp.scan``, in a transaction of the temporary database alone
        (no lock on the index): the first and last rowid they took. Where there is no room
        for SQLite's temporary files (``SQLITE_TMPDIR``, ``TMPDIR``, ``/var/tmp``), they
        are kept in memory from then on and the refresh starts again (`_Retry`)."""
        first = con.execute("SELECT coalesce(max(rowid), 0) + 1 FROM temp.scan").fetchone()[0]
        con.execute("BEGIN")
        try:
            con.executemany("INSERT INTO temp.scan VALUES (?,?,?,?)", entries)
            con.execute("COMMIT")
        except BaseException as exc:
            if con.in_transaction:
                con.execute("ROLLBACK")
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            in_memory = con.execute("PRAGMA temp_store").fetchone()[0] == _TEMP_IN_MEMORY
            if code not in (_SQLITE_FULL, _SQLITE_IOERR) or in_memory:
                raise
            log_warning("runfmt: no room for SQLite's temporary files (%s); indexing the "
                        "keys found in memory", exc)  # fmt: skip
            con.execute(f"PRAGMA temp_store={_TEMP_IN_MEMORY}")  # drops the temporary tables
            raise _Retry from None
        last = con.execute("SELECT coalesce(max(rowid), 0) FROM temp.scan").fetchone()[0]
        return first, last

    def _write(
        self,
        con: sqlite3.Connection,
        rows: Sequence[Row],
        work: Mapping[str, list[FileWork]],
        gone: set[str],
        known: Mapping[str, Stamp],
    ) -> tuple[int, list[str]]:
        """Store ``rows`` and forget ``gone``, in one transaction: the cache entries added,
        and the runs another process indexed meanwhile.

        ``known`` holds the stamps indexed when the rows were read. A run whose stamp has
        changed since is not written: the other process may have read it before or after
        this one did, so the caller reads it again (`_reindex`).
        """
        entries = 0
        batch = orjson.dumps([row.run_id for row in rows]).decode()
        self._stamps = None
        con.execute("BEGIN IMMEDIATE")
        try:
            for run_id in gone:
                self._forget(con, run_id)
            current = {
                run_id: (stamp, (created, config_hash))
                for run_id, stamp, created, config_hash in con.execute(
                    "SELECT run_id, stamp, created_at, config_hash FROM runs "
                    "WHERE run_id IN (SELECT value FROM json_each(?))",
                    (batch,),
                )
            }
            with_files = {
                run_id
                for (run_id,) in con.execute(
                    "SELECT DISTINCT run_id FROM files WHERE run_id IN "
                    "(SELECT value FROM json_each(?))",
                    (batch,),
                )
            }
            accepted, raced = [], []
            for row in rows:
                indexed = current.get(row.run_id)
                if (None if indexed is None else indexed[0]) != known.get(row.run_id):
                    raced.append(row.run_id)
                    continue
                if indexed is not None and (
                    row.replace or row.problem is not None or indexed[1] != row.identity
                ):
                    self._forget(con, row.run_id)
                    with_files.discard(row.run_id)
                accepted.append(row)
            for row in accepted:
                if row.keyed or row.run_id in with_files:
                    entries += self._write_files(con, row, work.get(row.run_id, []))
            con.executemany(
                "INSERT OR REPLACE INTO runs(run_id, stamp, revision, name, status, "
                "created_at, created_key, updated_at, finished_at, heartbeat_at, config_hash, "
                "error, detail, problem) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(row.run_id, _stamp(row), *row.values) for row in accepted],
            )  # fmt: skip
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            if work:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("DROP TABLE IF EXISTS temp.scan")
        return entries, raced

    @staticmethod
    def _write_files(con: sqlite3.Connection, row: Row, items: list[FileWork]) -> int:
        """Store a run's scanned files; `Row.partial` when one changed under the scan."""
        listed = {file.path: file.ordinal for file in row.keyed}
        indexed = {}
        for file_id, path, ordinal, size, sha in con.execute(
            "SELECT file_id, path, ordinal, indexed_bytes, sha256 FROM files WHERE run_id=?",
            (row.run_id,),
        ).fetchall():
            if path not in listed:
                con.execute("DELETE FROM cache WHERE file_id=?", (file_id,))
                con.execute("DELETE FROM files WHERE file_id=?", (file_id,))
                continue
            indexed[path] = file_id, (size, sha)
            if ordinal != listed[path]:
                con.execute("UPDATE files SET ordinal=? WHERE file_id=?", (listed[path], file_id))
        entries = 0
        for item in items:
            file = item.file
            found = indexed.get(file.path)
            if (None if found is None else found[1]) != item.seen:
                row.partial = True
                continue
            if item.scan is None:  # keys pending: a replaced file's old entries go
                if found is not None:
                    con.execute("DELETE FROM cache WHERE file_id=?", (found[0],))
                    con.execute("UPDATE files SET indexed_bytes=0, sha256='' WHERE file_id=?",
                                (found[0],))  # fmt: skip
                continue
            if found is None:
                file_id = con.execute(
                    "INSERT INTO files(run_id, created_key, path, stage, key_field, "
                    "record_schema_version, ordinal, indexed_bytes, sha256) "
                    "VALUES (?,?,?,?,?,?,?,?,?)",
                    (row.run_id, row.created_key, file.path, file.stage, file.key_field,
                     file.record_schema_version, file.ordinal, file.bytes, file.sha256),
                ).lastrowid  # fmt: skip
            else:
                file_id = found[0]
                if item.reset:
                    con.execute("DELETE FROM cache WHERE file_id=?", (file_id,))
                con.execute("UPDATE files SET indexed_bytes=?, sha256=? WHERE file_id=?",
                            (file.bytes, file.sha256, file_id))  # fmt: skip
            entries += con.execute(
                "INSERT INTO cache SELECT ?, key, ?, start, end, line FROM temp.scan "
                "WHERE rowid BETWEEN ? AND ?",
                (file.stage, file_id, *item.scan),
            ).rowcount
        return entries

    def forget(self, run_ids: Sequence[str]) -> None:
        """Drop runs known to be deleted (a refresh would notice too, one stat later)."""
        self._retrying(self._forget_all, list(run_ids))

    def _forget_all(self, run_ids: list[str]) -> None:
        with self._db() as con:
            self._write(con, [], {}, set(run_ids), {})

    @staticmethod
    def _forget(con: sqlite3.Connection, run_id: str) -> None:
        con.execute(
            "DELETE FROM cache WHERE file_id IN (SELECT file_id FROM files WHERE run_id=?)",
            (run_id,),
        )
        con.execute("DELETE FROM files WHERE run_id=?", (run_id,))
        con.execute("DELETE FROM runs WHERE run_id=?", (run_id,))

    # queries

    def runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
        since: datetime | date | str | None = None,
        limit: int | None = None,
        refresh: bool = True,
    ) -> list[RunSummary]:
        """Runs newest first (by creation time), filtered.

        ``status``: one or several statuses; ``name``: a glob (``eval-*``, case-sensitive);
        ``tags``: every key must have that value; ``since``: created at or after (a
        `datetime`, a `date`, meaning its midnight UTC, or text for `parse_since`);
        ``limit``: at most this many.
        """
        if refresh:
            self.refresh(keys=False)
        where: list[str] = []
        params: list[Any] = []
        statuses = [status] if isinstance(status, str) else list(status or ())
        unknown = sorted(set(statuses) - _STATUSES)
        if unknown:
            hint = "use running, completed, failed, cancelled or unreadable"
            if "abandoned" in unknown:
                hint += "; `runfmt status --status abandoned` lists runs whose writer died"
            raise InvalidInputError(f"unknown status {', '.join(map(repr, unknown))}", hint=hint)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params += statuses
        if name is not None:
            if not isinstance(name, str):
                raise InvalidInputError(f"name must be a glob (a string), not {name!r}")
            # SQLite's GLOB negates a set with [^...], not [!...]: sets go to fnmatch
            where.append("fnmatchcase(name, ?)" if "[" in name else "name GLOB ?")
            params.append(name)
        if tags is not None and not isinstance(tags, Mapping):
            raise InvalidInputError(f"tags must be a mapping of names to values, not {tags!r}",
                                    hint='e.g. tags={"model": "m1"}')  # fmt: skip
        for key, value in (tags or {}).items():
            where.append("EXISTS (SELECT 1 FROM json_each(runs.detail, '$.tags') AS t "
                         "WHERE t.key=? AND t.value=?)")  # fmt: skip
            params += [key, value]
        if since is not None:
            where.append("created_key >= ?")
            params.append(time_key(since) or moment_key(_moment(since)))
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
        ):
            raise InvalidInputError(f"limit must be a whole number >= 0 or None, not {limit!r}")
        if limit is not None and limit > _MAX_LIMIT:
            limit = None
        sql = (
            f"SELECT {_RUN_COLUMNS} FROM runs"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY created_key DESC, run_id DESC"
            + (" LIMIT ?" if limit is not None else "")
        )
        if limit is not None:
            params.append(limit)
        rows = self.query(sql, params)
        return list(map(RunSummary, rows))

    def run(self, run_id: str, *, refresh: bool = True, keys: bool = False) -> RunSummary | None:
        """One run's summary (re-read first if it changed, its keys indexed too with
        ``keys``), or None when it is not in the store."""
        if refresh:
            self._retrying(self._refresh_one, run_id, keys)
        rows = self.query(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id=?", [run_id])
        return RunSummary(rows[0]) if rows else None

    def _refresh_one(self, run_id: str, keys: bool) -> None:
        with self._db() as con:
            self._reindex(con, run_id, keys)

    def _reindex(self, con: sqlite3.Connection, run_id: str, keys: bool) -> int:
        """Bring one run's entry up to date: read it again while other processes index
        it at the same time (a few rounds; the next refresh does the rest)."""
        for _ in range(_ROUNDS):
            found = con.execute("SELECT stamp FROM runs WHERE run_id=?", (run_id,)).fetchone()
            indexed = None if found is None else found[0]
            stamp = self._source.stamp(run_id) if names.is_run_id(run_id) else None
            if (
                stamp is not None
                and not is_racy(stamp)
                and (indexed == stamp or (not keys and indexed == pending(stamp)))
            ):
                return 0
            row = None if stamp is None else self._read_run((run_id, stamp))
            if row is None:
                if found is not None:
                    self._write(con, [], {}, {run_id}, {})
                return 0
            known: dict[str, Stamp] = {} if indexed is None else {run_id: indexed}
            work = self._file_work(con, [row], keys)
            entries, raced = self._write(con, [row], work, set(), known)
            if not raced:
                return entries
        return 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query against the index as it stands (brought up to date
        first when the file turns out to be discarded or replaced)."""
        try:  # not `_retrying`: every cache lookup comes through here
            return self._query(sql, params)
        except _Retry:
            result: list[tuple[Any, ...]] = self._retrying(self._refreshed_query, sql, params)
            return result

    def _refreshed_query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        self._refresh(True)
        return self._query(sql, params)

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                self._failed(exc)

    @property
    def url(self) -> str:
        """The indexed store's path or URL."""
        return self._source.url

    def where(self, run_id: str, path: str = "") -> str:
        return self._source.where(run_id, path)

    def read_range(self, run_id: str, path: str, start: int, end: int) -> bytes:
        return self._source.read_range(run_id, path, start, end)

    def file_size(self, run_id: str, path: str) -> int | None:
        """The size of a run's file, or None when it is gone (no read of its content)."""
        return self._source.size(run_id, path)


class _Retry(Exception):
    """The index file was deleted, replaced, or corrupt and discarded: run the operation again."""


def _stamp(row: Row) -> Stamp:
    """The stamp a row is stored with: `_RETRY` when part of it could not be indexed."""
    if row.partial:
        return _RETRY
    return pending(row.stamp) if row.keys_pending else row.stamp


def _moment(since: datetime | date | str) -> datetime:
    """``since`` of `Index.runs` as an aware time (a date is its midnight UTC)."""
    if isinstance(since, str):
        from runfmt.units import parse_since

        return parse_since(since)
    if isinstance(since, datetime):
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    if isinstance(since, date):
        return datetime(since.year, since.month, since.day, tzinfo=UTC)
    raise InvalidInputError(f"since must be a datetime, a date or text, not {since!r}")


def log_warning(message: str, *args: object) -> None:
    """Log a warning of the ``runfmt.index`` logger (`logging` is imported only then), its
    arguments made `printable`: SQLite's messages may quote a damaged file's bytes."""
    import logging

    from runfmt.units import printable

    logging.getLogger("runfmt.index").warning(message, *(printable(str(a)) for a in args))


def _is_locked(exc: Exception) -> bool:
    """Whether ``exc`` is SQLite giving up on a lock another connection held."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _translate(exc: Exception, path: str) -> RunfmtError:
    return StorageError(f"the index failed: {exc}", location=path,
                        hint="delete the index file; it is rebuilt from the store")  # fmt: skip


def _out_of_space(exc: Exception, path: str) -> bool:
    """Whether ``exc`` is SQLite failing to grow the index file ``path``: "database or disk
    is full", or an I/O error while its filesystem has under a megabyte left."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None or path == ":memory:":
        return False
    if code & 0xFF == _SQLITE_FULL:
        return True
    if code & 0xFF != _SQLITE_IOERR:
        return False
    try:
        fs = os.statvfs(os.path.dirname(path))
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return fs.f_bavail * fs.f_frsize < 1 << 20


def _is_corrupt(exc: Exception) -> bool:
    """Whether ``exc`` says the index file is damaged (SQLite's message about a garbled
    schema may hold bytes that are no UTF-8: Python then raises `UnicodeDecodeError`)."""
    if isinstance(exc, UnicodeDecodeError):
        return True
    if not isinstance(exc, sqlite3.DatabaseError) or (
        isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
    ):
        return False
    if any(damage in str(exc) for damage in _DAMAGE):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    return "malformed" in str(exc) or "not a database" in str(exc)
