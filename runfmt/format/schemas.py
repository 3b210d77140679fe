"""The packaged JSON Schemas, by name and ``$id``, and validation that lists every problem."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

__all__ = ["SCHEMA_NAMES", "load_schema", "schema_errors"]

SCHEMA_NAMES = ("manifest", "stage-header")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The schema document ``<name>.schema.json`` shipped in the package."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    text = resources.files("runfmt").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=None)


def schema_errors(name: str, document: Any) -> list[str]:
    """Every violation of schema ``name`` in ``document``, as ``$.json.path: message``."""
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors]
