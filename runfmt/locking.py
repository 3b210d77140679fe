"""Writer exclusion: filelock on local disk, a process lock for ``memory://``.

Object stores need no lock: revisions are created with create-only writes
(COMMIT-2), so there is nothing to hold.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator

from filelock import FileLock, Timeout

from runfmt.errors import LockTimeoutError, ReadOnlyError
from runfmt.storage import Storage

__all__ = ["commit_lock", "file_lock", "hold_writer_lock", "live_writers", "writer_alive"]

COMMIT_LOCK = ".lock"
_COMMIT_POLL = 0.002
"""Seconds between tries for a held commit lock (filelock's 0.05 s default let one busy
writer win every race while another waited, measured in tests/test_locking.py)."""
_THREAD_LOCKS = 16
_thread_locks = threading.local()
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
        lock = _thread_lock(run.path(COMMIT_LOCK))
        try:
            lock.acquire(timeout=timeout, poll_interval=_COMMIT_POLL)
        except Timeout:
            raise LockTimeoutError(
                f"another writer held the commit lock for over {timeout:g} s",
                location=run.where(COMMIT_LOCK),
                hint="wait for it to finish, or raise lock_timeout",
            ) from None
        try:
            yield
        finally:
            lock.release()
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


def _thread_lock(path: str) -> FileLock:
    """This thread's lock object for ``path``, reused: making one costs more than the flock.

    Each thread has its own objects, so threads exclude each other (one flock each).
    """
    cache: OrderedDict[str, FileLock] | None = getattr(_thread_locks, "cache", None)
    if cache is None:
        cache = _thread_locks.cache = OrderedDict()
    lock = cache.get(path)
    if lock is None:
        lock = cache[path] = FileLock(path, thread_local=False)
        if len(cache) > _THREAD_LOCKS:
            oldest = next(iter(cache))
            if not cache[oldest].is_locked:
                del cache[oldest]
    else:
        cache.move_to_end(path)
    return lock


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
    lock = FileLock(run.path(_writer_lock_file(writer)), timeout=0)
    lock.acquire()
    return lock


def writer_alive(run: Storage, writer: str) -> bool:
    """Whether a process still holds ``writer``'s lock (local disk only; elsewhere False)."""
    if not run.is_local or not run.exists(_writer_lock_file(writer)):
        return False
    lock = FileLock(run.path(_writer_lock_file(writer)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


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
