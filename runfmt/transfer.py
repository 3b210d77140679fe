"""Portable export and import: one stage as one file, a whole run as one tar archive.

Exports read only what the newest manifest revision lists, checking sha256 as
they go. Imports check everything first (frame checksums, the export header's
record count and sha256, an archive's manifest and ``SHA256SUMS``), then write
through `RunWriter` with normal commits, so nothing half-checked is committed.
Export and import files are local paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from runfmt.check import refuse_damaged_copy
from runfmt.errors import (
    ChecksumMismatchError,
    ConflictError,
    FormatError,
    InvalidInputError,
    RunExistsError,
    RunfmtError,
    StageFileError,
    StorageError,
    UnsupportedFormatError,
)
from runfmt.format import names
from runfmt.format.checksum import parse_sums
from runfmt.format.frames import PREFIX, FrameDecoder, FrameEncoder, encode_header, stage_events
from runfmt.format.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    check_compatible,
    decode_manifest,
    parse_timestamp,
)
from runfmt.format.records import Record, is_failure, line_of
from runfmt.format.schemas import schema_errors
from runfmt.locking import hidden_build
from runfmt.run import (
    FRAME_TARGET,
    RunReader,
    RunWriter,
    StageWriter,
    load_revision,
    revisions,
    sums_of,
    writable_line,
)
from runfmt.store import Store

__all__ = [
    "ImportResult",
    "export_run",
    "export_stage",
    "import_run",
    "import_stage",
    "read_stage_file",
]

_CHUNK = 1 << 20
_EXPORT_WRITER = "export"
_IMPORT_FLUSH = 100_000
_IMPORT_FLUSH_BYTES = 64 << 20
"""An import flushes after this many bytes too (a frame's worth, FRAME-4)."""
_BUILD_PREFIX, _BUILDER = ".import-", "import"
"""A run archive is imported into a hidden folder of the store, which its importer holds
the lock of ``_BUILDER`` in, then renamed into place."""


def _stage_kind(path: str) -> str:
    if path.endswith(".jsonl.zst"):
        return "zst"
    if path.endswith(".jsonl"):
        return "jsonl"
    raise InvalidInputError(
        f"{path}: unknown stage file type", hint="name the file *.jsonl.zst or *.jsonl"
    )


@contextlib.contextmanager
def _atomic_output(dest: str) -> Iterator[IO[bytes]]:
    """A temp file next to ``dest`` that replaces it only when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(dest))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def export_stage(run: RunReader, stage: str, dest: str | os.PathLike[str]) -> int:
    """Write the stage's committed records to ``dest``; returns the record count.

    ``*.jsonl.zst`` gives a stage file (spec §5) whose header carries an
    ``export`` member (record and failure counts, sha256 of the bytes after the
    header); ``*.jsonl`` gives plain JSON Lines.
    """
    dest = os.fspath(dest)
    kind = _stage_kind(dest)
    entry = run.stage(stage)
    records = failures = 0
    if kind == "jsonl":
        with _atomic_output(dest) as out:
            for batch in run.record_batches(stage):
                for record in batch:
                    out.write(line_of(record))
                    failures += is_failure(record)
                records += len(batch)
        return records
    encoder = FrameEncoder()
    digest = hashlib.sha256()
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(dest))) as body:
        pending: list[bytes] = []
        size = 0
        for batch in run.record_batches(stage):
            for record in batch:
                line = line_of(record)
                pending.append(line)
                size += len(line)
                failures += is_failure(record)
                if size >= FRAME_TARGET:
                    frame = encoder.encode(b"".join(pending))
                    digest.update(frame)
                    body.write(frame)
                    pending, size = [], 0
            records += len(batch)
        if pending:
            frame = encoder.encode(b"".join(pending))
            digest.update(frame)
            body.write(frame)
        header = {
            "format": "runfmt-stage",
            "format_version": FORMAT_VERSION,
            "run_id": run.run_id,
            "stage": stage,
            "seq": 0,
            "writer": _EXPORT_WRITER,
            "record_schema_version": entry.record_schema_version,
            "key_field": entry.key_field,
            "export": {
                "records": records,
                "failures": failures,
                "sha256": digest.hexdigest(),
                "revision": run.manifest.revision,
            },
        }
        body.seek(0)
        with _atomic_output(dest) as out:
            out.write(PREFIX + encode_header(header))
            while chunk := body.read(_CHUNK):
                out.write(chunk)
    return records


@dataclass(frozen=True, slots=True)
class StageFile:
    """A checked stage export: its header (None for plain JSON Lines) and record counts."""

    path: str
    header: dict[str, Any] | None
    records: int
    failures: int

    @property
    def stage(self) -> str | None:
        return None if self.header is None else str(self.header["stage"])


def _zst_batches(path: str, f: IO[bytes]) -> Iterator[tuple[dict[str, Any], list[Record]]]:
    decoder = FrameDecoder()
    digest = hashlib.sha256()
    header: dict[str, Any] | None = None
    records = failures = 0

    def chunks() -> Iterator[bytes]:
        """The file's chunks; the digest covers what follows the header (EXP-2)."""
        offset = 0
        while chunk := f.read(_CHUNK):
            yield chunk
            if decoder.header is not None:
                digest.update(chunk[max(0, decoder.header_end - offset) :])
            offset += len(chunk)

    for event in stage_events(chunks(), path, decoder):
        if isinstance(event, list):
            records += len(event)
            failures += sum(map(is_failure, event))
            assert header is not None
            yield header, event
            continue
        try:
            check_compatible(event.get("format_version"), None)
        except UnsupportedFormatError as exc:
            raise exc.at(path) from None
        problems = schema_errors("stage-header", event)
        if problems:
            raise StageFileError("invalid stage file header: " + "; ".join(problems), location=path)
        header = event
    if header is None:
        raise StageFileError("no stage file header", location=path)
    export = header.get("export")
    if isinstance(export, dict):
        if (export.get("records"), export.get("failures")) != (records, failures):
            raise ChecksumMismatchError(
                f"file holds {records} records ({failures} failures), its header lists "
                f"{export.get('records')} ({export.get('failures')})",
                location=path,
                hint="the file was changed after export; export it again",
            )
        if export.get("sha256") != digest.hexdigest():
            raise ChecksumMismatchError(
                "sha256 of the data frames does not match the export header",
                location=path,
                hint="the file was changed after export; export it again",
            )
    if records == 0:
        yield header, []


def _jsonl_batches(path: str, f: IO[bytes]) -> Iterator[tuple[dict[str, Any], list[Record]]]:
    batch: list[Record] = []
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise StageFileError(f"not valid JSON: {exc}", location=f"{path}:{n}") from None
        if type(record) is not dict:
            raise StageFileError("not a JSON object", location=f"{path}:{n}")
        batch.append(record)
        if len(batch) >= 10_000:
            yield {}, batch
            batch = []
    yield {}, batch


def _stage_batches(path: str) -> Iterator[tuple[dict[str, Any], list[Record]]]:
    opener = _zst_batches if _stage_kind(path) == "zst" else _jsonl_batches
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    with f:
        yield from opener(path, f)


def read_stage_file(path: str | os.PathLike[str]) -> StageFile:
    """Read a stage export to its end and check it: frames, header, counts and sha256."""
    path = os.fspath(path)
    header: dict[str, Any] | None = None
    records = failures = 0
    for head, batch in _stage_batches(path):
        header = head or None
        records += len(batch)
        failures += sum(map(is_failure, batch))
    return StageFile(path, header, records, failures)


def _check_writable(path: str, key_field: str | None) -> None:
    """Refuse, before anything is written, a file holding a record the writer would refuse."""
    before = 0
    for _, batch in _stage_batches(path):
        _refuse_unwritable(batch, key_field, before, path)
        before += len(batch)


def _refuse_unwritable(
    batch: list[Record], key_field: str | None, before: int, location: str
) -> None:
    """Raise for the first record of ``batch`` that the writer refuses, numbered in its file
    (``before`` records precede the batch)."""
    for number, record in enumerate(batch, before + 1):
        try:
            writable_line(record, key_field)
        except InvalidInputError as exc:
            raise InvalidInputError(
                f"record {number} (counted from 1): {exc.problem}",
                location=location,
                hint="nothing was imported",
            ) from None


@dataclass(frozen=True, slots=True)
class ImportResult:
    run_id: str
    stages: dict[str, int]
    """Records imported per stage."""

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "stages": self.stages}


def _resolve_stage(found: StageFile, stage: str | None) -> str:
    if found.stage is not None and stage is not None and stage != found.stage:
        raise InvalidInputError(
            f"{found.path}: the file holds stage {found.stage!r}, not {stage!r}",
            hint=f"omit --stage to import it as {found.stage!r}",
        )
    name = stage or found.stage
    if name is None:
        raise InvalidInputError(
            f"{found.path}: plain JSON Lines name no stage", hint="pass --stage"
        )
    return names.validate_stage_name(name)


def import_stage(
    store: Store,
    path: str | os.PathLike[str],
    *,
    run: str | None = None,
    name: str | None = None,
    stage: str | None = None,
    key_field: str | None = None,
) -> ImportResult:
    """Append the records of a stage export to run ``run``, or to a new run called ``name``.

    The file is checked to its end before anything is written. A finished
    target run is resumed for the import and finished again with its status; a new run
    is built as `import_run` builds one.
    """
    found = read_stage_file(path)
    target = _resolve_stage(found, stage)
    header = found.header or {}
    if found.header is not None and key_field not in (None, header["key_field"]):
        raise InvalidInputError(
            f"{found.path}: the file's stage is keyed by {header['key_field']!r}, not {key_field!r}"
        )
    previous = None if run is None else store.open_run(run).manifest
    existing = None if previous is None else previous.stage(target)
    if found.header is not None:
        key, version = header["key_field"], header["record_schema_version"]
    elif existing is not None:
        key, version = key_field or existing.key_field, existing.record_schema_version
    else:
        key, version = key_field, None
    if existing is not None and (existing.key_field, existing.record_schema_version) != (
        key,
        version,
    ):
        raise ConflictError(
            f"stage {target!r} of run {run} is declared with key field "
            f"{existing.key_field!r} and record schema version "
            f"{existing.record_schema_version!r}; the file has {key!r} and {version!r}",
            hint="import into a new run (--name), or into a run without this stage",
        )
    _check_writable(found.path, key)

    def write(writer: RunWriter) -> None:
        stage_writer = writer.stage(target, record_schema_version=version, key_field=key)
        for _, batch in _stage_batches(found.path):
            _extend(writer, stage_writer, batch)

    if previous is None:
        source = str(header.get("run_id", os.path.basename(found.path)))

        def create(into: Store) -> RunWriter:
            return into.create_run(name or "import", tags={"imported_from": source},
                                   flush_every=_IMPORT_FLUSH, flush_interval=None)  # fmt: skip

        def fill(writer: RunWriter) -> None:
            write(writer)
            writer.finish("completed")

        run_id = _as_new_run(store, create, fill)
        return ImportResult(run_id, {target: found.records})
    assert run is not None
    writer = store.resume_run(run, flush_every=_IMPORT_FLUSH, flush_interval=None)
    try:
        write(writer)
        if previous.status == "running":
            writer.close()
        else:
            writer.finish(previous.status, previous.error,
                          through_stage=previous.completed_through_stage)  # fmt: skip
    except BaseException:
        writer.discard()
        raise
    return ImportResult(writer.run_id, {target: found.records})


def _as_new_run(
    store: Store, create: Callable[[Store], RunWriter], fill: Callable[[RunWriter], None]
) -> str:
    """Create a new run with ``create`` and write it whole with ``fill``; its id. On local
    disk it is built in a hidden folder of ``store`` and renamed into place, so it appears
    whole or not at all (a killed build leaves only that folder, which a later build
    removes); elsewhere it is written in place and removed again on an error."""
    if store.storage.is_local:
        with hidden_build(store.storage, _BUILD_PREFIX, _BUILDER) as work:
            run_id = _filled(Store(work.path()), create, fill, remove_on_failure=False)
            try:
                store.storage.rename(f"{work.name}/{run_id}", run_id)
            except StorageError:
                raise RunExistsError(f"run {run_id} was created meanwhile",
                                     location=store.storage.where(run_id)) from None  # fmt: skip
        return run_id
    return _filled(store, create, fill, remove_on_failure=True)


def _filled(
    store: Store,
    create: Callable[[Store], RunWriter],
    fill: Callable[[RunWriter], None],
    *,
    remove_on_failure: bool,
) -> str:
    writer = create(store)
    try:
        fill(writer)
    except BaseException:
        writer.discard()
        if remove_on_failure:
            with contextlib.suppress(RunfmtError, OSError):
                writer.storage.delete_tree("")
        raise
    return writer.run_id


def export_run(run: RunReader, dest: str | os.PathLike[str]) -> Manifest:
    """Write the run as a tar archive of its folder: manifests, listed files, ``SHA256SUMS``.

    Only what the newest revision lists goes in, each file cut to its listed
    length and checked against its sha256 on the way; ``manifest.json`` holds
    that revision (COMMIT-7). Returns it.
    """
    storage = run.storage
    manifest, newest = load_revision(storage)
    refuse_damaged_copy(storage, newest, manifest, "run `runfmt repair` on it first")
    top = manifest.run_id
    stamp = _epoch(manifest.updated_at)
    members: list[tuple[str, int, str | None]] = [(names.MANIFEST_FILE, -1, None)]
    members += [
        (names.revision_file(r), -1, None) for r in revisions(storage) if r <= manifest.revision
    ]
    members += [(path, size, sha) for path, (size, sha) in manifest.listed_files().items()]
    made = {names.MANIFEST_FILE: newest}
    if manifest.finished:  # made from the manifest, not copied (CHECK-3)
        made[names.SUMS_FILE] = sums_of(manifest, newest)
        members.append((names.SUMS_FILE, -1, None))
    with (
        _atomic_output(os.fspath(dest)) as out,
        tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, size, sha in members:
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.mtime, info.mode = stamp, 0o644
            if sha is None:
                try:
                    data = made[rel] if rel in made else storage.read(rel)
                except FileNotFoundError:
                    continue
                info.size = len(data)
                tar.addfile(info, _BytesReader(data))
                continue
            if not storage.inside(rel):
                raise FormatError(
                    "path leaves the run folder or goes through a link (LAYOUT-5)",
                    location=storage.where(rel),
                )
            info.size = size
            try:
                with storage.open_read(rel) as src:
                    reader = _HashingReader(src, size)
                    tar.addfile(info, reader)
            except FileNotFoundError:
                raise ChecksumMismatchError(
                    "listed file is missing", location=storage.where(rel)
                ) from None
            except ChecksumMismatchError as exc:
                raise exc.at(storage.where(rel)) from None
            if reader.seen != size or reader.hexdigest() != sha:
                raise ChecksumMismatchError(
                    "listed bytes do not match the manifest (CHECK-1)",
                    location=storage.where(rel),
                    hint="run `runfmt verify` on the run",
                )
    return manifest


def _epoch(stamp: str) -> int:
    return int(parse_timestamp(stamp).timestamp())


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = self._data[self._pos : end]
        self._pos += len(chunk)
        return chunk


class _HashingReader:
    """Reads at most ``limit`` bytes from ``src``, hashing them."""

    def __init__(self, src: IO[bytes], limit: int) -> None:
        self._src, self._left = src, limit
        self._hash = hashlib.sha256()
        self.seen = 0

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        chunk = self._src.read(want) if want else b""
        self._left -= len(chunk)
        self.seen += len(chunk)
        self._hash.update(chunk)
        if want and not chunk:
            raise ChecksumMismatchError("file is shorter than its listed length (CHECK-1)")
        return chunk

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _Archive:
    """A run archive opened for import: members checked for safety, manifest decoded."""

    def __init__(self, path: str, tar: tarfile.TarFile) -> None:
        self.path = path
        self.tar = tar
        self.members: dict[str, tarfile.TarInfo] = {}
        tops = set()
        for info in tar.getmembers():
            name = info.name.removeprefix("./")
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or not (info.isfile() or info.isdir()):
                raise FormatError(
                    f"unsafe archive member {info.name!r} (absolute, '..', link or device)",
                    location=path,
                    hint="import only archives made by `runfmt export`",
                )
            tops.add(parts[0])
            if info.isfile() and len(parts) > 1:
                rel = "/".join(parts[1:])
                if rel in self.members:
                    raise FormatError(f"archive holds {name!r} twice", location=path)
                self.members[rel] = info
        if len(tops) != 1:
            raise FormatError(
                f"archive must hold one run folder, found {len(tops)}: {sorted(tops)[:5]}",
                location=path,
            )
        revs = sorted(
            r
            for r in (
                names.parse_revision_file(k.removeprefix(names.MANIFESTS_DIR + "/"))
                for k in self.members
                if k.startswith(names.MANIFESTS_DIR + "/")
            )
            if r is not None
        )
        if not revs:
            raise FormatError("archive holds no manifest revision (_manifests/)", location=path)
        rel = names.revision_file(revs[-1])
        try:
            self.manifest = decode_manifest(self.read(rel))
        except FormatError as exc:
            raise exc.at(self.where(rel)) from None

    def where(self, rel: str) -> str:
        return f"{self.path}:{rel}"

    def read(self, rel: str) -> bytes:
        f = self.open(rel)
        return f.read()

    def open(self, rel: str) -> IO[bytes]:
        info = self.members.get(rel)
        if info is None:
            raise ChecksumMismatchError(
                "listed file is missing from the archive", location=self.where(rel)
            )
        f = self.tar.extractfile(info)
        assert f is not None
        return f

    def digest(self, rel: str, limit: int | None = None) -> tuple[str, int]:
        """The sha256 of a member's first ``limit`` bytes (all by default), and how many."""
        digest = hashlib.sha256()
        seen = 0
        with self.open(rel) as f:
            while limit is None or seen < limit:
                want = _CHUNK if limit is None else min(_CHUNK, limit - seen)
                chunk = f.read(want)
                if not chunk:
                    break
                digest.update(chunk)
                seen += len(chunk)
        return digest.hexdigest(), seen

    def check(self) -> None:
        """Every listed file and ``SHA256SUMS`` against the manifest (CHECK-1)."""
        known: dict[str, str] = {}
        for rel, (size, sha) in self.manifest.listed_files().items():
            got, seen = self.digest(rel, size)
            if (got, seen) != (sha, size):
                raise ChecksumMismatchError(
                    "bytes do not match the length and sha256 the manifest lists (CHECK-1)",
                    location=self.where(rel),
                    hint="the archive was changed or damaged",
                )
            if self.members[rel].size == size:
                known[rel] = got
        if names.SUMS_FILE in self.members:
            sums = parse_sums(self.read(names.SUMS_FILE).decode("utf-8", "replace"))
            for rel, sha in sums.items():
                if (known.get(rel) or self.digest(rel)[0]) != sha:
                    raise ChecksumMismatchError(
                        "does not match SHA256SUMS", location=self.where(rel)
                    )

    def batches(self, entry: FileEntry, stage: str) -> Iterator[list[Record]]:
        where = self.where(entry.path)

        def chunks(f: IO[bytes]) -> Iterator[bytes]:
            left = entry.bytes
            while left and (chunk := f.read(min(_CHUNK, left))):
                left -= len(chunk)
                yield chunk

        with self.open(entry.path) as f:
            for event in stage_events(chunks(f), where):
                if isinstance(event, list):
                    yield event
                elif event.get("stage") != stage:
                    raise StageFileError("header names another stage (FRAME-2)", location=where)


def import_run(
    store: Store, path: str | os.PathLike[str], *, run_id: str | None = None
) -> ImportResult:
    """Import a run archive into ``store`` as a new run (id ``run_id`` or the archived one).

    The archive is checked first; then the run is written through `RunWriter`
    (name, config, tags, creation time, stages, records, counters, artifacts, status).
    On local disk it is built in a hidden folder of the store and renamed into place, so it
    appears whole or not at all; elsewhere, on an error the partly imported run is removed.
    """
    path = os.fspath(path)
    try:
        tar = tarfile.open(path, mode="r:*")  # noqa: SIM115
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: no such file") from None
    except tarfile.TarError as exc:
        first = str(exc).splitlines()[0].rstrip(":")
        raise FormatError(f"not a tar archive ({first})", location=path,
                          hint="give a file that `runfmt export` wrote") from None  # fmt: skip
    with tar:
        try:
            archive = _Archive(path, tar)
            archive.check()
        except tarfile.TarError as exc:
            raise FormatError(f"damaged tar archive: {exc}", location=path) from None
        m = archive.manifest
        target = names.validate_run_id(run_id or m.run_id)
        if store.storage.exists(target):  # a run, or a folder of the user's: never written
            raise RunExistsError(
                f"run {target} exists in the store"
                if store.storage.child(target).exists(names.MANIFESTS_DIR)
                else f"a folder named {target} that holds no run exists in the store",
                location=store.storage.where(target),
                hint="pass --run-id NEW_ID to import a copy under another id",
            )
        counts: dict[str, int] = {}

        def create(into: Store) -> RunWriter:
            return into._create_run(m.name, m.config, tags=m.tags, run_id=target,
                                    created_at=m.created_at, flush_every=_IMPORT_FLUSH,
                                    flush_interval=None)  # fmt: skip

        def fill(writer: RunWriter) -> None:
            counts.update(_write_run(archive, writer))

        _as_new_run(store, create, fill)
    return ImportResult(target, counts)


def _extend(writer: RunWriter, stage: StageWriter, batch: list[Record]) -> None:
    """`StageWriter.extend`, then a flush once `_IMPORT_FLUSH_BYTES` are buffered: records
    that compress many times over are never held whole."""
    stage.extend(batch)
    if stage.pending_bytes >= _IMPORT_FLUSH_BYTES:
        writer.flush()


def _write_run(archive: _Archive, writer: RunWriter) -> dict[str, int]:
    m = archive.manifest
    counts: dict[str, int] = {}
    for s in m.stages:
        stage = writer.stage(
            s.name, record_schema_version=s.record_schema_version, key_field=s.key_field
        )
        counts[s.name] = 0
        for f in s.files:
            before = 0
            for batch in archive.batches(f, s.name):
                try:
                    _extend(writer, stage, batch)
                except InvalidInputError:
                    _refuse_unwritable(batch, s.key_field, before, archive.where(f.path))
                    raise
                before += len(batch)
            counts[s.name] += before
        mark: Callable[[], None] | None = {"completed": stage.complete, "failed": stage.fail}.get(
            s.status
        )
        if mark is not None:
            mark()
    for a in m.artifacts:
        writer.add_artifact(
            a.path.removeprefix("artifacts/"),
            archive.read(a.path)[: a.bytes],
            a.media_type,
            parents=[dict(p) for p in a.parents] or None,
        )
    for counter, value in m.counters.items():
        writer.count(counter, value)
    if m.status == "running":
        writer.close()
    else:
        writer.finish(m.status, m.error, through_stage=m.completed_through_stage)
    return counts
