"""Cache keys (spec §8): RFC 8785 canonical JSON, then sha256, as ``k1:<hex>``."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from runfmt.errors import InvalidInputError
from runfmt.format.keys import KEY_SCHEME, canonical_json, compute_key

# RFC 8785 Appendix B: IEEE 754 double (hex) -> the ECMAScript number form JCS requires.
RFC8785_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("ieee", "expected"), RFC8785_NUMBERS)
def test_rfc8785_appendix_b_numbers(ieee: str, expected: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(ieee))[0]
    assert canonical_json(value) == expected.encode()


@pytest.mark.parametrize("ieee", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_rfc8785_appendix_b_nan_and_infinity_are_refused(ieee: str) -> None:
    value = struct.unpack(">d", bytes.fromhex(ieee))[0]
    with pytest.raises(InvalidInputError, match="no canonical JSON form"):
        canonical_json(value)


def test_rfc8785_section_3_2_2_example() -> None:
    value = {
        "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
        "literals": [None, True, False],
    }
    expected = (
        '{"literals":[null,true,false],'
        '"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    )
    assert canonical_json(value) == expected.encode("utf-8")


def test_rfc8785_section_3_2_3_sorting_by_utf16_code_units() -> None:
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = list(json.loads(canonical_json(value)))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_key_is_sha256_of_the_canonical_form() -> None:
    inputs = {"prompt": "2+2?", "model": "m1", "params": {"t": 0.0, "n": 1}}
    canonical = b'{"model":"m1","params":{"n":1,"t":0},"prompt":"2+2?"}'
    assert canonical_json(inputs) == canonical
    assert compute_key(inputs) == f"{KEY_SCHEME}:{hashlib.sha256(canonical).hexdigest()}"
    assert compute_key({}) == (
        "k1:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )


@pytest.mark.parametrize(
    "value",
    [{"x": math.nan}, {"x": math.inf}, {1: "a"}, {"x": 2**53 + 1}, {"x": b"raw"}, {"x": object()}],
    ids=["nan", "inf", "int-key", "big-int", "bytes", "object"],
)
def test_values_without_a_canonical_form_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInputError, match="no canonical JSON form") as info:
        compute_key(value)
    assert "NaN" in info.value.hint


def _reparses_as_float(x: float) -> bool:
    """Integral floats in [2^53, 1e21) print as integers that rfc8785 refuses once reparsed."""
    return not (x.is_integer() and 2**53 <= abs(x) < 1e21)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False).filter(_reparses_as_float)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60)
@given(json_values)
def test_key_ignores_member_order_and_survives_a_json_round_trip(value: Any) -> None:
    def reorder(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: reorder(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [reorder(x) for x in v]
        return v

    key = compute_key(value)
    assert compute_key(reorder(value)) == key
    assert compute_key(json.loads(canonical_json(value))) == key
    assert canonical_json(json.loads(canonical_json(value))) == canonical_json(value)


def test_integral_floats_and_ints_give_one_key() -> None:
    assert compute_key({"n": 1.0}) == compute_key({"n": 1})
    assert compute_key({"n": -0.0}) == compute_key({"n": 0})
    assert compute_key({"n": 1}) != compute_key({"n": "1"})


def test_a_large_number_has_a_key_only_when_written_as_a_double() -> None:
    """KEY-3: ``1e16`` is the double it denotes; the integer 10**16 is out of range."""
    assert compute_key({"x": 1e16}).startswith("k1:")
    with pytest.raises(InvalidInputError, match="no canonical JSON form"):
        compute_key({"x": 10**16})


tricky_text = st.text(
    st.characters(blacklist_categories=("Cs",))  # lone surrogates: no canonical form
    | st.sampled_from(["\x00", "\x1f", "\x7f", "\u2028", "\ud7ff", "\ue000", "\uffff", "😀"]),
    max_size=8,
)
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=5),
    max_leaves=16,
)


@settings(max_examples=300)
@given(plain_values)
def test_the_fast_encoder_writes_what_the_reference_encoder_writes(value: Any) -> None:
    """`canonical_json` writes values without floats with orjson where the member names
    sort alike; everything else, and the check, with `rfc8785`."""
    assert canonical_json(value) == bytes(rfc8785.dumps(value))


def test_names_that_sort_differently_in_utf16_use_the_reference_encoder() -> None:
    """U+E000 sorts after U+1F600 by UTF-16 code units, before it by code points."""
    value = {"\ue000": 1, "😀": 2}
    assert canonical_json(value) == bytes(rfc8785.dumps(value))
    assert list(json.loads(canonical_json(value))) == ["😀", "\ue000"]
    with pytest.raises(InvalidInputError):
        canonical_json({"x": "\ud800"})
