"""Records as JSON lines (REC-*): what is written reads back as the same object, or is refused."""

from __future__ import annotations

import datetime
import decimal
import enum
import math
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runfmt.errors import InvalidInputError, StageFileError
from runfmt.format.records import (
    decode_lines,
    encode_record,
    encode_records,
    is_failure,
    record_key,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
records = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Big(enum.IntEnum):
    HUGE = 2**64


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, with -0.0 and 0.0 and int/float kept apart."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float):
        return type(b) is float and a == b and math.copysign(1, a) == math.copysign(1, b)
    return type(a) is type(b) and a == b


@settings(max_examples=50)
@given(records)
def test_record_round_trips(record: dict[str, Any]) -> None:
    line = encode_record(record)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    [back] = decode_lines(line)
    assert same(back, record)


@settings(max_examples=20)
@given(st.lists(records, max_size=5))
def test_many_records_round_trip_in_order(batch: list[dict[str, Any]]) -> None:
    back = decode_lines(encode_records(batch))
    assert len(back) == len(batch)
    assert all(map(same, back, batch))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2], "JSON object"),
        ("text", "JSON object"),
        (None, "JSON object"),
        (42, "JSON object"),
        ({"x": math.nan}, "NaN or Infinity"),
        ({"x": math.inf}, "NaN or Infinity"),
        ({"x": [1, {"y": -math.inf}]}, "NaN or Infinity"),
        ({1: "a"}, "not JSON-serializable"),
        ({("a",): 1}, "not JSON-serializable"),
        ({"when": datetime.datetime(2026, 1, 1)}, "not JSON-serializable"),
        ({"day": datetime.date(2026, 1, 1)}, "not JSON-serializable"),
        ({"x": decimal.Decimal("1.5")}, "not JSON-serializable"),
        ({"x": {1, 2}}, "not JSON-serializable"),
        ({"x": b"bytes"}, "not JSON-serializable"),
        ({"x": 2**64}, "member 'x' is not JSON-serializable"),
        ({"a": {"b": [1, -(2**63) - 1]}}, r"member 'a\.b\[1\]' is not JSON-serializable"),
        ({"a": (1, Big.HUGE)}, r"member 'a\[1\]' is not JSON-serializable"),
        ({"x": object()}, "not JSON-serializable"),
        ({"id": uuid.UUID(int=1)}, "not JSON-serializable"),
        ({"x": [{"color": Color.RED}]}, "not JSON-serializable"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v[:12],
)
def test_unrepresentable_records_are_refused(record: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        encode_record(record)


def test_str_and_int_subclasses_are_written_as_their_json_value() -> None:
    [back] = decode_lines(encode_record({"level": Level.HIGH, "t": (1, "a")}))
    assert back == {"level": 3, "t": [1, "a"]}


def test_nan_is_refused_even_beside_null() -> None:
    with pytest.raises(InvalidInputError, match="NaN"):
        encode_record({"a": None, "b": math.nan})


def test_bad_record_in_a_batch_is_named_and_nothing_returned() -> None:
    with pytest.raises(InvalidInputError) as info:
        encode_records([{"ok": 1}, {"ok": 2}, {"bad": math.nan}])
    assert info.value.location == "record 2"
    assert str(info.value).startswith("record 2: ")


@pytest.mark.parametrize("key", ["", "x" * 1025, 3, ["k"]])
def test_bad_keys_are_refused(key: object) -> None:
    with pytest.raises(InvalidInputError, match="key field 'id'"):
        encode_record({"id": key}, key_field="id")


def test_keys_and_failures() -> None:
    assert record_key({"id": "k1"}, "id") == "k1"
    assert record_key({"id": "k1"}, None) is None
    assert record_key({"other": 1}, "id") is None
    assert encode_record({"other": 1}, key_field="id") == b'{"other":1}\n'
    assert is_failure({"_error": "timeout"})
    assert is_failure({"_error": {"type": "E"}})
    assert not is_failure({"_error": None})
    assert not is_failure({"score": 1})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"a":1}', "does not end with a newline"),
        (b'{"a":1}\n[1]\n', "line 2: not a JSON object"),
        (b'{"a":1}\n\n', "line 2: not valid UTF-8 JSON"),
        (b'{"a":\xff}\n', "line 1: not valid UTF-8 JSON"),
        (b'{"a":NaN}\n', "line 1: not valid UTF-8 JSON"),
        (b'{"a":1\n', "line 1: not valid UTF-8 JSON"),
        (b'"x"\n', "line 1: not a JSON object"),
        (b'{"a":1}\n[1]\n{"a":\n', "line 2: not a JSON object"),
    ],
)
def test_bad_payloads_name_the_line_and_rule(payload: bytes, message: str) -> None:
    with pytest.raises(StageFileError, match=message) as info:
        decode_lines(payload)
    assert "REC-" in str(info.value)


def test_empty_payload_has_no_records() -> None:
    assert decode_lines(b"") == []


def _nested(levels: int) -> dict[str, Any]:
    """A record whose objects and arrays nest ``levels`` deep, the record included."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return {"v": value}


def test_records_nest_up_to_254_levels() -> None:
    """REC-3: writers refuse deeper records; readers accept that depth."""
    line = encode_record(_nested(254))
    assert decode_lines(line) == [_nested(254)]
    with pytest.raises(InvalidInputError, match=r"more than 254 levels deep \(REC-3\)"):
        encode_record(_nested(255))


def test_a_duplicate_member_name_keeps_the_last_value() -> None:
    """REC-3: a reader keeps the last value of a repeated member (or refuses the line)."""
    assert decode_lines(b'{"a":1,"a":2}\n') == [{"a": 2}]


def test_json_whitespace_around_a_line_is_read() -> None:
    """REC-1: RFC 8259 whitespace around the value is allowed (writers write none)."""
    assert decode_lines(b'{"a":1} \r\n\t{"b":2}\n') == [{"a": 1}, {"b": 2}]


def test_an_integer_beyond_a_double_is_refused() -> None:
    """REC-1: a 400-digit integer is no finite double, exponent or not."""
    with pytest.raises(StageFileError, match=r"line 1: .*REC-1"):
        decode_lines(b'{"a":1' + b"0" * 400 + b"}\n")
