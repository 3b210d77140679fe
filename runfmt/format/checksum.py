"""Digests: sha256 hex strings and the coreutils ``SHA256SUMS`` file (spec §7)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from runfmt.errors import FormatError

__all__ = ["format_sums", "is_sha256", "parse_sums", "sha256_hex"]

_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a lowercase 64-digit hex sha256."""
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


def format_sums(entries: Iterable[tuple[str, str]]) -> str:
    """``SHA256SUMS`` text for (path, sha256) pairs: ``<hex>  <path>`` lines, sorted by path."""
    return "".join(f"{digest}  {path}\n" for path, digest in sorted(entries))


def parse_sums(text: str) -> dict[str, str]:
    """Parse ``SHA256SUMS`` text into {path: sha256}."""
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, path = line.partition("  ")
        if not sep or not is_sha256(digest) or not path:
            raise FormatError(f"line {n}: not a '<sha256>  <path>' line", location="SHA256SUMS")
        sums[path] = digest
    return sums
