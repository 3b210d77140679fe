"""The invalid cases of the conformance suite: one fault each, named after it."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from typing import Any

import zstandard

from runfmt.format.frames import PREFIX
from runfmt.format.keys import compute_key
from tests.conformance.builder import (
    ENCODER,
    GEN,
    HEADER_MAGIC,
    Case,
    base,
    counter_frame,
    data_frame,
    flip,
    raw_frame,
    running,
    sha256_of,
    skippable,
)


def invalid_cases() -> list[tuple[Case, dict[str, Any]]]:
    """Each case with its extra case.json members (``error``, ``repairable``)."""
    out: list[tuple[Case, dict[str, Any]]] = []

    def add(c: Case, error: str | None = None, repairable: bool = False) -> Case:
        extra: dict[str, Any] = {"repairable": repairable}
        if error:
            extra["error"] = error
        out.append((c, extra))
        return c

    def invalid(
        name: str,
        description: str,
        rules: list[str],
        error: str | None = None,
        repairable: bool = False,
    ) -> Case:
        """A running run (`running`) with one fault, which the caller adds."""
        return add(running("invalid", name, description, rules), error, repairable)

    def raw(c: Case, mutate: Callable[[bytes], bytes]) -> None:
        data = mutate(c.manifest_bytes())
        c.revisions = {c.doc["revision"]: data}
        c.manifest_json = data

    # manifest and versions
    c = invalid(
        "manifest-newer-major",
        "format_version 2.0: a newer MAJOR is refused.",
        ["VER-2"],
        "UnsupportedFormatError",
    )
    c.doc["format_version"] = "2.0"
    c = invalid(
        "manifest-unknown-required-feature",
        "required_features names a feature this reader does not know.",
        ["VER-3"],
        "UnsupportedFormatError",
    )
    c.doc["required_features"] = ["time-travel"]
    c = invalid(
        "manifest-major-zero",
        "format_version 0.9: versions start at 1.0, so no reader implements MAJOR 0.",
        ["VER-1"],
        "UnsupportedFormatError",
    )
    c.doc["format_version"] = "0.9"
    c = invalid(
        "manifest-integer-with-fraction",
        "A file entry's records count is written 2.0: integer members are JSON integers.",
        ["MAN-1", "MAN-2"],
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"records": 2,', b'"records": 2.0,', 1))
    c = invalid(
        "manifest-tag-name-line-feed",
        "A tag name ends with a line feed, which its pattern's final $ does not match "
        "(ECMA-262 semantics, section 11.2).",
        ["MAN-2"],
        "ManifestError",
    )
    c.doc["tags"] = {"suite\n": "conformance"}
    c = invalid(
        "manifest-lone-surrogate",
        "The run's name begins with an escaped lone surrogate (\\ud800): a manifest's "
        "strings hold Unicode scalar values only.",
        ["MAN-1"],
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"name": "', b'"name": "\\ud800', 1))
    c = invalid(
        "manifest-number-not-finite",
        "A counter is 1e400, which is no finite double.",
        ["MAN-1"],
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"counters": {}', b'"counters": {"big": 1e400}', 1))
    c = invalid(
        "manifest-counter-beyond-64-bits",
        "A counter written as an integer is 2^63, past the ±(2^63-1) integer counters stay within.",
        ["COMMIT-5", "MAN-2"],
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"counters": {}', b'"counters": {"n": 9223372036854775808}', 1))
    c = invalid(
        "manifest-count-beyond-64-bits",
        "A file entry's records count is 2^63, past the 2^63-1 every count of the "
        "manifest is at most.",
        ["MAN-5", "MAN-2"],
        "ManifestError",
    )
    raw(c, lambda b: b.replace(b'"records": 2,', b'"records": 9223372036854775808,', 1))
    c = invalid(
        "manifest-not-json", "The revision is cut in the middle.", ["MAN-1"], "ManifestError"
    )
    raw(c, lambda b: b[: len(b) // 2])
    c = invalid(
        "manifest-duplicate-member",
        "The manifest names 'status' twice.",
        ["MAN-1"],
        "ManifestError",
    )
    raw(
        c,
        lambda b: b.replace(
            b'"status": "running",', b'"status": "running",\n  "status": "completed",', 1
        ),
    )
    c = invalid(
        "manifest-nan", "A counter holds NaN, which JSON has not.", ["MAN-1"], "ManifestError"
    )
    raw(c, lambda b: b.replace(b'"counters": {}', b'"counters": {"x": NaN}', 1))
    c = invalid(
        "manifest-not-utf8", "The name holds a byte that is not UTF-8.", ["MAN-1"], "ManifestError"
    )
    raw(c, lambda b: b.replace(b'"name": "manifest-not-utf8"', b'"name": "bad \xff"', 1))
    c = invalid(
        "manifest-missing-member", "The manifest has no run_id.", ["MAN-2"], "ManifestError"
    )
    del c.doc["run_id"]
    c = invalid(
        "manifest-bad-run-id",
        "The run id has capitals and a colon.",
        ["MAN-2", "NAME-1"],
        "ManifestError",
    )
    c.doc["run_id"] = "Run:1"
    c = invalid(
        "manifest-bad-stage-name",
        "A stage is named 'Generate'.",
        ["MAN-2", "NAME-2"],
        "ManifestError",
    )
    c.doc["stages"][0]["name"] = "Generate"
    c = invalid(
        "manifest-stage-device-name",
        "A stage is named 'aux', a device name on Windows.",
        ["MAN-2", "NAME-2"],
        "ManifestError",
    )
    c.doc["stages"][0]["name"] = "aux"
    c = invalid(
        "manifest-run-id-device-name",
        "The run id is 'con.1', whose part before the dot is a device name on Windows.",
        ["MAN-2", "NAME-1"],
        "ManifestError",
    )
    c.doc["run_id"] = "con.1"
    c = invalid(
        "manifest-bad-config-hash",
        "config_hash is not a k1 key.",
        ["MAN-2", "KEY-2"],
        "ManifestError",
    )
    c.doc["config_hash"] = "sha256:" + "0" * 64
    c = invalid(
        "config-hash-mismatch",
        "config_hash is a well-formed key, but of another config.",
        ["KEY-4"],
        "ManifestError",
    )
    c.doc["config_hash"] = compute_key({"model": "another"})
    for name, description, changes in (
        ("finished-at-on-running-run", "A running run has a finished_at time.",
         {"finished_at": "2026-11-01T12:00:05.000000Z"}),
        ("error-on-running-run", "A running run has an error message.", {"error": "oops"}),
        ("timestamp-not-a-date", "created_at matches the pattern but is month 13, day 45.",
         {"created_at": "2026-13-45T12:00:00.000000Z"}),
    ):  # fmt: skip
        c = invalid(name, description, ["MAN-9"], "ManifestError")
        c.doc.update(changes)
    c = invalid(
        "manifest-revision-mismatch",
        "_manifests/00000003.json holds revision 2.",
        ["MAN-3"],
        "ManifestError",
    )
    c.doc["revision"] = 2
    c.revisions = {3: c.manifest_bytes()}
    c = invalid("duplicate-stage", "Two stages are named 'generate'.", ["MAN-4"], "ManifestError")
    c.doc["stages"].append(copy.deepcopy(c.doc["stages"][0]) | {"files": []})
    c = invalid(
        "file-in-other-stage",
        "Stage 'score' lists a file under stages/generate/.",
        ["MAN-5"],
        "ManifestError",
    )
    c.stage("score")
    c.doc["stages"][1]["files"] = c.doc["stages"][0]["files"]
    c.doc["stages"][0]["files"] = []
    c = invalid(
        "failures-exceed-records",
        "A file lists more failures than records.",
        ["MAN-5"],
        "ManifestError",
    )
    c.doc["stages"][0]["files"][0]["failures"] = 5
    c = invalid(
        "path-escapes-run",
        "An artifact path climbs out of the run with '..'.",
        ["MAN-6", "LAYOUT-5", "NAME-5"],
        "ManifestError",
    )
    del c.files[c.artifact("report.txt", b"x")]
    c.doc["artifacts"][0]["path"] = "artifacts/../../outside.txt"
    c.outside["outside.txt"] = b"x"
    for name, description, rules, artifacts in (
        ("artifact-device-name", "An artifact named 'aux.txt', a device name on Windows.",
         ["MAN-6", "NAME-5"], {"aux.txt": b"x"}),
        ("artifact-name-not-ascii",
         "An artifact named with the Kelvin sign (U+212A), which case-folds to 'k': "
         "artifact names take ASCII letters only.",
         ["MAN-6", "NAME-5"], {"\u212aelvin.txt": b"x"}),
        ("case-colliding-paths",
         "Artifacts 'Report.txt' and 'report.txt' collide on case-insensitive filesystems.",
         ["MAN-7"], {"Report.txt": b"A", "report.txt": b"b"}),
    ):  # fmt: skip
        c = invalid(name, description, rules, "ManifestError")
        for artifact, data in artifacts.items():
            c.artifact(artifact, data)

    # layout
    c = invalid(
        "no-revisions",
        "manifest.json without _manifests/ (a copy that left the folder out).",
        ["LAYOUT-2"],
        "ManifestError",
    )
    c.revisions = {0: b""}
    c = invalid(
        "missing-stage-file",
        "A listed stage file does not exist.",
        ["LAYOUT-3"],
        "ChecksumMismatchError",
    )
    c.files.clear()
    c = invalid(
        "missing-artifact",
        "A listed artifact does not exist.",
        ["LAYOUT-3"],
        "ChecksumMismatchError",
    )
    path = c.artifact("gone.bin", b"\x00\x01")
    del c.files[path]
    c = invalid("unlisted-file", "A file at the run root that no manifest lists.", ["LAYOUT-4"])
    c.files["notes.txt"] = b"hello\n"
    c = invalid(
        "unexpected-file-in-manifests",
        "_manifests/ holds a file that is not a revision.",
        ["LAYOUT-4", "NAME-6"],
    )
    c.files["_manifests/latest.json"] = b"{}\n"
    c = invalid(
        "revision-name-not-canonical",
        "_manifests/ also holds 000000003.json, a second spelling of revision 3.",
        ["LAYOUT-4", "NAME-6"],
    )
    c.files["_manifests/000000003.json"] = c.manifest_bytes()
    c = invalid(
        "older-revision-corrupt",
        "Revision 2, older than the current 3, is not JSON.",
        ["MAN-2", "MAN-1"],
    )
    c.revisions = {2: b'{"format": "runfmt", "revis', 3: c.manifest_bytes()}
    c = invalid(
        "symlink-stage-file",
        "The listed stage file is a symbolic link "
        "to a copy outside the run (made at test time: see setup).",
        ["LAYOUT-5"],
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
        c = invalid(name, description, rules, error)
        path = c.doc["stages"][0]["files"][0]["path"]
        c.files[path] = mutate(c.files[path])
        if relist:
            c.entry(path).update(bytes=len(c.files[path]), sha256=sha256_of(c.files[path]))
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

    for name, about, rule, error, header in [
        ("header-names-other-stage", "The header says stage 'score' in a file under "
         "stages/generate/.", "FRAME-2", "StageFileError", {"stage": "score"}),
        ("header-names-other-writer", "The header names writer 'other1' and seq 7 in the "
         "file of writer w1, seq 1.", "FRAME-2", "StageFileError", {"writer": "other1", "seq": 7}),
        ("header-invalid", "The header's format member is 'nope' instead of 'runfmt-stage'.",
         "FRAME-2", "StageFileError", {"format": "nope"}),
        ("header-newer-major", "A stage file's header says format_version 2.0 in a 1.0 run.",
         "VER-2", "UnsupportedFormatError", {"format_version": "2.0"}),
    ]:  # fmt: skip
        c = invalid(name, about, [rule], error)
        c.doc["stages"][0]["files"].clear()
        c.file("generate", [GEN[:2]], header=header)
    c = invalid(
        "header-declaration-mismatch",
        "The header's key_field differs from the stage's declaration.",
        ["FRAME-2", "VER-5"],
        "StageFileError",
    )
    c.doc["stages"][0]["files"].clear()
    c.file("generate", [GEN[:2]], header={"key_field": "id"})
    c = invalid(
        "header-not-json", "The header frame's body is not JSON.", ["FRAME-2"], "StageFileError"
    )
    c.doc["stages"][0]["files"].clear()
    path = c.file("generate", [GEN[:2]])
    c.files[path] = PREFIX + skippable(b"{not json}", HEADER_MAGIC) + data_frame(GEN[:2])
    c.entry(path).update(bytes=len(c.files[path]), sha256=sha256_of(c.files[path]))

    big = 64 * 1024 * 1024 // 3 + 1
    oversize = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(b"{}\n" * big)
    corrupt_file(
        "frame-content-over-64mib",
        f"A data frame declares {big * 3} bytes of content, over the 64 MiB limit.",
        ["FRAME-4"],
        "StageFileError",
        lambda b: b + oversize,
    )
    line = b'{"a":1}\n'
    corrupt_file(
        "frame-window-over-128mib",
        "A data frame's header declares a 256 MiB window (2^28 bytes) for 8 bytes of content.",
        ["FRAME-4"],
        "StageFileError",
        lambda b: b + raw_frame(line, window_log=28),
    )
    corrupt_file(
        "frame-dictionary",
        "A data frame declares zstd dictionary 7, which no reader has.",
        ["FRAME-4"],
        "StageFileError",
        lambda b: b + raw_frame(line, window_log=17, dict_id=7),
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
    short = ENCODER.encode(b'{"a":1}\n')
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
    c = invalid(
        "sha256-mismatch",
        "The file is intact but the manifest lists another sha256.",
        ["CHECK-1"],
        "ChecksumMismatchError",
    )
    c.doc["stages"][0]["files"][0]["sha256"] = "0" * 64
    corrupt_file(
        "file-shorter-than-listed",
        "The file was cut after the commit: it is shorter than its listed length.",
        ["LAYOUT-3", "CHECK-1"],
        "ChecksumMismatchError",
        lambda b: b[:-7],
        relist=False,
    )
    c = invalid(
        "artifact-sha256-mismatch",
        "An artifact's bytes differ from its listed sha256.",
        ["CHECK-1"],
        "ChecksumMismatchError",
    )
    path = c.artifact("report.txt", b"accuracy 0.5\n")
    c.files[path] = b"accuracy 0.9\n"
    c = invalid(
        "record-count-mismatch",
        "The manifest lists 3 records where the file holds 2.",
        ["CHECK-2"],
        "ChecksumMismatchError",
    )
    c.doc["stages"][0]["files"][0]["records"] = 3
    c = invalid(
        "failure-count-mismatch",
        "The manifest lists 1 failure where the file holds none.",
        ["CHECK-2"],
    )
    c.doc["stages"][0]["files"][0]["failures"] = 1

    c = invalid(
        "stage-file-seq-zero",
        "A listed stage file is numbered 000000: a run's files are numbered from 1 "
        "(seq 0 marks a stage export).",
        ["NAME-4", "MAN-2"],
        "ManifestError",
    )
    c.doc["stages"][0]["files"].clear()
    c.files.clear()
    c.file("generate", [GEN[:2]], seq=0)
    c = invalid(
        "record-key-empty",
        "A record of the stage keyed by 'key' holds the key \"\": a key has 1 to 1024 characters.",
        ["REC-6"],
    )
    c.doc["stages"][0]["files"].clear()
    c.file("generate", [GEN[:1], [{"key": "", "question": "?", "answer": "!"}]])

    def bad_lines(name: str, description: str, rules: list[str], payload: bytes) -> None:
        c = invalid(name, description, rules, "StageFileError")
        c.doc["stages"][0]["files"].clear()
        path = c.file("generate", [])
        c.files[path] += ENCODER.encode(payload)
        c.entry(path).update(bytes=len(c.files[path]), sha256=sha256_of(c.files[path]), records=1)

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
    digest = sha256_of(c.manifest_bytes()).encode()
    c.sums_mutate = lambda b: b.replace(digest, b"f" * 64)
    c = add(
        base(
            "invalid",
            "sums-out-of-order",
            "SHA256SUMS lists the right digests, manifest.json first instead of sorted by path.",
            ["CHECK-3"],
        ),
        repairable=True,
    )
    c.sums_mutate = lambda b: b"".join(
        sorted(b.splitlines(keepends=True), key=lambda line: b"  manifest.json" not in line)
    )
    c = invalid(
        "sums-on-running-run", "A running run carries SHA256SUMS.", ["CHECK-3"], repairable=True
    )
    c.files["SHA256SUMS"] = b"0" * 64 + b"  manifest.json\n"
    c = invalid(
        "sums-malformed",
        "SHA256SUMS holds a line that is not '<sha256>  <path>'.",
        ["CHECK-3"],
        repairable=True,
    )
    c.finish()
    c.files["SHA256SUMS"] = b"not a sums line\n"
    c.sums = False

    # crash states (repair fixes them)
    c = invalid(
        "stale-manifest-json",
        "A crash between creating revision 3 and "
        "replacing manifest.json: manifest.json holds revision 2.",
        ["COMMIT-7"],
        repairable=True,
    )
    older = copy.deepcopy(c.doc) | {"revision": 2, "stages": []}
    c.manifest_json = (
        json.dumps(older | {"config_hash": compute_key(older["config"])}, indent=2) + "\n"
    ).encode()
    c = invalid(
        "missing-manifest-json",
        "manifest.json is gone; the revisions are intact.",
        ["COMMIT-7"],
        repairable=True,
    )
    c.manifest_json = b""

    c = invalid(
        "uncommitted-frames-with-counters",
        "Two flushes after the last commit, each a counter frame before its data frame; "
        "the second data frame is torn: repair salvages the first flush's record and "
        "adds its deltas, and cuts the second flush with its counter frame.",
        ["COMMIT-8", "FRAME-6"],
        repairable=True,
    )
    path = c.doc["stages"][0]["files"][0]["path"]
    c.doc["counters"] = {"tokens": 5}
    c.files[path] += (
        counter_frame(b'{"counters":{"tokens":7,"cost_usd":0.25}}')
        + data_frame([GEN[2]])
        + counter_frame(b'{"counters":{"tokens":100}}')
        + data_frame([{"key": "k1:q4", "late": True}])[:-5]
    )
    for name, description, rules, tail in (
        ("uncommitted-frames", "Complete frames appended after the last commit (a crash "
         "before the next revision): repair salvages them.", ["COMMIT-8"],
         data_frame([GEN[2]]) + data_frame([{"key": "k1:q4", "late": True}])),
        ("torn-tail", "A frame cut short after the last commit: repair cuts it off, keeping "
         "the committed records.", ["COMMIT-8"], data_frame([GEN[2]])[:-6]),
        ("uncommitted-frame-then-zeros", "After the last commit, a whole frame and then 4096 "
         "zero bytes (what a power loss can leave): repair salvages the frame and cuts the "
         "zeros.", ["COMMIT-8"], data_frame([GEN[2]]) + bytes(4096)),
        ("uncommitted-frame-with-a-bad-key", "After the last commit, a frame holding a record "
         "whose key field is an empty string, which no writer may write: repair salvages the "
         "frame before it and cuts the rest.", ["COMMIT-8", "REC-6"],
         data_frame([GEN[2]]) + data_frame([{"key": ""}]) + data_frame([{"key": "k1:q5"}])),
    ):  # fmt: skip
        c = invalid(name, description, rules, repairable=True)
        c.files[c.doc["stages"][0]["files"][0]["path"]] += tail
    c = invalid(
        "unlisted-stage-file",
        "A stage file that no revision lists (a "
        "crash before its first commit): repair salvages its complete frames.",
        ["COMMIT-8", "LAYOUT-4"],
        repairable=True,
    )
    listed = c.doc["stages"][0]["files"][0]
    c.file(
        "generate", [[{"key": "k1:late", "n": 1}], [{"key": "k1:later", "n": 2}]], writer="e5f6a7b8"
    )
    c.doc["stages"][0]["files"] = [listed]
    c = invalid(
        "unlisted-file-of-replaced-run",
        "A stage file left by a writer of the run this one replaced under the same id "
        "(its header's run_created_at is not the run's created_at): repair removes it "
        "and salvages nothing.",
        ["COMMIT-8", "LAYOUT-4", "FRAME-2"],
        repairable=True,
    )
    listed = c.doc["stages"][0]["files"][0]
    c.file(
        "generate",
        [[{"key": "k1:old", "n": 1}]],
        writer="e5f6a7b8",
        header={"run_created_at": "2026-10-01T08:00:00.000000Z"},
    )
    c.doc["stages"][0]["files"] = [listed]
    c = invalid(
        "unlisted-files-declare-a-stage-two-ways",
        "Two stage files of a stage no revision declares, whose headers declare it "
        "differently: repair declares it from the first file by writer id and salvages "
        "it, and removes the other, which does not match that declaration.",
        ["COMMIT-8", "LAYOUT-4", "FRAME-2"],
        repairable=True,
    )
    c.stage("extra", key_field="key", status="running")
    c.file("extra", [[{"key": "k1:b"}]], writer="b0b0b0b0")
    c.file(
        "extra",
        [[{"n": 1}, {"n": 2}]],
        writer="a0a0a0a0",
        header={"record_schema_version": "2", "key_field": None},
    )
    c.doc["stages"].pop()
    c = invalid(
        "unlisted-files-of-two-undeclared-stages",
        "Stage files of two stages no revision declares, each by one writer, two files "
        "of one stage numbered 999999 and 1000000: repair declares the stages in name "
        "order and lists the files by sequence number as an integer.",
        ["COMMIT-8", "LAYOUT-4", "MAN-8"],
        repairable=True,
    )
    c.stage("zeta", status="running")
    c.stage("alpha", key_field="key", status="running")
    c.file("zeta", [[{"z": 1}]], writer="c0c0c0c0")
    c.file("alpha", [[{"key": "k1:second"}]], seq=1000000, writer="c0c0c0c0")
    c.file("alpha", [[{"key": "k1:first"}]], seq=999999, writer="c0c0c0c0")
    del c.doc["stages"][1:]
    c = invalid(
        "unlisted-artifacts",
        "Artifacts no revision lists, left by a writer that died: repair lists them by "
        "path, each with the media type ART-1's table gives its name.",
        ["COMMIT-8", "ART-1", "LAYOUT-4"],
        repairable=True,
    )
    for name in ("z/plot.PNG", "b.tar.gz", "a.yml", "c.jsonl"):
        c.artifact(name, name.encode())
    c.doc["artifacts"] = []
    c = invalid(
        "newest-revision-corrupt",
        "The newest revision is not JSON "
        "(storage damage): repair sets it aside and the previous one is current.",
        ["COMMIT-7", "MAN-1"],
        "ManifestError",
        repairable=True,
    )
    prev = copy.deepcopy(c.doc) | {"revision": 2}
    prev_bytes = (
        json.dumps(prev | {"config_hash": compute_key(prev["config"])}, indent=2) + "\n"
    ).encode()
    c.revisions = {2: prev_bytes, 3: b'{"format": "runfmt", "revis'}
    c.manifest_json = prev_bytes
    c = invalid(
        "only-revision-corrupt",
        "The only revision kept is not JSON and manifest.json is gone: nothing can stand "
        "in for it, so repair changes nothing.",
        ["MAN-1"],
        "ManifestError",
    )
    c.revisions = {c.doc["revision"]: b'{"format": "runfmt", "revis'}
    c.manifest_json = b""
    c = invalid(
        "manifest-json-folder",
        "A folder named manifest.json, holding a user's file: it counts as a missing "
        "copy, but repair writes no file over it.",
        ["LAYOUT-2"],
    )
    c.manifest_json = b""
    c.files["manifest.json/notes.txt"] = b"my notes\n"
    c = add(
        base(
            "invalid",
            "sums-vouch-by-one-line",
            "The newest revision was changed (tokens 420 made 421); SHA256SUMS lists "
            "manifest.json's digest, but another of its lines is wrong, so it vouches for "
            "neither: not repairable.",
            ["COMMIT-14", "CHECK-3"],
        )
    )
    c.manifest_json = c.manifest_bytes()
    c.revisions = {c.doc["revision"]: c.manifest_json.replace(b'"tokens": 420', b'"tokens": 421')}
    report_digest = sha256_of(b"accuracy 0.5\n").encode()
    c.sums_mutate = lambda b: b.replace(report_digest, b"0" * 64)
    c = invalid(
        "uncommitted-record-too-deep",
        "A frame after the last commit holds a record nested 255 levels deep (REC-3): "
        "salvage takes no invalid frame, so repair cuts it.",
        ["COMMIT-8", "REC-3"],
        repairable=True,
    )
    deep = b'{"key":"k1:deep","v":' + b"[" * 254 + b"]" * 254 + b"}\n"
    c.files[c.doc["stages"][0]["files"][0]["path"]] += ENCODER.encode(deep)
    c = invalid(
        "copy-cut-short",
        "A copy taken while the run was written: the newest revision lists a second frame "
        "that the file holds only part of. Only repair asked to roll back goes back to "
        "the previous revision, which the file holds whole.",
        ["COMMIT-13", "LAYOUT-3", "CHECK-1"],
        "ChecksumMismatchError",
    )
    path = c.doc["stages"][0]["files"][0]["path"]
    prev = copy.deepcopy(c.doc) | {"revision": c.doc["revision"] - 1}
    prev_bytes = (
        json.dumps(prev | {"config_hash": compute_key(prev["config"])}, indent=2) + "\n"
    ).encode()
    full = c.files[path] + data_frame([GEN[2]])
    c.entry(path).update(bytes=len(full), records=3, sha256=sha256_of(full))
    c.files[path] = full[:-6]
    c.revisions = {prev["revision"]: prev_bytes, c.doc["revision"]: c.manifest_bytes()}
    return out
