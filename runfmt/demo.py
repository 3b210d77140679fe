"""A realistic evaluation run for trying runfmt, deterministic given a seed, with no network.

`write_demo_run` evaluates a simulated language model on a synthetic arithmetic
dataset in three keyed stages — ``generate`` → ``parse`` → ``score`` — with a
config, tags, token and cost counters, a few failure records and two artifacts
(``summary.json``, ``scores.csv``).

Every item's result goes through one place, `_Demo.result`: it computes the
standard cache key of the item's inputs and first asks ``reuse(stage, key)``
whether an earlier run already holds a committed record for it; only when not
does it do the work.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runfmt.format.keys import compute_key
from runfmt.run import RunWriter
from runfmt.store import Store

__all__ = ["STAGES", "DemoResult", "Reuse", "demo_config", "write_demo_run"]

Reuse = Callable[[str, str], dict[str, Any] | None]
"""``reuse(stage, key)``: the committed record an earlier run stored under ``key``, or None."""

STAGES = ("generate", "parse", "score")
KEY_FIELD = "key"
_OPERATIONS = ("+", "-", "*")
_QUOTA = 97
_PRICE_IN_USD = 0.15e-6
_PRICE_OUT_USD = 0.60e-6


@dataclass(frozen=True, slots=True)
class DemoResult:
    """The demo run's id, and how many of its results were computed or reused."""

    run_id: str
    computed: int
    reused: int

    @property
    def total(self) -> int:
        return self.computed + self.reused


def demo_config(*, seed: int = 0, items: int = 200) -> dict[str, Any]:
    """The config of a demo run."""
    return {
        "model": "demo-llm-7b",
        "temperature": 0.7,
        "max_tokens": 64,
        "prompt_template": "Answer with a number.\nQ: {question}\nA:",
        "dataset": "arith-mix",
        "items": items,
        "seed": seed,
        "parser": "last-integer/v2",
        "metric": "exact_match",
    }


def write_demo_run(
    store: Store,
    *,
    seed: int = 0,
    items: int = 200,
    reuse: Reuse | None = None,
    name: str = "demo-eval",
) -> DemoResult:
    """Write a completed demo evaluation run of ``items`` questions into ``store``.

    The records (and so their keys) depend only on ``seed`` and ``items``;
    ``reuse`` is asked for each item's key before its work is done.
    """
    config = demo_config(seed=seed, items=items)
    tags = {"purpose": "demo", "dataset": config["dataset"], "model": config["model"]}
    with store.create_run(name, config, tags=tags, flush_every=100) as writer:
        demo = _Demo(writer, config, reuse)
        demo.run(_dataset(seed, items))
    return DemoResult(writer.run_id, demo.computed, demo.reused)


def _dataset(seed: int, items: int) -> list[dict[str, Any]]:
    rng = random.Random(f"arith-mix:{seed}")
    questions = []
    for i in range(items):
        op = rng.choice(_OPERATIONS)
        a, b = rng.randint(2, 99), rng.randint(2, 99 if op != "*" else 12)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        questions.append(
            {
                "id": f"q{i + 1:04d}",
                "question": f"What is {a} {op} {b}?",
                "op": op,
                "answer": answer,
            }
        )
    return questions


class _Demo:
    def __init__(self, writer: RunWriter, config: dict[str, Any], reuse: Reuse | None) -> None:
        self.writer = writer
        self.config = config
        self.reuse = reuse
        self.computed = 0
        self.reused = 0

    def result(
        self, stage: str, inputs: dict[str, Any], work: Callable[[random.Random], dict[str, Any]]
    ) -> dict[str, Any]:
        """The record for ``inputs`` in ``stage``: reused when an earlier run has it, else made.

        ``work`` gets a random generator seeded by the key, so a result never
        depends on the order in which items are processed.
        """
        key = compute_key(inputs)
        earlier = self.reuse(stage, key) if self.reuse is not None else None
        if earlier is not None:
            record = {**earlier, KEY_FIELD: key}
            self.reused += 1
        else:
            record = {KEY_FIELD: key, **work(random.Random(key))}
            self.computed += 1
        self.writer.append(stage, record)
        return record

    def run(self, dataset: list[dict[str, Any]]) -> None:
        for stage in STAGES:
            self.writer.stage(stage, key_field=KEY_FIELD)
        generated = [(item, self.generate(i, item)) for i, item in enumerate(dataset)]
        self.writer.stage("generate").complete()
        parsed = [(item, self.parse(item, gen)) for item, gen in generated if "_error" not in gen]
        self.writer.stage("parse").complete()
        scored = [(item, self.score(item, p)) for item, p in parsed if "_error" not in p]
        self.writer.stage("score").complete()
        self.artifacts(dataset, generated, scored)

    def generate(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        prompt = c["prompt_template"].format(question=item["question"])
        inputs = {
            "item_id": item["id"],
            "model": c["model"],
            "temperature": c["temperature"],
            "max_tokens": c["max_tokens"],
            "prompt": prompt,
            "sample_seed": c["seed"],
        }

        def work(rng: random.Random) -> dict[str, Any]:
            base = {"item_id": item["id"], "prompt": prompt}
            if (index + 1) % _QUOTA == 0:
                return base | {
                    "_error": {
                        "type": "RateLimitError",
                        "message": f"429: quota of {_QUOTA - 1} requests per minute exceeded "
                        "(simulated); retries exhausted",
                    }
                }
            completion = _completion(rng, item)
            tokens_in = len(prompt) // 4 + 1
            tokens_out = len(completion) // 4 + 1
            self.writer.count("tokens_in", tokens_in)
            self.writer.count("tokens_out", tokens_out)
            self.writer.count("cost_usd", tokens_in * _PRICE_IN_USD + tokens_out * _PRICE_OUT_USD)
            return base | {
                "completion": completion,
                "finish_reason": "stop",
                "tokens_in": tokens_in,
                "tokens_out": tokens_out,
                "latency_ms": round(rng.lognormvariate(5.5, 0.4), 1),
            }

        return self.result("generate", inputs, work)

    def parse(self, item: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
        inputs = {"generate_key": generated[KEY_FIELD], "parser": self.config["parser"]}

        parents = [{"stage": "generate", "key": generated[KEY_FIELD]}]

        def work(_: random.Random) -> dict[str, Any]:
            numbers = [w.strip(".,!") for w in generated["completion"].split()]
            numbers = [w for w in numbers if w.lstrip("-").isdigit()]
            if not numbers:
                return {
                    "item_id": item["id"],
                    "_error": {"type": "ParseError", "message": "no integer in the completion"},
                    "_parents": parents,
                }
            return {"item_id": item["id"], "answer": int(numbers[-1]), "_parents": parents}

        return self.result("parse", inputs, work)

    def score(self, item: dict[str, Any], parsed: dict[str, Any]) -> dict[str, Any]:
        inputs = {
            "parse_key": parsed[KEY_FIELD],
            "reference": item["answer"],
            "metric": self.config["metric"],
        }

        def work(_: random.Random) -> dict[str, Any]:
            correct = parsed["answer"] == item["answer"]
            return {
                "item_id": item["id"],
                "op": item["op"],
                "prediction": parsed["answer"],
                "reference": item["answer"],
                "correct": correct,
                "score": 1.0 if correct else 0.0,
                "_parents": [{"stage": "parse", "key": parsed[KEY_FIELD]}],
            }

        return self.result("score", inputs, work)

    def artifacts(
        self,
        dataset: list[dict[str, Any]],
        generated: list[tuple[dict[str, Any], dict[str, Any]]],
        scored: list[tuple[dict[str, Any], dict[str, Any]]],
    ) -> None:
        by_op: dict[str, list[float]] = {}
        for item, s in scored:
            by_op.setdefault(item["op"], []).append(s["score"])
        scores = [s["score"] for _, s in scored]
        summary = {
            "items": len(dataset),
            "generated": sum("_error" not in g for _, g in generated),
            "scored": len(scored),
            "accuracy": round(sum(scores) / len(scores), 4) if scores else None,
            "accuracy_by_op": {op: round(sum(v) / len(v), 4) for op, v in sorted(by_op.items())},
        }
        self.writer.add_artifact(
            "summary.json", json.dumps(summary, indent=2).encode() + b"\n", "application/json"
        )
        table = io.StringIO()
        out = csv.writer(table, lineterminator="\n")
        out.writerow(["item_id", "op", "prediction", "reference", "correct"])
        for item, s in scored:
            out.writerow([item["id"], item["op"], s["prediction"], s["reference"], s["correct"]])
        self.writer.add_artifact("scores.csv", table.getvalue().encode(), "text/csv")


def _completion(rng: random.Random, item: dict[str, Any]) -> str:
    answer, question = item["answer"], item["question"]
    roll = rng.random()
    if roll < 0.05:
        return "I am not sure; let me think about it step by step."
    if roll < 0.22:
        answer += rng.choice((-10, -2, -1, 1, 2, 10))
    expression = question.removeprefix("What is ").removesuffix("?")
    return rng.choice((f"The answer is {answer}.", f"{expression} = {answer}", f"{answer}"))
