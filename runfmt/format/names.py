"""The name grammar: run ids, stage names, stage file names and artifact paths (spec §3)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from runfmt.errors import InvalidInputError

__all__ = [
    "MANIFESTS_DIR",
    "MANIFEST_FILE",
    "SUMS_FILE",
    "StageFileName",
    "artifact_path",
    "format_run_id",
    "format_stage_file",
    "is_run_id",
    "parse_revision_file",
    "parse_stage_file",
    "revision_file",
    "run_ids",
    "validate_artifact_name",
    "validate_run_id",
    "validate_stage_name",
    "validate_writer_id",
]

MANIFEST_FILE = "manifest.json"
MANIFESTS_DIR = "_manifests"
SUMS_FILE = "SHA256SUMS"
DELETING_FILE = ".deleting"
"""Local state a delete puts in a run folder first and removes last: a folder holding it
and no revision is what an interrupted delete left."""
STAGES_DIR = "stages"
ARTIFACTS_DIR = "artifacts"

_NOT_DEVICE = r"(?!(?i:con|prn|aux|nul|com[1-9]|lpt[1-9])(?:\.|$))"
"""Not a device name, which Windows reserves in every folder with any extension (§3.2)."""
_RUN_ID = re.compile(_NOT_DEVICE + r"[a-z0-9](?:[a-z0-9._-]{0,98}[a-z0-9])?")
_STAGE = re.compile(_NOT_DEVICE + r"[a-z][a-z0-9_-]{0,63}")
_WRITER = re.compile(r"[a-z0-9]{1,32}")
_STAGE_FILE = re.compile(
    r"part-(?P<seq>(?!000000-)[0-9]{6}|[1-9][0-9]{6,})-(?P<writer>[a-z0-9]{1,32})\.jsonl\.zst"
)
_REVISION_FILE = re.compile(r"((?!00000000\.)[0-9]{8}|[1-9][0-9]{8,})\.json")
_SEGMENT_SHAPE = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9_-])?"
_SEGMENT = re.compile(_NOT_DEVICE + _SEGMENT_SHAPE)
"""ASCII letters only: under re.IGNORECASE the Kelvin sign and the long s match k and s."""


def _check(pattern: re.Pattern[str], value: object, what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shape = pattern.pattern.removeprefix(_NOT_DEVICE)
        device = "" if shape == pattern.pattern else " and not be a device name such as con or aux"
        raise InvalidInputError(
            f"invalid {what} {value!r}", hint=f"{what}s must match {shape}{device} ({rule})"
        )
    return value


def validate_run_id(value: object) -> str:
    """Return ``value`` if it is a valid run id, else raise `InvalidInputError`."""
    return _check(_RUN_ID, value, "run id", "NAME-1")


def is_run_id(value: str) -> bool:
    return _RUN_ID.fullmatch(value) is not None


def run_ids(candidates: Iterable[str]) -> list[str]:
    """The run ids among ``candidates``, in order."""
    return list(filter(_RUN_ID.fullmatch, candidates))


def validate_stage_name(value: object) -> str:
    """Return ``value`` if it is a valid stage name, else raise `InvalidInputError`."""
    return _check(_STAGE, value, "stage name", "NAME-2")


def validate_writer_id(value: object) -> str:
    """Return ``value`` if it is a valid writer id, else raise `InvalidInputError`."""
    return _check(_WRITER, value, "writer id", "NAME-3")


def format_run_id(created: datetime, entropy: int) -> str:
    """A time-sortable run id: ``YYYYMMDD-HHMMSSmmm-xxxxxxxx`` (UTC, 32 bits of entropy)."""
    return f"{created:%Y%m%d-%H%M%S}{created.microsecond // 1000:03d}-{entropy & 0xFFFFFFFF:08x}"


@dataclass(frozen=True, slots=True)
class StageFileName:
    """The parts of a stage file name ``part-<seq>-<writer>.jsonl.zst``."""

    seq: int
    writer: str


def format_stage_file(stage: str, seq: int, writer: str) -> str:
    """The run-relative path of a stage file (``seq`` from 1, NAME-4)."""
    validate_stage_name(stage)
    validate_writer_id(writer)
    if seq < 1:
        raise InvalidInputError(f"stage file seq must be >= 1, not {seq} (NAME-4)")
    return f"{STAGES_DIR}/{stage}/part-{seq:06d}-{writer}.jsonl.zst"


def parse_stage_file(path: str) -> tuple[str, StageFileName]:
    """Split a run-relative stage file path into its stage and file name parts."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != STAGES_DIR:
        raise InvalidInputError(
            f"invalid stage file path {path!r}", hint="expected stages/<stage>/<file> (NAME-4)"
        )
    stage = validate_stage_name(parts[1])
    m = _STAGE_FILE.fullmatch(parts[2])
    if not m:
        raise InvalidInputError(
            f"invalid stage file name {parts[2]!r}",
            hint="expected part-<seq from 1, 6 digits or more without extra zeros>-<writer id>"
            ".jsonl.zst (NAME-4)",
        )
    return stage, StageFileName(int(m["seq"]), m["writer"])


def validate_artifact_name(name: object) -> str:
    """Check an artifact name (a relative path below ``artifacts/``) and return it."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"invalid artifact name {name!r}", hint="NAME-5")
    for segment in name.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidInputError(
                f"invalid artifact name {name!r}: bad segment {segment!r}",
                hint=f"segments must match {_SEGMENT_SHAPE} and not be a device name such as "
                "con or aux (NAME-5)",
            )
    if len(name) > 512:
        raise InvalidInputError(f"artifact name longer than 512 characters: {name[:40]!r}...")
    return name


def artifact_path(name: str) -> str:
    """The run-relative path of an artifact."""
    return f"{ARTIFACTS_DIR}/{validate_artifact_name(name)}"


def revision_file(revision: int) -> str:
    """The run-relative path of manifest revision ``revision``."""
    if revision < 1:
        raise InvalidInputError(f"revision must be >= 1, not {revision}")
    return f"{MANIFESTS_DIR}/{revision:08d}.json"


def parse_revision_file(name: str) -> int | None:
    """The revision number of a file name in ``_manifests/``, or None for other names."""
    m = _REVISION_FILE.fullmatch(name)
    return int(m[1]) if m else None
