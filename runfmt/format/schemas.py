"""The packaged JSON Schemas, by name and ``$id``, and validation that lists every problem.

Validation is stricter than jsonschema's defaults in the two ways spec §11.2 states: a
pattern's final ``$`` matches only at the end of the string, as in ECMA-262 (Python's
``$`` also matches before a final line feed), and an ``integer`` is a JSON integer,
never a number with a fraction such as ``3.0``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
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
def _ecma(pattern: str) -> re.Pattern[str]:
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(
    validator: Any, pattern: str, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if isinstance(instance, str) and not _ecma(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    base = jsonschema.validators.validator_for(schema)
    cls: Any = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        base,
        validators={"pattern": _pattern},
        type_checker=base.TYPE_CHECKER.redefine("integer", _is_integer),
    )
    validator: jsonschema.protocols.Validator = cls(schema, format_checker=None)
    return validator


def schema_errors(name: str, document: Any) -> list[str]:
    """Every violation of schema ``name`` in ``document``, as ``$.json.path: message``."""
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{e.json_path}: {e.message}" for e in errors]
