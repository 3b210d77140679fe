"""spec.md checks itself: examples validate, rule ids are defined once, used and covered."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runfmt import canonical_json, compute_key
from runfmt.format.frames import encode_header
from runfmt.format.manifest import manifest_problems
from runfmt.format.schemas import SCHEMA_NAMES, schema_errors

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "spec.md").read_text("utf-8")
SUITE = ROOT / "tests" / "conformance"
SUITE_SCHEMAS = {"case": SUITE / "case.schema.json", "view": SUITE / "view.schema.json"}

_DEFINITION = re.compile(r"^\s*(?:[-*] )?\*\*([A-Z]+-[0-9]+)\*\*", re.MULTILINE)
_JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)
_SCHEMA_COMMENT = re.compile(r"<!-- schema: ([a-z0-9-]+) -->\s*\Z")


def defined_ids() -> list[str]:
    return _DEFINITION.findall(SPEC)


def _id_pattern(prefixes: set[str]) -> re.Pattern[str]:
    return re.compile(rf"\b(?:{'|'.join(sorted(prefixes))})-[0-9]+\b")


def json_examples() -> list[tuple[int, str | None, str]]:
    """(line number, schema name from the comment before it, text) of every ```json block."""
    examples = []
    for m in _JSON_BLOCK.finditer(SPEC):
        before = SPEC[: m.start()]
        comment = _SCHEMA_COMMENT.search(before)
        examples.append((before.count("\n") + 1, comment[1] if comment else None, m[1]))
    return examples


@cache
def _suite_validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads(SUITE_SCHEMAS[name].read_text("utf-8"))
    return jsonschema.Draft202012Validator(schema)


def example_problems(schema: str, doc: Any) -> list[str]:
    if schema in SUITE_SCHEMAS:
        return [f"{e.json_path}: {e.message}" for e in _suite_validator(schema).iter_errors(doc)]
    if schema == "manifest":
        problems = manifest_problems(doc)
        if not problems and doc["config_hash"] != compute_key(doc["config"]):
            problems.append("config_hash is not the key of config (KEY-4)")
        return problems
    return schema_errors(schema, doc)


def test_spec_has_json_examples() -> None:
    schemas = {name for _, name, _ in json_examples()}
    assert {"manifest", "stage-header", "view", "case"} <= schemas


@pytest.mark.parametrize(
    ("line", "schema", "text"), json_examples(), ids=[f"line{n}" for n, _, _ in json_examples()]
)
def test_json_example_validates(line: int, schema: str | None, text: str) -> None:
    known = sorted({*SCHEMA_NAMES, *SUITE_SCHEMAS})
    assert schema is not None, f"spec.md:{line}: put <!-- schema: NAME --> before it ({known})"
    assert schema in known, f"spec.md:{line}: unknown schema {schema!r}; known: {known}"
    doc = json.loads(text)
    assert example_problems(schema, doc) == [], f"spec.md:{line}"


def test_every_rule_id_is_defined_once() -> None:
    ids = defined_ids()
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"rule ids defined more than once in spec.md: {duplicates}"
    assert len(ids) > 50


def test_rules_cited_in_spec_and_code_are_defined() -> None:
    """A rule id quoted anywhere (spec text, messages in runfmt/) must exist in spec.md."""
    defined = set(defined_ids())
    pattern = _id_pattern({i.split("-")[0] for i in defined})
    cited = {(m, "spec.md") for m in pattern.findall(SPEC)}
    for path in sorted((ROOT / "runfmt").rglob("*.py")):
        cited |= {(m, str(path.relative_to(ROOT))) for m in pattern.findall(path.read_text())}
    dangling = sorted(f"{rule} ({where})" for rule, where in cited if rule not in defined)
    assert not dangling, f"cited but not defined in spec.md: {dangling}"


def test_every_rule_is_covered_by_a_case_or_a_test() -> None:
    """Each rule id is cited by a conformance case.json or by a test file under tests/."""
    sources = [p.read_text("utf-8") for p in SUITE.glob("*/*/case.json")]
    sources += [
        p.read_text("utf-8")
        for p in (ROOT / "tests").rglob("*.py")
        if p.name != Path(__file__).name
    ]
    cited = set(re.findall(r"\b[A-Z]+-[0-9]+\b", "\n".join(sources)))
    uncovered = [i for i in defined_ids() if i not in cited]
    assert not uncovered, (
        f"{len(uncovered)} rule(s) of spec.md are not cited by any tests/conformance case.json "
        f"or test under tests/: {', '.join(uncovered)}"
    )


def key_vectors() -> list[tuple[str, str, str]]:
    table = SPEC.split("<!-- key-vectors -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        rows.append((cells[0], cells[1], cells[2]))
    return rows


@pytest.mark.parametrize(("value", "canonical", "key"), key_vectors())
def test_key_vectors(value: str, canonical: str, key: str) -> None:
    """KEY-1, KEY-2: the spec's vectors are what runfmt computes."""
    inputs = json.loads(value)
    assert canonical_json(inputs) == canonical.encode("utf-8")
    assert compute_key(inputs) == key


def test_key_vectors_are_many() -> None:
    assert len(key_vectors()) >= 10


def test_the_header_example_states_its_compact_length_and_frame_bytes() -> None:
    """FRAME-2: the example's stated length and first frame bytes are those of its compact
    form, as `encode_header` writes it."""
    m = re.search(r"it is (\d+) bytes long, so the frame begins `([0-9a-f ]+)`", SPEC)
    assert m is not None
    [text] = [t for _, schema, t in json_examples() if schema == "stage-header"]
    frame = encode_header(json.loads(text))
    assert len(frame) - 8 == int(m[1])
    assert frame[:8].hex(" ") == m[2]
