"""Stage file framing: the 9-byte empty zstd frame, the skippable header frame, data frames.

A stage file is ``PREFIX + header_frame(header) + data_frame(lines)*`` (spec §5), with
other skippable frames, such as counter frames (FRAME-6), between data frames.
`FrameDecoder` is fed chunks split anywhere and yields the header and each data
frame's decompressed payload (and, when asked, collects counter frames); `FrameDecoder.close`
tells a torn tail apart from a clean end. Nothing here performs I/O.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import zstandard

from runfmt.errors import StageFileError
from runfmt.format.checksum import sha256_hex
from runfmt.format.manifest import LABEL
from runfmt.format.records import Record, decode_lines

__all__ = [
    "COUNTERS_MAGIC",
    "DECLARATION_DIFFERS",
    "HEADER_MAGIC",
    "MAX_FRAME_CONTENT",
    "MAX_HEADER_SIZE",
    "PREFIX",
    "CounterFrame",
    "DataFrame",
    "FrameDecoder",
    "FrameEncoder",
    "Header",
    "declares",
    "decode_counters",
    "decode_header",
    "encode_counters",
    "encode_header",
    "iter_frames",
    "stage_events",
]

PREFIX = bytes.fromhex("28b52ffd2000010000")
"""An empty zstd frame: makes the file start with the zstd magic number (FRAME-1)."""
ZSTD_MAGIC = PREFIX[:4]
HEADER_MAGIC = 0x184D2A52
"""The skippable-frame magic number of the header frame (FRAME-2)."""
COUNTERS_MAGIC = 0x184D2A53
"""The skippable-frame magic number of a counter frame (FRAME-6)."""
SKIPPABLE_MIN, SKIPPABLE_MAX = 0x184D2A50, 0x184D2A5F
MAX_HEADER_SIZE = 64 * 1024
MAX_FRAME_CONTENT = 64 * 1024 * 1024
"""The largest decompressed size a data frame may declare (FRAME-4)."""
MAX_WINDOW = 1 << 27
"""The largest window a data frame may declare (FRAME-4)."""
_FEED = 256 * 1024
_DICTIONARY_ID_FLAG = 0x03
"""Bits of a zstd frame header descriptor that give the size of its Dictionary_ID field."""


@dataclass(frozen=True, slots=True)
class DataFrame:
    """A decoded data frame: where it starts and ends in the file, and its content."""

    start: int
    end: int
    content: bytes


@dataclass(frozen=True, slots=True)
class CounterFrame:
    """A counter frame: where it starts in the file, and the counter deltas it carries."""

    start: int
    counters: dict[str, float | int]


Header = dict[str, Any]


def encode_header(header: Header) -> bytes:
    """The skippable frame carrying ``header`` as compact UTF-8 JSON."""
    body = orjson.dumps(header)
    if len(body) > MAX_HEADER_SIZE:
        raise StageFileError(f"stage file header is {len(body)} bytes, over {MAX_HEADER_SIZE}")
    return struct.pack("<II", HEADER_MAGIC, len(body)) + body


def encode_counters(counters: dict[str, float | int]) -> bytes:
    """The skippable frame carrying counter deltas: ``{"counters": {...}}``, a line feed and
    the hex sha256 of that JSON text (FRAME-6)."""
    try:
        text = orjson.dumps({"counters": counters})
    except orjson.JSONEncodeError as exc:  # an integer delta beyond 64 bits
        raise StageFileError(f"counter deltas cannot be written in a frame: {exc}") from None
    body = text + b"\n" + sha256_hex(text).encode()
    if len(body) > MAX_HEADER_SIZE:
        raise StageFileError(f"counter frame is {len(body)} bytes, over {MAX_HEADER_SIZE}")
    return struct.pack("<II", COUNTERS_MAGIC, len(body)) + body


def decode_counters(body: bytes) -> dict[str, float | int]:
    """The deltas of a counter frame's body; `StageFileError` unless its JSON text matches
    the sha256 after it (a body with no line feed is JSON text alone, as written before
    counter frames had one) and is an object whose only member ``counters`` maps counter
    names to finite numbers (FRAME-6)."""
    text, newline, digest = body.rpartition(b"\n")
    if not newline:
        text = body
    elif digest != sha256_hex(text).encode():
        raise StageFileError("counter frame's sha256 does not match its JSON text (FRAME-6)")
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        doc = None
    counters = doc.get("counters") if isinstance(doc, dict) and len(doc) == 1 else None
    if not isinstance(counters, dict) or not all(
        LABEL.fullmatch(k) and isinstance(v, int | float) and not isinstance(v, bool)
        and math.isfinite(v)
        for k, v in counters.items()
    ):  # fmt: skip
        raise StageFileError('counter frame is not {"counters": {name: number, ...}} (FRAME-6)')
    return counters


DECLARATION_DIFFERS = "header record schema version or key field differs from the stage's"


def declares(
    header: Mapping[str, object], record_schema_version: str, key_field: str | None
) -> bool:
    """Whether a stage file's header carries its stage's declaration (FRAME-2)."""
    return (header.get("record_schema_version"), header.get("key_field")) == (
        record_schema_version,
        key_field,
    )


def decode_header(body: bytes) -> Header:
    """Parse the JSON body of a header frame."""
    try:
        header = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise StageFileError(f"header frame is not valid JSON: {exc} (FRAME-2)") from None
    if not isinstance(header, dict):
        raise StageFileError("header frame is not a JSON object (FRAME-2)")
    return header


class FrameEncoder:
    """Compresses payloads into independent zstd frames with content size and checksum."""

    def __init__(self, level: int = 3) -> None:
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)

    def encode(self, payload: bytes | memoryview) -> bytes:
        if len(payload) > MAX_FRAME_CONTENT:
            raise StageFileError(f"frame content of {len(payload)} bytes over {MAX_FRAME_CONTENT}")
        return self._cctx.compress(payload)


class FrameDecoder:
    """Incremental stage file decoder: `feed` chunks, collect events, then `close`.

    Events are the header (a dict, once, first) and `DataFrame` values, in file
    order. Raises `StageFileError` with the byte offset on any malformed input.
    """

    def __init__(
        self,
        max_frame_content: int = MAX_FRAME_CONTENT,
        *,
        start: int = 0,
        counters_from: int | None = None,
    ) -> None:
        """``start`` > 0: decode from that offset, a frame boundary after the header;
        ``counters_from``: check and collect in `counter_frames` the counter frames that
        start at or past that offset (the others are skipped as any skippable frame)."""
        self._buf = bytearray()
        self._offset = start
        self._state = "frames" if start else "prefix"
        self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        self._dobj: Any = None
        self._frame_start = 0
        self._out: list[bytes] = []
        self._out_size = 0
        self._content_size = 0
        self._skip = 0
        self._max = max_frame_content
        self._counters_from = counters_from
        self.counter_frames: list[CounterFrame] = []
        self.header: Header | None = None
        self.header_end = start
        self.complete_end = start
        """Offset just past the last complete frame (where a torn tail begins)."""

    def decode(self, chunk: bytes) -> Iterator[Header | DataFrame]:
        """Feed the next bytes of the file and yield each event as soon as it is decoded:
        one frame's content in memory at a time whatever the chunk's size, and the frames
        before a malformed one seen before its error (salvage keeps them). Consume it
        whole before the next chunk."""
        self._buf += chunk
        events: list[Header | DataFrame] = []
        while self._step(events):
            yield from events
            events.clear()

    def close(self) -> None:
        """Check that the input ended on a frame boundary, after the header."""
        if self._state in ("prefix", "header"):
            where = "header"
        elif self._buf or self._dobj is not None or self._skip:
            where = "frame"
        else:
            return
        raise StageFileError(
            f"truncated {where} at byte {self.complete_end}",
            hint="the file was cut short; `runfmt repair` restores the last commit",
        )

    def _error(self, what: str) -> StageFileError:
        return StageFileError(f"{what} at byte {self._frame_start}")

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return data

    def _step(self, events: list[Header | DataFrame]) -> bool:
        if self._skip:
            n = min(self._skip, len(self._buf))
            self._take(n)
            self._skip -= n
            if not self._skip:
                self.complete_end = self._offset
            return bool(n)
        if self._dobj is not None:
            return self._decompress(events)
        if self._state == "prefix":
            if len(self._buf) < len(PREFIX):
                if not PREFIX.startswith(bytes(self._buf)):
                    raise StageFileError("file does not start with the empty zstd frame (FRAME-1)")
                return False
            if self._take(len(PREFIX)) != PREFIX:
                raise StageFileError("file does not start with the empty zstd frame (FRAME-1)")
            self._state = "header"
            return True
        if len(self._buf) < 8:
            if self._state == "header" and self._buf and not _is_prefix_of_magic(self._buf):
                raise self._error("expected the header frame")
            return False
        self._frame_start = self._offset
        magic, size = struct.unpack_from("<II", self._buf)
        if self._state == "header":
            if magic != HEADER_MAGIC:
                raise StageFileError(f"expected the header frame at byte {self._offset} (FRAME-2)")
            if size > MAX_HEADER_SIZE:
                raise self._error(f"header frame of {size} bytes, over {MAX_HEADER_SIZE} (FRAME-2)")
            if len(self._buf) < 8 + size:
                return False
            self._take(8)
            self.header = decode_header(self._take(size))
            self.header_end = self._offset
            events.append(self.header)
            self._state = "frames"
            self.complete_end = self._offset
            return True
        if (
            magic == COUNTERS_MAGIC
            and self._counters_from is not None
            and self._frame_start >= self._counters_from
        ):
            if size > MAX_HEADER_SIZE:
                raise self._error(
                    f"counter frame of {size} bytes, over {MAX_HEADER_SIZE} (FRAME-6)"
                )
            if len(self._buf) < 8 + size:
                return False
            self._take(8)
            frame = CounterFrame(self._frame_start, decode_counters(self._take(size)))
            self.counter_frames.append(frame)
            self.complete_end = self._offset
            return True
        if SKIPPABLE_MIN <= magic <= SKIPPABLE_MAX:
            self._take(8)
            self._skip = size
            if not size:
                self.complete_end = self._offset
            return True
        if bytes(self._buf[:4]) != ZSTD_MAGIC:
            raise self._error("not a zstd frame")
        try:
            params = zstandard.get_frame_parameters(bytes(self._buf[:18]))
        except zstandard.ZstdError:
            if len(self._buf) < 18:
                return False
            raise self._error("invalid zstd frame header") from None
        if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
            raise self._error("data frame does not declare its content size (FRAME-4)")
        if params.content_size > self._max:
            raise self._error(
                f"data frame declares {params.content_size} bytes, over {self._max} (FRAME-4)"
            )
        if not params.has_checksum:
            raise self._error("data frame has no content checksum (FRAME-3)")
        if params.window_size > MAX_WINDOW:
            raise self._error(
                f"data frame declares a window of {params.window_size} bytes, over {MAX_WINDOW} "
                "(FRAME-4)"
            )
        if self._buf[4] & _DICTIONARY_ID_FLAG:
            raise self._error(f"data frame declares zstd dictionary {params.dict_id} (FRAME-4)")
        self._content_size = params.content_size
        self._dobj = self._dctx.decompressobj()
        self._out, self._out_size = [], 0
        return True

    def _decompress(self, events: list[Header | DataFrame]) -> bool:
        if not self._buf:
            return False
        n = min(len(self._buf), _FEED)
        chunk = self._take(n)
        try:
            out = self._dobj.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise self._error(f"corrupt zstd frame: {exc}") from None
        self._out_size += len(out)
        if self._out_size > self._content_size:
            raise self._error("data frame decompresses past its declared size")
        self._out.append(out)
        if not self._dobj.eof:
            return True
        unused = self._dobj.unused_data
        if unused:
            self._buf[:0] = unused
            self._offset -= len(unused)
        self._dobj = None
        if self._out_size != self._content_size:
            raise self._error("data frame content size does not match its header")
        events.append(DataFrame(self._frame_start, self._offset, b"".join(self._out)))
        self.complete_end = self._offset
        return True


def _is_prefix_of_magic(buf: bytearray) -> bool:
    return struct.pack("<I", HEADER_MAGIC).startswith(bytes(buf[:4]))


def iter_frames(data: bytes) -> Iterator[Header | DataFrame]:
    """Decode a whole stage file held in memory; raises on a torn or corrupt file."""
    decoder = FrameDecoder()
    yield from decoder.decode(data)
    decoder.close()


def stage_events(
    chunks: Iterable[bytes], where: str, decoder: FrameDecoder | None = None
) -> Iterator[Header | list[Record]]:
    """Decode a stage file given in chunks: its header (a dict), then each data frame's
    records (a list); raises on a torn or corrupt file.

    Errors name ``where``; a bad line also the number of records before its frame
    (``where:+N``). Pass ``decoder`` to read its offsets while chunks are fed.
    """
    decoder = decoder or FrameDecoder()
    line = 0
    for chunk in chunks:
        events = decoder.decode(chunk)
        while True:
            try:
                event = next(events, None)
            except StageFileError as exc:
                raise exc.at(where) from None
            if event is None:
                break
            if not isinstance(event, DataFrame):
                yield event
                continue
            try:
                batch = decode_lines(event.content)
            except StageFileError as exc:
                raise StageFileError(exc.problem, location=f"{where}:+{line}") from None
            line += len(batch)
            yield batch
    try:
        decoder.close()
    except StageFileError as exc:
        raise exc.at(where) from None
