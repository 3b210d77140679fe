"""Walking lineage: from a record or an artifact to everything it was made from (LIN-1..3).

Records name parents in their ``_parents`` member and artifacts in their
manifest entry's ``parents``. A parent record is found by its stage's key field
among the run's committed records (the last one with that key that is not a
failure, else the last one). Cycles and dangling references are reported on the
node where they occur, never raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from runfmt.errors import InvalidInputError
from runfmt.format.lineage import Parent, parent_json, parse_parents
from runfmt.format.manifest import ArtifactEntry
from runfmt.format.records import PARENTS_FIELD, Record, is_failure
from runfmt.run import RunReader

__all__ = ["MAX_DEPTH", "LineageNode", "artifact_lineage", "lineage"]


@dataclass(slots=True)
class LineageNode:
    """One record or artifact in a lineage tree, with its parents."""

    ref: Parent
    record: Record | None = None
    artifact: ArtifactEntry | None = None
    parents: list[LineageNode] = field(default_factory=list)
    problem: str | None = None
    """Why this reference could not be followed (dangling, cycle, malformed parents)."""
    repeated: bool = False
    """Reached before along another path; its parents are listed there only."""
    cut: bool = False
    """Not followed: deeper than the walk's ``max_depth`` (no problem)."""

    def walk(self) -> Iterator[LineageNode]:
        """This node and every node below it, depth first."""
        yield self
        for parent in self.parents:
            yield from parent.walk()

    def problems(self) -> list[str]:
        """Every problem in the tree as ``<ref>: <problem>``."""
        return [f"{n.ref}: {n.problem}" for n in self.walk() if n.problem]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(parent_json(self.ref))
        if self.ref.stage is not None:
            doc["record"] = self.record
        if self.artifact is not None:
            doc["bytes"] = self.artifact.bytes
            doc["sha256"] = self.artifact.sha256
            doc["media_type"] = self.artifact.media_type
        doc["problem"] = self.problem
        doc["repeated"] = self.repeated
        doc["cut"] = self.cut
        doc["parents"] = [p.to_json() for p in self.parents]
        return doc


MAX_DEPTH = 100
"""The deepest a lineage walk goes: its JSON nests two levels a node, and JSON writers stop
at 254 (REC-3)."""


class _Walker:
    def __init__(self, reader: RunReader, max_depth: int) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise InvalidInputError(
                f"max_depth must be a whole number >= 1, not {max_depth!r}",
                hint="1 follows the record's own parents only",
            )
        if max_depth > MAX_DEPTH:
            raise InvalidInputError(
                f"max_depth must be at most {MAX_DEPTH}, not {max_depth}",
                hint="a tree is shown, and written as JSON, nested as deep as it goes",
            )
        self.reader = reader
        self.max_depth = max_depth
        self._by_key: dict[str, dict[str, Record]] = {}
        self._expanded: set[Parent] = set()

    def records_by_key(self, stage: str) -> dict[str, Record]:
        if stage not in self._by_key:
            entry = self.reader.manifest.stage(stage)
            found: dict[str, Record] = {}
            if entry is not None and entry.key_field is not None:
                kf = entry.key_field
                for batch in self.reader.record_batches(stage):
                    for record in batch:
                        key = record.get(kf)
                        if isinstance(key, str) and (
                            key not in found or is_failure(found[key]) or not is_failure(record)
                        ):
                            found[key] = record
            self._by_key[stage] = found
        return self._by_key[stage]

    def node(self, ref: Parent, path: tuple[Parent, ...]) -> LineageNode:
        if ref in path:
            cycle = " -> ".join(str(p) for p in (*path[path.index(ref) :], ref))
            return LineageNode(ref, problem=f"cycle: {cycle}")
        if len(path) >= self.max_depth:
            return LineageNode(ref, cut=True)
        node, raw = self._resolve(ref)
        if node.problem is not None:
            return node
        if ref in self._expanded:
            node.repeated = True
            return node
        self._expanded.add(ref)
        if raw is None:
            return node
        try:
            parents = parse_parents(raw)
        except InvalidInputError as exc:
            node.problem = f"malformed parents: {exc.problem}"
            return node
        node.parents = [self.node(p, (*path, ref)) for p in parents]
        return node

    def _resolve(self, ref: Parent) -> tuple[LineageNode, Any]:
        manifest = self.reader.manifest
        if ref.artifact is not None:
            entry = next((a for a in manifest.artifacts if a.path == ref.artifact), None)
            if entry is None:
                return LineageNode(ref, problem="dangling: no such artifact in the run"), None
            raw = [dict(p) for p in entry.parents] if entry.parents else None
            return LineageNode(ref, artifact=entry), raw
        assert ref.stage is not None
        assert ref.key is not None
        stage = manifest.stage(ref.stage)
        if stage is None:
            return LineageNode(ref, problem=f"dangling: the run has no stage {ref.stage!r}"), None
        if stage.key_field is None:
            return LineageNode(ref, problem=f"dangling: stage {ref.stage!r} has no key field"), None
        record = self.records_by_key(ref.stage).get(ref.key)
        if record is None:
            return LineageNode(ref, problem="dangling: no committed record with this key"), None
        return LineageNode(ref, record=record), record.get(PARENTS_FIELD)


def lineage(reader: RunReader, stage: str, key: str, *, max_depth: int = MAX_DEPTH) -> LineageNode:
    """The lineage tree of the committed record with ``key`` in ``stage`` (LIN-2).

    Raises `InvalidInputError` when the run has no such stage, the stage no key
    field, or no committed record with that key.
    """
    entry = reader.stage(stage)
    if entry.key_field is None:
        raise InvalidInputError(
            f"stage {stage!r} has no key field, so its records cannot be found by key",
            location=reader.storage.where(),
        )
    root = _Walker(reader, max_depth).node(Parent(stage=stage, key=key), ())
    if root.record is None:
        raise InvalidInputError(
            f"stage {stage!r} has no committed record with key {key!r}",
            location=reader.storage.where(),
            hint=f"keys are in the record member {entry.key_field!r}",
        )
    return root


def artifact_lineage(reader: RunReader, name: str, *, max_depth: int = MAX_DEPTH) -> LineageNode:
    """The lineage tree of an artifact (its name below ``artifacts/``, or its path)."""
    entry = reader.artifact(name)
    return _Walker(reader, max_depth).node(Parent(artifact=entry.path), ())
