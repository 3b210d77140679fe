"""The one exception hierarchy of runfmt.

::

    RunfmtError
    ├── FormatError (ValueError)            stored bytes break the spec
    │   ├── ManifestError                   a manifest is unreadable or invalid
    │   ├── StageFileError                  a stage file is malformed (frames, header, lines)
    │   ├── ChecksumMismatchError           bytes do not match their listed length/sha256
    │   └── UnsupportedFormatError          newer MAJOR version or unknown required feature
    ├── InvalidInputError (ValueError)      the caller asked for something the spec forbids
    ├── RunNotFoundError (FileNotFoundError)
    ├── RunExistsError (FileExistsError)
    ├── LockTimeoutError (TimeoutError)     another writer holds the lock
    ├── ConflictError                       another writer got there first
    ├── ReadOnlyError (PermissionError)     a change was asked of a read-only store or run
    ├── StorageError (OSError)              backend failure; the original is ``__cause__``
    └── IndexStaleError                     the index needs a rebuild, and says how

Every error carries where it happened (``location``: a run, a file, a file and a
line), what was wrong (``problem``) and, where there is one, what to do
(``hint``). ``str()`` renders ``location: problem (hint)``. Errors pickle, so
worker processes can raise them across process boundaries.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ChecksumMismatchError",
    "ConflictError",
    "FormatError",
    "IndexStaleError",
    "InvalidInputError",
    "LockTimeoutError",
    "ManifestError",
    "ReadOnlyError",
    "RunExistsError",
    "RunNotFoundError",
    "RunfmtError",
    "StageFileError",
    "StorageError",
    "UnsupportedFormatError",
]


class RunfmtError(Exception):
    """Base of every error runfmt raises on purpose."""

    def __init__(self, problem: str, *, location: str = "", hint: str = "") -> None:
        self.problem = problem
        self.location = location
        self.hint = hint
        super().__init__(problem)

    def __str__(self) -> str:
        text = f"{self.location}: {self.problem}" if self.location else self.problem
        return f"{text} ({self.hint})" if self.hint else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.problem, self.location, self.hint))

    def at(self, location: str) -> RunfmtError:
        """Set the location when none is known yet; return self for ``raise err.at(...)``."""
        if not self.location:
            self.location = location
        return self


def _rebuild(cls: type[RunfmtError], problem: str, location: str, hint: str) -> RunfmtError:
    return cls(problem, location=location, hint=hint)


class FormatError(RunfmtError, ValueError):
    """Stored bytes break the spec."""


class ManifestError(FormatError):
    """A manifest is unreadable or breaks the manifest rules."""


class StageFileError(FormatError):
    """A stage file is malformed: prefix, header, zstd frames or JSON lines."""


class ChecksumMismatchError(FormatError):
    """Stored bytes do not match their listed length or sha256."""


class UnsupportedFormatError(FormatError):
    """The data needs a newer reader: a newer MAJOR version or an unknown required feature."""


class InvalidInputError(RunfmtError, ValueError):
    """The caller asked for something the spec forbids (bad name, bad record, ...)."""


class RunNotFoundError(RunfmtError, FileNotFoundError):
    """No run at that id or path."""


class RunExistsError(RunfmtError, FileExistsError):
    """A run with that id exists already."""


class LockTimeoutError(RunfmtError, TimeoutError):
    """Another process holds the lock and did not release it in time."""


class ConflictError(RunfmtError):
    """Another writer changed the same thing first and the change cannot be merged."""


class ReadOnlyError(RunfmtError, PermissionError):
    """A change was asked of a store or run opened read-only."""


class StorageError(RunfmtError, OSError):
    """The storage backend failed; the original exception is ``__cause__``."""


class IndexStaleError(RunfmtError):
    """The index cannot answer until it is rebuilt."""
