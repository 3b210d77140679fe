"""The manifest model: frozen dataclasses, JSON encode/decode, compatibility, merging (spec §4)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import orjson

from runfmt.errors import ConflictError, InvalidInputError, ManifestError, UnsupportedFormatError
from runfmt.format import names
from runfmt.format.keys import compute_key
from runfmt.format.lineage import parse_parents
from runfmt.format.records import MAX_DEPTH, too_deep
from runfmt.format.schemas import schema_errors

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FEATURES",
    "ArtifactEntry",
    "ChangeSet",
    "FileEntry",
    "Manifest",
    "StageEntry",
    "apply_changes",
    "check_compatible",
    "check_counter",
    "check_error",
    "check_tags",
    "decode_manifest",
    "encode_manifest",
    "manifest_problems",
    "parse_timestamp",
    "same_instant",
]

FORMAT_VERSION = "1.0"
_MANIFEST_OPTS = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
SUPPORTED_FEATURES: frozenset[str] = frozenset()
RunStatus = Literal["running", "completed", "failed", "cancelled"]
StageStatus = Literal["running", "completed", "failed"]
RUN_STATUSES = ("running", "completed", "failed", "cancelled")
STAGE_STATUSES = ("running", "completed", "failed")
LABEL = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
"""The grammar of tag and counter names."""
MAX_TAG_VALUE = 1024
MAX_ERROR = 65536
MAX_INTEGER = 2**63 - 1
"""The largest integer counter total (COMMIT-5), as REC-3 asks of record integers."""
_TIMESTAMPS = ("created_at", "updated_at", "finished_at", "heartbeat_at")
UPGRADE_HINT = "upgrade runfmt to read this run"
_VALID: dict[bytes, None] = {}
"""The sha256 digests of manifest bytes that passed validation, oldest first: a manifest is
decoded several times (a resume: to locate, repair and reopen the run), and its schema
validation costs 95% of a decode."""
_VALID_KEPT = 4096
_VALID_LOCK = threading.Lock()
_MAX_INT_TEXT = 320
"""More characters than the longest integer finite as a double (309 digits and a sign)."""
_TOO_DEEP = f"objects and arrays nest more than {MAX_DEPTH} levels deep (MAN-1)"


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 UTC timestamp as written in manifests (fractions beyond µs dropped)."""
    head, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}+00:00")


def same_instant(a: str, b: str) -> bool:
    """Whether two MAN-9 timestamps name the same instant, to the nanosecond (``…52.5Z``
    and ``…52.500Z`` do; ``…52.5021537Z`` and ``…52.502153Z`` do not)."""
    nanos = [t.rstrip("Z").partition(".")[2][6:].ljust(3, "0") for t in (a, b)]
    return parse_timestamp(a) == parse_timestamp(b) and nanos[0] == nanos[1]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A committed stage file: its first ``bytes`` bytes hold ``records`` records."""

    path: str
    bytes: int
    records: int
    failures: int
    sha256: str


@dataclass(frozen=True, slots=True)
class StageEntry:
    name: str
    status: StageStatus = "running"
    record_schema_version: str = "1"
    key_field: str | None = None
    files: tuple[FileEntry, ...] = ()

    @property
    def records(self) -> int:
        return sum(f.records for f in self.files)

    @property
    def failures(self) -> int:
        return sum(f.failures for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True, slots=True)
class ArtifactEntry:
    path: str
    bytes: int
    sha256: str
    media_type: str = "application/octet-stream"
    parents: tuple[Mapping[str, str], ...] = ()
    """Lineage: what the artifact was made from (LIN-1); omitted from the JSON when empty."""


@dataclass(frozen=True, slots=True)
class Manifest:
    run_id: str
    name: str
    revision: int
    status: RunStatus
    created_at: str
    updated_at: str
    config: Mapping[str, Any]
    config_hash: str
    format_version: str = FORMAT_VERSION
    required_features: tuple[str, ...] = ()
    error: str | None = None
    finished_at: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    counters: Mapping[str, float | int] = field(default_factory=dict)
    stages: tuple[StageEntry, ...] = ()
    artifacts: tuple[ArtifactEntry, ...] = ()
    writer: Mapping[str, str] = field(default_factory=dict)
    heartbeat_at: str | None = None
    """When a writer last showed it was alive (LIFE-3); omitted from the JSON when None."""
    completed_through_stage: str | None = None
    """The last stage a run stopped on purpose after (LIFE-2)."""
    forked_from: str | None = None
    """The run this one was forked from (FORK-1)."""
    forked_at_stage: str | None = None
    """The first stage this fork recomputed; earlier stages came from ``forked_from``."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Members this reader does not know, kept so a rewrite does not drop them."""

    def stage(self, name: str) -> StageEntry | None:
        return next((s for s in self.stages if s.name == name), None)

    def listed_files(self) -> dict[str, tuple[int, str]]:
        """Every run-relative path the manifest lists (stage files, then artifacts), with
        its byte length and sha256."""
        files = {f.path: (f.bytes, f.sha256) for s in self.stages for f in s.files}
        files.update((a.path, (a.bytes, a.sha256)) for a in self.artifacts)
        return files

    def listed_paths(self) -> dict[str, int]:
        """Every run-relative path the manifest lists, with its byte length."""
        return {path: size for path, (size, _) in self.listed_files().items()}

    @property
    def finished(self) -> bool:
        return self.status != "running"


_KNOWN = frozenset(
    {
        "format", "format_version", "required_features", "run_id", "name", "revision", "status",
        "error", "created_at", "updated_at", "finished_at", "config", "config_hash", "tags",
        "counters", "stages", "artifacts", "writer", "heartbeat_at", "completed_through_stage",
        "forked_from", "forked_at_stage",
    }
)  # fmt: skip


def to_json(m: Manifest) -> dict[str, Any]:
    """The manifest as a JSON-ready dict, members in spec order."""
    doc: dict[str, Any] = {
        "format": "runfmt",
        "format_version": m.format_version,
        "required_features": list(m.required_features),
        "run_id": m.run_id,
        "name": m.name,
        "revision": m.revision,
        "status": m.status,
        "error": m.error,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "finished_at": m.finished_at,
        "config": m.config,
        "config_hash": m.config_hash,
        "tags": dict(m.tags),
        "counters": dict(m.counters),
        "stages": [
            {
                "name": s.name,
                "status": s.status,
                "record_schema_version": s.record_schema_version,
                "key_field": s.key_field,
                "files": [
                    {
                        "path": f.path,
                        "bytes": f.bytes,
                        "records": f.records,
                        "failures": f.failures,
                        "sha256": f.sha256,
                    }
                    for f in s.files
                ],
            }
            for s in m.stages
        ],
        "artifacts": [_artifact_json(a) for a in m.artifacts],
        "writer": dict(m.writer),
    }
    for member in _OPTIONAL:
        value = getattr(m, member)
        if value is not None:
            doc[member] = value
    doc.update(m.extra)
    return doc


_OPTIONAL = ("heartbeat_at", "completed_through_stage", "forked_from", "forked_at_stage")
"""Members written only when set, so manifests without them re-encode byte for byte."""


def _artifact_json(a: ArtifactEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": a.path, "bytes": a.bytes, "sha256": a.sha256, "media_type": a.media_type
    }  # fmt: skip
    if a.parents:
        doc["parents"] = [dict(p) for p in a.parents]
    return doc


def encode_manifest(m: Manifest) -> bytes:
    """Manifest bytes: UTF-8 JSON, two-space indent, trailing newline (MAN-1)."""
    doc = to_json(m)
    try:
        return orjson.dumps(doc, option=_MANIFEST_OPTS)
    except orjson.JSONEncodeError as exc:
        if too_deep(doc):
            raise InvalidInputError(
                f"the config nests objects and arrays more than {MAX_DEPTH - 1} levels deep: "
                f"a manifest holds at most {MAX_DEPTH} (MAN-1)"
            ) from None
        raise InvalidInputError(f"manifest is not valid JSON: {exc}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ManifestError(f"duplicate member {dup!r} (MAN-1)")
    return obj


def _reject_constant(name: str) -> None:
    raise ManifestError(f"{name} is not valid JSON (MAN-1)")


def _parse_int(text: str) -> int:
    """An integer, unless it has more digits than any finite double (which Python's `int`
    would refuse past 4,300 digits with a plain ValueError)."""
    if len(text) > _MAX_INT_TEXT:
        raise ManifestError(
            f"number {text[:12]}… of {len(text)} digits is no finite double (MAN-1)"
        )
    return int(text)


def parse_json(data: bytes) -> Any:
    """Strict JSON parsing (MAN-1): UTF-8; strings of Unicode scalar values (no lone
    surrogate, even escaped); numbers finite as doubles; no duplicate member names."""
    try:
        text = data.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                         parse_int=_parse_int)  # fmt: skip
        orjson.loads(text)  # refuses lone surrogates and numbers beyond a double, as json not
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8: {exc} (MAN-1)") from None
    except json.JSONDecodeError as exc:  # orjson's is one too
        raise ManifestError(f"not valid JSON: {exc} (MAN-1)") from None
    except RecursionError:
        raise ManifestError(_TOO_DEEP) from None
    if data.count(b"{") + data.count(b"[") > MAX_DEPTH and too_deep(doc):
        raise ManifestError(_TOO_DEEP)
    return doc


def check_compatible(version: object, features: object) -> None:
    """Refuse data this reader does not implement: a newer MAJOR version (VER-2), MAJOR 0
    (VER-1) or an unknown required feature (VER-3)."""
    major = version.partition(".")[0] if isinstance(version, str) else ""
    if major.isascii() and major.isdigit():
        number = int(major) if len(major) < 10 else math.inf
        if number > int(FORMAT_VERSION.partition(".")[0]):
            raise UnsupportedFormatError(
                f"format version {version:.24} is newer than this reader ({FORMAT_VERSION}) "
                "(VER-2)",
                hint=UPGRADE_HINT,
            )
        if number == 0:
            raise UnsupportedFormatError(
                f"format version {version:.24} is not one this reader implements: "
                "versions start at 1.0 (VER-1)"
            )
    if isinstance(features, list):
        unknown = sorted({f for f in features if isinstance(f, str)} - SUPPORTED_FEATURES)
        if unknown:
            raise UnsupportedFormatError(
                f"run requires unknown features {', '.join(unknown)} (VER-3)",
                hint=UPGRADE_HINT,
            )


def later_version(a: str, b: str) -> str:
    """The later of two valid format versions of the same MAJOR (COMMIT-5)."""
    return max(a, b, key=lambda v: tuple(map(int, v.split("."))))


def manifest_problems(doc: Any) -> list[str]:
    """Every schema violation and cross-field rule broken by a manifest document."""
    problems = schema_errors("manifest", doc)
    if problems or not isinstance(doc, dict):
        return problems or ["$: not a JSON object"]
    problems += [
        f"$.counters.{name}: {value} is beyond ±(2^63-1) (COMMIT-5)"
        for name, value in doc["counters"].items()
        if type(value) is int and abs(value) > MAX_INTEGER
    ]
    seen_paths: dict[str, str] = {}
    stage_names = set()
    for i, stage in enumerate(doc["stages"]):
        if stage["name"] in stage_names:
            problems.append(f"$.stages[{i}]: duplicate stage {stage['name']!r} (MAN-4)")
        stage_names.add(stage["name"])
        for total in ("bytes", "records"):
            if sum(f[total] for f in stage["files"]) > MAX_INTEGER:
                problems.append(f"$.stages[{i}]: its files' {total} add up past 2^63-1 (MAN-5)")
        for j, f in enumerate(stage["files"]):
            where = f"$.stages[{i}].files[{j}]"
            if f["path"].split("/")[1] != stage["name"]:
                problems.append(
                    f"{where}: {f['path']!r} is not under stages/{stage['name']}/ (MAN-5)"
                )
            if f["failures"] > f["records"]:
                problems.append(f"{where}: more failures than records (MAN-5)")
            _unique_path(f["path"], where, seen_paths, problems)
    for i, a in enumerate(doc["artifacts"]):
        where = f"$.artifacts[{i}]"
        try:
            names.validate_artifact_name(a["path"].removeprefix("artifacts/"))
        except InvalidInputError as exc:
            problems.append(f"{where}: {exc} (MAN-6)")
        try:
            parse_parents(a.get("parents", []))
        except InvalidInputError as exc:
            problems.append(f"{where}.parents: {exc.problem.removesuffix(' (LIN-1)')} (LIN-1)")
        _unique_path(a["path"], where, seen_paths, problems)
    problems += _lifecycle_problems(doc, stage_names)
    return problems


def _lifecycle_problems(doc: dict[str, Any], stage_names: set[str]) -> list[str]:
    problems = []
    status = doc["status"]
    if (doc.get("finished_at") is None) != (status == "running"):
        problems.append(
            f"$.finished_at: must be null exactly when the run is running, not {status} (MAN-9)"
        )
    if doc.get("error") is not None and status not in ("failed", "cancelled"):
        problems.append(f"$.error: a {status} run has no error message (MAN-9)")
    for member in _TIMESTAMPS:
        value = doc.get(member)
        if isinstance(value, str):
            try:
                datetime.fromisoformat(value)
            except ValueError as exc:
                problems.append(f"$.{member}: {value!r} is not a real time: {exc} (MAN-9)")
    try:
        key = compute_key(doc["config"])
    except InvalidInputError as exc:
        problems.append(f"$.config: {exc.problem} (KEY-4)")
    else:
        if key != doc["config_hash"]:
            problems.append("$.config_hash: is not the key of config (KEY-4)")
    through = doc.get("completed_through_stage")
    if through is not None and through not in stage_names:
        problems.append(
            f"$.completed_through_stage: {through!r} is not a stage of the run (LIFE-2)"
        )
    elif doc.get("status") == "completed" and through is not None:
        stage = next(s for s in doc["stages"] if s["name"] == through)
        if stage["status"] != "completed":
            problems.append(
                f"$.completed_through_stage: stage {through!r} is {stage['status']}, "
                "not completed (LIFE-2)"
            )
    if (doc.get("forked_from") is None) != (doc.get("forked_at_stage") is None):
        problems.append("$: forked_from and forked_at_stage go together (FORK-1)")
    return problems


def _unique_path(path: str, where: str, seen: dict[str, str], problems: list[str]) -> None:
    folded = path.casefold()
    if folded in seen:
        problems.append(f"{where}: {path!r} collides with {seen[folded]} (MAN-7)")
    seen[folded] = where


def decode_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes; raises `ManifestError` listing every problem.

    Bytes found valid before are not validated again (`_VALID`).
    """
    doc = parse_json(data)
    if isinstance(doc, dict):
        check_compatible(doc.get("format_version"), doc.get("required_features"))
    digest = hashlib.sha256(data).digest()
    if digest not in _VALID:
        problems = manifest_problems(doc)
        if problems:
            raise ManifestError("invalid manifest: " + "; ".join(problems))
        with _VALID_LOCK:
            _VALID[digest] = None
            if len(_VALID) > _VALID_KEPT:
                del _VALID[next(iter(_VALID))]
    return from_json(doc)


def from_json(doc: dict[str, Any]) -> Manifest:
    """Build the model from a schema-valid document."""
    return Manifest(
        run_id=doc["run_id"],
        name=doc["name"],
        revision=doc["revision"],
        status=doc["status"],
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        config=doc["config"],
        config_hash=doc["config_hash"],
        format_version=doc["format_version"],
        required_features=tuple(doc["required_features"]),
        error=doc.get("error"),
        finished_at=doc.get("finished_at"),
        tags=doc["tags"],
        counters=doc["counters"],
        stages=tuple(
            StageEntry(
                name=s["name"],
                status=s["status"],
                record_schema_version=s["record_schema_version"],
                key_field=s["key_field"],
                files=tuple(
                    FileEntry(f["path"], f["bytes"], f["records"], f["failures"], f["sha256"])
                    for f in s["files"]
                ),
            )
            for s in doc["stages"]
        ),
        artifacts=tuple(
            ArtifactEntry(
                a["path"], a["bytes"], a["sha256"], a["media_type"], tuple(a.get("parents", ()))
            )
            for a in doc["artifacts"]
        ),
        writer=doc.get("writer", {}),
        heartbeat_at=doc.get("heartbeat_at"),
        completed_through_stage=doc.get("completed_through_stage"),
        forked_from=doc.get("forked_from"),
        forked_at_stage=doc.get("forked_at_stage"),
        extra={k: v for k, v in doc.items() if k not in _KNOWN},
    )


@dataclass(slots=True)
class ChangeSet:
    """What one writer changes in a commit, re-applicable to whatever revision is newest.

    Files are keyed by path (only their writer extends them); counters are
    deltas, so concurrent writers never lose or double-count (COMMIT-6).
    """

    stages: dict[str, StageEntry] = field(default_factory=dict)
    """Stages to declare: name, record schema version, key field (files ignored)."""
    files: dict[str, FileEntry] = field(default_factory=dict)
    stage_status: dict[str, StageStatus] = field(default_factory=dict)
    counters: dict[str, float | int] = field(default_factory=dict)
    artifacts: dict[str, ArtifactEntry] = field(default_factory=dict)
    status: RunStatus | None = None
    error: str | None = None
    completed_through_stage: str | None = None
    """With ``status`` completed: the stage a run stopped after, None for a run completed in
    full; any other status keeps the newest revision's (LIFE-2)."""
    tags: dict[str, str] = field(default_factory=dict)
    heartbeat: bool = False
    """Set ``heartbeat_at`` to the commit time: a writer of the run is alive (LIFE-3)."""
    complete_running: frozenset[str] = frozenset()
    """With ``status`` completed: the stages this writer took up, each marked completed when
    the revision it merges into shows it running and, with ``completed_through_stage``,
    lists it no later than that stage (LIFE-5); ``stage_status`` overrides."""

    def __bool__(self) -> bool:
        return any(
            (self.stages, self.files, self.stage_status, self.counters, self.artifacts,
             self.status, self.tags, self.heartbeat)
        )  # fmt: skip


def check_tags(tags: Mapping[Any, Any]) -> None:
    """Refuse tags a manifest cannot hold: names in `LABEL`, values strings of at most
    `MAX_TAG_VALUE` characters."""
    for name, value in tags.items():
        if not isinstance(name, str) or not LABEL.fullmatch(name):
            raise InvalidInputError(
                f"tag name {name!r} must be 1-128 letters, digits or _.:/- characters"
            )
        if not isinstance(value, str) or len(value) > MAX_TAG_VALUE:
            raise InvalidInputError(
                f"tag {name!r} must be a string of at most {MAX_TAG_VALUE} characters, "
                f"not {value!r:.60}"
            )


def as_dict(what: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A caller's ``value`` as a dict (None as an empty one); `InvalidInputError` naming
    ``what`` if it is no mapping."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{what} must be a mapping (a dict), not {type(value).__name__}")
    return dict(value)


def check_counter(name: object, total: float) -> None:
    """Refuse a counter a manifest cannot hold: a name in `LABEL`; a finite total, within
    MAX_INTEGER in magnitude when it is an integer (COMMIT-5)."""
    if not isinstance(name, str) or not LABEL.fullmatch(name):
        raise InvalidInputError(
            f"counter name {name!r} must be 1-128 letters, digits or _.:/- characters"
        )
    if not math.isfinite(total):
        raise InvalidInputError(f"counter {name!r} would overflow to {total}")
    if isinstance(total, int) and abs(total) > MAX_INTEGER:
        raise InvalidInputError(
            f"counter {name!r} would reach {total}, beyond a 64-bit integer (COMMIT-5)",
            hint="count in a larger unit, or with float deltas",
        )


def check_error(status: str, error: object) -> None:
    """Refuse an ``error`` that MAN-9 does not allow with ``status``."""
    if error is None:
        return
    if status not in ("failed", "cancelled"):
        raise InvalidInputError(f"a {status} run has no error message (MAN-9)")
    if not isinstance(error, str) or len(error) > MAX_ERROR:
        raise InvalidInputError(
            f"the error message must be a string of at most {MAX_ERROR} characters"
        )


def _to_complete(stages: Mapping[str, StageEntry], changes: ChangeSet) -> list[str]:
    """LIFE-5 over ``stages`` (base's, then the new ones: the order the revision lists)."""
    if changes.status != "completed":
        return []
    order = list(stages)
    through = changes.completed_through_stage
    if through is not None and through in stages:
        order = order[: order.index(through) + 1]
    return [n for n in order if n in changes.complete_running and stages[n].status == "running"]


def apply_changes(
    base: Manifest, changes: ChangeSet, revision: int, now: str, writer: Mapping[str, str]
) -> Manifest:
    """The next revision: ``base`` with ``changes`` merged in (COMMIT-5), committed at ``now``
    by the software ``writer`` names."""
    stages = {s.name: s for s in base.stages}
    for name, declared in changes.stages.items():
        current = stages.get(name)
        if current is None:
            stages[name] = replace(declared, files=())
        elif (current.record_schema_version, current.key_field) != (
            declared.record_schema_version,
            declared.key_field,
        ):
            raise ConflictError(
                f"stage {name!r} is declared with record schema "
                f"{current.record_schema_version!r} and key field {current.key_field!r}",
                hint="use the stage's existing declaration, or a new stage name",
            )
    for entry in changes.files.values():
        stage_name, _ = names.parse_stage_file(entry.path)
        stage = stages[stage_name]
        files = list(stage.files)
        at = next((i for i, f in enumerate(files) if f.path == entry.path), None)
        if at is None:
            files.append(entry)
        elif files[at].bytes <= entry.bytes:
            files[at] = entry
        else:
            raise ConflictError(f"{entry.path}: a newer revision lists more bytes than this writer")
        stages[stage_name] = replace(stage, files=tuple(files))
    for name in _to_complete(stages, changes):
        stages[name] = replace(stages[name], status="completed")
    for name, stage_status in changes.stage_status.items():
        stages[name] = replace(stages[name], status=stage_status)
    counters = dict(base.counters)
    for name, delta in changes.counters.items():
        counters[name] = counters.get(name, 0) + delta
        check_counter(name, counters[name])
    artifacts = {a.path: a for a in base.artifacts}
    for path, artifact in changes.artifacts.items():
        if artifacts.get(path, artifact) != artifact:
            raise ConflictError(f"{path}: another writer listed this artifact (ART-1)")
        artifacts[path] = artifact
    status = changes.status or base.status
    finished = base.finished_at if changes.status in (None, "running") else now
    return replace(
        base,
        revision=revision,
        updated_at=now,
        status=status,
        error=changes.error if changes.status else base.error,
        completed_through_stage=(
            changes.completed_through_stage
            if changes.status == "completed"
            else base.completed_through_stage
        ),
        format_version=later_version(base.format_version, FORMAT_VERSION),
        writer=writer,
        heartbeat_at=now if changes.heartbeat else base.heartbeat_at,
        finished_at=None if status == "running" else finished,
        tags={**base.tags, **changes.tags},
        counters=counters,
        stages=tuple(stages.values()),
        artifacts=tuple(artifacts.values()),
    )
