"""Records: JSON objects encoded one per line as UTF-8 JSON Lines (spec §6)."""

from __future__ import annotations

import itertools
import json
import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from runfmt.errors import InvalidInputError, StageFileError

__all__ = [
    "ERROR_FIELD",
    "MAX_DEPTH",
    "PARENTS_FIELD",
    "Record",
    "decode_lines",
    "encode_many",
    "encode_record",
    "encode_records",
    "first_too_deep",
    "is_failure",
    "is_key",
    "line_of",
    "record_key",
    "too_deep",
]

Record = dict[str, Any]
ERROR_FIELD = "_error"
"""A record whose ``_error`` member is present and not null marks a failure (REC-5)."""
PARENTS_FIELD = "_parents"
MAX_KEY_LENGTH = 1024
MAX_DEPTH = 254
"""How deep objects and arrays may nest in a record or manifest, counting the outermost
(REC-3, MAN-1): as deep as orjson writes."""
_OPTS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_SCALARS = frozenset((str, int, bool, type(None)))
_FLAT = _SCALARS | {float}
_KEY_TYPES = frozenset((str, type(None)))
_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1
"""The integers orjson writes."""


def encode_record(record: Mapping[str, Any], key_field: str | None = None) -> bytes:
    """One record as a compact JSON line ending in ``\\n``.

    Refuses what would not read back as the same JSON object: non-objects,
    non-string member names, NaN and infinities, values JSON has no type for.
    """
    if not isinstance(record, dict):
        raise InvalidInputError(
            f"a record must be a JSON object (a dict), not {type(record).__name__}"
        )
    try:
        line = _line(record)
    except (TypeError, orjson.JSONEncodeError) as exc:
        if too_deep(record):
            raise InvalidInputError(
                f"record nests objects and arrays more than {MAX_DEPTH} levels deep (REC-3)"
            ) from None
        raise _unserializable(record, exc) from None
    if not _all_finite(record):
        _exact_check(record)
    if key_field is not None:
        key = record.get(key_field)
        if key is not None and not is_key(key):
            raise InvalidInputError(
                f"record key field {key_field!r} must be a non-empty string of at most "
                f"{MAX_KEY_LENGTH} characters, not {key!r:.60}"
            )
    return line


def encode_many(records: list[Any], key_field: str | None = None) -> bytes | None:
    """`encode_record` of each record, joined, at C speed; None when one of them needs
    `encode_record`.

    None means "not sure" (a refused record, a NaN, a type needing the exact
    check), never "refused": the caller then encodes one by one.
    """
    if not records or set(map(type, records)) != {dict}:
        return None
    try:
        lines = b"".join(map(_line, records))
    except (TypeError, orjson.JSONEncodeError):
        return None
    if not _all_plain(records):
        return None
    if key_field is not None:
        keys = list(map(dict.get, records, itertools.repeat(key_field)))
        named = list(filter(None, keys))
        if (
            not set(map(type, keys)) <= _KEY_TYPES
            or len(named) + keys.count(None) != len(keys)
            or (named and max(map(len, named)) > MAX_KEY_LENGTH)
        ):
            return None
    return lines


def _line(record: dict[str, Any]) -> bytes:
    # A copy: orjson's own output keeps its over-allocated buffer, and holding thousands
    # of those until the next flush costs more than the encoding itself.
    return orjson.dumps(record, option=_OPTS) + b"\n"


def _all_plain(records: list[dict[str, Any]]) -> bool:
    """`_all_finite` of every record, at C speed when no record holds an array or object.

    A sum of floats is a finite number only if each of them is one (an overflow, which a
    sum of finite floats may reach, sends the records to `_all_finite`).
    """
    values = list(itertools.chain.from_iterable(map(dict.values, records)))
    types = list(map(type, values))
    kinds = set(types)
    if kinds <= _SCALARS:
        return True
    if kinds <= _FLAT:
        floats = itertools.compress(values, map(operator.is_, types, itertools.repeat(float)))
        if math.isfinite(sum(floats)):
            return True
    return all(map(_all_finite, records))


def _exact_check(record: dict[str, Any]) -> None:
    """Refuse what stdlib json refuses, though orjson would encode it.

    orjson writes NaN and infinities as null, and UUIDs or enums as their
    values: none of those reads back as the same record.
    """
    try:
        json.dumps(record, allow_nan=False)
    except ValueError:
        raise InvalidInputError(
            f"record member {_first_unwritable(record)} is NaN or Infinity, which JSON "
            "cannot represent",
            hint="write null, or the value as a string",
        ) from None
    except TypeError as exc:
        raise _unserializable(record, exc) from None


def _unserializable(record: dict[str, Any], exc: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"record member {_first_unwritable(record)} is not JSON-serializable ({exc})",
        hint="convert it to a JSON type first (str(value), value.isoformat(), ...)",
    )


def _first_unwritable(record: dict[str, Any]) -> str:
    """The path (``a.b[2]``) of the first value in ``record`` that is no plain JSON value
    (another type, NaN or an infinity) or whose member name is no string, else ``?``."""
    stack: list[tuple[str, Any]] = [("", record)]
    while stack:
        path, value = stack.pop()
        kind = type(value)
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, str):
                    return f"{path}.{k!r}".lstrip(".") + " (a member name that is no string)"
            stack.extend((f"{path}.{k}".lstrip("."), v) for k, v in reversed(value.items()))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif (
            (kind is float and value - value)
            or (isinstance(value, int) and not _MIN_INT <= value <= _MAX_INT)
            or (kind not in _FLAT and not isinstance(value, str | int | float | list))
        ):
            return repr(path)
    return "?"


def _all_finite(record: dict[str, Any]) -> bool:
    """Whether ``record`` holds only plain JSON types and finite floats (orjson writes NaN as null).

    False sends the caller to `_exact_check`, which also sees types orjson knows and json not.
    """
    for value in record.values():
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is not float:
            return _all_finite_nested(record)
        if value - value:
            return False
    return True


def _all_finite_nested(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float:
            if item - item:
                return False
        elif kind not in _SCALARS:
            return False
    return True


def too_deep(value: Any) -> bool:
    """Whether ``value``'s objects and arrays nest more than `MAX_DEPTH` levels deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        inner = item.values() if type(item) is dict else item if type(item) is list else ()
        stack.extend((v, depth + 1) for v in inner if type(v) is dict or type(v) is list)
    return False


def first_too_deep(payload: bytes, records: list[Record]) -> int | None:
    """The 1-based line of the first of ``records`` (decoded from ``payload``) that
    `too_deep` refuses; lines too short to nest that deep are not looked into."""
    shortest = 2 * MAX_DEPTH + 2
    lines = payload.split(b"\n")
    if max(map(len, lines)) < shortest:
        return None
    for n, (line, record) in enumerate(zip(lines, records, strict=False), 1):
        if (
            len(line) >= shortest
            and line.count(b"{") + line.count(b"[") > MAX_DEPTH
            and too_deep(record)
        ):
            return n
    return None


def line_of(record: Record) -> bytes:
    """A record read from a stage file as a compact JSON line again; `StageFileError` for
    one nested deeper than readers must take (REC-3), which orjson refuses to write."""
    try:
        return orjson.dumps(record) + b"\n"
    except TypeError:
        raise StageFileError(
            f"a record nests objects and arrays more than {MAX_DEPTH} levels deep (REC-3)",
            hint="run `runfmt verify` on the run: no conforming writer wrote it",
        ) from None


def encode_records(records: Iterable[Mapping[str, Any]], key_field: str | None = None) -> bytes:
    """Encode many records; on a bad one nothing is returned and the error names its position."""
    lines = []
    for i, record in enumerate(records):
        try:
            lines.append(encode_record(record, key_field))
        except InvalidInputError as exc:
            raise exc.at(f"record {i}") from None
    return b"".join(lines)


def decode_lines(payload: bytes) -> list[Record]:
    """Decode a frame's content: whole lines, each one JSON object (REC-1..REC-3).

    Raises `StageFileError` whose ``line`` attribute-free message names the
    1-based line within the payload.
    """
    if not payload:
        return []
    if not payload.endswith(b"\n"):
        raise StageFileError("frame content does not end with a newline (REC-2)")
    lines = payload.split(b"\n")[:-1]
    try:
        records = list(map(orjson.loads, lines))
    except orjson.JSONDecodeError:
        pass
    else:
        if set(map(type, records)) == {dict}:
            return records
    return _decode_one_by_one(lines)


def _decode_one_by_one(lines: list[bytes]) -> list[Record]:
    """`decode_lines` line by line, raising for the first bad line."""
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise StageFileError(f"line {n}: not valid UTF-8 JSON: {exc} (REC-1)") from None
        if type(record) is not dict:
            raise StageFileError(f"line {n}: not a JSON object (REC-1)")
        records.append(record)
    return records


def is_failure(record: Mapping[str, Any]) -> bool:
    """Whether the record marks a failure: it has a non-null ``_error`` member."""
    return record.get(ERROR_FIELD) is not None


def is_key(value: object) -> bool:
    """Whether ``value`` can be a record's key: a string of 1 to 1024 code points (REC-6)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_KEY_LENGTH


def record_key(record: Mapping[str, Any], key_field: str | None) -> str | None:
    """The record's cache key, or None when the stage has no key field or the record none
    (a value that breaks REC-6 is no key)."""
    if key_field is None:
        return None
    key = record.get(key_field)
    return key if is_key(key) else None
