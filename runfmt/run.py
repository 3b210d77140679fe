"""Reading and writing one run: `RunReader` streams committed records, `RunWriter` appends.

A writer buffers records per stage and, at each flush, appends zstd frames to its
own stage files and commits a new manifest revision (spec §9). A reader trusts
only what the newest revision lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import operator
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NoReturn, Self, TypedDict, cast

from filelock import FileLock
from zstandard import MAX_COMPRESSION_LEVEL

from runfmt._local import NotAFileError
from runfmt._version import __version__
from runfmt.errors import (
    ChecksumMismatchError,
    ConflictError,
    FormatError,
    InvalidInputError,
    ManifestError,
    ReadOnlyError,
    RunfmtError,
    RunNotFoundError,
    StageFileError,
    StorageError,
    UnsupportedFormatError,
)
from runfmt.format import names
from runfmt.format.checksum import format_sums, sha256_hex
from runfmt.format.frames import (
    MAX_FRAME_CONTENT,
    PREFIX,
    FrameEncoder,
    encode_counters,
    encode_header,
    stage_events,
)
from runfmt.format.lineage import parent_json, parse_parents
from runfmt.format.manifest import (
    FORMAT_VERSION,
    MAX_ERROR,
    UPGRADE_HINT,
    ArtifactEntry,
    ChangeSet,
    FileEntry,
    Manifest,
    RunStatus,
    StageEntry,
    apply_changes,
    check_counter,
    check_error,
    check_tags,
    decode_manifest,
    encode_manifest,
    parse_timestamp,
)
from runfmt.format.media import guess_media_type
from runfmt.format.records import (
    ERROR_FIELD,
    PARENTS_FIELD,
    Record,
    encode_many,
    encode_record,
    is_failure,
    record_key,
)
from runfmt.format.validate import folder_name_problem, header_problem
from runfmt.locking import commit_lock, hold_writer_lock, live_writers
from runfmt.storage import AppendFile, Storage

__all__ = [
    "RunReader",
    "RunWriter",
    "StageWriter",
    "WriterOptions",
    "commit",
    "load_manifest",
    "now_utc",
]

KEEP_REVISIONS = 32
"""Writers keep at least this many newest revisions in ``_manifests/`` (COMMIT-9)."""
FRAME_TARGET = 1 << 20
MAX_RECORD_BYTES = MAX_FRAME_CONTENT - FRAME_TARGET
"""The longest record line: it and the lines before it in its frame fit in one frame."""
ROLL_BYTES = 1 << 30
_READ_CHUNK = 1 << 20
_COMMIT_ATTEMPTS = 100
_PRUNE_EVERY = 8
_EXTEND_BATCH = 1000
WRITER = {"name": "runfmt-python", "version": __version__}
HEARTBEAT_INTERVAL = 60.0
"""Seconds between a writer's heartbeat commits by default (LIFE-3)."""
MAX_HEARTBEAT_INTERVAL = 100.0
"""Writers heartbeat at least this often, well inside the abandonment threshold (LIFE-3)."""
ABANDON_AFTER = 300.0
"""Seconds without a commit after which a running run is abandoned to readers (LIFE-4)."""
_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")


def now_utc() -> str:
    """The current time as an RFC 3339 UTC timestamp with microseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def revisions(run: Storage) -> list[int]:
    """The revision numbers present in ``_manifests/``, ascending."""
    return sorted(filter(None, map(names.parse_revision_file, run.names(names.MANIFESTS_DIR))))


def load_manifest(run: Storage, revision: int | None = None) -> Manifest:
    """The newest (or the given) manifest revision of the run at ``run`` (COMMIT-7)."""
    return load_revision(run, revision)[0]


def load_revision(run: Storage, revision: int | None = None) -> tuple[Manifest, bytes]:
    """`load_manifest`, with the revision's bytes. The newest is listed again when a live
    writer pruned it between the listing and the read (COMMIT-9)."""
    for _ in range(_COMMIT_ATTEMPTS if revision is None else 1):
        number = revision
        if number is None:
            revs = revisions(run)
            if not revs:
                if run.exists(names.MANIFEST_FILE):
                    raise ManifestError(
                        "no revisions in _manifests/ (LAYOUT-2)",
                        location=run.where(),
                        hint="the folder was copied without _manifests/; copy it whole",
                    )
                raise RunNotFoundError(
                    "not a run: no revision and no manifest.json (LAYOUT-2)",
                    location=run.where(),
                )
            number = revs[-1]
        rel = names.revision_file(number)
        if not run.inside(rel):
            raise ManifestError(
                "revision is, or is reached through, a symbolic link (LAYOUT-5)",
                location=run.where(rel),
                hint="a run folder holds no links: copy the files themselves",
            )
        try:
            data = run.read(rel)
        except NotAFileError:
            raise ManifestError(
                "revision is not a regular file (NAME-6)", location=run.where(rel)
            ) from None
        except FileNotFoundError:
            continue
        try:
            manifest = decode_manifest(data)
        except FormatError as exc:
            raise exc.at(run.where(rel)) from None
        if manifest.revision != number:
            raise ManifestError(
                f"file holds revision {manifest.revision}, not {number} (MAN-3)",
                location=run.where(rel),
            )
        return manifest, data
    if revision is not None:
        raise RunNotFoundError(f"revision {revision} is gone",
                               location=run.where(names.revision_file(revision)))  # fmt: skip
    raise RunNotFoundError("each newest revision went while it was read",
                           location=run.where(names.MANIFESTS_DIR), hint="retry")  # fmt: skip


def check_folder_name(manifest: Manifest, run: Storage, folder: str) -> Manifest:
    """``manifest``, when a store's run folder named ``folder`` may hold it (LAYOUT-1)."""
    problem = folder_name_problem(manifest, folder)
    if problem is not None:
        raise ManifestError(
            problem, location=run.where(),
            hint=f"rename the folder to {manifest.run_id}, or open it by its path",
        )  # fmt: skip
    return manifest


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT, and SIGTERM where Python handles it (the CLI does), back for the block
    (main thread only, where Python runs signal handlers) and deliver them when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda received, frame: held.append(received))
        for signum in (signal.SIGINT, signal.SIGTERM)
        if callable(signal.getsignal(signum))
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:  # the stronger, when both came
            signal.raise_signal(signal.SIGTERM if signal.SIGTERM in held else held[0])


def create_revision(run: Storage, revision: int, data: bytes) -> bool:
    """Create manifest revision ``revision`` only if it does not exist (COMMIT-2); True too
    when it holds ``data`` already: a create-only PUT whose response was lost is retried by
    the client, and the retry is refused (HTTP 412) because the first attempt landed."""
    rel = names.revision_file(revision)
    if run.create_exclusive(rel, data):
        return True
    try:
        return run.read(rel) == data
    except FileNotFoundError:
        return False


def commit(
    run: Storage,
    changes: ChangeSet,
    lock_timeout: float,
    base: Manifest | None = None,
    *,
    age: float = 0.0,
) -> Manifest:
    """Create the next revision with ``changes`` merged in; retry on a lost race (COMMIT-1..5)."""
    with commit_lock(run, lock_timeout):
        return commit_locked(run, changes, base, age=age)


def _silent_since(base: Manifest) -> float:
    """Seconds since ``base`` was committed, by this machine's clock."""
    return (datetime.now(UTC) - parse_timestamp(base.updated_at)).total_seconds()


def commit_locked(
    run: Storage,
    changes: ChangeSet,
    base: Manifest | None = None,
    *,
    repairing: bool = False,
    age: float = 0.0,
    flushed_at: float | None = None,
) -> Manifest:
    """`commit` for a caller that holds the commit lock already.

    A newer revision than ``base`` is merged into, unless it belongs to another run with
    the same id (created since, by a rerun), or is finished and ``changes`` do not reopen
    the run (COMMIT-11; `repair`, ``repairing``, may, as it writes ``SHA256SUMS`` again):
    then `ConflictError`, and nothing is written. A ``base`` committed longer ago than any
    heartbeat interval is read again even when it is still the newest number: its writer
    may have been judged abandoned meanwhile and the run replaced by one at the same
    revision (COMMIT-4). How long ago is told by its ``updated_at`` and by ``age``, the
    seconds since the caller saw it by a monotonic clock, which no clock step sets back.
    A writer whose last flush committed (``flushed_at``, by that clock) more than
    `ABANDON_AFTER` s ago may have been taken for abandoned: a revision that lists already
    what ``changes`` list is then refused (STORE-3).
    """
    born = None if base is None else base.created_at
    if base is not None and max(age, _silent_since(base)) > MAX_HEARTBEAT_INTERVAL:
        base = None
    for _ in range(_COMMIT_ATTEMPTS):
        newest = revisions(run)
        if base is None or not newest or newest[-1] != base.revision:
            base = load_manifest(run)
            if born is not None and base.created_at != born:
                raise ConflictError(
                    f"the run was replaced by another run with its id (created "
                    f"{base.created_at}) since this writer opened it",
                    location=run.where(),
                    hint="this writer's uncommitted changes are dropped; write a new run",
                )
        if base.finished and changes.status is None and not repairing:
            raise ConflictError(
                f"the run was finished ({base.status}) since this writer read it",
                location=run.where(),
                hint="resume the run to add to it (COMMIT-11); this commit is dropped",
            )
        if flushed_at is not None and time.monotonic() - flushed_at > ABANDON_AFTER:
            _refuse_taken(run, base, changes)
        if base.finished and changes.status is not None:
            run.delete(names.SUMS_FILE)  # a crash from here on leaves none, not a stale one
        new = apply_changes(base, changes, base.revision + 1, now_utc(), WRITER)
        data = encode_manifest(new)
        if create_revision(run, new.revision, data):
            # The commit point has passed: a failure now must not make the caller
            # commit the same changes again (counters would count twice, COMMIT-6).
            with contextlib.suppress(StorageError):
                write_manifest_copy(run, data, finished=new.finished)
                if new.revision % _PRUNE_EVERY == 0:
                    for old in newest:
                        if old <= new.revision - KEEP_REVISIONS:
                            run.delete(names.revision_file(old))
            return new
        base = None
    raise ConflictError(
        f"lost {_COMMIT_ATTEMPTS} commit races in a row", location=run.where(), hint="retry later"
    )


_TAKEN_OVER_HINT = (
    "resume the run, and give again what is not in it since this writer's last commit"
)


def _refuse_taken(run: Storage, base: Manifest, changes: ChangeSet) -> None:
    """`ConflictError` when ``base`` lists already, whole, a stage file or artifact that
    ``changes`` list, or one of them is gone: a repair salvaged it, with its counter deltas,
    or dropped it, while its writer was silent long enough to be taken for abandoned
    (STORE-3)."""
    listed = base.listed_paths()
    taken = [path for path, entry in changes.files.items() if listed.get(path, -1) >= entry.bytes]
    taken += [path for path in changes.artifacts if path in listed]
    taken += [path for path in [*changes.files, *changes.artifacts] if not run.exists(path)]
    if taken:
        raise ConflictError(
            f"{taken[0]} is listed already or gone: a repair took over what this writer "
            "stored and had not committed, taking the run for abandoned",
            location=run.where(),
            hint=_TAKEN_OVER_HINT,
        )


def write_manifest_copy(run: Storage, data: bytes, *, finished: bool) -> None:
    """Replace ``manifest.json`` with a revision's bytes (COMMIT-7).

    Durably only for a finished run, whose ``SHA256SUMS`` lists the copy: no reader relies
    on it otherwise, and `repair` rewrites one that a power loss left stale.
    """
    run.write_atomic(names.MANIFEST_FILE, data, durable=finished)


def unpublish(run: Storage) -> None:
    """Make the folder stop being a run before its data goes: ``manifest.json``, then the
    revisions, oldest first, so that it reads at its newest revision until it is no run at
    all (LAYOUT-2)."""
    run.delete(names.MANIFEST_FILE)
    for revision in revisions(run):
        run.delete(names.revision_file(revision))


def sums_of(manifest: Manifest, manifest_bytes: bytes) -> bytes:
    """What ``SHA256SUMS`` holds for a finished run: every listed file and ``manifest.json``
    (a copy of ``manifest_bytes``), sorted by path (CHECK-3)."""
    entries = [(path, sha) for path, (_, sha) in manifest.listed_files().items()]
    entries.append((names.MANIFEST_FILE, sha256_hex(manifest_bytes)))
    return format_sums(entries).encode()


def write_sums(run: Storage, manifest: Manifest) -> None:
    """Write ``SHA256SUMS`` for a finished run, after making sure ``manifest.json``, which
    it lists, is the revision's copy (the commit leaves a failed copy to the next one)."""
    current = run.read(names.revision_file(manifest.revision))
    try:
        copy = run.read(names.MANIFEST_FILE)
    except FileNotFoundError:
        copy = None
    if copy != current:
        write_manifest_copy(run, current, finished=True)
    run.write_atomic(names.SUMS_FILE, sums_of(manifest, current))


class RunReader:
    """A committed view of one run; `refresh` to see later commits."""

    def __init__(self, run: Storage, manifest: Manifest | None = None) -> None:
        self.storage = run
        self.manifest = manifest or load_manifest(run)

    def __repr__(self) -> str:
        return f"RunReader({self.storage.where()!r}, revision={self.manifest.revision})"

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def refresh(self) -> Self:
        self.manifest = load_manifest(self.storage)
        return self

    def stage(self, name: str) -> StageEntry:
        entry = self.manifest.stage(name)
        if entry is None:
            known = ", ".join(s.name for s in self.manifest.stages) or "none"
            raise InvalidInputError(
                f"run has no stage {name!r} (stages: {known})", location=self.storage.where()
            )
        return entry

    def records(self, stage: str, *, verify: bool = True) -> Iterator[Record]:
        """Stream the stage's committed records in order, frame by frame (bounded memory).

        With ``verify``, each file's sha256 is checked once it is read to its end.
        """
        entry = self.stage(stage)
        for f in entry.files:
            for batch in self._file_batches(f, entry, verify):
                yield from batch

    def record_batches(self, stage: str, *, verify: bool = True) -> Iterator[list[Record]]:
        """The stage's records as one list per zstd frame: the fastest way to read them all."""
        entry = self.stage(stage)
        for f in entry.files:
            yield from self._file_batches(f, entry, verify)

    def _file_batches(
        self, f: FileEntry, stage: StageEntry, verify: bool
    ) -> Iterator[list[Record]]:
        where = self.storage.where(f.path)
        if not self.storage.inside(f.path):
            raise FormatError("path leaves the run folder or goes through a link (LAYOUT-5)",
                              location=where)  # fmt: skip
        digest = hashlib.sha256()
        try:
            stream = self.storage.open_read(f.path)
        except NotAFileError:
            raise ChecksumMismatchError(
                "listed path is not a regular file (LAYOUT-3)", location=where
            ) from None
        except FileNotFoundError:
            raise ChecksumMismatchError(
                "listed file is missing (LAYOUT-3)", location=where
            ) from None

        def chunks() -> Iterator[bytes]:
            remaining = f.bytes
            while remaining:
                chunk = stream.read(min(_READ_CHUNK, remaining))
                if not chunk:
                    raise ChecksumMismatchError(
                        f"file ends {remaining} bytes before its listed length {f.bytes} (CHECK-1)",
                        location=where,
                        hint="the file was cut short; restore it from a copy",
                    )
                remaining -= len(chunk)
                if verify:
                    digest.update(chunk)
                yield chunk

        line = 0
        with stream:
            for event in stage_events(chunks(), where):
                if isinstance(event, list):
                    line += len(event)
                    yield event
                else:
                    found = header_problem(event, f.path, stage)
                    if found is not None:
                        problem, rule = found
                        if rule.startswith("VER-"):
                            raise UnsupportedFormatError(
                                f"{problem} ({rule})",
                                location=where,
                                hint=UPGRADE_HINT if rule == "VER-2" else "",
                            )
                        raise StageFileError(f"{problem} ({rule})", location=where)
        if verify and digest.hexdigest() != f.sha256:
            raise ChecksumMismatchError(
                "sha256 of the listed bytes does not match the manifest (CHECK-1)",
                location=where,
                hint="run `runfmt verify` for every problem in the run",
            )
        if line != f.records:
            raise ChecksumMismatchError(
                f"file holds {line} records, manifest lists {f.records} (CHECK-2)", location=where
            )

    def file_urls(self, stage: str) -> list[str]:
        """The URLs (or local paths) of the stage's committed files, for external readers.

        A reader of a whole file sees only committed records when the run is finished, or
        on an object store (each flush writes a new object). On local disk, a live
        writer's newest file in the stage grows by a flush's frames before the commit
        that lists them: read a running local run through `records`, which stops at the
        listed length.
        """
        return [self.storage.where(f.path) for f in self.stage(stage).files]

    def artifact(self, name: str) -> ArtifactEntry:
        """The listed entry of artifact ``name`` (its path below ``artifacts/``, or the path)."""
        path = names.artifact_path(name.removeprefix(names.ARTIFACTS_DIR + "/"))
        entry = next((a for a in self.manifest.artifacts if a.path == path), None)
        if entry is None:
            prefix = names.ARTIFACTS_DIR + "/"
            known = ", ".join(a.path.removeprefix(prefix) for a in self.manifest.artifacts)
            known = known or "none"
            raise InvalidInputError(
                f"run has no artifact {name!r} (artifacts: {known})", location=self.storage.where()
            )
        return entry

    def read_artifact(self, name: str) -> bytes:
        """An artifact's bytes, checked against its listed length and sha256."""
        return b"".join(self.stream_artifact(name))

    def stream_artifact(self, name: str, chunk_size: int = _READ_CHUNK) -> Iterator[bytes]:
        """An artifact's bytes in chunks (bounded memory); the last chunk is yielded only
        after the length and sha256 have matched, else `ChecksumMismatchError` (CHECK-1)."""
        entry = self.artifact(name)
        where = self.storage.where(entry.path)
        if not self.storage.inside(entry.path):
            raise FormatError("artifact goes through a link (LAYOUT-5)", location=where)
        digest = hashlib.sha256()
        size = 0
        held = b""
        try:
            stream = self.storage.open_read(entry.path)
        except FileNotFoundError:
            raise ChecksumMismatchError("listed artifact is missing", location=where) from None
        with stream:
            while chunk := stream.read(chunk_size):
                digest.update(chunk)
                size += len(chunk)
                if size > entry.bytes:
                    break
                if held:
                    yield held
                held = chunk
        if size != entry.bytes or digest.hexdigest() != entry.sha256:
            raise ChecksumMismatchError(
                "artifact does not match its listed length and sha256 (CHECK-1)", location=where,
                hint="run `runfmt verify` for every problem in the run",
            )  # fmt: skip
        if held:
            yield held

    def keys(self, stage: str) -> set[str]:
        """Keys of the stage's committed records that are not failures (REC-5, REC-6): none
        for a stage the run has not declared yet (a job resumed before its first commit)."""
        if self.manifest.stage(stage) is None:
            names.validate_stage_name(stage)
            return set()
        kf = self.stage(stage).key_field
        if kf is None:
            raise InvalidInputError(f"stage {stage!r} has no key field: its records have no keys",
                                    location=self.storage.where(),
                                    hint="declare one with stage(name, key_field=...)")  # fmt: skip
        return {
            key
            for batch in self.record_batches(stage)
            for r in batch
            if (key := record_key(r, kf)) is not None and not is_failure(r)
        }


@dataclass(slots=True)
class _OpenFile:
    """The local stage file a writer appends to, with what it holds so far."""

    path: str
    handle: AppendFile
    size: int = 0
    records: int = 0
    failures: int = 0
    digest: Any = field(default_factory=hashlib.sha256)


class StageWriter:
    """Buffers one stage's records for a `RunWriter`; get one with `RunWriter.stage`."""

    def __init__(self, run: RunWriter, entry: StageEntry, seq: int) -> None:
        self.name = entry.name
        self.entry = entry
        self._run = run
        self._chunks: list[bytes] = []
        """Encoded records not yet written: one line each from `append`, many from `extend`."""
        self._records = 0
        self._pending_failures = 0
        self._seq = seq
        self._open: _OpenFile | None = None
        self._unsent: tuple[FileEntry, bytes] | None = None
        """An object whose PUT raised, so it may have landed: its entry and bytes, sent again
        as they are before anything else (object stores)."""

    def __repr__(self) -> str:
        return f"StageWriter({self.name!r}, pending={self._records})"

    @property
    def pending(self) -> int:
        return self._records

    @property
    def pending_bytes(self) -> int:
        """The encoded size of the records buffered for the next flush."""
        return sum(map(len, self._chunks))

    def append(self, record: Mapping[str, Any]) -> None:
        """Buffer one record; a bad record raises `InvalidInputError` and changes nothing."""
        if self._run._closed:
            self._run._check_open()
        try:
            line = encode_record(record, self.entry.key_field)
            if len(line) > MAX_RECORD_BYTES or PARENTS_FIELD in record:  # rare: no call else
                _refuse_unwritable(record, line)
        except InvalidInputError as exc:
            raise exc.at(self._run.storage.where(f"{names.STAGES_DIR}/{self.name}")) from None
        with self._run._mutex:
            if self._run._closed:  # finished by another thread meanwhile
                self._run._check_open()
            self._chunks.append(line)
            self._records += 1
            if record.get(ERROR_FIELD) is not None:
                self._pending_failures += 1
            try:
                self._run._appended()
            except RunfmtError as exc:
                _say_taken(exc, self._run, "this record: do not append it again")
                raise

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        """`append` each record, encoding up to a flush's worth at a time at C speed.

        Flushes fall on the same records as with `append`; a bad record raises, naming
        its position, after the records before it were appended. Records are taken up
        to 1,000 at a time before they are encoded: a generator that yields one dict
        again and again, changed in place, must yield copies.
        """
        self._run._check_open()
        it = iter(records)
        taken = 0
        while True:
            batch: list[Mapping[str, Any]] = []
            try:
                batch.extend(itertools.islice(it, self._run._room()))
            except BaseException:
                self._append_each(batch, taken)
                raise
            if not batch:
                return
            lines = encode_many(batch, self.entry.key_field)
            if (
                lines is None
                or (
                    len(lines) > MAX_RECORD_BYTES
                    and max(map(len, lines.split(b"\n"))) >= MAX_RECORD_BYTES
                )
                or any(map(operator.contains, batch, itertools.repeat(PARENTS_FIELD)))
            ):
                self._append_each(batch, taken)
            else:
                dicts = cast("list[dict[str, Any]]", batch)  # encode_many took only dicts
                errors = list(map(dict.get, dicts, itertools.repeat(ERROR_FIELD)))
                with self._run._mutex:
                    self._run._check_open()
                    self._chunks.append(lines)
                    self._records += len(batch)
                    self._pending_failures += len(errors) - errors.count(None)
                    try:
                        self._run._appended(len(batch))
                    except RunfmtError as exc:
                        _say_taken(exc, self._run, _first(taken + len(batch)))
                        raise
            taken += len(batch)

    def _append_each(self, batch: list[Mapping[str, Any]], first: int) -> None:
        """`append` each record of ``batch``, whose first is ``extend``'s record ``first``."""
        for i, record in enumerate(batch, first):
            try:
                self.append(record)
            except InvalidInputError as exc:
                exc.problem = (
                    f"record {i} given to extend (counted from 0; the records before it "
                    f"were appended): {exc.problem}"
                )
                raise
            except RunfmtError as exc:
                _say_taken(exc, self._run, _first(i + 1))
                raise

    def complete(self) -> None:
        """Mark the stage completed at the next commit."""
        with self._run._mutex:
            self._run._changes.stage_status[self.name] = "completed"

    def fail(self) -> None:
        """Mark the stage failed at the next commit."""
        with self._run._mutex:
            self._run._changes.stage_status[self.name] = "failed"

    def _frames(self, encoder: FrameEncoder) -> list[bytes]:
        """The buffered lines as frames, each cut after the line that brings it to
        `FRAME_TARGET` bytes."""
        data = b"".join(self._chunks)
        if len(data) < FRAME_TARGET:
            return [encoder.encode(data)]
        view, frames, start = memoryview(data), [], 0
        while len(data) - start >= FRAME_TARGET:
            end = data.index(b"\n", start + FRAME_TARGET - 1) + 1
            frames.append(encoder.encode(view[start:end]))
            start = end
        if start < len(data):
            frames.append(encoder.encode(view[start:]))
        return frames

    def _header(self, seq: int) -> bytes:
        return PREFIX + encode_header(
            {
                "format": "runfmt-stage",
                "format_version": FORMAT_VERSION,
                "run_id": self._run.run_id,
                "stage": self.name,
                "seq": seq,
                "writer": self._run.writer_id,
                "record_schema_version": self.entry.record_schema_version,
                "key_field": self.entry.key_field,
                "run_created_at": self._run.manifest.created_at,
            }
        )

    def _resend(self, storage: Storage) -> FileEntry | None:
        """Send again, byte for byte, the object a failed PUT may have stored: a repair
        that listed it meanwhile sees the same bytes, and no second object holds its
        records (object stores)."""
        if self._unsent is None:
            return None
        entry, body = self._unsent
        storage.put(entry.path, body)
        self._unsent = None
        return entry

    def _write(
        self, storage: Storage, encoder: FrameEncoder, counters: bytes = b""
    ) -> FileEntry | None:
        """Write the buffered records as frames, with the ``counters`` frame before the last
        one (FRAME-6); return the file's new entry. On an object store a failed PUT keeps
        the object's bytes for `_resend` instead of the records."""
        if not self._chunks:
            return None
        frames = self._frames(encoder)
        data = b"".join([*frames[:-1], counters, frames[-1]])
        if not storage.is_local:
            return self._put(storage, data)
        f = self._local_file(storage)
        try:
            f.handle.write(data)
            f.handle.sync()
        except BaseException:
            with contextlib.suppress(RunfmtError, OSError):
                if f.records:
                    f.handle.truncate(f.size)  # part of a frame may have been written
                else:
                    storage.delete(f.path)  # new: it holds no record a revision could list
            self._abandon()
            raise
        f.digest.update(data)
        f.size += len(data)
        f.records += self._records
        f.failures += self._pending_failures
        self._chunks.clear()
        self._records = self._pending_failures = 0
        entry = FileEntry(f.path, f.size, f.records, f.failures, f.digest.copy().hexdigest())
        if f.size >= ROLL_BYTES:
            self._abandon()
        return entry

    def _put(self, storage: Storage, data: bytes) -> FileEntry:
        """Store the buffered records, framed as ``data``, as the stage's next object."""
        self._seq += 1
        path = names.format_stage_file(self.name, self._seq, self._run.writer_id)
        body = self._header(self._seq) + data
        entry = FileEntry(path, len(body), self._records, self._pending_failures,
                          sha256_hex(body))  # fmt: skip
        self._chunks.clear()
        self._records = self._pending_failures = 0
        try:
            storage.put(path, body)
        except BaseException:
            self._unsent = (entry, body)
            raise
        return entry

    def _local_file(self, storage: Storage) -> _OpenFile:
        if self._open is None:
            self._seq += 1
            path = names.format_stage_file(self.name, self._seq, self._run.writer_id)
            f = _OpenFile(path, storage.open_append(path))
            head = self._header(self._seq)
            try:
                f.handle.write(head)
            except BaseException:
                f.handle.close()
                with contextlib.suppress(RunfmtError, OSError):
                    storage.delete(path)  # new and never listed
                raise
            f.digest.update(head)
            f.size = len(head)
            self._open = f
        return self._open

    def _abandon(self) -> None:
        """Stop appending to the current file; the next flush starts a new one."""
        if self._open is not None:
            self._open.handle.close()
        self._open = None


_TAKEN = "the next flush commits "
_STOPPED = (
    "the writer stopped, committing nothing given since its last commit: resume the run "
    "(what reached the disk is salvaged) and give the rest again"
)


def _first(n: int) -> str:
    first = "the first record" if n == 1 else f"the first {n} records"
    return f"{first} given to extend: give it the rest, from record {n} (counted from 0)"


def _say_taken(exc: RunfmtError, run: RunWriter, what: str) -> None:
    """After the flush that an append triggered failed: say in ``exc``'s hint what the call
    took, which the next flush commits, unless the flush stopped the writer."""
    if not run._closed:
        exc.hint = "; ".join(filter(None, [_untaken(exc.hint), _TAKEN + what]))


def _untaken(hint: str) -> str:
    """``hint`` without what `_say_taken` added."""
    return "" if hint.startswith(_TAKEN) else hint.split("; " + _TAKEN, 1)[0]


def _holds_unlisted(run: Storage, manifest: Manifest) -> bool:
    """Whether a stage file of ``run`` holds bytes that ``manifest`` does not list."""
    listed = manifest.listed_paths()
    return any(
        listed.get(f"{names.STAGES_DIR}/{path}") != size
        for path, size in run.walk(names.STAGES_DIR).items()
    )


def writable_line(record: Mapping[str, Any], key_field: str | None) -> bytes:
    """The record's line, or `InvalidInputError` for what a writer refuses: what
    `encode_record` refuses, a line over `MAX_RECORD_BYTES`, malformed ``_parents``."""
    line = encode_record(record, key_field)
    _refuse_unwritable(record, line)
    return line


def _refuse_unwritable(record: Mapping[str, Any], line: bytes) -> None:
    """`InvalidInputError` for a line over `MAX_RECORD_BYTES` or malformed ``_parents``."""
    if len(line) > MAX_RECORD_BYTES:
        raise InvalidInputError(
            f"record of {len(line)} bytes is over the {MAX_RECORD_BYTES}-byte limit "
            "(a frame holds at most 64 MiB, FRAME-4)",
            hint="store large values as artifacts (add_artifact) and refer to them",
        )
    if PARENTS_FIELD in record:
        parse_parents(record[PARENTS_FIELD])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class WriterOptions(TypedDict, total=False):
    """`RunWriter`'s keyword options, which `Store.create_run`, `Store.resume_run`,
    `Store.open_or_create` and `Store.fork_run` pass on."""

    flush_every: int | None
    flush_interval: float | None
    lock_timeout: float
    compression_level: int
    heartbeat_interval: float | None
    until_stage: str | None


_WRITER_OPTIONS = tuple(WriterOptions.__annotations__)


def check_writer_options(options: Mapping[str, Any]) -> None:
    """Refuse unknown `RunWriter` options and values it cannot use, before a run is written."""
    unknown = sorted(set(options) - set(_WRITER_OPTIONS))
    if unknown:
        raise InvalidInputError(f"unknown writer option {', '.join(map(repr, unknown))}",
                                hint=f"writer options: {', '.join(_WRITER_OPTIONS)}")  # fmt: skip

    def refuse(name: str, what: str) -> NoReturn:
        raise InvalidInputError(f"{name} must be {what}, not {options[name]!r}")

    every = options.get("flush_every")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        refuse("flush_every", "a whole number of records >= 1, or None")
    interval = options.get("flush_interval")
    if interval is not None and not (_is_number(interval) and 0 < interval < math.inf):
        refuse("flush_interval", "a number of seconds > 0, or None")
    if "lock_timeout" in options and not (
        _is_number(options["lock_timeout"]) and 0 <= options["lock_timeout"] < math.inf
    ):
        refuse("lock_timeout", "a number of seconds >= 0")
    level = options.get("compression_level", 3)
    if not isinstance(level, int) or isinstance(level, bool) or level > MAX_COMPRESSION_LEVEL:
        refuse("compression_level", f"a zstd level up to {MAX_COMPRESSION_LEVEL}")
    heartbeat = options.get("heartbeat_interval")
    if heartbeat is not None and not (
        _is_number(heartbeat) and 0 < heartbeat <= MAX_HEARTBEAT_INTERVAL
    ):
        raise InvalidInputError(
            f"heartbeat_interval must be in (0, {MAX_HEARTBEAT_INTERVAL:g}] s or None, "
            f"not {heartbeat!r}",
            hint="a run not heard from for 300 s is reported abandoned (LIFE-4)",
        )
    if options.get("until_stage") is not None:
        names.validate_stage_name(options["until_stage"])


class RunWriter:
    """Appends records to a run and commits them; use as a context manager.

    Leaving the ``with`` block normally finishes the run as completed; an
    exception finishes it as failed with the exception as its error. `close`
    commits what is buffered and leaves the run resumable.
    """

    def __init__(
        self,
        run: Storage,
        manifest: Manifest,
        *,
        flush_every: int | None = 1000,
        flush_interval: float | None = 10.0,
        lock_timeout: float = 30.0,
        compression_level: int = 3,
        heartbeat_interval: float | None = HEARTBEAT_INTERVAL,
        until_stage: str | None = None,
    ) -> None:
        if run.read_only:
            raise ReadOnlyError("the store was opened read-only", location=run.where())
        check_writer_options({
            "flush_every": flush_every, "flush_interval": flush_interval,
            "lock_timeout": lock_timeout, "compression_level": compression_level,
            "heartbeat_interval": heartbeat_interval, "until_stage": until_stage,
        })  # fmt: skip
        self.until_stage = until_stage
        self.storage = run
        self.manifest = manifest
        self.writer_id = secrets.token_hex(4)
        self.flush_every = flush_every
        self.flush_interval = flush_interval
        self.lock_timeout = lock_timeout
        self._encoder = FrameEncoder(compression_level)
        self._changes = ChangeSet()
        self._unframed: dict[str, float | int] = {}
        """Counter deltas of `_changes` that no counter frame holds yet (FRAME-6)."""
        self._stages: dict[str, StageWriter] = {}
        self._pending = 0
        self._last_flush = time.monotonic()
        self._lock: FileLock | None = hold_writer_lock(run, self.writer_id)
        self._closed = False
        self._taken_over: ConflictError | None = None
        self._flushed_at = time.monotonic()
        self._mutex = threading.RLock()
        self._stop_heartbeat = threading.Event()
        if heartbeat_interval is not None:
            threading.Thread(
                target=self._heartbeat_loop,
                args=(heartbeat_interval,),
                name=f"runfmt-heartbeat-{self.writer_id}",
                daemon=True,
            ).start()

    def __repr__(self) -> str:
        return f"RunWriter({self.storage.where()!r}, writer={self.writer_id})"

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def stage(
        self, name: str, *, record_schema_version: str | None = None, key_field: str | None = None
    ) -> StageWriter:
        """The writer of stage ``name``, declared at the next commit if it is new.

        For an existing stage, omitted arguments take its declared values, and
        different ones raise `ConflictError`.
        """
        with self._mutex:
            return self._stage(name, record_schema_version, key_field)

    def _stage(
        self, name: str, record_schema_version: str | None, key_field: str | None
    ) -> StageWriter:
        self._check_open()
        if name in self._stages:
            writer = self._stages[name]
            self._check_declaration(writer.entry, record_schema_version, key_field)
            return writer
        names.validate_stage_name(name)
        existing = self.manifest.stage(name)
        if existing is not None:
            self._check_declaration(existing, record_schema_version, key_field)
            entry = StageEntry(name, existing.status, existing.record_schema_version,
                               existing.key_field)  # fmt: skip
        else:
            version = "1" if record_schema_version is None else record_schema_version
            if not isinstance(version, str) or not 0 < len(version) <= 64:
                raise InvalidInputError(
                    f"record_schema_version must be a string of 1-64 characters, not {version!r}"
                )
            if key_field is not None and (
                not isinstance(key_field, str) or not 0 < len(key_field) <= 256
            ):
                raise InvalidInputError(
                    f"key_field must be a string of 1-256 characters or None, not {key_field!r}"
                )
            entry = StageEntry(name, "running", version, key_field)
        self._changes.stages[name] = entry
        writer = StageWriter(self, entry, seq=0)
        self._stages[name] = writer
        return writer

    @staticmethod
    def _check_declaration(
        entry: StageEntry, record_schema_version: str | None, key_field: str | None
    ) -> None:
        if (record_schema_version not in (None, entry.record_schema_version)) or (
            key_field not in (None, entry.key_field)
        ):
            raise ConflictError(
                f"stage {entry.name!r} is declared with record schema version "
                f"{entry.record_schema_version!r} and key field {entry.key_field!r}",
                hint="write a new record schema version to a new stage",
            )

    def append(self, stage: str, record: Mapping[str, Any]) -> None:
        """`StageWriter.append` to ``stage``, declared by the first record it takes."""
        self._use(stage, StageWriter.append, record)

    def extend(self, stage: str, records: Iterable[Mapping[str, Any]]) -> None:
        """`StageWriter.extend` of ``stage``, declared by the first record it takes."""
        self._use(stage, StageWriter.extend, records)

    def _use(self, name: str, method: Callable[[StageWriter, Any], None], arg: Any) -> None:
        """``method`` of stage ``name``'s writer. On the first use of a stage, when it took no
        record, the writer did not take the stage up (LIFE-5) nor declare it: a refused
        record changes nothing (REC-3). The writer is looked up under the lock, never while
        another thread's first use may still drop it."""
        with self._mutex:
            writer = self._stages.get(name)
            if writer is None:
                writer = self.stage(name)
                try:
                    method(writer, arg)
                finally:
                    if not writer.pending and writer._seq == 0:
                        del self._stages[name]
                        self._changes.stages.pop(name, None)
                return
        method(writer, arg)

    def count(self, counter: str, delta: float = 1) -> None:
        """Add ``delta`` to a per-run counter (cost, tokens, ...) at the next commit."""
        with self._mutex:
            self._check_open()
            try:
                if not _is_number(delta) or not math.isfinite(delta):
                    raise InvalidInputError(f"counter delta must be a finite number, not {delta!r}")
                pending = self._changes.counters.get(counter, 0) + delta
                check_counter(counter, self.manifest.counters.get(counter, 0) + pending)
            except InvalidInputError as exc:
                raise exc.at(self.storage.where()) from None
            self._changes.counters[counter] = pending
            self._unframed[counter] = self._unframed.get(counter, 0) + delta

    def tag(self, **tags: str) -> None:
        """Set tags at the next commit."""
        self._check_open()
        try:
            check_tags(tags)
        except InvalidInputError as exc:
            raise exc.at(self.storage.where()) from None
        with self._mutex:
            self._check_open()  # finished by another thread meanwhile
            self._changes.tags.update(tags)

    def add_artifact(
        self,
        name: str,
        data: bytes,
        media_type: str | None = None,
        *,
        parents: list[Mapping[str, str]] | None = None,
    ) -> str:
        """Store a binary artifact in the run, listed at the next commit; returns its path.

        ``media_type`` defaults to the one spec ART-1 gives the name's extension, else
        ``application/octet-stream``; ``parents`` names what it was made from (LIN-1).
        A listed artifact is never overwritten: listed bytes do not change (LAYOUT-3).
        """
        self._check_open()
        path = names.artifact_path(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInputError(f"artifact data must be bytes, not {type(data).__name__}")
        if not isinstance(media_type, str | None):
            raise InvalidInputError(
                f"media type must be a string, not {type(media_type).__name__}",
                hint="e.g. image/png, or None to guess it from the name",
            )
        media_type = media_type or guess_media_type(name)
        if not _MEDIA_TYPE.fullmatch(media_type):
            raise InvalidInputError(f"invalid media type {media_type!r}", hint="e.g. image/png")
        refs = tuple(parent_json(p) for p in parse_parents(parents)) if parents is not None else ()
        folded = path.casefold()
        taken = next((p for p in [*self._changes.artifacts, *(a.path for a in
                     self.manifest.artifacts)] if p.casefold() == folded), None)  # fmt: skip
        if taken is not None:
            same = "exists; listed bytes never change" if taken == path else (
                f"differs from artifact {taken!r} only in case, which a case-insensitive "
                "filesystem would store as one file (MAN-7)"
            )  # fmt: skip
            raise ConflictError(f"artifact {path!r} {same}", location=self.storage.where(path),
                                hint="store the new version under a new name")  # fmt: skip
        if not self.storage.inside(path):
            raise InvalidInputError(f"artifact path {path!r} goes through a link")
        data = bytes(data)
        if not self.storage.create_exclusive(path, data):
            if not self._left_by_dead_writer(path):
                raise ConflictError(
                    f"artifact {path!r} exists: another writer of the run stored it",
                    location=self.storage.where(path),
                    hint="store the new version under a new name (on an object store, a dead "
                    "writer's file that no revision lists goes when the run is resumed once "
                    "abandoned, 300 s after it was last heard from)",
                )
            self.storage.write_atomic(path, data)
        entry = ArtifactEntry(path, len(data), sha256_hex(data), media_type, refs)
        with self._mutex:
            if self._closed:  # finished by another thread meanwhile: no commit will list it
                with contextlib.suppress(RunfmtError, OSError):
                    self.storage.delete(path)
                self._check_open()
            self._changes.artifacts[path] = entry
        return path

    def _left_by_dead_writer(self, path: str) -> bool:
        """Whether the artifact file at ``path`` is what a dead writer left uncommitted: no
        revision lists it and no other writer of the run is alive (local disk only; an
        object store cannot tell, so there the name stays taken)."""
        if not self.storage.is_local or any(
            a.path == path for a in load_manifest(self.storage).artifacts
        ):
            return False
        return set(live_writers(self.storage)) <= {self.writer_id}

    def _room(self) -> int:
        """How many records `StageWriter.extend` may encode before the next check for a flush."""
        if self.flush_every is None:
            return _EXTEND_BATCH
        return max(1, min(_EXTEND_BATCH, self.flush_every - self._pending))

    def _appended(self, count: int = 1) -> None:
        self._pending += count
        if (self.flush_every is not None and self._pending >= self.flush_every) or (
            self.flush_interval is not None
            and time.monotonic() - self._last_flush >= self.flush_interval
        ):
            self.flush()

    def flush(self) -> Manifest:
        """Write buffered records and commit a new revision (if anything changed).

        Once the run's commit lock is held, Ctrl-C waits until the writes and the commit
        are recorded in the writer's state, so the ``with`` block's exit commits nothing
        twice and lists no byte under a stale checksum.
        """
        with self._mutex:
            self._check_open()
            self._pending = 0
            self._last_flush = time.monotonic()
            if not self._changes and not any(w._chunks for w in self._stages.values()):
                return self.manifest
            with commit_lock(self.storage, self.lock_timeout), interrupts_held():
                last = next((w for w in reversed(self._stages.values()) if w._chunks), None)
                for writer in self._stages.values():
                    counters = b""
                    if writer is last and self._unframed:
                        with contextlib.suppress(StageFileError):  # no frame holds them:
                            counters = encode_counters(self._unframed)  # the commit has them
                    resent = writer._resend(self.storage)
                    if counters and not self.storage.is_local:
                        self._unframed = {}  # sent, or kept for `_resend` with its object
                    written = writer._write(self.storage, self._encoder, counters)
                    for entry in (resent, written):
                        if entry is not None:
                            self._changes.files[entry.path] = entry
                if last is not None:
                    self._unframed = {}  # written in a counter frame
                self._changes.heartbeat = True
                self._stop_if_taken_over()
                try:
                    self.manifest = commit_locked(self.storage, self._changes, self.manifest,
                                                  age=self._base_age(),
                                                  flushed_at=self._flushed_at)  # fmt: skip
                except ConflictError:
                    if not self._stop_if_refused():
                        self._stop_if_taken_over(always=True)
                    raise
                self._flushed_at = time.monotonic()
                self._changes = ChangeSet()
                self._unframed = {}
            return self.manifest

    @property
    def manifest(self) -> Manifest:
        """The newest revision this writer has seen: its base for the next commit."""
        return self._manifest

    @manifest.setter
    def manifest(self, value: Manifest) -> None:
        self._manifest = value
        self._based_at = time.monotonic()

    def _base_age(self) -> float:
        return time.monotonic() - self._based_at

    def heartbeat(self) -> Manifest:
        """Commit that this writer is alive (``heartbeat_at``, LIFE-3) and what is buffered."""
        with self._mutex:
            self._check_open()
            self._changes.heartbeat = True
            return self.flush()

    def _heartbeat_loop(self, interval: float) -> None:
        """Commit a heartbeat every ``interval`` s until the writer closes or the run is gone."""
        while not self._stop_heartbeat.wait(interval):
            with self._mutex:
                if self._closed:
                    return
                try:
                    if not self.storage.exists(names.MANIFESTS_DIR):
                        return
                    self._stop_if_taken_over()
                    self.manifest = commit(self.storage, ChangeSet(heartbeat=True),
                                           self.lock_timeout, self.manifest,
                                           age=self._base_age())  # fmt: skip
                except RunNotFoundError:
                    return
                except ConflictError:  # a finished run stops the heartbeat, not the writer
                    if (
                        self._closed  # taken over
                        or self._stop_if_refused(finished=False)
                        or load_manifest(self.storage).finished
                    ):
                        return
                except (RunfmtError, OSError):
                    continue

    def finish(
        self,
        status: RunStatus = "completed",
        error: str | None = None,
        *,
        through_stage: str | None = None,
    ) -> Manifest:
        """Commit what is buffered, set the final status, write ``SHA256SUMS`` and close.

        Where locks tell live writers from dead ones (local disk), what dead
        writers of the run appended to stage files and never committed is then salvaged
        into it as `runfmt.check.repair_run` does (COMMIT-11), so that the finished run's
        stage files hold only what it lists. A completed run stopped on purpose after
        a stage records it as ``completed_through_stage`` (``through_stage``, else the
        writer's ``until_stage``; LIFE-2); that stage is marked completed.
        """
        if status not in ("completed", "failed", "cancelled"):
            raise InvalidInputError(f"finish needs completed, failed or cancelled, not {status!r}")
        check_error(status, error)
        with self._mutex:
            self._check_open()
            through = None
            if status == "completed":
                through = through_stage or self.until_stage
                if (
                    through is not None
                    and through not in self._stages
                    and self._newest_of_this_run().stage(through) is None
                ):
                    raise InvalidInputError(
                        f"cannot complete through stage {through!r}: the run has no such stage",
                        location=self.storage.where(),
                    )
                if through is not None:
                    self._changes.stage_status[through] = "completed"
                self._changes.complete_running = frozenset(self._stages)
            self._changes.status = status
            self._changes.error = error
            self._changes.completed_through_stage = through
            manifest = self.flush()
            if self.storage.is_local and _holds_unlisted(self.storage, manifest):
                from runfmt.check import repair_run

                repair_run(self.storage, artifacts="leave", writer=self.writer_id)  # + sums
                manifest = load_manifest(self.storage)
            else:
                write_sums(self.storage, manifest)
            self._release()
            return manifest

    def _newest_of_this_run(self) -> Manifest:
        """The run's newest revision, which may list stages other writers declared since this
        writer's last commit; the writer's own when the run was replaced meanwhile (its
        commit then fails, COMMIT-4)."""
        newest = load_manifest(self.storage)
        return newest if newest.created_at == self.manifest.created_at else self.manifest

    def fail(self, error: str) -> Manifest:
        return self.finish("failed", error)

    def cancel(self) -> Manifest:
        return self.finish("cancelled")

    def close(self) -> None:
        """Commit what is buffered and stop writing; the run stays resumable. A commit the
        run refuses for good (`ConflictError`: finished or replaced by another writer) stops
        the writer too; after any other failure, ``close`` may be called again."""
        with self._mutex:
            if not self._closed:
                try:
                    self.flush()
                except ConflictError:
                    self._release()
                    raise
                self._release()

    def discard(self) -> None:
        """Stop writing and commit nothing more: buffered records and changes are dropped.

        Bytes already appended past the last commit are debris that `repair` removes.
        """
        self._release()

    def _stop_if_refused(self, *, finished: bool = True) -> bool:
        """After a refused commit: when the run now is another run with this id (a rerun,
        COMMIT-4) or, with ``finished``, was finished (COMMIT-11), the commit is dropped for
        good. Undo the writes made for it that the newest revision does not list (a later
        repair would salvage them): stage files, and artifacts still holding this writer's
        bytes (another run with this id may store one by the same name). Then close. Whether
        it was so."""
        try:
            current = load_manifest(self.storage)
        except (RunfmtError, OSError):
            return False
        replaced = current.created_at != self.manifest.created_at
        if not (replaced or (finished and current.finished)):
            return False
        self._undo({} if replaced else current.listed_paths())  # a repair may list more
        return True

    def _unsent(self) -> list[str]:
        return [w._unsent[0].path for w in self._stages.values() if w._unsent is not None]

    def _undo(self, listed: Mapping[str, int]) -> None:
        """Delete (or cut back to what ``listed`` holds) the stage files written for changes
        that will never be committed, and the artifacts still holding this writer's bytes
        (another run with this id may store one by the same name); then close."""
        for path in [*self._changes.files, *self._unsent()]:
            with contextlib.suppress(RunfmtError, OSError):
                if listed.get(path) and self.storage.is_local:
                    self.storage.truncate(path, listed[path])
                elif not listed.get(path):
                    self.storage.delete(path)
        for art in self._changes.artifacts.values():
            with contextlib.suppress(RunfmtError, OSError):
                if (
                    art.path not in listed
                    and self.storage.size(art.path) == art.bytes
                    and self.storage.prefix_sha256(art.path, art.bytes) == art.sha256
                ):
                    self.storage.delete(art.path)
        self._release()

    def _release(self) -> None:
        with self._mutex:
            self._stop_heartbeat.set()
            for writer in self._stages.values():
                writer._abandon()
            if self._lock is not None:
                self._lock.release()
                self.storage.delete(f".writer-{self.writer_id}.lock")
                self._lock = None
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise self._taken_over or InvalidInputError(
                "this writer is closed", location=self.storage.where(),
                hint="resume the run to write more",
            )  # fmt: skip

    def _stop_if_taken_over(self, *, always: bool = False) -> None:
        """Where no lock tells (STORE-3), when this writer's flushes committed nothing for
        longer than `ABANDON_AFTER` (heartbeats commit none of what it stored) or
        ``always``: stop with a `ConflictError` when another machine, taking the run for
        abandoned, listed or deleted what it stored and has not committed (LIFE-4);
        committing it then would list a file twice, count its counters twice, or list one
        that is gone."""
        mine = [*self._changes.files, *self._unsent(), *self._changes.artifacts]
        silent = time.monotonic() - self._flushed_at
        if self.storage.is_local or not mine or (silent <= ABANDON_AFTER and not always):
            return
        listed = load_manifest(self.storage).listed_paths()
        if not any(path in listed or not self.storage.exists(path) for path in mine):
            return
        self._taken_over = ConflictError(
            f"this writer was silent for {silent:.0f} s, so the run was taken for "
            "abandoned and what it stored but had not committed was repaired (listed or "
            "deleted) meanwhile",
            location=self.storage.where(),
            hint=_TAKEN_OVER_HINT,
        )
        self._undo(listed)  # what a repair listed stays; the rest goes
        raise self._taken_over

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        if exc is None:
            try:
                self.finish("completed")
            # a through stage the run does not have; Ctrl-C while waiting for the lock
            except (InvalidInputError, KeyboardInterrupt) as refused:
                self.__exit__(type(refused), refused, None)
                raise
            except BaseException as failed:
                self._stop(failed)  # as a crash would: `repair` or a resume takes it from here
                raise
            return
        status: RunStatus = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.finish(status, error[:MAX_ERROR])
        except Exception:
            self._stop(exc)

    def _stop(self, exc: BaseException) -> None:
        """Release the writer whose ``with`` block could not finish the run; when that drops
        buffered records, ``exc`` says so in its hint instead of what it said they would be."""
        dropped = any(writer._chunks for writer in self._stages.values())
        self._release()
        if dropped and isinstance(exc, RunfmtError):
            exc.hint = "; ".join(filter(None, [_untaken(exc.hint), _STOPPED]))
