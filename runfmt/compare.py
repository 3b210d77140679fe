"""Comparing runs: what differs between two runs, and a paired comparison of keyed records.

`diff_runs` sets two manifests side by side (config, status, stages, counters).
`compare_runs` joins the records of one stage by their key and compares one
numeric field: means, the mean difference with a percentile bootstrap
confidence interval, wins, losses and ties. Deterministic for a given seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from runfmt.errors import InvalidInputError
from runfmt.format.records import Record, is_failure
from runfmt.run import RunReader

__all__ = [
    "Comparison",
    "ConfigChange",
    "RunDiff",
    "StageDiff",
    "bootstrap_ci",
    "compare_runs",
    "config_changes",
    "diff_runs",
    "field_value",
    "numeric_value",
]

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """One config value that differs: ``path`` like ``model.params.temperature`` or ``seeds[2]``."""

    path: str
    a: Any
    b: Any
    kind: str
    """``changed``, ``added`` (only in B) or ``removed`` (only in A)."""


@dataclass(frozen=True, slots=True)
class StageDiff:
    name: str
    status_a: str | None
    status_b: str | None
    records_a: int
    records_b: int
    failures_a: int
    failures_b: int
    bytes_a: int
    bytes_b: int


@dataclass(frozen=True, slots=True)
class RunDiff:
    """Two runs side by side; A and B keep the order they were given in."""

    run_a: str
    run_b: str
    name: tuple[str, str]
    status: tuple[str, str]
    config_hash: tuple[str, str]
    config: list[ConfigChange]
    tags: list[ConfigChange]
    counters: dict[str, tuple[float | int | None, float | int | None]]
    stages: list[StageDiff]

    @property
    def same_config(self) -> bool:
        return self.config_hash[0] == self.config_hash[1]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["same_config"] = self.same_config
        doc["counters"] = {k: {"a": a, "b": b} for k, (a, b) in self.counters.items()}
        return doc


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def config_changes(a: Any, b: Any, path: str = "") -> Iterator[ConfigChange]:
    """The leaf-level differences between two JSON values, in a stable order."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            yield from config_changes(a.get(key, _MISSING), b.get(key, _MISSING), _join(path, key))
    elif isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            yield from config_changes(
                a[i] if i < len(a) else _MISSING, b[i] if i < len(b) else _MISSING, _join(path, i)
            )
    elif a is _MISSING:
        yield ConfigChange(path or "$", None, b, "added")
    elif b is _MISSING:
        yield ConfigChange(path or "$", a, None, "removed")
    elif type(a) is not type(b) or a != b:
        yield ConfigChange(path or "$", a, b, "changed")


def diff_runs(a: RunReader, b: RunReader) -> RunDiff:
    """Config, tags, status, counters and per-stage counts and sizes of two runs."""
    ma, mb = a.manifest, b.manifest
    counters = {
        k: (ma.counters.get(k), mb.counters.get(k))
        for k in sorted(set(ma.counters) | set(mb.counters))
    }
    stages = []
    names = [s.name for s in ma.stages] + [s.name for s in mb.stages if ma.stage(s.name) is None]
    for name in names:
        sa, sb = ma.stage(name), mb.stage(name)
        stages.append(
            StageDiff(
                name,
                sa.status if sa else None,
                sb.status if sb else None,
                sa.records if sa else 0,
                sb.records if sb else 0,
                sa.failures if sa else 0,
                sb.failures if sb else 0,
                sa.bytes if sa else 0,
                sb.bytes if sb else 0,
            )
        )
    return RunDiff(
        run_a=ma.run_id,
        run_b=mb.run_id,
        name=(ma.name, mb.name),
        status=(ma.status, mb.status),
        config_hash=(ma.config_hash, mb.config_hash),
        config=list(config_changes(ma.config, mb.config)),
        tags=list(config_changes(dict(ma.tags), dict(mb.tags))),
        counters=counters,
        stages=stages,
    )


def field_value(record: Mapping[str, Any], name: str) -> Any:
    """The member ``name`` of a record, else the dotted path ``a.b.c`` into nested objects.

    Raises `KeyError` when neither exists.
    """
    if name in record:
        return record[name]
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def numeric_value(value: Any, name: str, where: str) -> float:
    """A record field as a number: booleans count as 0/1; anything else non-numeric is an error."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    raise InvalidInputError(
        f"field {name!r} is {value!r:.60}, not a number or boolean",
        location=where,
        hint="compare a numeric or boolean field",
    )


@dataclass(frozen=True, slots=True)
class Comparison:
    """The paired comparison of one field between runs A and B; differences are B - A."""

    run_a: str
    run_b: str
    stage: str
    field: str
    key_field: str
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    resamples: int
    seed: int
    wins: int
    """Keys where B > A."""
    losses: int
    """Keys where B < A."""
    ties: int
    only_a: list[str]
    """Keys with a result in A and no record at all in B."""
    only_b: list[str]
    failures_a: int
    failures_b: int
    """Failure records (``_error`` set) left out of the comparison, per run."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _keyed_values(
    run: RunReader, stage: str, name: str, key_field: str
) -> tuple[dict[str, float], set[str], int]:
    values: dict[str, float] = {}
    failed: set[str] = set()
    failures = 0
    where = f"{run.storage.where()} stage {stage}"
    for n, record in enumerate(_records(run, stage), 1):
        key = record.get(key_field)
        if is_failure(record):
            failures += 1
            if isinstance(key, str):
                failed.add(key)
                values.pop(key, None)
            continue
        if key is None:  # a record with no key (REC-6) pairs with none
            continue
        if not isinstance(key, str):
            raise InvalidInputError(
                f"record {n} has no string key in field {key_field!r}",
                location=where,
                hint="pass --key with the field that identifies a record",
            )
        failed.discard(key)
        try:
            raw = record[name] if name in record else field_value(record, name)
        except KeyError:
            raise InvalidInputError(
                f"record {key!r} has no field {name!r} (fields: {', '.join(sorted(record))})",
                location=where,
            ) from None
        if type(raw) is bool or type(raw) is int:
            values[key] = float(raw)
        else:
            values[key] = numeric_value(raw, name, f"{where}, record {key!r}")
    return values, failed, failures


def _records(run: RunReader, stage: str) -> Iterator[Record]:
    for batch in run.record_batches(stage):
        yield from batch


FEW_VALUES = 32
"""Up to this many distinct differences, resamples are drawn as exact multinomial counts."""


def _binomial(rng: random.Random, trials: int, num: int, den: int) -> int:
    """An exact Binomial(trials, num/den) draw.

    Each trial compares a uniform number with num/den, binary digit by digit.
    Trials still undecided are exchangeable, so one digit step needs only how
    many of them drew a 1: the popcount of ``getrandbits(undecided)``. About
    two random bits per trial in all.
    """
    if trials == 0 or num == 0:
        return 0
    if num >= den:
        return trials
    undecided, ones, rest = trials, 0, num
    while undecided and rest:
        rest *= 2
        drew_one = rng.getrandbits(undecided).bit_count()
        if rest >= den:
            rest -= den
            ones += undecided - drew_one
            undecided = drew_one
        else:
            undecided -= drew_one
    return ones


def _resample_sums(diffs: list[float], resamples: int, rng: random.Random) -> Iterator[float]:
    n = len(diffs)
    counts = Counter(diffs)
    if len(counts) > FEW_VALUES:
        for _ in range(resamples):
            yield math.fsum(rng.choices(diffs, k=n))
        return
    values = sorted(counts)
    for _ in range(resamples):
        left, pool, parts = n, n, []
        for value in values[:-1]:
            drawn = _binomial(rng, left, counts[value], pool)
            parts.append(value * drawn)
            left -= drawn
            pool -= counts[value]
        parts.append(values[-1] * left)
        yield math.fsum(parts)


def bootstrap_ci(
    diffs: list[float], *, resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (resampling with replacement).

    With few distinct differences (booleans, small integer scores) each
    resample is drawn as multinomial counts, exactly and much faster than
    drawing every pair.
    """
    n = len(diffs)
    if n == 0:
        raise InvalidInputError("no pairs to resample")
    rng = random.Random(seed)
    means = sorted(total / n for total in _resample_sums(diffs, resamples, rng))
    alpha = (1 - confidence) / 2
    low = means[min(resamples - 1, max(0, math.floor(alpha * resamples)))]
    high = means[min(resamples - 1, max(0, math.ceil((1 - alpha) * resamples) - 1))]
    return low, high


def compare_runs(
    a: RunReader,
    b: RunReader,
    stage: str,
    field: str,
    *,
    key: str | None = None,
    seed: int = 0,
    resamples: int = 10_000,
    confidence: float = 0.95,
) -> Comparison:
    """Join ``stage`` records of A and B by key and compare ``field`` (B - A).

    The key is ``key`` or the stage's declared key field. A key written more
    than once counts with its last record. Failure records are left out and
    counted. Raises `InvalidInputError` for an unknown stage or field, a
    non-numeric value, or runs that share no key.
    """
    if resamples < 1:
        raise InvalidInputError(f"resamples must be at least 1, not {resamples}")
    if not 0 < confidence < 1:
        raise InvalidInputError(f"confidence must be between 0 and 1, not {confidence}")
    sa, sb = a.stage(stage), b.stage(stage)
    key_field = key or sa.key_field or sb.key_field
    if key_field is None:
        raise InvalidInputError(
            f"stage {stage!r} declares no key field in either run",
            hint="pass --key (key=) with the field that identifies a record",
        )
    if key is None and sa.key_field != sb.key_field:
        raise InvalidInputError(
            f"stage {stage!r} is keyed by {sa.key_field!r} in {a.run_id} "
            f"but by {sb.key_field!r} in {b.run_id}",
            hint="pass --key (key=) to join on one field",
        )
    values_a, failed_a, failures_a = _keyed_values(a, stage, field, key_field)
    values_b, failed_b, failures_b = _keyed_values(b, stage, field, key_field)
    common = sorted(values_a.keys() & values_b.keys())
    if not common:
        raise InvalidInputError(
            f"the runs share no key in stage {stage!r} "
            f"({len(values_a)} keys in {a.run_id}, {len(values_b)} in {b.run_id})",
            hint="compare runs over the same inputs",
        )
    pairs = [(values_a[k], values_b[k]) for k in common]
    diffs = [y - x for x, y in pairs]
    n = len(pairs)
    try:
        if not all(map(math.isfinite, diffs)):
            raise OverflowError
        low, high = bootstrap_ci(diffs, resamples=resamples, confidence=confidence, seed=seed)
        means = [math.fsum(column) / n for column in (*zip(*pairs, strict=True), diffs)]
        if not all(map(math.isfinite, (low, high, *means))):
            raise OverflowError
    except (OverflowError, ValueError):  # fsum of +inf and -inf: ValueError
        raise InvalidInputError(
            f"field {field!r} holds values whose sums or differences are beyond a double",
            hint="compare the field on a smaller scale",
        ) from None
    return Comparison(
        run_a=a.run_id,
        run_b=b.run_id,
        stage=stage,
        field=field,
        key_field=key_field,
        n=n,
        mean_a=means[0],
        mean_b=means[1],
        mean_diff=means[2],
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        wins=sum(d > 0 for d in diffs),
        losses=sum(d < 0 for d in diffs),
        ties=sum(d == 0 for d in diffs),
        only_a=sorted(values_a.keys() - values_b.keys() - failed_b),
        only_b=sorted(values_b.keys() - values_a.keys() - failed_a),
        failures_a=failures_a,
        failures_b=failures_b,
    )
