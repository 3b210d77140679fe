"""Copy runs between any two locations, driven by their manifests (spec §14, SYNC-1..7).

A run is copied in the order that keeps the destination consistent at every
moment: its listed files first (only their committed bytes, checked against the
listed sha256 on the way), then ``SHA256SUMS``, then the manifest revision, then
``manifest.json``. A reader of the destination trusts only the newest revision,
so an interrupted sync never shows a run whose files are not all there, and
running it again finishes the job. An unchanged run costs one small read of the
destination's ``manifest.json``.
"""

from __future__ import annotations

import errno
import hashlib
import operator
import os
import posixpath
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from runfmt._local import NotAFileError, run_folder_around
from runfmt.check import refuse_damaged_copy
from runfmt.errors import (
    ChecksumMismatchError,
    ConflictError,
    FormatError,
    InvalidInputError,
    ManifestError,
    RunfmtError,
    RunNotFoundError,
    StorageError,
)
from runfmt.format import names
from runfmt.format.manifest import Manifest, decode_manifest
from runfmt.format.validate import folder_name_problem
from runfmt.run import (
    KEEP_REVISIONS,
    load_revision,
    revisions,
    sums_of,
    unpublish,
    write_manifest_copy,
)
from runfmt.storage import Storage, check_url

__all__ = ["Action", "RunResult", "SyncProgress", "SyncReport", "sync"]

Action = Literal["new", "update", "same", "conflict", "delete", "error"]
_SMALL = 8 << 20
_RUN_WORKERS = 32


class SyncProgress(Protocol):
    """Receives totals as runs are planned and bytes as they are copied (from many threads)."""

    def planned(self, files: int, nbytes: int) -> None: ...

    def advanced(self, nbytes: int) -> None: ...

    def file_done(self) -> None: ...


@dataclass
class RunResult:
    """What sync did (or, with ``dry_run``, would do) to one run."""

    run_id: str
    action: Action
    revision: int | None = None
    files: int = 0
    bytes: int = 0
    message: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.action not in ("conflict", "error") and not self.problems


@dataclass
class SyncReport:
    """The outcome of `sync`: one `RunResult` per run seen."""

    src: str
    dst: str
    dry_run: bool
    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)

    def count(self, action: Action) -> int:
        return sum(r.action == action for r in self.runs)

    @property
    def files(self) -> int:
        return sum(r.files for r in self.runs)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        actions: tuple[Action, ...] = ("new", "update", "same", "conflict", "delete", "error")
        return {
            "src": self.src,
            "dst": self.dst,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "runs": {a: self.count(a) for a in actions},
            "files": self.files,
            "bytes": self.bytes,
            "details": [
                {
                    "run_id": r.run_id,
                    "action": r.action,
                    "revision": r.revision,
                    "files": r.files,
                    "bytes": r.bytes,
                    "message": r.message,
                    "problems": r.problems,
                }
                for r in self.runs
            ],
        }


@dataclass
class _Copy:
    path: str
    nbytes: int
    sha256: str
    check_first: bool
    final: bool
    """The file cannot grow any more (its run is finished)."""


@dataclass
class _Plan:
    result: RunResult
    src_bytes: bytes = b""
    manifest: Manifest | None = None
    copies: list[_Copy] = field(default_factory=list)
    dst_revisions: list[int] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Files the destination's revision lists and the new one does not: deleted after it."""
    debris: list[str] = field(default_factory=list)
    """Files at a destination with no revision (or one being replaced) that the new revision
    does not list, left by an interrupted sync or removal: deleted before it is published."""
    leftover: bool = False
    """DST holds files but no revision: what an interrupted sync or delete left."""
    forced: bool = False
    checked: bool = False
    """DST held SRC's manifest already and ``force`` had every file checked (SYNC-4)."""


def _location(where: str | Storage, options: dict[str, Any] | None, single_writer: bool) -> Storage:
    if isinstance(where, Storage):
        return where
    check_url(where)
    url = where if "://" in where else os.path.abspath(where)
    return Storage(url, options, single_writer=single_writer)


_DATA_DIRS = (names.STAGES_DIR + "/", names.ARTIFACTS_DIR + "/")
"""Where a run's listed files are: what an interrupted sync leaves there is its debris."""


class _NotARun(Exception):
    """The source folder holds no revision and no ``manifest.json``: a creation or a copy
    cut short before its first revision, which is no run (LAYOUT-2) and is not synced."""


def _is_run(storage: Storage) -> bool:
    return storage.exists(names.MANIFESTS_DIR) or storage.exists(names.MANIFEST_FILE)


def sync(
    src: str | Storage,
    dst: str | Storage,
    *,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    dry_run: bool = False,
    verify: bool = False,
    delete: bool = False,
    force: bool = False,
    workers: int = 16,
    single_writer: bool = False,
    progress: SyncProgress | None = None,
) -> SyncReport:
    """Make ``dst`` hold what ``src`` has committed: a whole store, or one run.

    ``src`` and ``dst`` are paths, fsspec URLs or `Storage` objects. When ``src``
    is a run folder, it goes to ``dst/<run id>`` (or to ``dst`` itself when its
    last segment is the run id). A destination run that changed on its own is
    refused (SYNC-4) unless ``force``; ``delete`` removes destination runs that
    ``src`` lacks (store to store only). Problems are reported per run, never raised; a
    ``src`` that does not exist (on an object store: holds nothing) is `RunNotFoundError`,
    so that a mistyped source never empties ``dst`` with ``delete``, and a destination
    bucket that does not exist is `StorageError`.
    """
    if workers < 1:
        raise InvalidInputError(f"workers must be at least 1, not {workers}")
    source = _location(src, src_options, single_writer)
    target = _location(dst, dst_options, single_writer)
    if target.is_local and os.path.exists(target.root) and not os.path.isdir(target.root):
        raise InvalidInputError("the destination is a file, not a folder", location=target.root)
    if not target.is_local and target.missing() == "bucket":
        raise StorageError("the destination's bucket does not exist", location=target.where(),
                           hint="create it first, or check the DST URL")  # fmt: skip
    report = SyncReport(source.url, target.url, dry_run)
    pairs: list[tuple[str, Storage, Storage]]
    one_run = _is_run(source)
    run_id = _run_id_of(source) if one_run else ""
    here = one_run and target.name == run_id
    if one_run:
        if delete:
            raise InvalidInputError("--delete needs a store as SRC, not one run",
                                    location=source.where())  # fmt: skip
        pairs = [(run_id, source, target if here else target.child(run_id))]
        _check_apart(source, pairs[0][2])
    elif source.is_dir() and (source.is_local or source.list()):  # an empty bucket: nothing
        _check_apart(source, target)
        ids = sorted(e.name for e in source.list() if e.is_dir and names.is_run_id(e.name))
        pairs = [(i, source.child(i), target.child(i)) for i in ids]
        if delete and not any(revisions(run) for _, run, _ in pairs):
            raise RunNotFoundError(
                "SRC holds no run: --delete would remove every run of DST",
                location=source.where(),
                hint="check SRC (a store is the folder that holds the run folders); to remove "
                "runs, use `runfmt gc` or delete their folders",
            )
    else:
        raise RunNotFoundError("no run or store here", location=source.where())
    if _in_a_run(target, here):
        raise InvalidInputError(
            "the destination is, or lies in, a run folder, not a store: the copy would land "
            "inside that run",
            location=target.where(),
            hint="give a store (a folder of runs) as DST",
        )
    engine = _Engine(dry_run, verify, force, workers, progress)
    report.runs = engine.run_all(pairs)
    if one_run and not report.runs:
        raise RunNotFoundError("no revision in _manifests/ (LAYOUT-2)", location=source.where())
    if delete:
        known = {result.run_id for result in report.runs}
        extra = sorted(
            e.name
            for e in target.list()
            if e.is_dir
            and names.is_run_id(e.name)
            and e.name not in known
            and _is_run(target.child(e.name))  # a folder of the user's is no run to delete
        )
        for run_id in extra:
            report.runs.append(_delete_run(target.child(run_id), run_id, dry_run))
    return report


def _in_a_run(target: Storage, here: bool) -> bool:
    """Whether the destination is a run folder (unless it is the one run's own, ``here``) or
    lies in one: a copy there would land inside that run."""
    if target.is_local:
        return run_folder_around(os.path.dirname(target.root) if here else target.root) is not None
    if not here and _is_run(target):
        return True
    parts = target.root.split("/")
    return any(
        target.fs.exists(posixpath.join(*parts[:i], names.MANIFESTS_DIR))
        for i in range(1, len(parts))
    )


def _run_id_of(run: Storage) -> str:
    """The id of the run in the folder ``run`` (which may have another name); the folder's
    name when its manifest cannot be read, which `_Engine` then reports."""
    try:
        return load_revision(run)[0].run_id
    except RunNotFoundError:
        raise
    except FormatError:
        return run.name


def _run_path(path: str) -> bool:
    """Whether ``path`` is one a run folder holds (LAYOUT-3): what sync may write or delete."""
    return path in (names.MANIFEST_FILE, names.SUMS_FILE) or path.startswith(
        (names.MANIFESTS_DIR + "/", *_DATA_DIRS)
    )


def _check_apart(source: Storage, target: Storage) -> None:
    """Refuse a destination that is the source, or lies inside it or around it: the copy
    would land in what is being copied."""
    if source.protocol != target.protocol or source.endpoint != target.endpoint:
        return
    a, b = (
        (os.path.realpath(s.root) if s.is_local else s.root).replace(os.sep, "/").rstrip("/") + "/"
        for s in (source, target)
    )
    if a.startswith(b) or b.startswith(a):
        raise InvalidInputError(
            f"the destination {target.where()} overlaps the source {source.where()}",
            hint="sync to a folder outside the source (and not around it)",
        )


def _delete_run(run: Storage, run_id: str, dry_run: bool) -> RunResult:
    result = RunResult(run_id, "delete", message="not at SRC")
    if dry_run:
        return result
    try:
        unpublish(run)
        run.delete_tree("")
    except RunfmtError as exc:
        return RunResult(run_id, "error", message=str(exc))
    return result


class _Engine:
    def __init__(
        self,
        dry_run: bool,
        verify: bool,
        force: bool,
        workers: int,
        progress: SyncProgress | None,
    ) -> None:
        self.dry_run = dry_run
        self.verify = verify
        self.force = force
        self.workers = workers
        self.progress = progress
        self._lock = threading.Lock()

    def run_all(self, pairs: list[tuple[str, Storage, Storage]]) -> list[RunResult]:
        """Each pair's result. On an interruption (Ctrl-C) or an error that stops the sync,
        the runs and files not started yet are dropped, and the runs under way stop at
        their next file: none of them is published (SYNC-2)."""
        files = ThreadPoolExecutor(self.workers, thread_name_prefix="runfmt-sync-file")
        runs = ThreadPoolExecutor(
            min(self.workers, _RUN_WORKERS), thread_name_prefix="runfmt-sync-run"
        )
        try:
            futures = [runs.submit(self._one, i, s, d, files) for i, s, d in pairs]
            return [result for f in futures if (result := f.result()) is not None]
        finally:
            files.shutdown(wait=False, cancel_futures=True)
            runs.shutdown(cancel_futures=True)
            files.shutdown()

    def _one(
        self, run_id: str, src: Storage, dst: Storage, pool: ThreadPoolExecutor
    ) -> RunResult | None:
        """The run's result; None when the source folder is no run."""
        try:
            plan = self._plan(run_id, src, dst)
            if plan.result.action in ("new", "update") and not self.dry_run:
                try:
                    self._apply(plan, src, dst, pool)
                except FileNotFoundError:
                    plan = self._plan(run_id, src, dst)
                    self._apply(plan, src, dst, pool)
            result = plan.result
        except _NotARun:
            return None
        except ConflictError as exc:
            return RunResult(run_id, "conflict", message=str(exc))
        except _SourceMissing as exc:
            return RunResult(run_id, "error", message=f"{exc.filename}: SRC lists this file "
                             "but it is missing; nothing published (LAYOUT-3)")  # fmt: skip
        except (RunfmtError, FileNotFoundError) as exc:
            return RunResult(run_id, "error", message=str(exc))
        if self.verify and not self.dry_run and result.action in ("new", "update", "same"):
            from runfmt.check import verify_run

            result.problems = [str(p) for p in verify_run(dst)]
        return result

    def _plan(self, run_id: str, src: Storage, dst: Storage) -> _Plan:
        if not revisions(src) and not src.exists(names.MANIFEST_FILE):
            raise _NotARun
        manifest, src_bytes = load_revision(src)  # refuses what a reader refuses (MAN-3, ...)
        misnamed = folder_name_problem(manifest, run_id)
        if misnamed is not None:
            raise ManifestError(misnamed, location=src.where())
        plan = _Plan(RunResult(run_id, "new", manifest.revision), src_bytes, manifest)
        try:
            current = dst.read(names.MANIFEST_FILE)
        except FileNotFoundError:
            current = None
        if current == src_bytes and not self.force:
            plan.result.action = "same"
            return plan
        refuse_damaged_copy(src, src_bytes, manifest, "run `runfmt repair` on SRC first")
        plan.checked = current == src_bytes
        files = dst.walk()
        links = sorted(dst.symlinks())
        if links or dst.is_link(""):
            raise FormatError(
                "DST run folder is, or holds, a symbolic link (LAYOUT-5): a copy would write "
                "through it",
                location=dst.where(links[0] if links else ""),
                hint="replace the link by what it points to, or remove it",
            )
        plan.dst_revisions = sorted(
            r
            for p in files
            if p.startswith(names.MANIFESTS_DIR + "/")
            and (r := names.parse_revision_file(p.split("/", 1)[1])) is not None
        )
        foreign = sorted(p for p in files if not _run_path(p))
        if foreign and not plan.dst_revisions:
            raise ConflictError(
                f"DST holds no run but other files ({foreign[0]}, ...): a run copied there "
                "would mix with them",
                location=dst.where(),
                hint="move them away, or sync to another folder",
            )
        plan.leftover = bool(files) and not plan.dst_revisions
        old = self._check_ancestry(plan, src, dst) if plan.dst_revisions else None
        if old is not None:
            plan.result.action = "update"
        listed_old = {p: sha for p, (_, sha) in old.listed_files().items()} if old else {}
        wanted = manifest.listed_files()
        for path, (nbytes, sha) in wanted.items():
            if not src.inside(path):
                raise FormatError("listed file goes through a link (LAYOUT-5)",
                                  location=src.where(path))  # fmt: skip
            size = files.get(path)
            if size == nbytes and listed_old.get(path) == sha and not self.force:
                continue
            if self.force and size == nbytes and dst.prefix_sha256(path, nbytes) == sha:
                continue  # checked now, so that a dry run tells what would move
            check_first = size == nbytes and not self.force
            plan.copies.append(_Copy(path, nbytes, sha, check_first, manifest.finished))
        plan.dropped = sorted(set(listed_old) - set(wanted))
        if plan.forced or plan.checked or not plan.dst_revisions:
            plan.debris = sorted(p for p in files if p not in wanted and p.startswith(_DATA_DIRS))
        plan.result.files = len(plan.copies)
        plan.result.bytes = sum(c.nbytes for c in plan.copies)
        if plan.checked:
            plan.result.action = "update" if plan.copies or plan.debris else "same"
            if plan.copies or plan.debris:
                plan.result.message = (
                    f"DST had {len(plan.copies)} damaged or missing files and "
                    f"{len(plan.debris)} that SRC does not list"
                )
        if plan.result.action == "update" and not plan.copies and not plan.checked:
            plan.result.message = "manifest only"
        return plan

    def _check_ancestry(self, plan: _Plan, src: Storage, dst: Storage) -> Manifest:
        """The destination's newest manifest, if ``src`` continues it; else `ConflictError`."""
        assert plan.manifest is not None
        newest = plan.dst_revisions[-1]
        dst_bytes = dst.read(names.revision_file(newest))
        old = _decode(dst_bytes, dst.where(names.revision_file(newest)))
        mine = plan.manifest.revision
        reason = ""
        if old.run_id != plan.manifest.run_id or old.created_at != plan.manifest.created_at:
            reason = f"DST holds another run ({old.run_id}, created {old.created_at})"
        elif newest > mine:
            reason = f"DST is at revision {newest}, newer than SRC's {mine}"
        elif newest == mine and dst_bytes != plan.src_bytes:
            reason = f"DST has different content at revision {mine}"
        elif newest < mine:
            try:
                ancestor = src.read(names.revision_file(newest))
            except FileNotFoundError:
                ancestor = None
            if ancestor is not None and ancestor != dst_bytes:
                reason = f"DST revision {newest} differs from SRC's revision {newest}"
            elif ancestor is None and not _continues(old, plan.manifest):
                reason = (
                    f"DST revision {newest} holds a name, config, stage, file or artifact "
                    f"that SRC's revision {mine} does not extend"
                )
        if reason and not self.force:
            raise ConflictError(
                f"{reason}: it changed independently (SYNC-4)",
                location=dst.where(),
                hint="sync the other way first, or pass --force to make DST a copy of SRC",
            )
        plan.forced = bool(reason)
        return old

    def _apply(self, plan: _Plan, src: Storage, dst: Storage, pool: ThreadPoolExecutor) -> None:
        assert plan.manifest is not None
        manifest = plan.manifest
        if plan.forced:
            # DST stops being a run first, so that an interruption from here on leaves no
            # mix of two runs: the next sync finds no revision and copies SRC afresh.
            unpublish(dst)
            plan.dst_revisions = []
        # made, not copied: it follows from the manifest (CHECK-3)
        sums = sums_of(manifest, plan.src_bytes) if manifest.finished else None
        shown = bool(plan.dst_revisions)
        if plan.leftover:  # a folder a gc left is filled again: no longer gc's leftover
            dst.delete(names.DELETING_FILE)
        if shown or sums is None:  # an interruption leaves no SHA256SUMS, never a stale one
            dst.delete(names.SUMS_FILE)
        for path in plan.debris:
            dst.delete(path)
        if self.progress is not None:
            self.progress.planned(len(plan.copies), plan.result.bytes)
        futures: list[Future[bool]] = [pool.submit(self._copy, c, src, dst) for c in plan.copies]
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise errors[0]
        copied = [c for c, f in zip(plan.copies, futures, strict=True) if f.result()]
        plan.result.files = len(copied)
        plan.result.bytes = sum(c.nbytes for c in copied)
        if sums is not None and not shown:  # a new run is shown finished with it
            dst.write_atomic(names.SUMS_FILE, sums)
        rev = names.revision_file(manifest.revision)
        if not dst.create_exclusive(rev, plan.src_bytes) and dst.read(rev) != plan.src_bytes:
            raise ConflictError(
                f"another writer created revision {manifest.revision} meanwhile (SYNC-4)",
                location=dst.where(rev),
                hint="run sync again to see what changed",
            )
        if sums is not None and shown:
            dst.write_atomic(names.SUMS_FILE, sums)
        write_manifest_copy(dst, plan.src_bytes, finished=manifest.finished)
        for path in plan.dropped:
            dst.delete(path)
        for old in plan.dst_revisions:
            if old <= manifest.revision - KEEP_REVISIONS:
                dst.delete(names.revision_file(old))

    def _copy(self, copy: _Copy, src: Storage, dst: Storage) -> bool:
        """Copy one file's committed bytes unless ``dst`` has them already; True if copied."""
        if copy.check_first and dst.prefix_sha256(copy.path, copy.nbytes) == copy.sha256:
            self._advance(copy.nbytes, done=True)
            return False
        if (
            copy.final
            and copy.nbytes > _SMALL
            and src.is_local
            and not dst.is_local
            and src.size(copy.path) == copy.nbytes
        ):
            if src.prefix_sha256(copy.path, copy.nbytes) != copy.sha256:
                raise _mismatch(src, copy.path)
            dst.upload(copy.path, src.path(copy.path))
            self._advance(copy.nbytes, done=True)
            return True
        digest = hashlib.sha256()

        def chunks() -> Iterator[bytes]:
            try:
                for chunk in src.read_prefix(copy.path, copy.nbytes):
                    digest.update(chunk)
                    self._advance(len(chunk))
                    yield chunk
            except NotAFileError:
                raise FormatError("listed path is not a regular file (LAYOUT-3)",
                                  location=src.where(copy.path)) from None  # fmt: skip
            except FileNotFoundError as exc:  # a backend may not name the file
                raise _SourceMissing(errno.ENOENT, str(exc), src.where(copy.path)) from exc
            if digest.hexdigest() != copy.sha256:
                raise _mismatch(src, copy.path)

        if not dst.is_local and copy.nbytes <= _SMALL:
            data = b"".join(chunks())
            dst.put(copy.path, data)
        else:
            dst.put_stream(copy.path, chunks())
        self._advance(0, done=True)
        return True

    def _advance(self, nbytes: int, *, done: bool = False) -> None:
        if self.progress is None:
            return
        with self._lock:
            if nbytes:
                self.progress.advanced(nbytes)
            if done:
                self.progress.file_done()


class _SourceMissing(FileNotFoundError):
    """A file the source run lists is not there (``filename`` says where)."""


def _mismatch(src: Storage, rel: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        "SRC bytes do not match their listed sha256; nothing published (SYNC-3)",
        location=src.where(rel),
        hint="run `runfmt verify` and `runfmt repair` on SRC",
    )


def _decode(data: bytes, where: str) -> Manifest:
    try:
        return decode_manifest(data)
    except FormatError as exc:
        raise exc.at(where) from None


def _continues(old: Manifest, new: Manifest) -> bool:
    """Whether ``new`` could be a later revision of ``old``: the same name and config, every
    stage and artifact ``old`` lists unchanged, every stage file unchanged or with a longer
    prefix."""
    if (old.name, old.config_hash) != (new.name, new.config_hash):
        return False
    artifact_key = operator.attrgetter("path", "bytes", "sha256", "media_type")
    stage_key = operator.attrgetter("name", "record_schema_version", "key_field")
    if not set(map(artifact_key, old.artifacts)) <= set(map(artifact_key, new.artifacts)):
        return False
    if not set(map(stage_key, old.stages)) <= set(map(stage_key, new.stages)):
        return False
    now = {f.path: f for s in new.stages for f in s.files}
    for stage in old.stages:
        for f in stage.files:
            later = now.get(f.path)
            if later is None or later.bytes < f.bytes:
                return False
            if later.bytes == f.bytes and later.sha256 != f.sha256:
                return False
    return True
