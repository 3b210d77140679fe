"""`runfmt diff` and `runfmt compare`: config differences and the paired comparison of runs."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from runfmt import compare
from runfmt.compare import _binomial, bootstrap_ci, compare_runs, config_changes, diff_runs
from runfmt.errors import InvalidInputError, RunNotFoundError
from runfmt.store import Store
from tests.fixtures_manage import Cli, MakeRun


def scores(values: dict[str, object], field: str = "correct") -> list[dict[str, object]]:
    return [{"id": k, field: v} for k, v in values.items()]


@pytest.fixture
def pair(store: Store, make_run: MakeRun) -> tuple[str, str]:
    a = make_run(
        store,
        "eval",
        {"model": {"name": "m1", "params": {"temperature": 0.2}}, "seeds": [1, 2], "old": True},
        {
            "score": (
                "id",
                [
                    *scores({"q1": True, "q2": False, "q3": True, "q4": 0.5}),
                    {"id": "q5", "_error": "timeout"},
                ],
            ),
            "generate": (None, [{"x": 1}] * 3),
        },
        counters={"cost_usd": 1.5, "tokens": 10},
        run_id="run-a",
    )
    b = make_run(
        store,
        "eval",
        {
            "model": {"name": "m1", "params": {"temperature": 0.7}},
            "seeds": [1, 2, 3],
            "new key": "x",
        },
        {
            "score": (
                "id",
                [
                    *scores({"q1": True, "q2": True, "q3": False, "q6": 1}),
                    {"id": "q4", "_error": "bad"},
                ],
            )
        },
        counters={"cost_usd": 2.0},
        status="failed",
        run_id="run-b",
    )
    return a, b


def test_config_changes_name_nested_paths_and_lists() -> None:
    changes = list(
        config_changes(
            {"a": {"b": [1, {"c": 2}]}, "gone": 1, "x y": 1, "t": 1},
            {"a": {"b": [1, {"c": 3}, 4]}, "x y": 2, "t": 1.0, "new": None},
        )
    )
    assert [(c.path, c.a, c.b, c.kind) for c in changes] == [
        ("a.b[1].c", 2, 3, "changed"),
        ("a.b[2]", None, 4, "added"),
        ("gone", 1, None, "removed"),
        ("new", None, None, "added"),
        ("t", 1, 1.0, "changed"),
        ("['x y']", 1, 2, "changed"),
    ]


def test_diff_runs_reports_config_status_counters_and_stages(
    store: Store, pair: tuple[str, str]
) -> None:
    d = diff_runs(store.open_run(pair[0]), store.open_run(pair[1]))
    assert d.status == ("completed", "failed")
    assert not d.same_config
    assert {c.path: c.kind for c in d.config} == {
        "model.params.temperature": "changed",
        "['new key']": "added",
        "old": "removed",
        "seeds[2]": "added",
    }
    assert d.counters == {"cost_usd": (1.5, 2.0), "tokens": (10, None)}
    stages = {s.name: s for s in d.stages}
    assert (stages["score"].records_a, stages["score"].records_b) == (5, 5)
    assert (stages["score"].failures_a, stages["score"].failures_b) == (1, 1)
    assert stages["generate"].records_b == 0
    assert stages["generate"].status_b is None
    assert stages["score"].bytes_a > 0


def test_diff_cli_text_and_json(store: Store, pair: tuple[str, str], cli: Cli) -> None:
    code, out, _ = cli(store, "diff", *pair)
    assert code == 0
    assert "~ model.params.temperature: 0.2 -> 0.7" in out
    assert "+ ['new key'] = \"x\"  (only in B)" in out
    assert "- old = true  (only in A)" in out
    assert "cost_usd" in out
    assert "generate" in out
    code, out, _ = cli(store, "diff", *pair, "--json")
    doc = json.loads(out)
    assert doc["status"] == ["completed", "failed"]
    assert doc["counters"]["tokens"] == {"a": 10, "b": None}
    assert doc["config"][0]["path"] == "model.params.temperature"


def test_diff_shows_what_tells_two_values_apart(store: Store, cli: Cli) -> None:
    """A string and a number, or two floats alike in their first digits, never look the
    same: config values print as JSON, counters exactly."""
    ids = []
    for config, cost, tokens in (({"x": 1, "s": "a"}, 1234.5678, 2500000.0),
                                 ({"x": "1", "s": None}, 1234.5712, 2500004.0)):  # fmt: skip
        with store.create_run("exact", config) as w:
            w.count("cost_usd", cost)
            w.count("tokens", tokens)
        ids.append(w.run_id)
    code, out, _ = cli(store, "diff", *ids)
    assert code == 0
    assert '~ x: 1 -> "1"' in out
    assert '~ s: "a" -> null' in out
    assert "1234.5678" in out
    assert "1234.5712" in out
    assert "2500000" in out
    assert "2500004" in out
    code, out, _ = cli(store, "show", ids[1])
    assert "tokens=2500004" in out


def test_counters_show_15_digits_and_diff_the_exact_form_only_to_tell_them_apart(
    store: Store, cli: Cli
) -> None:
    """A float sum's last bits are noise (0.0014999999999999998 is 0.0015); two values
    that 15 digits show alike are shown exactly, side by side."""
    ids = []
    for deltas in ([0.0003] * 5, [0.0015]):
        with store.create_run("noise") as w:
            for delta in deltas:
                w.count("cost_usd", delta)
        ids.append(w.run_id)
    assert store.open_run(ids[0]).manifest.counters["cost_usd"] == 0.0014999999999999998
    assert "cost_usd=0.0015\n" in cli(store, "show", ids[0])[1]
    out = cli(store, "diff", *ids)[1]
    assert "0.0014999999999999998" in out
    assert "0.0015" in out


def test_diff_by_folder_path(store: Store, pair: tuple[str, str], cli: Cli) -> None:
    code, out, _ = cli(
        "/nonexistent-store", "diff", store.storage.where(pair[0]), store.storage.where(pair[0])
    )
    assert code == 0
    assert "config: same" in out


def test_diff_unknown_run_exits_1(store: Store, pair: tuple[str, str], cli: Cli) -> None:
    code, out, err = cli(store, "diff", pair[0], "no-such-run")
    assert code == 1
    assert out == ""
    assert "no run 'no-such-run'" in err


def test_compare_pairs_by_key_and_counts_failures(store: Store, pair: tuple[str, str]) -> None:
    c = compare_runs(store.open_run(pair[0]), store.open_run(pair[1]), "score", "correct")
    # common keys q1..q3 (q4 failed in B, q5 failed in A); booleans count as 0/1
    assert c.n == 3
    assert c.mean_a == pytest.approx(2 / 3)
    assert c.mean_b == pytest.approx(2 / 3)
    assert c.mean_diff == pytest.approx(0)
    assert (c.wins, c.losses, c.ties) == (1, 1, 1)
    assert c.only_a == []
    assert c.only_b == ["q6"]
    assert (c.failures_a, c.failures_b) == (1, 1)
    assert c.key_field == "id"
    assert c.ci_low <= c.mean_diff <= c.ci_high


def test_compare_is_deterministic_for_a_seed(store: Store, make_run: MakeRun) -> None:
    rng = random.Random(7)
    a = make_run(
        store, "e", {}, {"s": ("id", scores({f"k{i}": rng.random() for i in range(50)}, "v"))}
    )
    b = make_run(
        store, "e", {}, {"s": ("id", scores({f"k{i}": rng.random() for i in range(50)}, "v"))}
    )
    ra, rb = store.open_run(a), store.open_run(b)
    first = compare_runs(ra, rb, "s", "v", seed=3, resamples=2000)
    again = compare_runs(ra, rb, "s", "v", seed=3, resamples=2000)
    other = compare_runs(ra, rb, "s", "v", seed=4, resamples=2000)
    assert first == again
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    rng = random.Random(1)
    diffs = [rng.gauss(0.3, 1.0) for _ in range(200)]
    low, high = bootstrap_ci(diffs, resamples=2000, confidence=0.95, seed=0)
    half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    assert low == pytest.approx(mean - half, abs=0.03)
    assert high == pytest.approx(mean + half, abs=0.03)
    assert bootstrap_ci([0.5] * 10, resamples=100, confidence=0.9, seed=0) == (0.5, 0.5)


def test_compare_cli_text_and_json(store: Store, pair: tuple[str, str], cli: Cli) -> None:
    code, out, _ = cli(
        store,
        "compare",
        *pair,
        "--stage",
        "score",
        "--field",
        "correct",
        "--seed",
        "1",
        "--resamples",
        "500",
    )
    assert code == 0
    assert "score.correct paired by id: n = 3" in out
    assert "B > A: 1   B < A: 1   ties: 1" in out
    assert "only in B: 1 (q6)" in out
    assert "failure records left out: A 1, B 1" in out
    code, out, _ = cli(
        store,
        "compare",
        *pair,
        "--stage",
        "score",
        "--field",
        "correct",
        "--json",
        "--resamples",
        "500",
    )
    doc = json.loads(out)
    assert doc["n"] == 3
    assert doc["only_b"] == ["q6"]
    assert doc["resamples"] == 500


def test_compare_nested_field_and_key_override(store: Store, make_run: MakeRun) -> None:
    recs = [{"q": "a", "m": {"acc": 1}}, {"q": "b", "m": {"acc": 0}}]
    a = make_run(store, "e", {}, {"s": (None, recs)})
    b = make_run(store, "e", {}, {"s": (None, [{"q": "a", "m": {"acc": 0}}])})
    with pytest.raises(InvalidInputError, match="declares no key field"):
        compare_runs(store.open_run(a), store.open_run(b), "s", "m.acc")
    c = compare_runs(store.open_run(a), store.open_run(b), "s", "m.acc", key="q")
    assert (c.n, c.mean_diff, c.only_a) == (1, -1.0, ["b"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "nope", "--field", "correct"], "run has no stage 'nope'"),
        (["--stage", "score", "--field", "nope"], "has no field 'nope'"),
        (["--stage", "score", "--field", "label"], "field 'label' is 'yes', not a number"),
    ],
)
def test_compare_bad_stage_or_field_exit_1(
    store: Store, make_run: MakeRun, cli: Cli, args: list[str], message: str
) -> None:
    recs = [{"id": "q1", "correct": True, "label": "yes"}]
    a = make_run(store, "e", {}, {"score": ("id", recs)})
    b = make_run(store, "e", {}, {"score": ("id", recs)})
    code, out, err = cli(store, "compare", a, b, *args)
    assert code == 1
    assert out == ""
    assert message in err


def test_compare_mismatched_keys_exit_1(store: Store, make_run: MakeRun, cli: Cli) -> None:
    a = make_run(store, "e", {}, {"score": ("id", scores({"q1": 1}))})
    b = make_run(store, "e", {}, {"score": ("id", scores({"z9": 1}))})
    code, _, err = cli(store, "compare", a, b, "--stage", "score", "--field", "correct")
    assert code == 1
    assert "the runs share no key in stage 'score'" in err
    c = make_run(store, "e", {}, {"score": ("qid", [{"qid": "q1", "correct": 1}])})
    code, _, err = cli(store, "compare", a, c, "--stage", "score", "--field", "correct")
    assert code == 1
    assert "keyed by 'id'" in err
    assert "'qid'" in err


def test_compare_usage_errors_exit_2(store: Store, pair: tuple[str, str], cli: Cli) -> None:
    code, _, err = cli(store, "compare", *pair, "--field", "correct")
    assert code == 2
    assert "--stage" in err
    code, _, _ = cli(store, "compare", *pair, "--stage", "s", "--field", "x", "--resamples", "0")
    assert code == 2
    code, _, err = cli(store, "compare", *pair, "--stage", "s", "--field", "x",
                       "--confidence", "nan")  # fmt: skip
    assert code == 2
    assert "--confidence" in err


def test_compare_unknown_run_raises(store: Store, pair: tuple[str, str]) -> None:
    with pytest.raises(RunNotFoundError):
        store.open_run("missing-run")


def test_failure_records_without_a_key_are_counted(store: Store, make_run: MakeRun) -> None:
    a = make_run(store, "e", {}, {"s": ("id", [{"id": "a", "v": 1}, {"_error": "crash"}])})
    b = make_run(store, "e", {}, {"s": ("id", [{"id": "a", "v": 3}])})
    c = compare_runs(store.open_run(a), store.open_run(b), "s", "v", resamples=10)
    assert (c.n, c.mean_diff, c.failures_a) == (1, 2.0, 1)


def test_records_without_a_key_pair_with_none(store: Store, make_run: MakeRun) -> None:
    """REC-6: a null or absent key is no key; such a record is left out, not an error."""
    a = make_run(store, "e", {}, {"s": ("id", [{"id": "a", "v": 1}, {"id": None, "v": 5}])})
    b = make_run(store, "e", {}, {"s": ("id", [{"id": "a", "v": 3}, {"v": 7}])})
    c = compare_runs(store.open_run(a), store.open_run(b), "s", "v", resamples=10)
    assert (c.n, c.mean_diff, c.only_a, c.only_b) == (1, 2.0, [], [])


@pytest.mark.parametrize(
    ("va", "vb"),
    [
        ([-1e308, 1e308], [1e308, -1e308]),
        ([1e308, 1e308], [1e308, 1e308]),
        ([0.0] * 10, [1e308] * 5 + [-1e308] * 5),  # only resampled sums overflow
        ([0.0, 0.0], [1e308, -5e307]),
    ],
)
def test_values_beyond_a_double_are_bad_input(
    store: Store, make_run: MakeRun, cli: Cli, va: list[float], vb: list[float]
) -> None:
    """Differences or sums past 1.8e308 are refused with a message, never a traceback."""
    a = make_run(store, "e", {}, {"s": ("id", [{"id": str(i), "v": v} for i, v in enumerate(va)])})
    b = make_run(store, "e", {}, {"s": ("id", [{"id": str(i), "v": v} for i, v in enumerate(vb)])})
    with pytest.raises(InvalidInputError, match="beyond a double"):
        compare_runs(store.open_run(a), store.open_run(b), "s", "v", resamples=10)
    code, _, err = cli(store, "compare", a, b, "--stage", "s", "--field", "v")
    assert code == 1
    assert "beyond a double" in err
    assert "Traceback" not in err


def test_exact_binomial_draws_follow_the_binomial_law() -> None:
    rng = random.Random(5)
    draws = 30_000
    counts = [0] * 4
    for _ in range(draws):
        counts[_binomial(rng, 3, 1, 3)] += 1
    for k in range(4):
        p = math.comb(3, k) * (1 / 3) ** k * (2 / 3) ** (3 - k)
        assert counts[k] / draws == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / draws))
    assert _binomial(rng, 50, 0, 7) == 0
    assert _binomial(rng, 50, 7, 7) == 50
    big = [_binomial(rng, 10_000, 3, 10) for _ in range(200)]
    assert statistics.fmean(big) == pytest.approx(3000, abs=4 * math.sqrt(2100 / 200))


def test_few_value_bootstrap_agrees_with_drawing_every_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(2)
    diffs = [rng.choice([-1.0, 0.0, 0.0, 1.0]) for _ in range(300)]
    fast = bootstrap_ci(diffs, resamples=2000, confidence=0.9, seed=0)
    monkeypatch.setattr(compare, "FEW_VALUES", 0)
    slow = bootstrap_ci(diffs, resamples=2000, confidence=0.9, seed=0)
    assert fast != slow
    assert fast == pytest.approx(slow, abs=0.01)
