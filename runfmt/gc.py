"""Retention: choose runs to delete by count per name, age, status and total size; delete them.

`plan_gc` only reads; `delete_planned` deletes what a plan chose, checking
each run again first. A run being written (status ``running`` with a live
writer, or updated within ``active_within``) is never chosen.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, defaultdict
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from runfmt.errors import FormatError, InvalidInputError, RunfmtError, RunNotFoundError
from runfmt.format import names
from runfmt.format.manifest import parse_timestamp
from runfmt.lifecycle import revision_written
from runfmt.locking import commit_lock, live_writers
from runfmt.run import RunReader, interrupts_held, load_manifest, revisions, unpublish
from runfmt.storage import Storage
from runfmt.store import Store
from runfmt.units import format_size

__all__ = [
    "GcEntry",
    "GcPlan",
    "delete_planned",
    "plan_gc",
]

DEFAULT_ACTIVE_WITHIN = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class GcEntry:
    run_id: str
    name: str
    status: str
    created_at: str
    updated_at: str
    revision: int
    bytes: int
    reason: str


@dataclass(slots=True)
class GcPlan:
    """What a retention policy would delete, keep, and never touch."""

    delete: list[GcEntry] = field(default_factory=list)
    keep: list[GcEntry] = field(default_factory=list)
    protected: list[GcEntry] = field(default_factory=list)
    """Runs being written: never deleted."""
    unreadable: list[dict[str, str]] = field(default_factory=list)
    """Folders whose manifest cannot be read: left alone (see `runfmt verify`)."""
    over_cap: int = 0
    """Bytes still above ``max_size`` after every run that may go was chosen."""
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    """Folders that a delete cut short left (`names.DELETING_FILE` in them, no revision):
    ``run_id`` and ``bytes``. Never deleted here: without a lock that copies take too, gc
    cannot tell one left alone from one a copy or a sync is filling again."""

    @property
    def bytes_freed(self) -> int:
        return sum(e.bytes for e in self.delete)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["bytes_freed"] = self.bytes_freed
        return doc


def _entry(run: RunReader, size: int, reason: str) -> GcEntry:
    m = run.manifest
    return GcEntry(m.run_id, m.name, m.status, m.created_at, m.updated_at, m.revision, size, reason)


def _files(run: Storage) -> dict[Hashable, int]:
    """The run folder's files by identity, with their sizes: on local disk the inode, which
    hard links share, else the path."""
    sizes = run.walk()
    if not run.is_local:
        return {(run.name, rel): n for rel, n in sizes.items()}
    found: dict[Hashable, int] = {}
    for rel, n in sizes.items():
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
            st = os.lstat(run.path(rel))
            found[st.st_dev, st.st_ino] = n
    return found


def _delete_marked(folder: Storage) -> None:
    """Delete the folder, `names.DELETING_FILE` last, so that a delete cut short anywhere
    leaves it."""
    for name in folder.names():
        folder.delete_tree(name)
    folder.delete_tree("")


def _being_written(run: RunReader, now: datetime, active_within: timedelta) -> str | None:
    if run.manifest.status != "running":
        return None
    if live_writers(run.storage):
        return "being written (a live writer holds its lock)"
    idle = now - parse_timestamp(run.manifest.updated_at)
    if idle >= active_within:  # unless the storage wrote it lately: its writer's clock is behind
        written = revision_written(run.storage, run.manifest)
        idle = idle if written is None else min(idle, now - written)
    if idle < active_within:
        return f"being written (updated {int(idle.total_seconds())} s ago)"
    return None


def plan_gc(
    store: Store,
    *,
    keep_last: int | None = None,
    older_than: timedelta | None = None,
    only_completed: bool = False,
    max_size: int | None = None,
    active_within: timedelta = DEFAULT_ACTIVE_WITHIN,
    now: datetime | None = None,
) -> GcPlan:
    """Choose the runs a retention policy deletes; reads manifests and sizes, changes nothing.

    A run may go when it is not being written (and is completed, with
    ``only_completed``). Of those, it is chosen when it is beyond the
    ``keep_last`` newest of its name and last updated before ``older_than``
    ago (both, when both are given). Then, while the store holds more than
    ``max_size`` bytes, the oldest remaining runs that may go are chosen too.
    """
    if keep_last is None and older_than is None and max_size is None:
        raise InvalidInputError(
            "no retention policy given", hint="pass --keep-last, --older-than or --max-size"
        )
    if keep_last is not None and keep_last < 0:
        raise InvalidInputError(f"keep-last must be 0 or more, not {keep_last}")
    now = now or datetime.now(UTC)
    plan = GcPlan()
    candidates: list[tuple[RunReader, int]] = []
    files: dict[str, dict[Hashable, int]] = {}
    left_alone: dict[Hashable, int] = {}
    for run_id in store.run_ids():
        try:
            run = store.open_run(run_id)
            files[run_id] = _files(run.storage)
            size = sum(files[run_id].values())
        except FormatError as exc:
            plan.unreadable.append({"run_id": run_id, "error": str(exc)})
            with contextlib.suppress(RunfmtError):  # left alone: what it holds stays
                left_alone.update(_files(store.storage.child(run_id)))
            continue
        except RunNotFoundError:  # left alone too: a leftover, or a copy under way
            with contextlib.suppress(RunfmtError):
                folder = store.storage.child(run_id)
                held = _files(folder)
                left_alone.update(held)
                if folder.exists(names.DELETING_FILE) and not revisions(folder):
                    plan.leftovers.append({"run_id": run_id, "bytes": sum(held.values())})
            continue
        except RunfmtError:
            continue
        busy = _being_written(run, now, active_within)
        if busy:
            plan.protected.append(_entry(run, size, busy))
        elif only_completed and run.manifest.status != "completed":
            plan.keep.append(_entry(run, size, f"status {run.manifest.status}"))
        else:
            candidates.append((run, size))
    candidates.sort(key=lambda c: (c[0].manifest.created_at, c[0].run_id), reverse=True)
    rank: dict[str, int] = defaultdict(int)
    chosen: list[tuple[RunReader, int, str]] = []
    kept: list[tuple[RunReader, int, str]] = []
    for run, size in candidates:
        m = run.manifest
        rank[m.name] += 1
        reasons = []
        keep_reason = ""
        if keep_last is not None:
            if rank[m.name] > keep_last:
                reasons.append(f"beyond the newest {keep_last} of {m.name!r}")
            else:
                keep_reason = f"among the newest {keep_last} of {m.name!r}"
        if older_than is not None:
            if parse_timestamp(m.updated_at) < now - older_than:
                reasons.append(f"not updated for over {_human(older_than)}")
            else:
                keep_reason = keep_reason or f"updated within {_human(older_than)}"
        if (keep_last is not None or older_than is not None) and not keep_reason:
            chosen.append((run, size, "; ".join(reasons)))
        else:
            kept.append((run, size, keep_reason or "within the size cap"))
    for hidden in store.storage.local_state():  # a killed fork's or import's build folder
        with contextlib.suppress(RunfmtError):
            left_alone.update(_files(store.storage.child(hidden)))
    holders = Counter(f for held in [*files.values(), left_alone] for f in held)
    sizes = {f: n for held in files.values() for f, n in held.items()}

    def freed(run: RunReader) -> int:
        """What deleting ``run`` frees, once the runs chosen before it are gone: files that
        hard links share with a run that stays (a fork's, FORK-3) free nothing."""
        holders.subtract(files[run.run_id].keys())
        return sum(n for f, n in files[run.run_id].items() if not holders[f])

    chosen = [(run, freed(run), why) for run, _, why in chosen]
    if max_size is not None:
        total = sum(n for f, n in sizes.items() if holders[f])
        kept.sort(key=lambda c: (c[0].manifest.created_at, c[0].run_id))
        while kept and total > max_size:
            run, _, _ = kept.pop(0)
            size = freed(run)
            chosen.append((run, size, f"oldest while the store is over {format_size(max_size)}"))
            total -= size
        plan.over_cap = max(0, total - max_size)
    plan.delete = [_entry(r, s, why) for r, s, why in chosen]
    plan.keep += [_entry(r, s, why) for r, s, why in kept]
    plan.delete.sort(key=lambda e: e.run_id)
    plan.keep.sort(key=lambda e: e.run_id)
    plan.protected.sort(key=lambda e: e.run_id)
    return plan


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def delete_planned(
    store: Store,
    plan: GcPlan,
    *,
    active_within: timedelta = DEFAULT_ACTIVE_WITHIN,
    lock_timeout: float = 5.0,
) -> tuple[list[str], list[dict[str, str]]]:
    """Delete the runs ``plan`` chose; returns (deleted ids, skipped runs with the reason).

    Each run is checked again under its commit lock: one that gained a
    revision or a live writer since the plan was made is skipped. The
    manifest revisions go first, so an interrupted delete leaves no folder
    that reads as a run. Ctrl-C (and the CLI's SIGTERM) wait for the run to be gone; a
    delete cut short otherwise leaves `names.DELETING_FILE` in it, and a plan lists the
    folder in ``leftovers``. The store's index is told at once; had that failed, its
    next refresh would notice the missing folders anyway.
    """
    deleted: list[str] = []
    skipped: list[dict[str, str]] = []
    for entry in plan.delete:
        run = store.storage.child(names.validate_run_id(entry.run_id))
        try:
            with interrupts_held():  # Ctrl-C and SIGTERM wait for the run to be gone
                with commit_lock(run, lock_timeout):
                    current = load_manifest(run)
                    if current.revision != entry.revision or live_writers(run):
                        now = datetime.now(UTC)
                        busy = _being_written(RunReader(run, current), now, active_within)
                        reason = busy or "changed since the plan was made"
                        skipped.append({"run_id": entry.run_id, "reason": reason})
                        continue
                    run.write_atomic(names.DELETING_FILE, b"", durable=False)
                    unpublish(run)
                _delete_marked(run)
        except RunfmtError as exc:
            skipped.append({"run_id": entry.run_id, "reason": str(exc)})
            continue
        deleted.append(entry.run_id)
    if deleted:
        with contextlib.suppress(RunfmtError):
            store.index.forget(deleted)
    return deleted, skipped
