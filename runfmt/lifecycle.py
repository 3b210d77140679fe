"""Run lifecycle: health (abandoned runs), status summaries, deterministic ids and the
existing-run policy, finding runs by config (spec §14, LIFE-*, POLICY-*).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Unpack, get_args

from runfmt.errors import (
    ConflictError,
    InvalidInputError,
    RunExistsError,
    RunfmtError,
    RunNotFoundError,
)
from runfmt.format import names
from runfmt.format.keys import compute_key
from runfmt.format.manifest import Manifest, parse_timestamp
from runfmt.locking import live_writers
from runfmt.run import (
    ABANDON_AFTER,
    RunReader,
    RunWriter,
    WriterOptions,
    check_folder_name,
    load_manifest,
    unpublish,
)

if TYPE_CHECKING:
    from runfmt.storage import Storage
    from runfmt.store import Store

__all__ = [
    "ABANDON_AFTER",
    "Health",
    "OpenedRun",
    "Policy",
    "RunSummary",
    "StageSummary",
    "deterministic_run_id",
    "health",
    "may_be_alive",
    "observed_health",
    "open_or_create",
    "remove_run",
    "revision_written",
    "runs_with_config",
    "summarize",
]


Health = Literal["running", "abandoned", "completed", "failed", "cancelled"]
Policy = Literal["auto", "error", "rerun"]
Action = Literal["created", "resumed", "reused", "rerun"]
_SLUG_JUNK = re.compile(r"[^a-z0-9]+")
_RERUN_PREFIX = ".rerun-"
_SLUG_MAX = 100 - 17


def last_sign_of_life(m: Manifest) -> str:
    """``heartbeat_at``, or ``updated_at`` for runs written without heartbeats."""
    return m.heartbeat_at or m.updated_at


def health(m: Manifest, now: datetime) -> Health:
    """The run's status, with ``running`` runs not heard from in `ABANDON_AFTER` s as
    ``abandoned`` (LIFE-4)."""
    if m.status != "running":
        return m.status
    age = (now - parse_timestamp(last_sign_of_life(m))).total_seconds()
    return "abandoned" if age > ABANDON_AFTER else "running"


def observed_health(run: Storage, m: Manifest, now: datetime) -> Health:
    """`health`, with a run whose stamps say abandoned shown running when its writer is
    seen alive otherwise: by its lock on local disk, elsewhere by `may_be_alive`."""
    found = health(m, now)
    if found != "abandoned":
        return found
    try:
        alive = bool(live_writers(run)) if run.is_local else may_be_alive(run, m, now)
    except OSError:  # locks this user may not probe
        alive = False
    return "running" if alive else found


def may_be_alive(run: Storage, m: Manifest, now: datetime) -> bool:
    """Whether a writer of ``m``, a revision of ``run`` where no lock tells, may be alive
    (STORE-3): the run is running and was heard from within `ABANDON_AFTER` s, by its
    stamps or by when the storage says its newest revision was written, which a writer
    whose clock is behind does not set back (LIFE-4)."""
    if m.status != "running" or health(m, now) == "running":
        return m.status == "running"
    try:
        written = revision_written(run, m)
    except RunfmtError:
        return True  # not told: a destructive step must not take the writer for dead
    return written is not None and (now - written).total_seconds() <= ABANDON_AFTER


def revision_written(run: Storage, m: Manifest) -> datetime | None:
    """When the storage, by its own clock, wrote revision ``m`` of ``run`` (LIFE-4)."""
    return run.modified(names.revision_file(m.revision))


@dataclass(frozen=True, slots=True)
class StageSummary:
    name: str
    status: str
    records: int
    failures: int


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What `runfmt status` shows of one run."""

    run_id: str
    name: str
    health: Health
    completed_through_stage: str | None
    error: str | None
    created_at: str
    last_seen: str
    age_seconds: float
    """Seconds since the run was created."""
    idle_seconds: float
    """Seconds since the last commit or heartbeat."""
    stages: tuple[StageSummary, ...]
    counters: Mapping[str, float | int] = field(default_factory=dict)
    forked_from: str | None = None
    forked_at_stage: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "name": self.name,
            "health": self.health,
            "completed_through_stage": self.completed_through_stage,
            "error": self.error,
            "created_at": self.created_at,
            "last_seen": self.last_seen,
            "age_seconds": round(self.age_seconds, 3),
            "idle_seconds": round(self.idle_seconds, 3),
            "stages": [
                {"name": s.name, "status": s.status, "records": s.records, "failures": s.failures}
                for s in self.stages
            ],
            "counters": dict(self.counters),
            "forked_from": self.forked_from,
            "forked_at_stage": self.forked_at_stage,
            "problem": None,
        }

    @staticmethod
    def unreadable_json(run_id: str, problem: str) -> dict[str, Any]:
        """`to_json`'s members for a run whose manifest cannot be read: only the id, the
        ``unreadable`` health and the ``problem`` are known."""
        doc: dict[str, Any] = dict.fromkeys(f.name for f in fields(RunSummary))
        doc.update(run_id=run_id, health="unreadable", stages=[], counters={}, problem=problem)
        return doc


def summarize(m: Manifest, now: datetime) -> RunSummary:
    """A run's lifecycle and per-stage progress as of ``now``."""
    seen = last_sign_of_life(m)
    return RunSummary(
        run_id=m.run_id,
        name=m.name,
        health=health(m, now),
        completed_through_stage=m.completed_through_stage,
        error=m.error,
        created_at=m.created_at,
        last_seen=seen,
        age_seconds=(now - parse_timestamp(m.created_at)).total_seconds(),
        idle_seconds=(now - parse_timestamp(seen)).total_seconds(),
        stages=tuple(StageSummary(s.name, s.status, s.records, s.failures) for s in m.stages),
        counters=m.counters,
        forked_from=m.forked_from,
        forked_at_stage=m.forked_at_stage,
    )


def deterministic_run_id(name: str, config: Mapping[str, Any]) -> str:
    """``<slug of name>-<first 16 hex digits of the config's key>`` (POLICY-1).

    The same name and config give the same id on any machine (RFC 8785 keys).
    """
    slug = _SLUG_JUNK.sub("-", str(name).lower()).strip("-")[:_SLUG_MAX].strip("-") or "run"
    return names.validate_run_id(f"{slug}-{compute_key(dict(config))[3:19]}")


@dataclass(slots=True)
class OpenedRun:
    """What `open_or_create` did, and the run: ``writer`` is None when it was reused."""

    action: Action
    run_id: str
    reader: RunReader
    writer: RunWriter | None


def _satisfied(m: Manifest, until_stage: str | None) -> bool:
    """Whether a completed run already holds what a caller stopping at ``until_stage`` wants."""
    if m.status != "completed":
        return False
    if m.completed_through_stage is None or until_stage == m.completed_through_stage:
        return True
    stage = m.stage(until_stage) if until_stage is not None else None
    return stage is not None and stage.status == "completed"


def open_or_create(
    store: Store,
    name: str,
    config: Mapping[str, Any] | None = None,
    *,
    policy: Policy = "auto",
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    **writer_options: Unpack[WriterOptions],
) -> OpenedRun:
    """Open the run of ``config`` under its deterministic id, applying the existing-run policy.

    ``auto``: a run that is completed (through ``until_stage``, when given) is
    reused as is; any other is resumed. ``error``: `RunExistsError` if it exists.
    ``rerun``: the old run is removed (`remove_run`) and a fresh one created
    (POLICY-2..4).
    """
    if policy not in get_args(Policy):
        raise InvalidInputError(
            f"unknown existing-run policy {policy!r}", hint="use auto, error or rerun"
        )
    config = dict(config or {})
    run_id = run_id or deterministic_run_id(name, config)
    storage = store._run_storage(run_id)
    if policy == "rerun":
        remove_run(store, run_id)
    else:
        existing = _existing(storage, run_id)
        if existing is not None:
            if policy == "error":
                raise RunExistsError(
                    f"run {run_id} exists ({existing.status})", location=storage.where(),
                    hint="use policy auto to reuse or resume it, or rerun to start afresh",
                )  # fmt: skip
            return _reuse_or_resume(store, storage, existing, config, writer_options)
    try:
        writer = store.create_run(name, config, tags=tags, run_id=run_id, **writer_options)
    except RunExistsError:
        if policy != "auto":
            raise
        existing = check_folder_name(load_manifest(storage), storage, run_id)
        return _reuse_or_resume(store, storage, existing, config, writer_options)
    if not storage.is_local:
        _delete_what_a_removal_left(storage)
    action: Action = "rerun" if policy == "rerun" else "created"
    return OpenedRun(action, run_id, RunReader(storage, writer.manifest), writer)


def _delete_what_a_removal_left(storage: Storage) -> None:
    """Delete the data an interrupted removal of a run with this id left on an object
    store: the new run's first revision exists and its writer has written nothing, so
    nothing under ``stages/`` or ``artifacts/`` is its own (POLICY-4)."""
    for path in storage.walk():
        if path.startswith((f"{names.STAGES_DIR}/", f"{names.ARTIFACTS_DIR}/")):
            storage.delete(path)


def _existing(storage: Storage, run_id: str) -> Manifest | None:
    try:
        return check_folder_name(load_manifest(storage), storage, run_id)
    except RunNotFoundError:
        return None


def _reuse_or_resume(
    store: Store,
    storage: Storage,
    existing: Manifest,
    config: dict[str, Any],
    options: WriterOptions,
) -> OpenedRun:
    if existing.config_hash != compute_key(config):
        raise ConflictError(
            f"run {existing.run_id} exists with another config ({existing.config_hash})",
            location=storage.where(),
            hint="give another run_id, or use policy rerun to replace it",
        )
    if _satisfied(existing, options.get("until_stage")):
        return OpenedRun("reused", existing.run_id, RunReader(storage, existing), None)
    writer = store.resume_run(existing.run_id, **options)
    return OpenedRun("resumed", existing.run_id, RunReader(storage, writer.manifest), writer)


def remove_run(store: Store, run_id: str) -> bool:
    """Delete run ``run_id`` from the store so that no reader ever sees it half-deleted.

    Local disk: the folder is first renamed to ``.rerun-<id>-<token>`` (atomic,
    invisible as local state), then deleted; leftovers of an interrupted removal
    are deleted by the next one. Object stores: ``manifest.json`` and the
    revisions go first, oldest first, so the run stays readable at its newest
    revision until it is no run at all; then the data. Refuses while a writer of
    the run is alive: its liveness lock is held (local disk), or the run is running
    and not abandoned (object stores, LIFE-4). Returns whether there was anything to
    remove.
    """
    storage = store._run_storage(run_id)
    store.storage._writable(run_id)
    for leftover in store.storage.local_state():
        if leftover.startswith(f"{_RERUN_PREFIX}{run_id}-"):
            store.storage.delete_tree(leftover)
    if not storage.exists():
        return False
    live = live_writers(storage)
    if live:
        raise ConflictError(
            f"run {run_id} has a live writer ({', '.join(live)})", location=storage.where(),
            hint="stop that writer before replacing the run",
        )  # fmt: skip
    if not storage.is_local:
        existing = _existing(storage, run_id)
        if existing is not None and may_be_alive(storage, existing, now()):
            raise ConflictError(
                f"run {run_id} is running: its writer was heard from at "
                f"{last_sign_of_life(existing)} (LIFE-4)",
                location=storage.where(),
                hint=f"stop that writer, or wait until the run is abandoned "
                f"({ABANDON_AFTER:.0f} s without a heartbeat)",
            )
    if store.storage.is_local:
        aside = f"{_RERUN_PREFIX}{run_id}-{secrets.token_hex(4)}"
        store.storage.rename(run_id, aside)
        store.storage.delete_tree(aside)
    else:
        unpublish(storage)
        store.storage.delete_tree(run_id)
    with contextlib.suppress(RunfmtError):
        store.index.forget([run_id])
    return True


def runs_with_config(store: Store, config: Mapping[str, Any] | str) -> list[RunReader]:
    """Runs whose config is ``config`` (a mapping, or its ``k1:`` hash), newest id first."""
    wanted = config if isinstance(config, str) else compute_key(dict(config))
    if not re.fullmatch(r"k1:[0-9a-f]{64}", wanted):
        raise InvalidInputError(f"invalid config hash {wanted!r}", hint="expected k1:<64 hex>")
    return [
        run
        for _, run in store.runs()
        if isinstance(run, RunReader) and run.manifest.config_hash == wanted
    ]


def now() -> datetime:
    """The current UTC time (the CLI's clock for `summarize`)."""
    return datetime.now(UTC)
