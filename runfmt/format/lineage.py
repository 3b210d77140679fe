"""Lineage references: what a record or an artifact was made from (spec LIN-1).

A parent is ``{"stage": <stage name>, "key": <record key>}`` (a record of the
same run, found by its stage's key field) or ``{"artifact": "artifacts/<name>"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runfmt.errors import InvalidInputError
from runfmt.format import names
from runfmt.format.records import MAX_KEY_LENGTH

__all__ = ["MAX_PARENTS", "Parent", "parent_json", "parse_parents"]

MAX_PARENTS = 10_000


@dataclass(frozen=True, slots=True)
class Parent:
    """One lineage reference: a record (``stage`` and ``key``) or an artifact (``artifact``)."""

    stage: str | None = None
    key: str | None = None
    artifact: str | None = None

    def __str__(self) -> str:
        return self.artifact if self.artifact is not None else f"{self.stage}/{self.key}"


def parse_parents(value: Any) -> tuple[Parent, ...]:
    """Check a ``_parents`` (or artifact ``parents``) value and return its references (LIN-1)."""
    if not isinstance(value, list):
        raise InvalidInputError(
            f"_parents must be a list, not {type(value).__name__}",
            hint='write [{"stage": ..., "key": ...}] or [{"artifact": "artifacts/..."}] (LIN-1)',
        )
    if len(value) > MAX_PARENTS:
        raise InvalidInputError(f"_parents has {len(value)} entries; at most {MAX_PARENTS} (LIN-1)")
    return tuple(_parse_one(i, item) for i, item in enumerate(value))


def _parse_one(i: int, item: Any) -> Parent:
    hint = (
        'a parent is {"stage": <stage>, "key": <key>} or {"artifact": "artifacts/<name>"} (LIN-1)'
    )
    if isinstance(item, Mapping) and set(item) == {"stage", "key"}:
        names.validate_stage_name(item["stage"])
        key = item["key"]
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise InvalidInputError(f"_parents[{i}]: key must be a non-empty string", hint=hint)
        return Parent(stage=item["stage"], key=key)
    if isinstance(item, Mapping) and set(item) == {"artifact"}:
        path = item["artifact"]
        if not isinstance(path, str) or not path.startswith(names.ARTIFACTS_DIR + "/"):
            raise InvalidInputError(f"_parents[{i}]: {path!r} is not under artifacts/", hint=hint)
        names.validate_artifact_name(path.removeprefix(names.ARTIFACTS_DIR + "/"))
        return Parent(artifact=path)
    raise InvalidInputError(f"_parents[{i}]: {item!r:.80} is not a parent reference", hint=hint)


def parent_json(parent: Parent) -> dict[str, str]:
    """The JSON form of a reference."""
    if parent.artifact is not None:
        return {"artifact": parent.artifact}
    return {"stage": str(parent.stage), "key": str(parent.key)}
