"""Local-disk helpers: opening files for reading without ever blocking on what is not a
file, and telling whether a folder is, or lies in, a run folder.

Kept apart from `runfmt.storage` so that the index's local fast path and the command
line's start-up can use them without importing fsspec.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO

from runfmt.format import names

__all__ = ["NotAFileError", "open_regular", "run_folder_around"]

_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)
)  # fmt: skip


class NotAFileError(FileNotFoundError):
    """A local path holds a folder, a FIFO or a device where a file was expected: for a
    reader, the file is missing."""


def open_regular(path: str) -> IO[bytes]:
    """Open a local file for reading; `FileNotFoundError` unless it is a regular file.

    Opened without blocking and checked before any read: a FIFO or a device at a listed
    path must not hang a reader (ERR-1); a folder or a FIFO is no file (LAYOUT-3), and a
    symbolic link is not followed (LAYOUT-5).
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise NotAFileError(errno.ENOENT, "a symbolic link, not a file", path) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFileError(errno.ENOENT, "not a regular file", path)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def run_folder_around(path: str) -> str | None:
    """The local run folder that ``path`` is or lies in, by its path or through links:
    one whose ``_manifests/`` holds a revision (LAYOUT-2); else None."""
    for start in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        here = start
        while True:
            try:
                found = os.listdir(os.path.join(here, names.MANIFESTS_DIR))
            except OSError:
                found = []
            if any(map(names.parse_revision_file, found)):
                return here
            if (parent := os.path.dirname(here)) == here:
                break
            here = parent
    return None
