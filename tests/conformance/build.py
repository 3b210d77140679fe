"""Build the conformance cases made with the format core: ``python -m tests.conformance.build``.

Each case is a folder ``valid/<name>/`` or ``invalid/<name>/`` holding ``case.json``,
the run folder ``run/`` and, where the suite expects a view, ``expected.json``.
Cases named ``plain-*`` come from ``build_plain.sh`` (zstd CLI, printf, sha256sum)
and are left alone here. Timestamps, ids and writer ids are fixed so that a rebuild
changes only what the format core writes differently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard

from runfmt.check import repair_run, verify_run
from runfmt.conformance import normalized_view
from runfmt.format.checksum import format_sums
from runfmt.format.frames import PREFIX, FrameEncoder
from runfmt.format.keys import compute_key
from runfmt.format.records import encode_record
from runfmt.storage import Storage
from runfmt.store import Store

SUITE = Path(__file__).resolve().parent
RUN_ID = "20261101-120000000-0a1b2c3d"
WRITER = "a1b2c3d4"
T0, T1, T2 = "2026-11-01T12:00:00.000000Z", "2026-11-01T12:00:05.250000Z", "2026-11-01T12:01:00Z"
HEADER_MAGIC = 0x184D2A52
_ENC = FrameEncoder(3)

Records = list[dict[str, Any]]
Frame = Records | bytes
"""A data frame given as its records, or raw bytes placed as they are."""


def data_frame(records: Records) -> bytes:
    return _ENC.encode(b"".join(encode_record(r) for r in records))


def skippable(payload: bytes, magic: int = 0x184D2A5B) -> bytes:
    return struct.pack("<II", magic, len(payload)) + payload


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
                "sha256": _sha(data),
            }
        )
        return path

    def artifact(self, name: str, data: bytes, media_type: str = "text/plain") -> str:
        path = f"artifacts/{name}"
        self.files[path] = data
        self.doc["artifacts"].append(
            {"path": path, "bytes": len(data), "sha256": _sha(data), "media_type": media_type}
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
            _put(run / "_manifests" / f"{rev:08d}.json", data)
        if self.manifest_json != b"":
            _put(run / "manifest.json", self.manifest_json or current)
        for path, data in self.files.items():
            _put(run / path, data)
        if self.sums:
            entries = [(f["path"], f["sha256"]) for s in self.doc["stages"] for f in s["files"]]
            entries += [(a["path"], a["sha256"]) for a in self.doc["artifacts"]]
            entries.append(("manifest.json", _sha(current)))
            _put(run / "SHA256SUMS", self.sums_mutate(format_sums(entries).encode()))
        for path, data in self.outside.items():
            _put(folder / path, data)
        meta = {**self.meta, "outcome": "valid" if self.kind == "valid" else "invalid"}
        meta["built_with"] = meta.get("built_with", "runfmt-format")
        if self.setup:
            meta["setup"] = self.setup
        _put(folder / "case.json", (json.dumps(meta, indent=2) + "\n").encode())
        return folder


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(path: Path, data: bytes) -> None:
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
    _put(folder / "expected.json", (json.dumps(view, indent=2, ensure_ascii=False) + "\n").encode())


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


def valid_cases() -> list[Case]:
    cases = []
    c = Case(
        "valid",
        "minimal",
        "A new run: revision 1, no stages, no artifacts.",
        ["LAYOUT-1", "MAN-2", "MAN-3", "NAME-1", "NAME-6", "VER-1"],
    )
    c.doc.update(revision=1, updated_at=T0, config={}, tags={})
    cases.append(c)

    cases.append(
        base(
            "valid",
            "completed-run",
            "A finished run: two keyed stages, a failure record, counters, an artifact, "
            "SHA256SUMS.",
            [
                "LAYOUT-1",
                "MAN-2",
                "MAN-9",
                "NAME-2",
                "NAME-3",
                "NAME-4",
                "NAME-5",
                "FRAME-1",
                "FRAME-2",
                "FRAME-3",
                "FRAME-4",
                "REC-1",
                "REC-5",
                "REC-6",
                "CHECK-1",
                "CHECK-2",
                "CHECK-3",
                "KEY-4",
                "KEY-5",
                "COMMIT-11",
            ],
        )
    )

    c = Case(
        "valid",
        "multi-frame",
        "One stage file of four data frames; readers must read past the first frame.",
        ["FRAME-5", "REC-2", "REC-7"],
    )
    c.stage("generate")
    c.file("generate", [[{"i": i, "frame": f} for i in range(3)] for f in range(4)])
    cases.append(c)

    c = Case(
        "valid",
        "skippable-between-frames",
        "Skippable frames (other magic numbers, and "
        "an empty one) between and after data frames are ignored.",
        ["FRAME-5"],
    )
    c.stage("generate")
    c.file(
        "generate",
        [
            [{"i": 0}],
            skippable(b"ignored \x00\xff bytes", 0x184D2A50),
            [{"i": 1}],
            skippable(b"", 0x184D2A5F),
            [{"i": 2}],
            skippable(b'{"not": "a header"}', HEADER_MAGIC),
        ],
    )
    cases.append(c)

    c = Case(
        "valid",
        "empty-stage",
        "A declared stage with no files, and a stage whose file "
        "holds only the prefix and the header.",
        ["MAN-8", "FRAME-5", "CHECK-2"],
    )
    c.stage("declared", status="running")
    c.stage("header-only")
    c.file("header-only", [])
    cases.append(c)

    c = running(
        "valid",
        "failure-records",
        "Failure records (non-null _error) are counted as "
        "failures and give no cache key; _error: null is not a failure.",
        ["REC-4", "REC-5", "KEY-5", "CHECK-2"],
    )
    c.doc["stages"][0]["files"].clear()
    c.files.clear()
    c.file(
        "generate",
        [
            [
                {"key": "k1:a", "ok": 1, "_error": None},
                {"key": "k1:b", "_error": "ValueError: bad input"},
                {"key": "k1:c", "_error": {"type": "Timeout", "message": "took too long"}},
                {"key": "k1:a", "ok": 1, "retry": True},
            ]
        ],
    )
    cases.append(c)

    c = running(
        "valid",
        "unknown-members",
        "Members unknown to this version in the manifest, "
        "its stages, files, artifacts, the stage header and records are ignored.",
        ["VER-4", "REC-4", "MAN-2"],
    )
    c.doc["stages"][0]["files"].clear()
    c.files.clear()
    c.file(
        "generate",
        [[{"key": "k1:a", "_future_member": [1]}]],
        header={"compression_hint": "zstd-3"},
    )
    c.doc["x_future"] = {"nested": True}
    c.doc["stages"][0]["x_stage_note"] = "ignored"
    c.doc["stages"][0]["files"][0]["x_file_note"] = 7
    c.artifact("notes.md", b"# notes\n", "text/markdown")
    c.doc["artifacts"][0]["x_artifact_note"] = None
    cases.append(c)

    c = running(
        "valid",
        "newer-minor-version",
        "format_version 1.9 with an unknown optional member: same MAJOR, so it is read.",
        ["VER-1", "VER-4"],
    )
    c.doc["format_version"] = "1.9"
    c.doc["retention_hint"] = {"keep": 3}
    cases.append(c)

    c = running(
        "valid",
        "older-revisions-pruned",
        "Only revisions 99999999 and 100000000 "
        "remain; the highest by number (not by name) is current.",
        ["COMMIT-7", "COMMIT-9", "NAME-6"],
    )
    old = copy.deepcopy(c.doc)
    old.update(revision=99999999, stages=[], status="running")
    c.doc["revision"] = 100000000
    c.revisions = {
        99999999: (
            json.dumps(old | {"config_hash": compute_key(old["config"])}, indent=2) + "\n"
        ).encode(),
        100000000: c.manifest_bytes(),
    }
    cases.append(c)

    c = running(
        "valid",
        "local-state-ignored",
        "Dot-files (locks, temp files) anywhere in the "
        "run are local state, ignored by readers and verify.",
        ["LAYOUT-1"],
    )
    c.files[".lock"] = b""
    c.files[".writer-a1b2c3d4.lock"] = b""
    c.files["_manifests/.tmp-0123456789abcdef"] = b'{"partial'
    c.files["stages/generate/.tmp-77"] = b"junk"
    cases.append(c)

    c = Case(
        "valid",
        "files-in-manifest-order",
        "Two writers' files in one stage: records come "
        "in manifest order, not name order; a 7-digit sequence number.",
        ["MAN-8", "REC-7", "NAME-4", "COMMIT-6"],
    )
    c.stage("generate", status="running")
    c.file("generate", [[{"from": "zz99", "n": 1}]], writer="zz99", seq=3)
    c.file("generate", [[{"from": "a1b2c3d4", "n": 2}]], seq=1000000, digits=7)
    c.file("generate", [[{"from": "0000", "n": 3}]], writer="0000", seq=1)
    cases.append(c)

    c = base(
        "valid",
        "nested-artifact-and-values",
        "Artifacts in sub-folders, records with 64-bit integers, floats, escapes and deep nesting.",
        ["NAME-5", "REC-1", "REC-3"],
    )
    c.artifact("plots/loss-curve_v1.svg", b"<svg/>", "image/svg+xml")
    c.doc["stages"][0]["files"].clear()
    c.files = {k: v for k, v in c.files.items() if not k.startswith("stages/generate")}
    c.file(
        "generate",
        [
            [
                {
                    "key": "k1:big",
                    "int": 9223372036854775807,
                    "neg": -(2**63),
                    "f": 1e-7,
                    "g": 1.5e300,
                    "s": 'tab\tquote"nl\nnul\u0000',
                    "deep": [[[{"x": [[]]}]]],
                    "empty": {},
                }
            ]
        ],
    )
    cases.append(c)

    c = base(
        "valid",
        "failed-run",
        "A run finished as failed, with its error message.",
        ["MAN-9", "COMMIT-11"],
    )
    c.finish("failed", "RuntimeError: the judge model is unavailable")
    c.doc["stages"][1]["status"] = "failed"
    cases.append(c)
    return cases


def invalid_cases() -> list[tuple[Case, dict[str, Any]]]:
    """Each case with its extra case.json members (``error``, ``repairable``)."""
    out: list[tuple[Case, dict[str, Any]]] = []

    def add(c: Case, error: str | None = None, repairable: bool = False) -> Case:
        extra: dict[str, Any] = {"repairable": repairable}
        if error:
            extra["error"] = error
        out.append((c, extra))
        return c

    def raw(c: Case, mutate: Callable[[bytes], bytes]) -> None:
        data = mutate(c.manifest_bytes())
        c.revisions = {c.doc["revision"]: data}
        c.manifest_json = data

    # manifest and versions
    c = add(
        running(
            "invalid",
            "manifest-newer-major",
            "format_version 2.0: a newer MAJOR is refused.",
            ["VER-2"],
        ),
        "UnsupportedFormatError",
    )
    c.doc["format_version"] = "2.0"
    c = add(
        running(
            "invalid",
            "manifest-unknown-required-feature",
            "required_features names a feature this reader does not know.",
            ["VER-3"],
        ),
        "UnsupportedFormatError",
    )
    c.doc["required_features"] = ["time-travel"]
    c = add(
        running("invalid", "manifest-not-json", "The revision is cut in the middle.", ["MAN-1"]),
        "ManifestError",
    )
    raw(c, lambda b: b[: len(b) // 2])
    c = add(
        running(
            "invalid", "manifest-duplicate-member", "The manifest names 'status' twice.", ["MAN-1"]
        ),
        "ManifestError",
    )
    raw(
        c,
        lambda b: b.replace(
            b'"status": "running",', b'"status": "running",\n  "status": "completed",', 1
        ),
    )
    c = add(
        running("invalid", "manifest-nan", "A counter holds NaN, which JSON has not.", ["MAN-1"]),
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"counters": {}', b'"counters": {"x": NaN}', 1))
    c = add(
        running(
            "invalid", "manifest-not-utf8", "The name holds a byte that is not UTF-8.", ["MAN-1"]
        ),
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"name": "manifest-not-utf8"', b'"name": "bad \xff"', 1))
    c = add(
        running("invalid", "manifest-missing-member", "The manifest has no run_id.", ["MAN-2"]),
        "ManifestError",
    )
    del c.doc["run_id"]
    c = add(
        running(
            "invalid",
            "manifest-bad-run-id",
            "The run id has capitals and a colon.",
            ["MAN-2", "NAME-1"],
        ),
        "ManifestError",
    )
    c.doc["run_id"] = "Run:1"
    c = add(
        running(
            "invalid",
            "manifest-bad-stage-name",
            "A stage is named 'Generate'.",
            ["MAN-2", "NAME-2"],
        ),
        "ManifestError",
    )
    c.doc["stages"][0]["name"] = "Generate"
    c = add(
        running(
            "invalid",
            "manifest-bad-config-hash",
            "config_hash is not a k1 key.",
            ["MAN-2", "KEY-2"],
        ),
        "ManifestError",
    )
    c.doc["config_hash"] = "sha256:" + "0" * 64
    c = add(
        running(
            "invalid",
            "manifest-revision-mismatch",
            "_manifests/00000003.json holds revision 2.",
            ["MAN-3"],
        ),
        "ManifestError",
    )
    c.doc["revision"] = 2
    c.revisions = {3: c.manifest_bytes()}
    c = add(
        running("invalid", "duplicate-stage", "Two stages are named 'generate'.", ["MAN-4"]),
        "ManifestError",
    )
    c.doc["stages"].append(copy.deepcopy(c.doc["stages"][0]) | {"files": []})
    c = add(
        running(
            "invalid",
            "file-in-other-stage",
            "Stage 'score' lists a file under stages/generate/.",
            ["MAN-5"],
        ),
        "ManifestError",
    )
    c.stage("score")
    c.doc["stages"][1]["files"] = c.doc["stages"][0]["files"]
    c.doc["stages"][0]["files"] = []
    c = add(
        running(
            "invalid",
            "failures-exceed-records",
            "A file lists more failures than records.",
            ["MAN-5"],
        ),
        "ManifestError",
    )
    c.doc["stages"][0]["files"][0]["failures"] = 5
    c = add(
        running(
            "invalid",
            "path-escapes-run",
            "An artifact path climbs out of the run with '..'.",
            ["MAN-6", "LAYOUT-5", "NAME-5"],
        ),
        "ManifestError",
    )
    c.artifact("report.txt", b"x")
    c.doc["artifacts"][0]["path"] = "artifacts/../../outside.txt"
    c.outside["outside.txt"] = b"x"
    c = add(
        running(
            "invalid",
            "artifact-device-name",
            "An artifact named 'aux.txt', a device name on Windows.",
            ["MAN-6", "NAME-5"],
        ),
        "ManifestError",
    )
    c.artifact("aux.txt", b"x")
    c = add(
        running(
            "invalid",
            "case-colliding-paths",
            "Artifacts 'Report.txt' and 'report.txt' collide on case-insensitive filesystems.",
            ["MAN-7"],
        ),
        "ManifestError",
    )
    c.artifact("Report.txt", b"A")
    c.artifact("report.txt", b"b")

    # layout
    c = add(
        running(
            "invalid",
            "no-revisions",
            "manifest.json without _manifests/ (a copy that left the folder out).",
            ["LAYOUT-2"],
        ),
        "ManifestError",
    )
    c.revisions = {0: b""}
    c = add(
        running(
            "invalid", "missing-stage-file", "A listed stage file does not exist.", ["LAYOUT-3"]
        ),
        "ChecksumMismatchError",
    )
    c.files.clear()
    c = add(
        running("invalid", "missing-artifact", "A listed artifact does not exist.", ["LAYOUT-3"]),
        "FormatError",
    )
    path = c.artifact("gone.bin", b"\x00\x01")
    del c.files[path]
    c = add(
        running(
            "invalid",
            "unlisted-file",
            "A file at the run root that no manifest lists.",
            ["LAYOUT-4"],
        )
    )
    c.files["notes.txt"] = b"hello\n"
    c = add(
        running(
            "invalid",
            "unexpected-file-in-manifests",
            "_manifests/ holds a file that is not a revision.",
            ["LAYOUT-4", "NAME-6"],
        )
    )
    c.files["_manifests/latest.json"] = b"{}\n"
    c = add(
        running(
            "invalid",
            "symlink-stage-file",
            "The listed stage file is a symbolic link "
            "to a copy outside the run (made at test time: see setup).",
            ["LAYOUT-5"],
        ),
        "FormatError",
    )
    target = c.doc["stages"][0]["files"][0]["path"]
    c.outside["outside/part.jsonl.zst"] = c.files.pop(target)
    c.setup.append({"symlink": f"run/{target}", "target": "outside/part.jsonl.zst"})

    # stage files
    def corrupt_file(
        name: str,
        description: str,
        rules: list[str],
        error: str,
        mutate: Callable[[bytes], bytes],
        relist: bool = True,
    ) -> Case:
        c = add(running("invalid", name, description, rules), error)
        path = c.doc["stages"][0]["files"][0]["path"]
        c.files[path] = mutate(c.files[path])
        if relist:
            c.entry(path).update(bytes=len(c.files[path]), sha256=_sha(c.files[path]))
        return c

    def header_len(data: bytes) -> int:
        return len(PREFIX) + 8 + int(struct.unpack_from("<I", data, len(PREFIX) + 4)[0])

    corrupt_file(
        "frame-missing-prefix",
        "The file starts with the header frame, without the empty zstd frame.",
        ["FRAME-1"],
        "StageFileError",
        lambda b: b[len(PREFIX) :],
    )
    corrupt_file(
        "header-wrong-magic",
        "The header frame uses skippable magic 0x184D2A50.",
        ["FRAME-2"],
        "StageFileError",
        lambda b: PREFIX + struct.pack("<I", 0x184D2A50) + b[len(PREFIX) + 4 :],
    )

    c = add(
        running(
            "invalid",
            "header-names-other-stage",
            "The header says stage 'score' in a file under stages/generate/.",
            ["FRAME-2"],
        ),
        "StageFileError",
    )
    c.doc["stages"][0]["files"].clear()
    c.file("generate", [GEN[:2]], header={"stage": "score"})
    c = add(
        running(
            "invalid",
            "header-declaration-mismatch",
            "The header's key_field differs from the stage's declaration.",
            ["FRAME-2", "VER-5"],
        ),
        "StageFileError",
    )
    c.doc["stages"][0]["files"].clear()
    c.file("generate", [GEN[:2]], header={"key_field": "id"})
    c = add(
        running("invalid", "header-not-json", "The header frame's body is not JSON.", ["FRAME-2"]),
        "StageFileError",
    )
    c.doc["stages"][0]["files"].clear()
    path = c.file("generate", [GEN[:2]])
    c.files[path] = PREFIX + skippable(b"{not json}", HEADER_MAGIC) + data_frame(GEN[:2])
    c.entry(path).update(bytes=len(c.files[path]), sha256=_sha(c.files[path]))

    big = 64 * 1024 * 1024 // 3 + 1
    oversize = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b"{}\n" * big)
    corrupt_file(
        "frame-content-over-64mib",
        f"A data frame declares {big * 3} bytes of content, over the 64 MiB limit.",
        ["FRAME-4"],
        "StageFileError",
        lambda b: b + oversize,
    )
    corrupt_file(
        "frame-truncated-tail",
        "The listed bytes end inside a data frame (length and sha256 listed for the cut file).",
        ["FRAME-5"],
        "StageFileError",
        lambda b: b[:-5],
    )
    corrupt_file(
        "frame-garbage-after-header",
        "Bytes that are no frame follow the header.",
        ["FRAME-5"],
        "StageFileError",
        lambda b: b[: header_len(b)] + b"GARBAGE!" + b[header_len(b) :],
    )
    short = _ENC.encode(b'{"a":1}\n')
    corrupt_file(
        "frame-content-size-wrong",
        "A data frame declares 9 bytes of content and holds 8.",
        ["FRAME-4", "FRAME-5"],
        "StageFileError",
        lambda b: b + short[:5] + b"\x09" + short[6:],
    )
    corrupt_file(
        "flipped-byte",
        "One bit flipped inside a data frame; the manifest still lists the original sha256.",
        ["CHECK-1", "FRAME-3"],
        "FormatError",
        lambda b: flip(b, len(b) - 12),
        relist=False,
    )
    c = add(
        running(
            "invalid",
            "sha256-mismatch",
            "The file is intact but the manifest lists another sha256.",
            ["CHECK-1"],
        ),
        "ChecksumMismatchError",
    )
    c.doc["stages"][0]["files"][0]["sha256"] = "0" * 64
    corrupt_file(
        "file-shorter-than-listed",
        "The file was cut after the commit: it is shorter than its listed length.",
        ["CHECK-1"],
        "ChecksumMismatchError",
        lambda b: b[:-7],
        relist=False,
    )
    c = add(
        running(
            "invalid",
            "artifact-sha256-mismatch",
            "An artifact's bytes differ from its listed sha256.",
            ["CHECK-1"],
        ),
        "ChecksumMismatchError",
    )
    path = c.artifact("report.txt", b"accuracy 0.5\n")
    c.files[path] = b"accuracy 0.9\n"
    c = add(
        running(
            "invalid",
            "record-count-mismatch",
            "The manifest lists 3 records where the file holds 2.",
            ["CHECK-2"],
        ),
        "ChecksumMismatchError",
    )
    c.doc["stages"][0]["files"][0]["records"] = 3
    c = add(
        running(
            "invalid",
            "failure-count-mismatch",
            "The manifest lists 1 failure where the file holds none.",
            ["CHECK-2"],
        )
    )
    c.doc["stages"][0]["files"][0]["failures"] = 1

    def bad_lines(name: str, description: str, rules: list[str], payload: bytes) -> None:
        c = add(running("invalid", name, description, rules), "StageFileError")
        c.doc["stages"][0]["files"].clear()
        path = c.file("generate", [])
        c.files[path] += _ENC.encode(payload)
        c.entry(path).update(bytes=len(c.files[path]), sha256=_sha(c.files[path]), records=1)

    bad_lines("record-not-object", "A line holds a JSON array.", ["REC-1"], b"[1, 2]\n")
    bad_lines("record-invalid-json", "A line is not JSON.", ["REC-1"], b"{'single': 1}\n")
    bad_lines(
        "record-invalid-utf8",
        "A line holds a byte that is not UTF-8.",
        ["REC-1"],
        b'{"a": "\xc3\x28"}\n',
    )
    bad_lines("record-empty-line", "An empty line between records.", ["REC-1"], b'{"a": 1}\n\n')
    bad_lines(
        "frame-partial-line",
        "A data frame's content does not end with a newline: a record split across frames.",
        ["REC-2"],
        b'{"a": 1}\n{"b":',
    )

    # SHA256SUMS
    c = add(
        base(
            "invalid",
            "sums-mismatch",
            "SHA256SUMS lists another digest for manifest.json.",
            ["CHECK-3"],
        ),
        repairable=True,
    )
    digest = _sha(c.manifest_bytes()).encode()
    c.sums_mutate = lambda b: b.replace(digest, b"f" * 64)
    c = add(
        running("invalid", "sums-on-running-run", "A running run carries SHA256SUMS.", ["CHECK-3"]),
        repairable=True,
    )
    c.files["SHA256SUMS"] = b"0" * 64 + b"  manifest.json\n"
    c = add(
        running(
            "invalid",
            "sums-malformed",
            "SHA256SUMS holds a line that is not '<sha256>  <path>'.",
            ["CHECK-3"],
        ),
        repairable=True,
    )
    c.finish()
    c.files["SHA256SUMS"] = b"not a sums line\n"
    c.sums = False

    # crash states (repair fixes them)
    c = add(
        running(
            "invalid",
            "stale-manifest-json",
            "A crash between creating revision 3 and "
            "replacing manifest.json: manifest.json holds revision 2.",
            ["COMMIT-7"],
        ),
        repairable=True,
    )
    older = copy.deepcopy(c.doc) | {"revision": 2, "stages": []}
    c.manifest_json = (
        json.dumps(older | {"config_hash": compute_key(older["config"])}, indent=2) + "\n"
    ).encode()
    c = add(
        running(
            "invalid",
            "missing-manifest-json",
            "manifest.json is gone; the revisions are intact.",
            ["COMMIT-7"],
        ),
        repairable=True,
    )
    c.manifest_json = b""

    c = add(
        running(
            "invalid",
            "uncommitted-frames",
            "Complete frames appended after the last "
            "commit (a crash before the next revision): repair salvages them.",
            ["COMMIT-8"],
        ),
        repairable=True,
    )
    path = c.doc["stages"][0]["files"][0]["path"]
    c.files[path] += data_frame([GEN[2]]) + data_frame([{"key": "k1:q4", "late": True}])
    c = add(
        running(
            "invalid",
            "torn-tail",
            "A frame cut short after the last commit: repair "
            "cuts it off, keeping the committed records.",
            ["COMMIT-8"],
        ),
        repairable=True,
    )
    path = c.doc["stages"][0]["files"][0]["path"]
    c.files[path] += data_frame([GEN[2]])[:-6]
    c = add(
        running(
            "invalid",
            "unlisted-stage-file",
            "A stage file that no revision lists (a "
            "crash before its first commit): repair salvages its complete frames.",
            ["COMMIT-8", "LAYOUT-4"],
        ),
        repairable=True,
    )
    listed = c.doc["stages"][0]["files"][0]
    c.file(
        "generate", [[{"key": "k1:late", "n": 1}], [{"key": "k1:later", "n": 2}]], writer="e5f6a7b8"
    )
    c.doc["stages"][0]["files"] = [listed]
    c = add(
        running(
            "invalid",
            "newest-revision-corrupt",
            "The newest revision is not JSON "
            "(storage damage): repair sets it aside and the previous one is current.",
            ["COMMIT-7", "MAN-1"],
        ),
        "ManifestError",
        repairable=True,
    )
    prev = copy.deepcopy(c.doc) | {"revision": 2}
    prev_bytes = (
        json.dumps(prev | {"config_hash": compute_key(prev["config"])}, indent=2) + "\n"
    ).encode()
    c.revisions = {2: prev_bytes, 3: b'{"format": "runfmt", "revis'}
    c.manifest_json = prev_bytes
    return out


def writer_case() -> Case:
    """A run written by runfmt's own `RunWriter`, copied as it is (dot-files left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "runs")
        w = store.create_run(
            "written-by-runwriter",
            {"model": "m2", "seed": 7},
            tags={"owner": "suite"},
            run_id="written-by-runwriter",
            flush_every=2,
            flush_interval=None,
        )
        gen = w.stage("generate", key_field="key")
        for i in range(5):
            gen.append({"key": f"k1:{i}", "text": f"answer {i}"})
        gen.complete()
        w.append("score", {"key": "k1:0", "_error": "judge failed"})
        w.count("tokens", 120)
        w.add_artifact("summary.json", b'{"n": 5}\n', "application/json")
        w.finish()
        case = Case(
            "valid",
            "written-by-runwriter",
            "A run written by the Python RunWriter "
            "with a flush every 2 records: several revisions and frames.",
            ["COMMIT-1", "COMMIT-3", "COMMIT-11", "KEY-4"],
        )
        folder = SUITE / "valid" / case.name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(
            Path(tmp) / "runs" / "written-by-runwriter",
            folder / "run",
            ignore=shutil.ignore_patterns(".*"),
        )
    meta = {**case.meta, "outcome": "valid", "built_with": "runfmt-writer"}
    _put(folder / "case.json", (json.dumps(meta, indent=2) + "\n").encode())
    return case


def main() -> None:
    for kind in ("valid", "invalid"):
        for old in (SUITE / kind).glob("*"):
            if old.is_dir() and not old.name.startswith("plain-"):
                shutil.rmtree(old)
    folders = [c.write() for c in valid_cases()]
    for c, extra in invalid_cases():
        c.meta.update(extra)
        folders.append(c.write())
    writer_case()
    folders.append(SUITE / "valid" / "written-by-runwriter")
    from tests.conformance.build_lifecycle import lifecycle_cases

    folders += [c.write() for c in lifecycle_cases()]
    for folder in folders:
        finish_case(folder)
    print(f"built {len(folders)} cases in {SUITE}")


if __name__ == "__main__":
    main()
