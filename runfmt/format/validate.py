"""Whole-run rules over facts gathered by the I/O layer; every problem, never just the first.

`FileCheck` is fed a stage file's bytes in chunks and reports what is wrong with
it against its manifest entry. `check_listing` compares a manifest with the
files found in the run folder. Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass

from runfmt.errors import InvalidInputError, StageFileError, UnsupportedFormatError
from runfmt.format import names
from runfmt.format.frames import DECLARATION_DIFFERS, DataFrame, FrameDecoder, declares
from runfmt.format.manifest import (
    FileEntry,
    Manifest,
    StageEntry,
    check_compatible,
    parse_timestamp,
)
from runfmt.format.records import (
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    decode_lines,
    first_too_deep,
    is_failure,
    is_key,
)
from runfmt.format.schemas import schema_errors

__all__ = [
    "FileCheck",
    "Problem",
    "check_listing",
    "cited_rule",
    "folder_name_problem",
    "header_problem",
]

_RUN_FILES = frozenset({names.MANIFEST_FILE, names.SUMS_FILE})
_RULE_ID = re.compile(r"\s*\(([A-Z]+-[0-9]+)\)")
_LINE = re.compile(r"line ([0-9]+): ")


def cited_rule(problem: str, default: str) -> tuple[str, str]:
    """An error's problem text without the rule id it cites, and that rule (else
    ``default``): a `Problem` names its rule once."""
    m = _RULE_ID.search(problem)
    if m is None:
        return problem, default
    return problem[: m.start()] + problem[m.end() :], m[1]


def folder_name_problem(manifest: Manifest, folder: str) -> str | None:
    """What is wrong with a store's run folder named ``folder`` holding ``manifest``, citing
    its rule; None when nothing is. In a store a run folder's name is its run id (LAYOUT-1)."""
    if manifest.run_id == folder:
        return None
    return f"manifest names run {manifest.run_id!r}, not its folder name (LAYOUT-1)"


def header_problem(
    header: Mapping[str, object], path: str, stage: StageEntry | None
) -> tuple[str, str] | None:
    """What is wrong with the header of the stage file at ``path``, and the rule it breaks;
    None when nothing is. It must follow its schema, name the file's stage, writer and seq,
    and carry the declaration of ``stage`` (FRAME-2), in a major version this reader knows
    (VER-1, VER-2: checked first, as a newer header may have another shape)."""
    try:
        check_compatible(header.get("format_version"), None)
    except UnsupportedFormatError as exc:
        return cited_rule(exc.problem, "VER-2")
    problems = schema_errors("stage-header", header)
    if problems:
        return "invalid header: " + "; ".join(problems), "FRAME-2"
    born = header.get("run_created_at")
    if isinstance(born, str):
        try:
            parse_timestamp(born)
        except ValueError:
            return f"invalid header: run_created_at {born!r} is not a real time", "FRAME-2"
    name, parsed = names.parse_stage_file(path)
    if (header["stage"], header["writer"], header["seq"]) != (name, parsed.writer, parsed.seq):
        return "header names another stage or writer than the file name", "FRAME-2"
    if stage is not None and not declares(header, stage.record_schema_version, stage.key_field):
        return DECLARATION_DIFFERS, "FRAME-2"
    return None


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a run: where, what, the spec rule, and whether repair fixes it."""

    location: str
    problem: str
    rule: str = ""
    repairable: bool = False

    def __str__(self) -> str:
        rule = f" ({self.rule})" if self.rule else ""
        return f"{self.location}: {self.problem}{rule}"


class FileCheck:
    """Checks one listed stage file: length, sha256, header, frames, lines, counts."""

    def __init__(self, entry: FileEntry, stage: StageEntry) -> None:
        self.entry = entry
        self.stage = stage
        self._hash = hashlib.sha256()
        self._decoder = FrameDecoder()
        self._seen = 0
        self._records = 0
        self._failures = 0
        self._bad_keys = 0
        self._first_bad_key: tuple[int, object] | None = None
        self._error: Problem | None = None

    def _fail(self, problem: str, rule: str, line: int | None = None) -> None:
        """Keep the file's first problem, citing the rule its text names, else ``rule``."""
        if self._error is None:
            where = self.entry.path if line is None else f"{self.entry.path}:{line}"
            self._error = Problem(where, *cited_rule(problem, rule))

    def feed(self, chunk: bytes) -> None:
        """Feed the next bytes of the file's listed prefix."""
        self._hash.update(chunk)
        self._seen += len(chunk)
        if self._error is not None:
            return
        try:
            for event in self._decoder.decode(chunk):
                if isinstance(event, DataFrame):
                    self._frame(event)
                else:
                    self._header(event)
        except StageFileError as exc:
            self._fail(exc.problem, "FRAME-5")

    def _header(self, header: Mapping[str, object]) -> None:
        found = header_problem(header, self.entry.path, self.stage)
        if found is not None:
            self._fail(*found)

    def _frame(self, frame: DataFrame) -> None:
        try:
            records = decode_lines(frame.content)
        except StageFileError as exc:
            at = _LINE.match(exc.problem)  # the frame's line: the problem names the file's
            line = None if at is None else self._records + int(at[1])
            self._fail(*cited_rule(exc.problem[at.end() if at else 0 :], "REC-1"), line)
            return
        deep = first_too_deep(frame.content, records)
        if deep is not None:
            what = f"nests objects and arrays more than {MAX_DEPTH} levels deep"
            self._fail(what, "REC-3", self._records + deep)
            return
        key_field = self.stage.key_field
        if key_field is not None:
            for n, record in enumerate(records, self._records + 1):
                key = record.get(key_field)
                if key is not None and not is_key(key):
                    self._bad_keys += 1
                    self._first_bad_key = self._first_bad_key or (n, key)
        self._records += len(records)
        self._failures += sum(map(is_failure, records))

    def finish(self, file_size: int | None) -> list[Problem]:
        """All problems found, given the file's actual size (None: missing)."""
        e = self.entry
        if file_size is None:
            return [Problem(e.path, "listed file is missing", "LAYOUT-3")]
        problems = []
        if file_size < e.bytes or self._seen < e.bytes:
            problems.append(
                Problem(e.path, f"file has {file_size} bytes, manifest lists {e.bytes}", "CHECK-1")
            )
            return problems
        if self._hash.hexdigest() != e.sha256:
            problems.append(Problem(e.path, "sha256 of the listed bytes does not match", "CHECK-1"))
        if self._error is None:
            try:
                self._decoder.close()
            except StageFileError as exc:
                self._fail(exc.problem, "FRAME-5")
        if self._error is None and self._first_bad_key is not None:
            line, key = self._first_bad_key
            more = f" (and {self._bad_keys - 1} more records)" if self._bad_keys > 1 else ""
            problems.append(
                Problem(
                    f"{e.path}:{line}",
                    f"key field {self.stage.key_field!r} holds {key!r:.40}, not a string of 1 "
                    f"to {MAX_KEY_LENGTH} characters{more}",
                    "REC-6",
                )
            )
        if self._error is not None:
            problems.append(self._error)
        elif (self._records, self._failures) != (e.records, e.failures):
            problems.append(
                Problem(
                    e.path,
                    f"holds {self._records} records ({self._failures} failures), manifest lists "
                    f"{e.records} ({e.failures})",
                    "CHECK-2",
                )
            )
        if file_size > e.bytes:
            problems.append(
                Problem(
                    e.path,
                    f"{file_size - e.bytes} bytes past the committed length",
                    "COMMIT-8",
                    repairable=True,
                )
            )
        return problems


def check_listing(
    manifest: Manifest, files: Mapping[str, int], links: frozenset[str] = frozenset()
) -> list[Problem]:
    """Problems in what the run folder holds besides the listed files' contents.

    ``files`` maps every run-relative file path (local state excluded) to its size;
    ``links`` names those that are symbolic links (repair replaces one in place of
    ``manifest.json`` or ``SHA256SUMS``, which counts as missing, LAYOUT-2).
    """
    problems = [
        Problem(p, "symbolic link in a run folder", "LAYOUT-5", repairable=p in _RUN_FILES)
        for p in sorted(links)
    ]
    listed = manifest.listed_paths()
    for path in sorted(files):
        if path in listed or path in _RUN_FILES or path in links:
            continue
        if path.startswith(names.MANIFESTS_DIR + "/"):
            if names.parse_revision_file(path.split("/", 1)[1]) is None:
                problems.append(Problem(path, "unexpected file in _manifests/", "LAYOUT-4"))
            continue
        repairable = is_repairable(path, listed)
        problems.append(Problem(path, "file not listed in the manifest", "LAYOUT-4", repairable))
    return problems


def is_repairable(path: str, listed: Container[str] = ()) -> bool:
    """Whether an unlisted file at ``path`` is uncommitted data `repair` salvages or removes:
    one named as a stage file (NAME-4) or an artifact (NAME-5; COMMIT-8), and not inside a
    folder where a ``listed`` path belongs (a user's folder in a listed artifact's place)."""
    parts = path.split("/")
    if any("/".join(parts[:n]) in listed for n in range(1, len(parts))):
        return False
    try:
        if path.startswith(names.ARTIFACTS_DIR + "/"):
            names.validate_artifact_name(path.split("/", 1)[1])
        else:
            names.parse_stage_file(path)
    except InvalidInputError:
        return False
    return True
