"""The machinery of the conformance suite's builders: a run folder under construction.

`Case` holds a manifest document and file bytes, writes ``run/``, ``case.json``
and ``expected.json``. Timestamps, ids and writer ids are fixed so that a rebuild
changes only what the format core writes differently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runfmt.check import repair_run, verify_run
from runfmt.conformance import normalized_view
from runfmt.format.checksum import format_sums
from runfmt.format.frames import COUNTERS_MAGIC, PREFIX, FrameEncoder
from runfmt.format.keys import compute_key
from runfmt.format.records import encode_record
from runfmt.storage import Storage

SUITE = Path(__file__).resolve().parent
RUN_ID = "20261101-120000000-0a1b2c3d"
WRITER = "a1b2c3d4"
T0, T1, T2 = "2026-11-01T12:00:00.000000Z", "2026-11-01T12:00:05.250000Z", "2026-11-01T12:01:00Z"
HEADER_MAGIC = 0x184D2A52
ENCODER = FrameEncoder(3)

Records = list[dict[str, Any]]
Frame = Records | bytes
"""A data frame given as its records, or raw bytes placed as they are."""


def data_frame(records: Records) -> bytes:
    return ENCODER.encode(b"".join(encode_record(r) for r in records))


def raw_frame(content: bytes, window_log: int = 17, dict_id: int | None = None) -> bytes:
    """A zstd frame written by hand, as a long-window or dictionary encoder could: one raw
    block of ``content``, content size and checksum declared, not single-segment, so its
    header carries a window of 2**window_log bytes (10 to 41) and, unless None, a one-byte
    Dictionary_ID ``dict_id``."""
    descriptor = 0xC4 | (0 if dict_id is None else 1)
    header = bytes([descriptor, (window_log - 10) << 3])
    header += b"" if dict_id is None else bytes([dict_id])
    block = (1 | len(content) << 3).to_bytes(3, "little")
    checksum = ENCODER.encode(content)[-4:]
    size = struct.pack("<Q", len(content))
    return b"\x28\xb5\x2f\xfd" + header + size + block + content + checksum


def skippable(payload: bytes, magic: int = 0x184D2A5B) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


def counter_frame(text: bytes) -> bytes:
    """A counter frame (FRAME-6) made with hashlib: the JSON text, a line feed, its sha256."""
    return skippable(text + b"\n" + hashlib.sha256(text).hexdigest().encode(), COUNTERS_MAGIC)


def header_frame(header: dict[str, Any], magic: int = HEADER_MAGIC) -> bytes:
    return skippable(json.dumps(header, separators=(",", ":")).encode(), magic)


class Case:
    """A run folder under construction: a manifest document plus file bytes."""

    def __init__(self, kind: str, name: str, description: str, rules: list[str]) -> None:
        self.kind, self.name = kind, name
        self.meta: dict[str, Any] = {"description": description, "rules": rules}
        self.doc: dict[str, Any] = {
            "format": "runfmt",
            "format_version": "1.0",
            "required_features": [],
            "run_id": RUN_ID,
            "name": name,
            "revision": 3,
            "status": "running",
            "error": None,
            "created_at": T0,
            "updated_at": T1,
            "finished_at": None,
            "config": {"model": "m1", "temperature": 0.5, "items": [1, 2, 3]},
            "config_hash": "",
            "tags": {"suite": "conformance"},
            "counters": {},
            "stages": [],
            "artifacts": [],
            "writer": {"name": "conformance-build", "version": "1"},
        }
        self.files: dict[str, bytes] = {}
        self.revisions: dict[int, bytes] = {}
        self.manifest_json: bytes | None = None
        """Bytes of ``manifest.json`` when they differ from the newest revision; b"" for none."""
        self.sums = False
        self.sums_mutate: Callable[[bytes], bytes] = bytes
        self.setup: list[dict[str, str]] = []
        self.outside: dict[str, bytes] = {}

    def stage(
        self,
        name: str,
        *,
        key_field: str | None = None,
        status: str = "completed",
        record_schema_version: str = "1",
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": name,
            "status": status,
            "record_schema_version": record_schema_version,
            "key_field": key_field,
            "files": [],
        }
        self.doc["stages"].append(entry)
        return entry

    def file(
        self,
        stage: str,
        frames: list[Frame],
        *,
        seq: int = 1,
        writer: str = WRITER,
        header: dict[str, Any] | None = None,
        digits: int = 6,
    ) -> str:
        """Add a stage file of ``frames`` and list its whole length in ``stage``."""
        entry = next(s for s in self.doc["stages"] if s["name"] == stage)
        path = f"stages/{stage}/part-{seq:0{digits}d}-{writer}.jsonl.zst"
        head = {
            "format": "runfmt-stage",
            "format_version": "1.0",
            "run_id": RUN_ID,
            "stage": stage,
            "seq": seq,
            "writer": writer,
            "record_schema_version": entry["record_schema_version"],
            "key_field": entry["key_field"],
        }
        head.update(header or {})
        data = PREFIX + header_frame(head)
        records = failures = 0
        for frame in frames:
            if isinstance(frame, bytes):
                data += frame
                continue
            data += data_frame(frame)
            records += len(frame)
            failures += sum(r.get("_error") is not None for r in frame)
        self.files[path] = data
        entry["files"].append(
            {
                "path": path,
                "bytes": len(data),
                "records": records,
                "failures": failures,
                "sha256": sha256_of(data),
            }
        )
        return path

    def artifact(self, name: str, data: bytes, media_type: str = "text/plain") -> str:
        path = f"artifacts/{name}"
        self.files[path] = data
        self.doc["artifacts"].append(
            {"path": path, "bytes": len(data), "sha256": sha256_of(data), "media_type": media_type}
        )
        return path

    def finish(self, status: str = "completed", error: str | None = None) -> None:
        self.doc.update(status=status, error=error, finished_at=T2, updated_at=T2)
        self.sums = True

    def entry(self, path: str) -> dict[str, Any]:
        return next(f for s in self.doc["stages"] for f in s["files"] if f["path"] == path)

    def manifest_bytes(self) -> bytes:
        if not self.doc["config_hash"]:
            self.doc["config_hash"] = compute_key(self.doc["config"])
        return (json.dumps(self.doc, indent=2, ensure_ascii=False) + "\n").encode()

    def write(self) -> Path:
        folder = SUITE / self.kind / self.name
        if folder.exists():
            shutil.rmtree(folder)
        run = folder / "run"
        current = self.manifest_bytes()
        revisions = self.revisions or {self.doc["revision"]: current}
        for rev, data in revisions.items():
            if rev == 0:
                continue
            put_file(run / "_manifests" / f"{rev:08d}.json", data)
        if self.manifest_json != b"":
            put_file(run / "manifest.json", self.manifest_json or current)
        for path, data in self.files.items():
            put_file(run / path, data)
        if self.sums:
            entries = [(f["path"], f["sha256"]) for s in self.doc["stages"] for f in s["files"]]
            entries += [(a["path"], a["sha256"]) for a in self.doc["artifacts"]]
            entries.append(("manifest.json", sha256_of(current)))
            put_file(run / "SHA256SUMS", self.sums_mutate(format_sums(entries).encode()))
        for path, data in self.outside.items():
            put_file(folder / path, data)
        meta = {**self.meta, "outcome": "valid" if self.kind == "valid" else "invalid"}
        meta["built_with"] = meta.get("built_with", "runfmt-format")
        if self.setup:
            meta["setup"] = self.setup
        put_file(folder / "case.json", (json.dumps(meta, indent=2) + "\n").encode())
        return folder


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def finish_case(folder: Path) -> None:
    """Write ``expected.json`` (valid cases, and invalid ones that repair fixes)."""
    meta = json.loads((folder / "case.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(folder / "run", run, symlinks=True)
        storage = Storage(str(run))
        problems = verify_run(storage)
        if meta["outcome"] == "valid":
            assert not problems, f"{folder.name}: {problems}"
        else:
            assert problems, f"{folder.name}: verify found nothing"
            if not meta.get("repairable"):
                return
            repair_run(storage)
            left = verify_run(storage)
            assert not left, f"{folder.name} after repair: {left}"
        view = normalized_view(run)
    put_file(
        folder / "expected.json", (json.dumps(view, indent=2, ensure_ascii=False) + "\n").encode()
    )


# The records used across cases.

GEN: Records = [
    {"key": "k1:q1", "question": "2+2?", "answer": "4"},
    {"key": "k1:q2", "question": "capital of France?", "answer": "Paris"},
    {"key": "k1:q3", "question": "ünïcødé ✓ 数", "answer": "ok", "nested": {"a": [1, 2.5, None]}},
]
SCORE: Records = [
    {"key": "k1:q1", "correct": True, "score": 1.0},
    {"key": "k1:q2", "correct": False, "score": 0},
    {"key": "k1:q3", "_error": {"type": "Timeout", "message": "model timed out"}},
]


def base(kind: str, name: str, description: str, rules: list[str]) -> Case:
    """A finished run with two keyed stages, counters and an artifact."""
    case = Case(kind, name, description, rules)
    case.stage("generate", key_field="key")
    case.stage("score", key_field="key", record_schema_version="2")
    case.file("generate", [GEN])
    case.file("score", [SCORE])
    case.artifact("report.txt", b"accuracy 0.5\n")
    case.doc["counters"] = {"cost_usd": 0.125, "tokens": 420}
    case.finish()
    return case


def running(kind: str, name: str, description: str, rules: list[str]) -> Case:
    """A running run (no SHA256SUMS) with one keyed stage in one file."""
    case = Case(kind, name, description, rules)
    case.stage("generate", key_field="key", status="running")
    case.file("generate", [GEN[:2]])
    return case


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
