"""Stage file framing (FRAME-*): decoding is the same wherever the input is split, and any cut
that does not fall on a frame boundary is reported."""

from __future__ import annotations

import hashlib
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from runfmt.errors import StageFileError
from runfmt.format.frames import (
    COUNTERS_MAGIC,
    HEADER_MAGIC,
    MAX_HEADER_SIZE,
    PREFIX,
    DataFrame,
    FrameDecoder,
    FrameEncoder,
    Header,
    decode_counters,
    encode_counters,
    encode_header,
    iter_frames,
    stage_events,
)
from runfmt.format.records import decode_lines, encode_records
from tests.conformance.builder import raw_frame

HEADER: Header = {
    "format": "runfmt-stage",
    "format_version": "1.0",
    "run_id": "r1",
    "stage": "score",
    "seq": 1,
    "writer": "w1",
    "record_schema_version": "1",
    "key_field": None,
}


def stage_file(payloads: list[bytes], header: Header = HEADER) -> bytes:
    encoder = FrameEncoder()
    return PREFIX + encode_header(header) + b"".join(encoder.encode(p) for p in payloads)


def decode(chunks: list[bytes]) -> list[Header | DataFrame]:
    decoder = FrameDecoder()
    events = [e for chunk in chunks for e in decoder.decode(chunk)]
    decoder.close()
    return events


def decode_records(data: bytes) -> list[dict[str, object]]:
    return [r for e in decode([data]) if isinstance(e, DataFrame) for r in decode_lines(e.content)]


def boundaries(events: list[Header | DataFrame], header_end: int) -> list[int]:
    return [header_end] + [e.end for e in events if isinstance(e, DataFrame)]


PAYLOADS = [
    encode_records([{"i": i, "text": "x" * (i % 7)} for i in range(n)]) for n in (1, 5, 0, 3)
]
PAYLOADS = [p for p in PAYLOADS if p]
SMALL = stage_file(PAYLOADS)


def test_whole_file_decodes_to_header_and_every_frame() -> None:
    events = list(iter_frames(SMALL))
    assert events[0] == HEADER
    frames = [e for e in events if isinstance(e, DataFrame)]
    assert len(frames) == len(events) - 1
    assert [f.content for f in frames] == PAYLOADS
    assert frames[0].start == len(PREFIX) + len(encode_header(HEADER))
    assert frames[-1].end == len(SMALL)
    assert sum(len(decode_lines(f.content)) for f in frames) == 9


def test_python_zstandard_alone_would_stop_at_the_first_frame() -> None:
    """The trap the decoder exists for: decompress() returns only the first data frame."""
    first_frame = SMALL[len(PREFIX) + len(encode_header(HEADER)) :]
    assert zstandard.ZstdDecompressor().decompress(first_frame) == PAYLOADS[0]
    assert len(PAYLOADS) > 1


@settings(max_examples=80)
@given(
    payloads=st.lists(
        st.binary(min_size=1, max_size=300).map(lambda b: b.hex().encode() + b"\n"),
        min_size=0,
        max_size=4,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_same_events_wherever_the_input_is_split(payloads: list[bytes], cuts: list[int]) -> None:
    data = stage_file(payloads)
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert decode(chunks) == decode([data])
    assert decode([data[i : i + 1] for i in range(len(data))]) == decode([data])


@settings(max_examples=40)
@given(
    batches=st.lists(
        st.lists(
            st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
            min_size=1,
        ),
        max_size=4,
    ),
    size=st.integers(min_value=1, max_value=200),
)
def test_stage_events_yield_the_header_then_each_frames_records(
    batches: list[list[dict[str, object]]], size: int
) -> None:
    data = stage_file([encode_records(b) for b in batches])
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert list(stage_events(chunks, "f.jsonl.zst")) == [HEADER, *batches]


def test_stage_events_name_the_file_and_the_records_before_a_bad_line() -> None:
    data = stage_file([encode_records([{"i": 1}, {"i": 2}]), b'{"i": 3}\nnot json\n'])
    with pytest.raises(StageFileError) as info:
        list(stage_events([data], "f.jsonl.zst"))
    assert info.value.location == "f.jsonl.zst:+2"
    assert "line 2" in info.value.problem
    with pytest.raises(StageFileError) as info:
        list(stage_events([data[:-3]], "f.jsonl.zst"))
    assert info.value.location == "f.jsonl.zst"


@settings(max_examples=60)
@given(junk=st.binary(min_size=1, max_size=64), cut=st.integers(min_value=0))
def test_decode_gives_every_frame_before_a_malformed_one(junk: bytes, cut: int) -> None:
    """Salvage (COMMIT-8) keeps the frames before damage fed in the same chunk as them."""
    data = SMALL + b"\x00" + junk
    decoder = FrameDecoder()
    events: list[Header | DataFrame] = []

    def decode_all() -> None:
        for chunk in (data[: cut % len(data)], data[cut % len(data) :]):
            events.extend(decoder.decode(chunk))
        decoder.close()

    with pytest.raises(StageFileError):
        decode_all()
    assert events == list(iter_frames(SMALL))


def test_every_truncation_off_a_frame_boundary_is_detected() -> None:
    decoder = FrameDecoder()
    whole = list(decoder.decode(SMALL))
    cuts_ok = boundaries(whole, decoder.header_end)
    for length in range(len(SMALL)):
        truncated = SMALL[:length]
        if length not in cuts_ok:
            with pytest.raises(StageFileError, match=r"truncated|at byte"):
                decode([truncated])
            continue
        events = decode([truncated])
        assert events == whole[: len(events)]


def test_truncation_reports_where_the_complete_part_ends() -> None:
    decoder = FrameDecoder()
    events = list(decoder.decode(SMALL[:-3]))
    with pytest.raises(StageFileError, match="truncated frame") as info:
        decoder.close()
    last_complete = [e for e in events if isinstance(e, DataFrame)][-1].end
    assert decoder.complete_end == last_complete
    assert f"at byte {last_complete}" in info.value.problem
    assert "repair" in info.value.hint


def test_every_byte_flip_inside_data_frames_is_detected() -> None:
    decoder = FrameDecoder()
    list(decoder.decode(SMALL))
    for pos in range(decoder.header_end, len(SMALL)):
        flipped = bytearray(SMALL)
        flipped[pos] ^= 0xFF
        with pytest.raises(StageFileError):
            decode_records(bytes(flipped))


@pytest.mark.parametrize("chunked", [False, True])
def test_skippable_frames_between_data_frames_are_skipped(chunked: bool) -> None:
    encoder = FrameEncoder()
    skippable = struct.pack("<II", 0x184D2A5E, 5) + b"hello"
    empty_skippable = struct.pack("<II", 0x184D2A50, 0)
    data = (
        PREFIX
        + encode_header(HEADER)
        + encoder.encode(b"{}\n")
        + skippable
        + empty_skippable
        + encoder.encode(b'{"a":1}\n')
    )
    chunks = [data[i : i + 1] for i in range(len(data))] if chunked else [data]
    contents = [e.content for e in decode(chunks) if isinstance(e, DataFrame)]
    assert contents == [b"{}\n", b'{"a":1}\n']


def test_file_must_start_with_the_empty_zstd_frame() -> None:
    with pytest.raises(StageFileError, match="FRAME-1"):
        decode([encode_header(HEADER) + FrameEncoder().encode(b"{}\n")])
    with pytest.raises(StageFileError, match="FRAME-1"):
        list(FrameDecoder().decode(b"\x28\xb5\x2f\xfc"))


def test_header_frame_must_follow_the_prefix() -> None:
    with pytest.raises(StageFileError, match="FRAME-2"):
        decode([PREFIX + FrameEncoder().encode(b"{}\n")])
    body = b'{"not": "closed"'
    with pytest.raises(StageFileError, match="header frame is not valid JSON"):
        decode([PREFIX + struct.pack("<II", HEADER_MAGIC, len(body)) + body])
    with pytest.raises(StageFileError, match="not a JSON object"):
        decode([PREFIX + struct.pack("<II", HEADER_MAGIC, 2) + b"[]"])


def test_empty_input_and_a_lone_prefix_are_truncated_headers() -> None:
    for data in (b"", PREFIX, PREFIX + encode_header(HEADER)[:6]):
        with pytest.raises(StageFileError, match="truncated header"):
            decode([data])


def test_data_frames_must_carry_a_checksum() -> None:
    frame = zstandard.ZstdCompressor(write_checksum=False).compress(b"{}\n")
    with pytest.raises(StageFileError, match="FRAME-3"):
        decode([PREFIX + encode_header(HEADER) + frame])


def test_data_frames_must_declare_their_size() -> None:
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False)
    stream = cctx.compressobj()
    frame = stream.compress(b"{}\n") + stream.flush()
    with pytest.raises(StageFileError, match="FRAME-4"):
        decode([PREFIX + encode_header(HEADER) + frame])


def test_declared_size_is_bounded_before_decompressing() -> None:
    bomb = FrameEncoder().encode(b"\0" * 100_000)
    assert len(bomb) < 200
    decoder = FrameDecoder(max_frame_content=50_000)
    with pytest.raises(StageFileError, match=r"declares 100000 bytes, over 50000 \(FRAME-4\)"):
        list(decoder.decode(PREFIX + encode_header(HEADER) + bomb))


@pytest.mark.parametrize(
    ("frame", "refused"),
    [
        (raw_frame(b"{}\n", window_log=27), None),
        (
            raw_frame(b"{}\n", window_log=28),
            r"window of 268435456 bytes, over 134217728 \(FRAME-4\)",
        ),
        (raw_frame(b"{}\n", window_log=17, dict_id=7), r"declares zstd dictionary 7 \(FRAME-4\)"),
        (raw_frame(b"{}\n", window_log=17, dict_id=0), r"declares zstd dictionary 0 \(FRAME-4\)"),
    ],
    ids=["window-2^27", "window-2^28", "dictionary", "dictionary-id-0"],
)
def test_a_frame_header_is_refused_for_its_window_or_dictionary(
    frame: bytes, refused: str | None
) -> None:
    """FRAME-4: what a frame's header declares is checked before it is decompressed."""
    data = PREFIX + encode_header(HEADER) + frame
    if refused is None:
        assert decode_records(data) == [{}]
    else:
        with pytest.raises(StageFileError, match=refused):
            decode([data])


def test_oversized_header_is_refused() -> None:
    with pytest.raises(StageFileError, match="over"):
        encode_header({"pad": "x" * 70_000})
    with pytest.raises(StageFileError, match="header frame of"):
        list(FrameDecoder().decode(PREFIX + struct.pack("<II", HEADER_MAGIC, 10**9)))


COUNTER_NAMES = st.from_regex(r"[A-Za-z0-9_.:/-]{1,128}", fullmatch=True)
DELTAS = st.dictionaries(
    COUNTER_NAMES,
    st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False),
    max_size=5,
)


@settings(max_examples=60)
@given(deltas=st.lists(DELTAS, min_size=1, max_size=3), cut=st.integers(0, 10_000))
def test_counter_frames_round_trip_wherever_the_input_is_split(
    deltas: list[dict[str, float | int]], cut: int
) -> None:
    encoder = FrameEncoder()
    data = PREFIX + encode_header(HEADER)
    starts = []
    for i, d in enumerate(deltas):
        starts.append(len(data))
        data += encode_counters(d) + encoder.encode(b'{"i":%d}\n' % i)
    cut %= len(data) + 1
    decoder = FrameDecoder(counters_from=0)
    events = [*decoder.decode(data[:cut]), *decoder.decode(data[cut:])]
    decoder.close()
    assert [f.counters for f in decoder.counter_frames] == deltas
    assert [f.start for f in decoder.counter_frames] == starts
    assert len([e for e in events if isinstance(e, DataFrame)]) == len(deltas)
    assert decode([data]) == events  # other readers skip them (FRAME-5)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"counters": []}',
        b'{"counters": {"tokens": "5"}}',
        b'{"counters": {"tokens": true}}',
        b'{"counters": {"tokens": null}}',
        b'{"counters": {"tokens": 1e999}}',
        b'{"counters": {}, "more": 1}',
    ],
)
def test_a_counter_frame_not_as_frame_6_says_is_an_error(body: bytes) -> None:
    body += b"\n" + hashlib.sha256(body).hexdigest().encode()
    with pytest.raises(StageFileError, match="FRAME-6"):
        decode_counters(body)
    frame = struct.pack("<II", COUNTERS_MAGIC, len(body)) + body
    decoder = FrameDecoder(counters_from=0)
    with pytest.raises(StageFileError):
        list(decoder.decode(PREFIX + encode_header(HEADER) + frame))


@pytest.mark.parametrize("at", range(0, 80, 7))
def test_a_changed_byte_in_a_counter_frame_is_detected(at: int) -> None:
    """FRAME-6: the sha256 after the JSON text catches what the zstd frame checksum does
    for data frames: a flipped digit would otherwise be salvaged as a genuine delta."""
    body = bytearray(encode_counters({"tokens": 5, "cost_usd": 0.25})[8:])
    assert decode_counters(bytes(body)) == {"tokens": 5, "cost_usd": 0.25}
    body[at % len(body)] ^= 0x02
    with pytest.raises(StageFileError, match="FRAME-6"):
        decode_counters(bytes(body))


def test_a_counter_frame_without_its_sha256_is_read_as_first_written() -> None:
    """FRAME-6: content with no line feed is the JSON text alone (runs written before the
    sha256 was added salvage their deltas as they did)."""
    assert decode_counters(b'{"counters":{"tokens":5}}') == {"tokens": 5}


def test_a_counter_frame_is_bounded_in_size() -> None:
    huge = {f"c{i}": i for i in range(MAX_HEADER_SIZE // 8)}
    with pytest.raises(StageFileError, match="counter frame"):
        encode_counters(huge)
    frame = struct.pack("<II", COUNTERS_MAGIC, MAX_HEADER_SIZE + 1)
    with pytest.raises(StageFileError, match="counter frame of"):
        list(FrameDecoder(counters_from=0).decode(PREFIX + encode_header(HEADER) + frame))
