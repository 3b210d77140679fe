"""Conformance cases of spec §14.2 (lifecycle, forks, lineage), built with the format core.

`tests/conformance/build.py` writes them with the rest of the suite.
"""

from __future__ import annotations

from typing import Any

from tests.conformance.builder import GEN, RUN_ID, SCORE, T1, Case, base, running

SOURCE_ID = "20261031-090000000-99aa88bb"


def lifecycle_cases() -> list[Case]:
    """The valid and invalid cases, with their complete case.json members."""
    cases: list[Case] = []

    def add(c: Case, **extra: Any) -> Case:
        c.meta.update(extra)
        cases.append(c)
        return c

    c = add(Case("valid", "lifecycle-completed-through-stage",
                 "A generation-only run: completed, complete through stage generate.",
                 ["LIFE-2"]))  # fmt: skip
    c.stage("generate", key_field="key")
    c.file("generate", [GEN])
    c.finish()
    c.doc["completed_through_stage"] = "generate"

    c = add(running("valid", "lifecycle-heartbeat",
                    "A running run whose writer last sent a heartbeat at T1.",
                    ["LIFE-3"]))  # fmt: skip
    c.doc["heartbeat_at"] = T1

    c = add(Case("valid", "fork-header-names-source",
                 "A fork: stage generate taken from the source run (its header names the "
                 "source's run_id), stage score recomputed.", ["FORK-1", "FORK-2"]))  # fmt: skip
    c.stage("generate", key_field="key")
    c.file("generate", [GEN], header={"run_id": SOURCE_ID}, writer="0f0f0f0f")
    c.stage("score", key_field="key", record_schema_version="2")
    c.file("score", [SCORE])
    c.finish()
    c.doc.update(forked_from=SOURCE_ID, forked_at_stage="score")

    c = add(Case("valid", "lineage-parents",
                 "Records name parent records and an artifact in _parents, an artifact names a "
                 "record; one reference dangles, which leaves the run valid.",
                 ["LIN-1", "LIN-2"]))  # fmt: skip
    c.artifact("prompt.txt", b"Answer briefly.\n")
    c.stage("generate", key_field="key")
    c.file("generate", [[{**r, "_parents": [{"artifact": "artifacts/prompt.txt"}]} for r in GEN]])
    c.stage("score", key_field="key")
    c.file(
        "score",
        [[{"key": "k1:q1", "score": 1, "_parents": [{"stage": "generate", "key": "k1:q1"}]},
          {"key": "k1:q9", "score": 0, "_parents": [{"stage": "generate", "key": "k1:q9"}]}]],
    )  # fmt: skip
    c.artifact("plot.png", b"\x89PNG\r\n\x1a\n", "image/png")
    c.doc["artifacts"][1]["parents"] = [{"stage": "score", "key": "k1:q1"}]
    c.finish()

    c = add(base("invalid", "completed-through-unknown-stage",
                 "completed_through_stage names a stage the run does not have.", ["LIFE-2"]),
            repairable=False, error="ManifestError")  # fmt: skip
    c.doc["completed_through_stage"] = "judge"

    c = add(running("invalid", "completed-through-running-stage",
                    "A completed run whose completed_through_stage is still running.",
                    ["LIFE-2"]),
            repairable=False, error="ManifestError")  # fmt: skip
    c.finish()
    c.doc["completed_through_stage"] = "generate"

    c = add(base("invalid", "forked-from-without-stage",
                 "forked_from without forked_at_stage.", ["FORK-1"]),
            repairable=False, error="ManifestError")  # fmt: skip
    c.doc["forked_from"] = SOURCE_ID

    c = add(base("invalid", "artifact-parents-malformed",
                 "An artifact's parents entry has neither stage and key nor artifact.",
                 ["LIN-1", "MAN-2"]),
            repairable=False, error="ManifestError")  # fmt: skip
    c.doc["artifacts"][0]["parents"] = [{"run": RUN_ID, "key": "k1:q1"}]

    c = add(base("invalid", "artifact-parents-escape",
                 "An artifact's parent is artifacts/../report.txt, not an artifact name "
                 "NAME-5 allows.", ["LIN-1", "NAME-5"]),
            repairable=False, error="ManifestError")  # fmt: skip
    c.doc["artifacts"][0]["parents"] = [{"artifact": "artifacts/../report.txt"}]
    return cases
