"""Build the conformance cases made with the format core: ``python -m tests.conformance.build``.

Each case is a folder ``valid/<name>/`` or ``invalid/<name>/`` holding ``case.json``,
the run folder ``run/`` and, where the suite expects a view, ``expected.json``.
Cases named ``plain-*`` come from ``build_plain.sh`` (zstd CLI, printf, sha256sum)
and are left alone here.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

from runfmt.format.keys import compute_key
from runfmt.store import Store
from tests.conformance.build_lifecycle import lifecycle_cases
from tests.conformance.builder import (
    HEADER_MAGIC,
    SUITE,
    T0,
    Case,
    base,
    counter_frame,
    finish_case,
    put_file,
    running,
    skippable,
)
from tests.conformance.cases_invalid import invalid_cases


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
        "counter-frames",
        "Counter frames before data frames: readers skip them; the counters are the manifest's.",
        ["FRAME-5", "FRAME-6"],
    )
    c.stage("generate")
    c.file(
        "generate",
        [
            counter_frame(b'{"counters":{"tokens":7,"cost_usd":0.5}}'),
            [{"i": 0}],
            counter_frame(b'{"counters":{"tokens":3}}'),
            [{"i": 1}],
        ],
    )
    c.doc["counters"] = {"cost_usd": 0.5, "tokens": 10}
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
    put_file(folder / "case.json", (json.dumps(meta, indent=2) + "\n").encode())
    return case


WRITER_CASE = SUITE / "valid" / "written-by-runwriter"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.conformance.build", description=__doc__)
    parser.add_argument(
        "--writer-case",
        action="store_true",
        help="also rewrite valid/written-by-runwriter (its timestamps and ids change each time)",
    )
    args = parser.parse_args(argv)
    for kind in ("valid", "invalid"):
        for old in (SUITE / kind).glob("*"):
            keep = old.name.startswith("plain-") or (old == WRITER_CASE and not args.writer_case)
            if old.is_dir() and not keep:
                shutil.rmtree(old)
    folders = [c.write() for c in valid_cases()]
    for c, extra in invalid_cases():
        c.meta.update(extra)
        folders.append(c.write())
    if args.writer_case or not WRITER_CASE.exists():
        writer_case()
        folders.append(WRITER_CASE)
    folders += [c.write() for c in lifecycle_cases()]
    for folder in folders:
        finish_case(folder)
    print(f"built {len(folders)} cases in {SUITE}")


if __name__ == "__main__":
    main()
