"""Cache keys and config fingerprints: RFC 8785 canonical JSON, then sha256 (spec §8)."""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785

from runfmt.errors import InvalidInputError

__all__ = ["KEY_SCHEME", "canonical_json", "compute_key"]

KEY_SCHEME = "k1"
"""Key scheme 1: ``k1:`` + lowercase hex sha256 of the RFC 8785 form of the inputs."""


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 (JCS) canonical UTF-8 form of a JSON value."""
    try:
        return bytes(rfc8785.dumps(value))
    except (rfc8785.CanonicalizationError, TypeError, UnicodeEncodeError) as exc:
        raise InvalidInputError(
            f"value has no canonical JSON form: {exc}",
            hint="keys take JSON values only: no NaN/Infinity, integers within ±2^53, "
            "string member names",
        ) from None


def compute_key(inputs: Any) -> str:
    """The standard key of ``inputs``: the same in every language that implements RFC 8785."""
    return f"{KEY_SCHEME}:{hashlib.sha256(canonical_json(inputs)).hexdigest()}"
