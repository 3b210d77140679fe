"""Writer exclusion: filelock on local disk, a process lock for ``memory://``.

Object stores need no lock: revisions are created with create-only writes
(COMMIT-2), so there is nothing to hold.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator

from filelock import FileLock, Timeout, lock_descriptor, unlock_descriptor

from runfmt.errors import LockTimeoutError, ReadOnlyError, RunNotFoundError, StorageError
from runfmt.storage import Storage

__all__ = [
    "commit_lock",
    "file_lock",
    "hidden_build",
    "hold_writer_lock",
    "live_writers",
    "writer_alive",
]

COMMIT_LOCK = ".lock"
_COMMIT_POLL = 0.002
"""Seconds between tries for a held commit lock (filelock's 0.05 s default let one busy
writer win every race while another waited, measured in tests/test_locking.py)."""
_OWN_LOCK_WAIT = 5.0
"""Seconds a new writer waits for its own liveness lock: its id is fresh, so only a
`writer_alive` probe of another process (a repair) can hold it, for microseconds."""
_BUILD_GRACE = 60.0
"""Seconds a hidden build folder is spared even with its lock free: its builder may not
have taken the lock yet."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_held = threading.local()
_memory_locks: dict[str, threading.RLock] = {}
_memory_guard = threading.Lock()


def _writer_lock_file(writer: str) -> str:
    return f".writer-{writer}.lock"


@contextlib.contextmanager
def commit_lock(run: Storage, timeout: float) -> Iterator[None]:
    """Hold the run's commit lock; `LockTimeoutError` when it is not had within ``timeout``.

    A read-only run is never locked: taking the lock would create a file.
    """
    if run.read_only:
        raise ReadOnlyError("the store was opened read-only", location=run.where())
    if run.is_local:
        with _flock(run, timeout):
            yield
    elif run.protocol == "memory":
        with _memory_guard:
            rlock = _memory_locks.setdefault(run.root, threading.RLock())
        if not rlock.acquire(timeout=timeout):
            raise LockTimeoutError("commit lock not had in time", location=run.where())
        try:
            yield
        finally:
            rlock.release()
    else:
        yield


@contextlib.contextmanager
def _flock(run: Storage, timeout: float) -> Iterator[None]:
    """The commit lock as filelock's bare descriptor lock, polled until ``timeout``.

    It is the same flock `FileLock` takes, at 8 us instead of the 200 us of a reused
    `FileLock` (filelock 4.2). A descriptor per hold makes threads exclude each other;
    a thread already holding the lock holds it again at once.
    """
    path = run.path(COMMIT_LOCK)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if path in held:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except FileNotFoundError:
        raise RunNotFoundError(
            "the run folder is gone",
            location=run.where(),
            hint="it was deleted (gc, rm) while open; write to a new run",
        ) from None
    except OSError as exc:
        raise StorageError(
            f"cannot open the commit lock: {exc.strerror}",
            location=path,
            hint="the run folder must be writable, and .lock a plain file",
        ) from exc
    try:
        deadline = time.monotonic() + timeout
        while not lock_descriptor(fd, blocking=False):
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"another writer held the commit lock for over {timeout:g} s",
                    location=path,
                    hint="wait for it to finish, or raise lock_timeout",
                )
            time.sleep(_COMMIT_POLL)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
            unlock_descriptor(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on the local file ``path``; `LockTimeoutError` after ``timeout``."""
    lock = FileLock(path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise LockTimeoutError(
            f"another process held the lock for over {timeout:g} s", location=path
        ) from None
    try:
        yield
    finally:
        lock.release()


def hold_writer_lock(run: Storage, writer: str) -> FileLock | None:
    """Take the lock that marks ``writer`` as alive for as long as its process holds it."""
    if not run.is_local:
        return None
    lock = FileLock(run.path(_writer_lock_file(writer)))
    try:
        lock.acquire(timeout=_OWN_LOCK_WAIT, poll_interval=_COMMIT_POLL)
    except Timeout:
        raise LockTimeoutError(
            f"writer {writer}'s liveness lock was held by another process for over "
            f"{_OWN_LOCK_WAIT:g} s (COMMIT-12)",
            location=run.where(_writer_lock_file(writer)),
            hint="another process probes it only for an instant: retry",
        ) from None
    return lock


@contextlib.contextmanager
def hidden_build(store: Storage, prefix: str, builder: str) -> Iterator[Storage]:
    """A new hidden folder of the local ``store`` (``prefix`` and random hex: local state,
    never listed), held by ``builder``'s liveness lock, to build a run in and rename into
    place; on leaving, the lock is released and what is left of the folder deleted. The
    folders of builders that are gone (killed) are deleted first."""
    _remove_dead_builds(store, prefix, builder)
    name = f"{prefix}{secrets.token_hex(6)}"
    work = store.child(name)
    work.makedirs("")
    lock = hold_writer_lock(work, builder)
    try:
        yield work
    finally:
        if lock is not None:
            lock.release()
        store.delete_tree(name)


def _remove_dead_builds(store: Storage, prefix: str, builder: str) -> None:
    """Delete the store's build folders (named ``prefix``...) whose builder is gone:
    ``builder``'s lock in it is free, and it is over a minute old (a builder makes the
    folder, then takes the lock)."""
    for name in store.local_state():
        build = store.child(name)
        with contextlib.suppress(OSError):
            if (
                name.startswith(prefix)
                and not writer_alive(build, builder)
                and time.time() - os.path.getmtime(build.path()) > _BUILD_GRACE
            ):
                store.delete_tree(name)


def writer_alive(run: Storage, writer: str) -> bool:
    """Whether a process still holds ``writer``'s lock (local disk only; elsewhere False).

    The probe opens the lock file only if it exists: it never makes one (COMMIT-12).
    """
    if not run.is_local:
        return False
    try:
        fd = os.open(run.path(_writer_lock_file(writer)), os.O_RDWR | _NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        if not lock_descriptor(fd, blocking=False):
            return True
        unlock_descriptor(fd)
        return False
    finally:
        os.close(fd)


def live_writers(run: Storage) -> list[str]:
    """Ids of the writers whose process still holds their liveness lock (local disk only)."""
    if not run.is_local:
        return []
    try:
        found = os.listdir(run.path())
    except FileNotFoundError:
        return []
    ids = [n[8:-5] for n in found if n.startswith(".writer-") and n.endswith(".lock")]
    return sorted(w for w in ids if writer_alive(run, w))
