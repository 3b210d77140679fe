"""Fork and replay: a new run that takes another run's stages up to a stage and
recomputes from there (spec FORK-1..4).

The fork is a self-contained folder: its copied stage files and artifacts are
hard links where the filesystem allows and the source is finished, copies of the
listed bytes otherwise. It appears in the store whole or not at all.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Unpack

from runfmt.errors import (
    ChecksumMismatchError,
    ConflictError,
    InvalidInputError,
    ReadOnlyError,
    RunExistsError,
    StorageError,
)
from runfmt.format import names
from runfmt.format.keys import canonical_json, compute_key
from runfmt.format.manifest import (
    Manifest,
    as_dict,
    encode_manifest,
    manifest_problems,
    to_json,
)
from runfmt.locking import COMMIT_LOCK, commit_lock, hidden_build, live_writers
from runfmt.run import (
    WRITER,
    RunWriter,
    WriterOptions,
    check_writer_options,
    create_revision,
    load_manifest,
    now_utc,
    revisions,
    write_manifest_copy,
)

if TYPE_CHECKING:
    from runfmt.storage import Storage
    from runfmt.store import Store

__all__ = ["fork_run"]

_BUILD_PREFIX = ".fork-"
_BUILDER = "fork"
_LINK_LOCK_WAIT = 60.0
"""Seconds a fork waits for its source's commit lock to link its files (a repair holds it)."""


def fork_run(
    store: Store,
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
    """Create a run holding ``source``'s stages declared before ``at_stage`` and return
    its writer, to recompute ``at_stage`` and what follows (FORK-1).

    Name, config and tags default to the source's. Every stage taken must be
    completed. Artifacts are taken too unless ``artifacts=False``; counters
    start at zero (they count this run's work).
    """
    if store.read_only:
        raise ReadOnlyError("the store was opened read-only", location=store.url)
    store._refuse_in_run()
    check_writer_options(writer_options)
    src = store.locate(source)
    base = load_manifest(src)
    order = [s.name for s in base.stages]
    if at_stage not in order:
        raise InvalidInputError(
            f"run {base.run_id} has no stage {at_stage!r} to fork at",
            location=src.where(),
            hint=f"stages in order: {', '.join(order) or 'none'}",
        )
    taken = base.stages[: order.index(at_stage)]
    unfinished = [s.name for s in taken if s.status != "completed"]
    if unfinished:
        raise InvalidInputError(
            f"stages {', '.join(unfinished)} of run {base.run_id} are not completed",
            location=src.where(),
            hint="fork at the first stage that is not completed, or complete it first",
        )
    config = as_dict("config", base.config if config is None else config)
    canonical_json(config)
    run_id = names.validate_run_id(
        run_id or names.format_run_id(datetime.now(UTC), secrets.randbits(32))
    )
    stamp = now_utc()
    manifest = Manifest(
        run_id=run_id,
        name=base.name if name is None else name,
        revision=1,
        status="running",
        created_at=stamp,
        updated_at=stamp,
        config=config,
        config_hash=compute_key(config),
        tags=as_dict("tags", base.tags if tags is None else tags),
        stages=tuple(replace(s, status="completed") for s in taken),
        artifacts=base.artifacts if artifacts else (),
        writer=WRITER,
        heartbeat_at=stamp,
        forked_from=base.run_id,
        forked_at_stage=at_stage,
    )
    problems = manifest_problems(to_json(manifest))
    if problems:
        raise InvalidInputError("invalid fork: " + "; ".join(problems))
    link = base.status != "running" and not live_writers(src)  # none may append to it
    if store.storage.is_local:
        _build_local(store, src, manifest, link, base.revision)
    else:
        _build_remote(store, src, manifest)
    return RunWriter(store._run_storage(run_id), manifest, **writer_options)


def _copy_files(
    src: Storage, dst: Storage, manifest: Manifest, link: bool, revision: int = 0
) -> None:
    """Link or copy each taken file, checked against its listed sha256: a fork never starts
    from damaged data (CHECK-1). With ``link``, files of source revision ``revision`` that
    can be are linked (`_link`); the rest are copied."""
    for path, (length, sha256) in manifest.listed_files().items():
        if not src.inside(path):
            raise InvalidInputError(f"{path} goes through a link (LAYOUT-5)", location=src.where())
        try:
            if not (link and _link(src, dst, path, length, sha256, revision)):
                dst.link_from(src, path, path, length, sha256, link=False)
        except FileNotFoundError:
            raise ChecksumMismatchError("listed file is missing (LAYOUT-3)",
                                        location=src.where(path)) from None  # fmt: skip


def _link(src: Storage, dst: Storage, path: str, length: int, sha256: str, revision: int) -> bool:
    """Check and link one file under the source's commit lock, so that no repair cuts it in
    between (FORK-3); False, having done nothing, when it is to be copied instead: on
    another filesystem, of another length, or with a lock this user may not take or that
    no writer made (a fork never creates one in its source)."""
    if (
        not src.exists(COMMIT_LOCK)
        or src.size(path) != length
        or os.stat(src.path(path)).st_dev != os.stat(dst.path()).st_dev
    ):
        return False
    try:
        with commit_lock(src, _LINK_LOCK_WAIT):
            if revisions(src)[-1:] != [revision]:
                raise ConflictError(
                    "the source run changed while it was forked", location=src.where(),
                    hint="fork it again",
                )  # fmt: skip
            return dst.link_from(src, path, path, length, sha256, link=True)
    except (ReadOnlyError, StorageError):
        return False


def _build_local(store: Store, src: Storage, manifest: Manifest, link: bool, revision: int) -> None:
    """Build the fork in a hidden folder, then rename it into place (FORK-3, FORK-4)."""
    with hidden_build(store.storage, _BUILD_PREFIX, _BUILDER) as work:
        _copy_files(src, work, manifest, link, revision)
        data = encode_manifest(manifest)
        work.create_exclusive(names.revision_file(1), data)
        write_manifest_copy(work, data, finished=manifest.finished)
        try:
            store.storage.rename(work.name, manifest.run_id)
        except StorageError:
            raise RunExistsError(
                "a run with this id exists", location=store.storage.where(manifest.run_id),
                hint="choose another run_id",
            ) from None  # fmt: skip
    store.storage.child(manifest.run_id).delete(f".writer-{_BUILDER}.lock")


def _build_remote(store: Store, src: Storage, manifest: Manifest) -> None:
    """Copy the files, then create revision 1: a folder without revisions is no run."""
    dst = store.storage.child(manifest.run_id)
    if dst.exists(names.MANIFESTS_DIR):
        raise RunExistsError("a run with this id exists", location=dst.where())
    _copy_files(src, dst, manifest, link=False)
    data = encode_manifest(manifest)
    if not create_revision(dst, 1, data):
        raise RunExistsError("a run with this id exists", location=dst.where())
    write_manifest_copy(dst, data, finished=manifest.finished)
