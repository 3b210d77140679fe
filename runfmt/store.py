"""A store: a folder or bucket prefix whose children are run folders (spec §3)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, Unpack

from runfmt._local import run_folder_around
from runfmt.errors import (
    FormatError,
    InvalidInputError,
    ManifestError,
    ReadOnlyError,
    RunExistsError,
    RunNotFoundError,
    StorageError,
)
from runfmt.format import names
from runfmt.format.keys import canonical_json, compute_key
from runfmt.format.manifest import (
    Manifest,
    as_dict,
    check_tags,
    encode_manifest,
    manifest_problems,
    to_json,
)
from runfmt.run import (
    WRITER,
    RunReader,
    RunWriter,
    WriterOptions,
    check_folder_name,
    check_writer_options,
    create_revision,
    load_manifest,
    now_utc,
    revisions,
    write_manifest_copy,
)
from runfmt.storage import Storage

if TYPE_CHECKING:
    from runfmt.cache import Cache
    from runfmt.index import Index
    from runfmt.lifecycle import OpenedRun, Policy

__all__ = ["DEFAULT_STORE", "Store", "open_run", "resolve_store_url"]

DEFAULT_STORE = "./runs"
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Control characters (Unicode category Cc), which writers keep out of run names (MAN-10)."""
STORE_ENV = "RUNFMT_STORE"


def resolve_store_url(url: str | os.PathLike[str] | None = None) -> str:
    """The store to use: ``url``, else ``$RUNFMT_STORE``, else ``./runs``."""
    if url is not None and not isinstance(url, str | os.PathLike):
        raise InvalidInputError(f"a store is a path or URL, not {type(url).__name__}")
    return os.fspath(url) if url else os.environ.get(STORE_ENV) or DEFAULT_STORE


_RUN_HINT = "give a run id from `runfmt ls`, or the path of a run folder"


def open_run(
    location: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    read_only: bool = True,
) -> RunReader:
    """Open the run folder at a path or URL, with no store around it."""
    if not isinstance(location, str | os.PathLike):
        raise InvalidInputError(f"a run is a folder's path or URL, not {type(location).__name__}")
    storage = Storage(os.fspath(location), storage_options, read_only=read_only)
    if storage.is_local and not _may_hold_run(storage):
        hint = "give the path of a run folder"
        if os.path.lexists(storage.path()):
            _refuse_folder(storage.path(), hint)
        raise RunNotFoundError("no such folder", location=storage.path(), hint=hint)
    return RunReader(storage)


class Store:
    """Runs under one root: create, open, resume and list them.

    ``url`` is a local path or any fsspec URL (``memory://x``, ``s3://bucket/prefix``);
    ``storage_options`` are passed to fsspec and never stored. A backend that cannot
    create files exclusively (COMMIT-10) is written only with ``single_writer=True``.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        read_only: bool = False,
        single_writer: bool = False,
    ) -> None:
        self.storage = Storage(
            resolve_store_url(url), storage_options, read_only=read_only,
            single_writer=single_writer,
        )  # fmt: skip
        root = self.storage.path()
        if self.storage.is_local and os.path.lexists(root) and not os.path.isdir(root):
            hint = "give a folder as the store; it is made if missing"
            raise InvalidInputError("is a file, not a store folder", location=root, hint=hint)
        if self.storage.is_local and os.path.lexists(root):
            self._refuse_in_run()
        self.read_only = read_only

    def __repr__(self) -> str:
        return f"Store({self.storage.where()!r})"

    @property
    def url(self) -> str:
        return self.storage.url

    @functools.cached_property
    def _in_run(self) -> str | None:
        """The run folder that the store folder is or lies in (LAYOUT-2), or None. On object
        stores it is looked up only before a run is created: one listing a level."""
        if self.storage.is_local:
            return run_folder_around(self.storage.path())
        parts = self.storage.root.split("/")
        for depth in range(len(parts), 0, -1):
            here = self.storage.at(f"{self.storage.protocol}://{'/'.join(parts[:depth])}")
            if any(map(names.parse_revision_file, here.names(names.MANIFESTS_DIR))):
                return here.where()
        return None

    def _refuse_in_run(self) -> None:
        """`InvalidInputError` when the store folder is, or lies in, a run folder. One that
        does not exist yet only stops runs being created: a run in it is read by its path."""
        run, root = self._in_run, self.storage.where()
        if run is not None:
            raise InvalidInputError(
                f"is {'a run folder' if run == root else 'inside the run folder ' + run}, not a "
                "store: runs created here would land inside that run",
                location=root,
                hint="open the run with runfmt.open_run(path), or give another folder as the store",
            )

    def _run_storage(self, run_id: str) -> Storage:
        return self.storage.child(names.validate_run_id(run_id))

    def create_run(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        created_at: str | None = None,
        **writer_options: Unpack[WriterOptions],
    ) -> RunWriter:
        """Create a run and return its writer. ``writer_options`` go to `RunWriter`.

        ``created_at`` (a manifest timestamp) records another creation time than now: that
        of a run imported from elsewhere. A name holds no control character (MAN-10).
        """
        if isinstance(name, str) and (_CONTROL.search(name) or (name and not name.strip())):
            raise InvalidInputError(
                f"run name {name!r} holds a control character or only white space (MAN-10)",
                hint="name the run with visible characters; spaces, not tabs or line breaks",
            )
        return self._create_run(name, config, tags=tags, run_id=run_id, created_at=created_at,
                                **writer_options)  # fmt: skip

    def _create_run(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        *,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        created_at: str | None = None,
        **writer_options: Unpack[WriterOptions],
    ) -> RunWriter:
        """`create_run` of a name that may hold what writers avoid but readers take
        (MAN-10): an imported run keeps its name (EXP-4)."""
        self._refuse_in_run()
        check_writer_options(writer_options)
        config = as_dict("config", config)
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise InvalidInputError(f"run name {name!r} must be 1-200 characters")
        tags = as_dict("tags", tags)
        check_tags(tags)
        canonical_json(config)
        created = datetime.now(UTC)
        run_id = run_id or names.format_run_id(created, secrets.randbits(32))
        run = self._run_storage(run_id)
        stamp = now_utc()
        manifest = Manifest(
            run_id=run_id,
            name=name,
            revision=1,
            status="running",
            created_at=created_at or stamp,
            updated_at=stamp,
            config=config,
            config_hash=compute_key(config),
            tags=tags,
            writer=WRITER,
            heartbeat_at=stamp,
        )
        data = encode_manifest(manifest)
        problems = manifest_problems(to_json(manifest))
        if problems:
            raise InvalidInputError("invalid run: " + "; ".join(problems))
        exists = bool(revisions(run)) or run.exists(names.MANIFEST_FILE)
        if exists or not create_revision(run, 1, data):
            raise RunExistsError("a run with this id exists", location=run.where(),
                                 hint="choose another run_id, or resume the run")  # fmt: skip
        with contextlib.suppress(StorageError):  # a copy: the next commit writes it again
            write_manifest_copy(run, data, finished=False)
        return RunWriter(run, manifest, **writer_options)

    def open_run(self, run: str | os.PathLike[str]) -> RunReader:
        """Open a run by id, or by the path/URL of its folder (see `locate`)."""
        storage, run_id = self._find(run)
        reader = RunReader(storage)
        if run_id is not None:
            check_folder_name(reader.manifest, storage, run_id)
        return reader

    def locate(self, run: str | os.PathLike[str]) -> Storage:
        """The storage of a run given by id (in this store) or by folder path/URL.

        A folder found by id whose manifest names another run is refused with a
        `ManifestError` (LAYOUT-1); by its path, a folder may have any name. A manifest
        that cannot be read is left to the caller (verify reports it, repair mends it).
        """
        storage, run_id = self._find(run)
        if run_id is not None:
            try:
                manifest = load_manifest(storage)
            except FormatError:
                return storage
            check_folder_name(manifest, storage, run_id)
        return storage

    def _find(self, run: str | os.PathLike[str]) -> tuple[Storage, str | None]:
        """The storage of a run, and the run id it was found by (None: found by path)."""
        if not isinstance(run, str | os.PathLike):
            raise InvalidInputError(f"a run is a run id or a path, not {type(run).__name__}")
        text = os.fspath(run)
        if names.is_run_id(text):
            by_id = self._run_storage(text)
            if _may_hold_run(by_id):
                return by_id, text
            if by_id.is_local and os.path.isdir(by_id.path()):
                _refuse_folder(by_id.path())
        if "://" in text or os.sep in text or "/" in text or os.path.lexists(text):
            located = self.storage.at(text if "://" in text else os.path.abspath(text))
            if _may_hold_run(located):
                return located, None
            if located.is_local and os.path.lexists(located.path()):
                _refuse_folder(located.path())
            if located.is_local and not names.is_run_id(text):
                raise RunNotFoundError(
                    "no such folder", location=located.path(),
                    hint="give the path of a run folder, or a run id from `runfmt ls`",
                )  # fmt: skip
            if not located.is_local:
                hint = "give the URL of a run folder, or a run id from `runfmt ls`"
                if any(e.is_dir and names.is_run_id(e.name) for e in located.list()):
                    hint = f"it holds runs: list them with `runfmt --store {located.where()} ls`"
                raise RunNotFoundError(
                    "not a run: no revision and no manifest.json (LAYOUT-2)",
                    location=located.where(), hint=hint,
                )  # fmt: skip
        missing = self.storage.missing()
        raise RunNotFoundError(
            f"no run {text!r}" + (f": the store has no such {missing}" if missing else ""),
            location=self.storage.where(),
            hint="check --store or RUNFMT_STORE" if missing
            else _RUN_HINT,
        )  # fmt: skip

    def resume_run(
        self,
        run: str | os.PathLike[str],
        *,
        salvage: bool = True,
        **writer_options: Unpack[WriterOptions],
    ) -> RunWriter:
        """Reopen a run for writing after a crash or a `RunWriter.close`.

        First repairs what dead writers left (salvaging complete frames, spec COMMIT-8;
        ``salvage=False`` drops them, with the counters that went with them, so they are
        computed again), then marks the run running again if it had finished.

        Artifacts they stored but never committed stay on local disk, for the new writer to
        store again. Elsewhere no create-only write could replace them (ART-1), so they are
        deleted, but only once no writer may be alive: until the run is abandoned (300 s
        after it was last heard from) they stay and ``salvage=False`` is refused (STORE-3).
        """
        from runfmt.check import being_written_by, repair_run

        storage = self.locate(run)
        if storage.read_only:
            raise ReadOnlyError("the store was opened read-only", location=storage.where())
        keep = storage.is_local or bool(being_written_by(storage))
        report = repair_run(storage, salvage=salvage, artifacts="leave" if keep else "drop")
        for problem in report.left:
            if problem.rule == "COMMIT-14":  # a commit would take a changed revision as true
                raise ManifestError(str(problem), location=storage.where(),
                                    hint="then resume the run again")  # fmt: skip
        writer = RunWriter(storage, load_manifest(storage), **writer_options)
        if writer.manifest.status != "running":
            writer._changes.status = "running"
        try:
            writer.heartbeat()
        except BaseException:
            writer.discard()  # no commit: no writer of the run
            raise
        return writer

    def open_or_create(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        *,
        policy: Policy = "auto",
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        **writer_options: Unpack[WriterOptions],
    ) -> OpenedRun:
        """The run of ``config`` under its deterministic id, by the existing-run ``policy``:
        ``auto`` reuses a completed run and resumes any other, ``error`` refuses an
        existing one, ``rerun`` replaces it (see `runfmt.lifecycle.open_or_create`)."""
        from runfmt.lifecycle import open_or_create

        return open_or_create(self, name, config, policy=policy, run_id=run_id, tags=tags,
                              **writer_options)  # fmt: skip

    def fork_run(
        self,
        source: str | os.PathLike[str],
        at_stage: str,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        artifacts: bool = True,
        **writer_options: Unpack[WriterOptions],
    ) -> RunWriter:
        """A new run holding ``source``'s stages before ``at_stage``, to recompute the rest
        (see `runfmt.fork.fork_run`)."""
        from runfmt.fork import fork_run

        return fork_run(self, source, at_stage, name=name, config=config, tags=tags,
                        run_id=run_id, artifacts=artifacts, **writer_options)  # fmt: skip

    def runs_with_config(self, config: Mapping[str, Any] | str) -> list[RunReader]:
        """Runs whose config is ``config`` (a mapping, or its ``k1:`` hash), newest id first."""
        from runfmt.lifecycle import runs_with_config

        return runs_with_config(self, config)

    @functools.cached_property
    def index(self) -> Index:
        """The store's SQLite index (derived; `runfmt.index`): fast listing and cache lookups."""
        from runfmt.index import Index

        return Index.for_storage(self.storage)

    @functools.cached_property
    def cache(self) -> Cache:
        """Cross-run cache lookups by record key, served by `index` (`runfmt.cache`)."""
        from runfmt.cache import Cache

        return Cache(self.index)

    def run_ids(self) -> list[str]:
        """Ids of the run folders in the store, newest first (by a listing, no reads)."""
        ids = [e.name for e in self.storage.list() if e.is_dir and names.is_run_id(e.name)]
        return sorted(ids, reverse=True)

    def runs(self) -> Iterator[tuple[str, RunReader | FormatError | StorageError]]:
        """Every run in the store, newest id first, as its id and its reader, or the error
        that makes it unreadable (a `FormatError`, or a `StorageError` such as a folder
        this user may not read)."""
        for run_id in self.run_ids():
            run = self._run_storage(run_id)
            try:
                yield run_id, RunReader(run, check_folder_name(load_manifest(run), run, run_id))
            except RunNotFoundError:
                continue
            except (FormatError, StorageError) as exc:
                yield run_id, exc


def _refuse_folder(path: str, hint: str = _RUN_HINT) -> NoReturn:
    """Say why the local ``path`` that a user gave as a run is none."""
    if (around := run_folder_around(path)) is not None:
        hint = f"give the run folder that holds it: {around}"
    if not os.path.isdir(path):
        raise RunNotFoundError("is a file, not a run folder", location=path, hint=hint)
    try:
        entries = os.listdir(path)
    except PermissionError:
        denied = "permission denied: cannot look into the folder"
        raise StorageError(denied, location=path, hint="ask for read access") from None
    runs = (os.path.isdir(os.path.join(path, e, names.MANIFESTS_DIR)) for e in entries)
    if ".runfmt" in entries or any(runs):
        hint = f"it holds runs: list them with `runfmt --store {path} ls`"
        raise RunNotFoundError("is a store, not a run folder", location=path, hint=hint)
    raise RunNotFoundError(
        "not a run: no revision and no manifest.json (LAYOUT-2)", location=path, hint=hint
    )


def _may_hold_run(run: Storage) -> bool:
    """Whether the folder holds a run, maybe a damaged one (LAYOUT-2), at a glance."""
    return run.exists(names.MANIFESTS_DIR) or run.exists(names.MANIFEST_FILE)
