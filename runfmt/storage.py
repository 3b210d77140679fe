"""Storage behind one small interface: local disk, ``memory://`` and any fsspec backend.

This is the only module that touches files, and the only place where OS and
fsspec errors become runfmt errors. Paths given to `Storage` methods are
relative to its root and use ``/``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations, registry

from runfmt._local import open_regular
from runfmt.errors import (
    ChecksumMismatchError,
    InvalidInputError,
    ReadOnlyError,
    RunfmtError,
    StorageError,
)
from runfmt.format.manifest import as_dict

__all__ = ["EXCLUSIVE_PROTOCOLS", "AppendFile", "Entry", "Storage"]

_MEMORY_LOCK = threading.Lock()
_TEMP_PREFIX = ".tmp-"
_STREAM_BLOCK = 8 << 20
_READ_CHUNK = 8 << 20
EXCLUSIVE_PROTOCOLS = frozenset({"file", "local", "memory", "s3", "s3a"})
"""Backends whose create-only write has exactly one winner (COMMIT-2); others need single-writer."""
_T = TypeVar("_T")
_SHORT_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(?!//)")
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
"""Object stores, where writing an object needs no folder, only its bucket."""
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_REDACTED = "<redacted>"
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)([^/@\s]*)@")
"""The password (group 2) of a URL's ``user:password@`` (group 1 keeps what precedes it)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_VERSION_KEYS = ("ETag", "generation", "LastModified", "mtime", "updated", "created")
"""Members of an fsspec listing entry that change whenever an object is written again."""


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    is_dir: bool
    size: int
    version: str = ""
    """What changes when the object is written again (its ETag, generation or time), as the
    backend lists it; empty on local disk."""


def _option_values(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _option_values(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _option_values(item)


def _secrets(options: dict[str, Any], url: str) -> tuple[str, ...]:
    """Strings that must never be shown: option values, credentials and fsspec config from
    env, and the URL's password (a backend may quote it without its ``://``)."""
    found = set(_option_values(options))
    found.update(os.environ[k] for k in _SECRET_ENV if os.environ.get(k))
    found.update(v for k, v in os.environ.items() if k.startswith(("FSSPEC_", "AWS_ENDPOINT")))
    found = {v for v in found if len(v) >= 8}
    found.update(m.group(2) for m in _URL_PASSWORD.finditer(url) if len(m.group(2)) >= 3)
    return tuple(sorted(found, key=len, reverse=True))


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` without ``secrets`` nor the password of any URL in it."""
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    return _URL_PASSWORD.sub(rf"\1{_REDACTED}@", text)


def _create_refused(exc: BaseException) -> bool:
    """Whether a create-only PUT was refused: 412 (the name is taken; s3fs maps it to
    `FileExistsError` only when the reply names the condition, which not every
    S3-compatible server does) or 409 (a concurrent conditional write; try again)."""
    response = getattr(exc.__cause__, "response", None)
    if not isinstance(response, dict):
        return False
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP})
"""What ``link(2)`` fails with on a filesystem that has no hard links (FAT, exFAT)."""


@contextlib.contextmanager
def _translate(
    where: str, secrets: tuple[str, ...] = (), bucket: str | None = None
) -> Iterator[None]:
    """Backend errors as `StorageError`; `FileNotFoundError` as is, except on a write to
    ``bucket``, where an object needs no folder and it means the bucket is missing."""
    try:
        yield
    except RunfmtError:
        raise
    except FileNotFoundError as exc:
        if bucket is None:
            raise
        raise StorageError(
            f"no such bucket {bucket!r}",
            location=where,
            hint="create it first, or check --store / RUNFMT_STORE",
        ) from exc
    except FileExistsError:
        raise
    except (AssertionError, AttributeError, NameError) as exc:
        if isinstance(exc, AssertionError) or _raised_here(exc):
            raise
        text = _describe(exc, where)
        message = _redact(text, secrets)
        raise StorageError(message, location=where, hint=_OPTIONS_HINT) from (
            exc if message == text else None
        )
    except Exception as exc:
        text = _describe(exc, where)
        message = _redact(text, secrets)
        hint = _OPTIONS_HINT if isinstance(exc, TypeError) else ""
        if isinstance(exc, PermissionError):
            hint = "ask for access to it, or run as a user who has it"
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "free space there; what was committed is intact"
        if isinstance(exc, ImportError):
            hint = (
                "install the backend: pip install 'runfmt[s3]'"
                if "s3fs" in text
                else "install the package the message names"
            )
        raise StorageError(message, location=where, hint=hint) from (
            exc if message == text else None
        )


_OPTIONS_HINT = (
    "the backend may not take a storage option (-o, storage_options) of that name or type"
)


def _raised_here(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in runfmt's own code (a bug to show whole), not in a
    backend (which raises such errors for storage options of the wrong type)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is None or tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def _describe(exc: Exception, where: str) -> str:
    """``Not a directory (NotADirectoryError)``: the system's words, and the file when it is
    not the place the error is reported at."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
        if exc.filename is not None and str(exc.filename) != where:
            text += f": {exc.filename}"
    else:
        text = str(exc)
    return f"{text} ({type(exc).__name__})" if text else type(exc).__name__


class Storage:
    """One store root (a folder or a bucket prefix) and the operations runfmt needs.

    ``storage_options`` go to fsspec only; they are never stored or shown.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        read_only: bool = False,
        single_writer: bool = False,
    ) -> None:
        options = as_dict("storage_options", storage_options)
        check_url(str(url))
        self._secrets = _secrets(options, str(url))
        self._options = options
        with _translate(_redact(str(url), self._secrets), self._secrets):
            fs, root = url_to_fs(str(url), **options)
        self.fs: fsspec.AbstractFileSystem = fs
        self.protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.is_local = self.protocol in ("file", "local")
        self._set_root(os.path.abspath(root) if self.is_local else str(root).rstrip("/"))
        self.read_only = read_only
        self.single_writer = single_writer

    def _set_root(self, root: str) -> None:
        """Root at ``root``, a backend path: its URL, and the URL shown in messages."""
        self.root = root
        self.url = root if self.is_local or "://" in root else f"{self.protocol}://{root}"
        self._shown = _redact(self.url, self._secrets)

    @property
    def name(self) -> str:
        """The last segment of the root: a run folder's name."""
        return self.root.replace(os.sep, "/").rstrip("/").rsplit("/", 1)[-1]

    def __repr__(self) -> str:
        return f"Storage({self._shown!r})"

    @property
    def endpoint(self) -> str:
        """The service the store lives on when its options name one (``endpoint_url``, as
        for MinIO or a second S3 region): the same bucket on two services is two places."""
        options = self.fs.storage_options
        found = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
            "endpoint_url"
        )
        return str(found or "")

    @property
    def exclusive(self) -> bool:
        """Whether this backend creates files exclusively, so concurrent writers are safe."""
        return self.protocol in EXCLUSIVE_PROTOCOLS

    def child(self, rel: str, *, read_only: bool | None = None) -> Storage:
        """A `Storage` rooted at ``rel`` below this one, sharing the filesystem."""
        new = object.__new__(Storage)
        new.fs, new.protocol, new.is_local = self.fs, self.protocol, self.is_local
        new._secrets, new._options = self._secrets, self._options
        new.single_writer = self.single_writer
        new._set_root(self.path(rel))
        new.read_only = self.read_only if read_only is None else read_only
        return new

    def at(self, url: str, *, read_only: bool | None = None) -> Storage:
        """A `Storage` for another URL: on this filesystem (and its options) when the scheme
        matches; else a new one, with this one's options when this one is local (a local
        folder takes none: they were given for the other location, as ``-o`` is), else none."""
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        ro = self.read_only if read_only is None else read_only
        if scheme not in protocols or self.is_local:
            options = self._options if self.is_local else None
            return Storage(url, options, read_only=ro, single_writer=self.single_writer)
        new = self.child("", read_only=ro)
        new._set_root(str(self.fs._strip_protocol(url)).rstrip("/"))
        return new

    def _io(self, rel: str, *, writing: bool = False) -> contextlib.AbstractContextManager[None]:
        bucket = self._bucket() if writing and self.protocol in _BUCKET_PROTOCOLS else None
        return _translate(self.where(rel), self._secrets, bucket)

    def _bucket(self) -> str:
        """The first part of an object store's root: its bucket."""
        return self.root.split("/", 1)[0]

    def path(self, rel: str = "") -> str:
        """The backend path of ``rel``."""
        if not rel:
            return self.root
        if self.is_local:
            return os.path.join(self.root, *rel.split("/"))
        return f"{self.root}/{rel}"

    def where(self, rel: str = "") -> str:
        """A location for messages: the local path or URL of ``rel``."""
        if self.is_local:
            return self.path(rel)
        return f"{self._shown}/{rel}" if rel else self._shown

    def _writable(self, rel: str) -> None:
        if self.read_only:
            raise ReadOnlyError("the store was opened read-only", location=self.where(rel))
        if not (self.exclusive or self.single_writer):
            raise ReadOnlyError(
                f"{self.protocol}:// cannot create files exclusively, so concurrent writers "
                "could lose commits (COMMIT-10)",
                location=self.where(rel),
                hint="if only one process writes here, open the store with single_writer=True "
                "(CLI: --single-writer)",
            )

    # reads

    def read(self, rel: str) -> bytes:
        with self._io(rel):
            if self.is_local:
                with open_regular(self.path(rel)) as f:
                    return f.read()
            if self.protocol in ("s3", "s3a"):
                one_get: bytes = self.fs.cat_file(self.path(rel), max_concurrency=1)
                return one_get
            data: bytes = self.fs.cat_file(self.path(rel))
            return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with self._io(rel):
            if self.is_local:
                with open_regular(self.path(rel)) as f:
                    f.seek(start)
                    return f.read(end - start)
            data: bytes = self.fs.cat_file(self.path(rel), start=start, end=end)
            return data

    def open_read(self, rel: str) -> IO[bytes]:
        with self._io(rel):
            if self.is_local:
                return open_regular(self.path(rel))
            f: IO[bytes] = self.fs.open(self.path(rel), "rb", block_size=4 << 20)
            return f

    def read_prefix(self, rel: str, nbytes: int) -> Iterator[bytes]:
        """The first ``nbytes`` bytes of a file, in chunks; `ChecksumMismatchError` when the
        file is shorter."""
        if nbytes <= _READ_CHUNK:
            data = self.read_range(rel, 0, nbytes) if nbytes else b""
            if len(data) != nbytes:
                raise ChecksumMismatchError(
                    f"file has {len(data)} bytes, fewer than its listed length {nbytes} (CHECK-1)",
                    location=self.where(rel),
                )
            yield data
            return
        remaining = nbytes
        with self.open_read(rel) as f:
            while remaining:
                chunk = f.read(min(_READ_CHUNK, remaining))
                if not chunk:
                    raise ChecksumMismatchError(
                        f"file ends {remaining} bytes before its listed length {nbytes} (CHECK-1)",
                        location=self.where(rel),
                    )
                remaining -= len(chunk)
                yield chunk

    def prefix_sha256(self, rel: str, nbytes: int) -> str | None:
        """The sha256 of a file's first ``nbytes`` bytes; None when it is missing or shorter."""
        digest = hashlib.sha256()
        try:
            for chunk in self.read_prefix(rel, nbytes):
                digest.update(chunk)
        except (FileNotFoundError, ChecksumMismatchError):
            return None
        return digest.hexdigest()

    def exists(self, rel: str = "") -> bool:
        with self._io(rel):
            if self.is_local:
                return os.path.exists(self.path(rel))
            return bool(self.fs.exists(self.path(rel)))

    def missing(self) -> str | None:
        """``"bucket"`` or ``"folder"`` when the store's root cannot be there, else None. On
        an object store only a missing bucket counts: a prefix exists once written to."""
        if self.fs.root_marker == "":  # object stores: the first path part is the bucket
            try:
                with self._io(""):
                    self.fs.info(self._bucket())  # exists() would take any failure for "no"
            except FileNotFoundError:
                return "bucket"
            return None
        return None if self.is_dir() else "folder"

    def is_dir(self, rel: str = "") -> bool:
        with self._io(rel):
            if self.is_local:
                return os.path.isdir(self.path(rel))
            return bool(self.fs.isdir(self.path(rel)))

    def is_link(self, rel: str) -> bool:
        return self.is_local and os.path.islink(self.path(rel))

    def is_file(self, rel: str) -> bool:
        """Whether ``rel`` is a regular file, not a FIFO, device or folder (LAYOUT-3); an
        object store holds nothing else."""
        if not self.is_local:
            return True
        try:
            return stat.S_ISREG(os.lstat(self.path(rel)).st_mode)
        except FileNotFoundError:
            return False

    def size(self, rel: str) -> int | None:
        """The size of a file, or None when it does not exist."""
        try:
            with self._io(rel):
                if self.is_local:
                    return os.stat(self.path(rel)).st_size
                return int(self.fs.size(self.path(rel)))
        except FileNotFoundError:
            return None

    def modified(self, rel: str) -> datetime | None:
        """When the storage says a file was last written, by its own clock (an object
        store's, or this machine's for local disk); None when missing or not told."""
        try:
            with self._io(rel):
                if self.is_local:
                    return datetime.fromtimestamp(os.stat(self.path(rel)).st_mtime, UTC)
                try:
                    found = self.fs.modified(self.path(rel))
                except (NotImplementedError, IsADirectoryError):  # a backend that keeps none
                    return None
        except FileNotFoundError:
            return None
        if not isinstance(found, datetime):
            return None
        return found if found.tzinfo else found.replace(tzinfo=UTC)

    def mtime_ns(self, rel: str) -> int | None:
        """A change stamp of a file (local mtime), or None where the backend has none cheaply."""
        if not self.is_local:
            return None
        try:
            return os.stat(self.path(rel)).st_mtime_ns
        except FileNotFoundError:
            return None

    def list(self, rel: str = "") -> list[Entry]:
        """The children of a folder, without local state (names starting with '.')."""
        try:
            with self._io(rel):
                if self.is_local:
                    with os.scandir(self.path(rel)) as it:
                        return [
                            Entry(e.name, e.is_dir(follow_symlinks=False), 0)
                            for e in it
                            if not e.name.startswith(".")
                        ]
                self.fs.invalidate_cache(self.path(rel))
                infos = self.fs.ls(self.path(rel), detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for info in infos:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if name and not name.startswith(".") and info["name"].rstrip("/") != self.path(rel):
                version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) is not None), "")
                size = int(info.get("size") or 0)
                out.append(Entry(name, info["type"] == "directory", size, version))
        return out

    def names(self, rel: str = "") -> tuple[str, ...]:
        """The names of a folder's children, without local state; cheaper than `list`."""
        if not self.is_local:
            return tuple(e.name for e in self.list(rel))
        try:
            with self._io(rel):
                return tuple(n for n in os.listdir(self.path(rel)) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return ()

    def walk(self, rel: str = "") -> dict[str, int]:
        """Every file below ``rel`` (relative to ``rel``) with its size, local state excluded."""
        base = self.path(rel)
        found: dict[str, int] = {}
        with self._io(rel):
            if self.is_local:
                for dirpath, dirnames, filenames in os.walk(base):
                    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                    for name in filenames:
                        if not name.startswith("."):
                            full = os.path.join(dirpath, name)
                            relpath = os.path.relpath(full, base).replace(os.sep, "/")
                            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                                found[relpath] = os.lstat(full).st_size
                return found
            self.fs.invalidate_cache(base)
            listed = self.fs.find(base, detail=True, withdirs=False)
            for folder in {full.rsplit("/", 1)[0] for full in listed}:
                self.fs.invalidate_cache(folder)  # find cached listings that exists() would trust
            for full, info in listed.items():
                relpath = full[len(base) :].lstrip("/")
                if full.endswith("/"):
                    continue  # a folder marker: a zero-byte key that S3 tools show as a folder
                if relpath and not any(p.startswith(".") for p in relpath.split("/")):
                    found[relpath] = int(info.get("size") or 0)
        return found

    def symlinks(self, rel: str = "") -> set[str]:
        """Run-relative paths below ``rel`` that are symbolic links (local disk only)."""
        if not self.is_local:
            return set()
        base = self.path(rel)
        links = set()
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    links.add(os.path.relpath(full, base).replace(os.sep, "/"))
        return links

    def inside(self, rel: str) -> bool:
        """Whether ``rel`` resolves inside the root with no symbolic link on the way."""
        if not self.is_local:
            return ".." not in rel.split("/")
        root = os.path.realpath(self.root)
        return os.path.realpath(self.path(rel)) == os.path.join(root, *rel.split("/"))

    # writes

    def makedirs(self, rel: str) -> None:
        self._writable(rel)
        with self._io(rel):
            if self.is_local:
                os.makedirs(self.path(rel), exist_ok=True)
            else:
                self.fs.makedirs(self.path(rel), exist_ok=True)

    def write_atomic(self, rel: str, data: bytes, *, durable: bool = True) -> None:
        """Replace ``rel`` with ``data`` so readers see the old or the new bytes, never a mix.

        ``durable=False`` skips the two ``fsync`` calls, for a copy that no reader
        relies on after a power loss (``manifest.json``, COMMIT-7).
        """
        self._writable(rel)
        with self._io(rel, writing=True):
            if not self.is_local:
                self._remote(rel, lambda path: self.fs.pipe_file(path, data))
                return
            target = self.path(rel)
            tmp = self._local_temp(target, data, durable=durable)
            try:
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if durable:
                _fsync_dir(os.path.dirname(target))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` unless it exists; False when it exists (COMMIT-2)."""
        self._writable(rel)
        with self._io(rel, writing=True):
            if self.is_local:
                target = self.path(rel)
                tmp = self._local_temp(target, data)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in _NO_HARD_LINKS:
                        raise
                    raise StorageError(
                        "this filesystem makes no hard links, by which a local commit creates "
                        "a file exclusively and whole (COMMIT-2)",
                        location=target,
                        hint="write runs on a filesystem with hard links (ext4, XFS, APFS, "
                        "NTFS) and copy them here: reading, verifying and listing work here",
                    ) from None
                finally:
                    os.unlink(tmp)
                _fsync_dir(os.path.dirname(target))
                return True
            if self.protocol == "memory":
                with _MEMORY_LOCK:
                    if self.fs.exists(self.path(rel)):
                        return False
                    self.fs.pipe_file(self.path(rel), data)
                    return True
            try:
                self._remote(rel, lambda path: self.fs.pipe_file(path, data, mode="create"))
            except FileExistsError:
                return False
            except OSError as exc:
                if _create_refused(exc):
                    return False
                raise
            return True

    def put(self, rel: str, data: bytes) -> None:
        """Write a whole new file (one that no reader trusts until a manifest lists it)."""
        self._writable(rel)
        with self._io(rel, writing=True):
            if self.is_local:
                target = self.path(rel)
                _make_folders(os.path.dirname(target))
                with open(target, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(os.path.dirname(target))
            else:
                self._remote(rel, lambda path: self.fs.pipe_file(path, data))

    def put_stream(self, rel: str, chunks: Iterable[bytes]) -> None:
        """Write a whole file from ``chunks``; it appears complete or not at all."""
        self._writable(rel)
        with self._io(rel, writing=True):
            if not self.is_local:
                out = self._remote(
                    rel, lambda path: self.fs.open(path, "wb", block_size=_STREAM_BLOCK)
                )
                try:
                    for chunk in chunks:
                        out.write(chunk)
                except BaseException:
                    with contextlib.suppress(Exception):
                        out.discard()
                        out.closed = True
                    raise
                out.close()
                return
            target = self.path(rel)
            _make_folders(os.path.dirname(target))
            tmp = os.path.join(os.path.dirname(target), _TEMP_PREFIX + secrets.token_hex(16))
            try:
                with open(tmp, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            _fsync_dir(os.path.dirname(target))

    def upload(self, rel: str, local_path: str) -> None:
        """Write a whole file from a local one (in parallel parts where the backend can)."""
        self._writable(rel)
        with self._io(rel):
            self._remote(rel, lambda path: self.fs.put_file(local_path, path))

    def open_append(self, rel: str) -> AppendFile:
        """A local file opened for appending (created if missing)."""
        self._writable(rel)
        if not self.is_local:
            raise StorageError("append is only offered on local disk", location=self.where(rel))
        with self._io(rel):
            target = self.path(rel)
            _make_folders(os.path.dirname(target))
            return AppendFile(target)

    def truncate(self, rel: str, size: int) -> None:
        """Cut a local file back to ``size`` bytes, durably. A file that other hard links
        share (a fork's, FORK-3) is not cut: its first ``size`` bytes replace this name's
        as a file of its own, and the other names keep every byte."""
        self._writable(rel)
        with self._io(rel), open(self.path(rel), "r+b") as f:
            if os.fstat(f.fileno()).st_nlink == 1:
                f.truncate(size)
                os.fsync(f.fileno())
                return

            def prefix() -> Iterator[bytes]:
                left = size
                while left and (chunk := f.read(min(left, _READ_CHUNK))):
                    left -= len(chunk)
                    yield chunk

            self.put_stream(rel, prefix())

    def unshare(self, rel: str) -> None:
        """Give a local file that other hard links share (a fork's, FORK-3) a copy of its
        own under ``rel``, so that what is written to it next reaches no other name."""
        self._writable(rel)
        if not self.is_local:
            return
        with self._io(rel), open(self.path(rel), "rb") as f:
            if os.fstat(f.fileno()).st_nlink > 1:
                self.put_stream(rel, iter(lambda: f.read(_READ_CHUNK), b""))

    def delete(self, rel: str) -> None:
        self._writable(rel)
        with contextlib.suppress(FileNotFoundError), self._io(rel):
            if self.is_local:
                os.unlink(self.path(rel))
            else:
                self.fs.rm_file(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        self._writable(rel)
        with contextlib.suppress(FileNotFoundError), self._io(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def local_state(self, rel: str = "") -> tuple[str, ...]:
        """Names of the local state (names starting with '.') in a local folder; () elsewhere."""
        if not self.is_local:
            return ()
        try:
            with self._io(rel), os.scandir(self.path(rel)) as it:
                return tuple(sorted(e.name for e in it if e.name.startswith(".")))
        except (FileNotFoundError, NotADirectoryError):
            return ()

    def rename(self, rel: str, new_rel: str) -> None:
        """Rename a local file or folder atomically; `StorageError` if ``new_rel`` is taken."""
        self._writable(rel)
        if not self.is_local:
            raise StorageError("rename is only offered on local disk", location=self.where(rel))
        with self._io(rel):
            if os.path.lexists(self.path(new_rel)):
                raise StorageError(f"{new_rel} exists", location=self.where(new_rel))
            os.rename(self.path(rel), self.path(new_rel))
            _fsync_dir(os.path.dirname(self.path(new_rel)))

    def link_from(
        self,
        source: Storage,
        src_rel: str,
        rel: str,
        length: int,
        sha256: str,
        *,
        link: bool = True,
    ) -> bool:
        """Make ``rel`` hold the first ``length`` bytes of ``source``'s ``src_rel``, whose
        sha256 they must have (else `ChecksumMismatchError`, and ``rel`` is not made).

        A hard link (True) when ``link`` is set, both are on one local filesystem
        and the source is exactly ``length`` bytes long; a copy otherwise (False),
        hashed as it streams.
        """
        self._writable(rel)
        where = source.where(src_rel)
        if link and self.is_local and source.is_local and source.size(src_rel) == length:
            if source.prefix_sha256(src_rel, length) != sha256:
                raise _digest_mismatch(where)
            with self._io(rel):
                target = self.path(rel)
                _make_folders(os.path.dirname(target))
                try:
                    os.link(source.path(src_rel), target)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                else:
                    _fsync_dir(os.path.dirname(target))
                    return True

        def checked() -> Iterator[bytes]:
            digest = hashlib.sha256()
            for chunk in source.read_prefix(src_rel, length):
                digest.update(chunk)
                yield chunk
            if digest.hexdigest() != sha256:
                raise _digest_mismatch(where)

        self.put_stream(rel, checked())
        return False

    def _remote(self, rel: str, write: Callable[[str], _T]) -> _T:
        """``write`` the backend path of ``rel``, first making its folder on a backend that
        has folders (an object store has none: there a missing one is a missing bucket)."""
        path = self.path(rel)
        try:
            return write(path)
        except FileNotFoundError:
            if self.protocol in _BUCKET_PROTOCOLS:
                raise
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            return write(path)

    def _local_temp(self, target: str, data: bytes, *, durable: bool = True) -> str:
        directory = os.path.dirname(target)
        tmp = os.path.join(directory, _TEMP_PREFIX + secrets.token_hex(16))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:
            _make_folders(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # a full disk gets its space back
            raise
        os.close(fd)
        return tmp


class AppendFile:
    """A local file that grows by whole writes, each made durable by `sync`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self._fd).st_size
        self._new = self.size == 0

    def write(self, data: bytes) -> None:
        with _translate(self.path):
            _write_all(self._fd, data)
        self.size += len(data)

    def truncate(self, size: int) -> None:
        """Cut the file back to ``size`` bytes, durably, if it holds more."""
        with _translate(self.path):
            if os.fstat(self._fd).st_size > size:
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)
        self.size = size

    def sync(self) -> None:
        with _translate(self.path):
            os.fsync(self._fd)
            if self._new:
                _fsync_dir(os.path.dirname(self.path))
                self._new = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def check_url(url: str) -> None:
    """Refuse ``s3:/bucket`` and ``s3:bucket`` (a URL missing a slash would name a local
    folder ``s3:``), a protocol fsspec does not know, a URL naming no folder or bucket
    (``file://`` would be the working directory), and a chained one (``simplecache::``)."""
    if "::" in url:
        raise InvalidInputError(
            f"{url!r} chains filesystems (fsspec's `::`), which runfmt does not",
            hint="give the store's own URL, such as s3://bucket/runs",
        )
    scheme, sep, rest = url.partition("://")
    if sep:
        known = known_implementations.keys() | registry.keys()
        if scheme not in known:
            lower = scheme.lower() in known
            raise InvalidInputError(
                f"{url!r}: unknown protocol {scheme!r}",
                hint=f"write {scheme.lower()}://{rest}" if lower
                else "fsspec knows file, memory, s3, gs, az, … (some need their package)",
            )  # fmt: skip
        if not rest.strip("/"):
            raise InvalidInputError(
                f"{url!r} names no folder or bucket",
                hint="give one, such as file:///data/runs or s3://bucket/runs",
            )
    found = _SHORT_URL.match(url)
    scheme = found[1].lower() if found else "file"
    if scheme not in ("file", "local") and scheme in fsspec.available_protocols():
        rest = url[found.end() :].lstrip("/") if found else url
        raise InvalidInputError(
            f"{url!r} is a {scheme}: URL missing a slash",
            hint=f"write {scheme}://{rest}, or ./{url} for a local folder",
        )


def _digest_mismatch(where: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        "sha256 of the listed bytes does not match (CHECK-1)",
        location=where,
        hint="run `runfmt verify` on the run it comes from",
    )


def _make_folders(directory: str) -> None:
    """Create ``directory`` and its missing parents, each new one made durable by a sync of
    its parent (a folder's entry is data of its parent)."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        _fsync_dir(os.path.dirname(folder))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
