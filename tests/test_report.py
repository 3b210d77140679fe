"""`runfmt report`: runs x status, stage counts, counters and metric means in json/md/csv/latex."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from runfmt.errors import InvalidInputError
from runfmt.report import build_report, latex_escape, render
from runfmt.store import Store
from tests.fixtures_manage import Cli, MakeRun


@pytest.fixture
def runs(store: Store, make_run: MakeRun) -> list[str]:
    first = make_run(
        store,
        "base_line & co",
        stages={
            "score": (
                "id",
                [
                    {"id": "q1", "acc": True, "ms": 10},
                    {"id": "q2", "acc": False, "ms": 30},
                    {"id": "q3", "_error": "timeout"},
                ],
            )
        },
        counters={"cost_usd": 0.25},
        run_id="r1",
    )
    second = make_run(
        store,
        "tuned",
        stages={
            "score": ("id", [{"id": "q1", "acc": True}, {"id": "q2", "acc": True}]),
            "parse": (None, [{"ok": 1}]),
        },
        counters={"cost_usd": 1, "tokens": 1200},
        status="failed",
        run_id="r2",
    )
    return [first, second]


def test_build_report_aggregates_means_without_failures(store: Store, runs: list[str]) -> None:
    report = build_report([store.open_run(r) for r in runs], "score", ["acc", "ms"])
    r1, r2 = report.rows
    assert (r1.metrics["acc"].mean, r1.metrics["acc"].count) == (0.5, 2)
    assert (r1.metrics["ms"].mean, r1.metrics["ms"].count) == (20.0, 2)
    assert (r2.metrics["ms"].mean, r2.metrics["ms"].missing) == (None, 2)
    assert r1.stages["score"].failures == 1
    assert r2.status == "failed"
    assert report.stage_names == ["score", "parse"]
    assert report.counter_names == ["cost_usd", "tokens"]


def test_markdown_pastes_into_an_issue(store: Store, runs: list[str], cli: Cli) -> None:
    code, out, _ = cli(store, "report", *runs, "--stage", "score", "-m", "acc", "--digits", "2")
    assert code == 0
    assert out == (
        "| run | name | status | score | parse | cost_usd | tokens | acc (mean) | acc (n) |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
        "| r1 | base_line & co | completed | 3 (1 failed) |  | 0.25 |  | 0.50 | 2 |\n"
        "| r2 | tuned | failed | 2 | 1 | 1 | 1200 | 1.00 | 2 |\n"
    )


def test_latex_is_booktabs_and_escaped(store: Store, runs: list[str], cli: Cli) -> None:
    code, out, _ = cli(store, "report", *runs, "--format", "latex", "--stage", "score", "-m", "acc")
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == r"\begin{tabular}{lllrrrrrr}"
    assert lines[2] == r"\toprule"
    assert lines[4] == r"\midrule"
    assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    assert r"r1 & base\_line \& co & completed & 3 (1 failed) &  & 0.250 &  & 0.500 & 2 \\" in lines
    assert r"cost\_usd" in lines[3]
    assert latex_escape("50% of $x_1^2 {a} #1 ~ \\") == (
        r"50\% of \$x\_1\textasciicircum{}2 \{a\} \#1 \textasciitilde{} \textbackslash{}"
    )
    assert latex_escape("a\nb\x1b[2Jc") == "a b [2Jc"


def test_markdown_and_latex_cells_hold_no_control_character(
    store: Store, make_run: MakeRun, cli: Cli
) -> None:
    """A hand-edited name can neither break a table row nor send a terminal escapes."""
    make_run(store, "evil", run_id="r9")
    newest = max((Path(store.url) / "r9" / "_manifests").glob("*.json"))
    doc = json.loads(newest.read_bytes())
    newest.write_text(json.dumps(doc | {"name": "evil\n| x |\x1b[2J\rname"}))
    for fmt in ("md", "latex"):
        code, out, _ = cli(store, "report", "r9", "--format", fmt)
        assert code == 0
        assert not [c for c in out if not c.isprintable() and c != "\n"], fmt
        assert len(out.splitlines()) == (3 if fmt == "md" else 8), fmt


def test_csv_and_json_keep_full_values(store: Store, runs: list[str], cli: Cli) -> None:
    code, out, _ = cli(store, "report", *runs, "--format", "csv", "--stage", "score", "-m", "acc")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["run_id"] for r in rows] == ["r1", "r2"]
    assert rows[0]["score.failures"] == "1"
    assert rows[0]["parse.records"] == ""
    assert rows[0]["acc.mean"] == "0.5"
    assert rows[1]["counter.tokens"] == "1200"
    code, out, _ = cli(store, "report", *runs, "--format", "json", "--stage", "score", "-m", "acc")
    doc = json.loads(out)
    assert doc["runs"][0]["metrics"]["acc"] == {"mean": 0.5, "count": 2, "missing": 0}
    assert doc["runs"][1]["stages"]["parse"]["records"] == 1


def test_all_runs_oldest_first_with_name_filter(store: Store, runs: list[str], cli: Cli) -> None:
    code, out, _ = cli(store, "report", "--format", "csv")
    assert code == 0
    assert [r["run_id"] for r in csv.DictReader(io.StringIO(out))] == ["r1", "r2"]
    code, out, _ = cli(store, "report", "--format", "csv", "--name", "tuned")
    assert [r["run_id"] for r in csv.DictReader(io.StringIO(out))] == ["r2"]
    code, out, _ = cli(store, "report", "--format", "csv", "--name", "base_*")
    assert [r["run_id"] for r in csv.DictReader(io.StringIO(out))] == ["r1"]
    code, out, _ = cli(store, "report", "--format", "csv", "--limit", "1")
    assert [r["run_id"] for r in csv.DictReader(io.StringIO(out))] == ["r2"]


def test_report_uses_the_store_index_like_ls(
    store: Store, runs: list[str], cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One index per local store: `report` must not build a second one in the user cache."""
    monkeypatch.setenv("RUNFMT_CACHE_DIR", str(tmp_path / "cache"))
    assert cli(store, "report", "--format", "csv")[0] == 0
    assert (Path(store.url) / ".runfmt" / "index.sqlite").is_file()
    assert not (tmp_path / "cache").exists()


def test_unreadable_runs_are_left_out_with_a_warning(
    store: Store, runs: list[str], cli: Cli
) -> None:
    run = Path(store.url) / "r1"
    for revision in [run / "manifest.json", *(run / "_manifests").iterdir()]:
        revision.write_text("{")
    code, out, err = cli(store, "report", "--format", "csv")
    assert code == 0
    assert [r["run_id"] for r in csv.DictReader(io.StringIO(out))] == ["r2"]
    assert "skipped unreadable run r1: " in err


def test_output_file(store: Store, runs: list[str], cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "table.md"
    code, out, err = cli(store, "report", *runs, "--output", str(target))
    assert code == 0
    assert out == ""
    assert "wrote md report of 2 runs" in err
    assert target.read_text().startswith("| run | name | status |")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--format", "docx"], 2, "unknown format 'docx'"),
        (["-m", "acc"], 2, "--metric needs --stage"),
        (["--stage", "nope", "-m", "acc"], 1, "no run has a stage 'nope' (stages: parse, score)"),
        (["--stage", "score", "-m", "nope"], 1, "no record of stage 'score' has a field 'nope'"),
        (["--stage", "score", "-m", "id"], 1, "field 'id' is 'q1', not a number"),
        (["missing-run"], 1, "no run 'missing-run'"),
        (["r1", "--limit", "1"], 2, "give them or RUN, not both"),
    ],
)
def test_bad_input(
    store: Store, runs: list[str], cli: Cli, args: list[str], code: int, message: str
) -> None:
    got, out, err = cli(store, "report", *args)
    assert got == code
    assert out == ""
    assert message in err


def test_render_rejects_unknown_format(store: Store, runs: list[str]) -> None:
    report = build_report([store.open_run(runs[0])])
    with pytest.raises(InvalidInputError, match="unknown report format"):
        render(report, "pdf")  # type: ignore[arg-type]


def test_small_values_keep_their_significant_digits(store: Store) -> None:
    """A counter or a mean under 1 shows ``digits`` significant digits, never 0.000."""
    with store.create_run("tiny", heartbeat_interval=None) as w:
        w.count("cost_usd", 0.0197745)
        w.count("tokens", 1234.5678)
        w.extend("score", [{"p": 1e-9}, {"p": 2e-9}])
    text = render(build_report([store.open_run(w.run_id)], "score", ["p"]), "md", digits=3)
    row = text.splitlines()[-1]
    assert "| 0.0198 |" in row
    assert "| 1234.568 |" in row
    assert "| 1.5e-09 |" in row


def test_large_values_show_no_digits_past_a_floats_precision(store: Store) -> None:
    """15 significant digits at most: 123456789012345.67 is 123456789012346, not .672."""
    with store.create_run("huge", heartbeat_interval=None) as w:
        w.count("tokens", 123456789012345.67)
        w.extend("score", [{"p": 1.5}])
    text = render(build_report([store.open_run(w.run_id)], "score", ["p"]), "md", digits=3)
    row = text.splitlines()[-1]
    assert "| 123456789012346 |" in row
    assert "| 1.500 |" in row
    with store.create_run("huger", heartbeat_interval=None) as w:
        w.extend("score", [{"p": 1.7e308}, {"p": 1.7e308}])
    text = render(build_report([store.open_run(w.run_id)], "score", ["p"]), "md", digits=3)
    assert "| 1.7e+308 |" in text.splitlines()[-1]


def test_means_are_exact_and_finite_whatever_the_values(store: Store) -> None:
    """Huge values neither overflow a mean to Infinity (no valid JSON) nor lose the
    small ones; the order of the records does not change a mean."""
    values = [1e308, 1e308, -1e308, 0.1, 0.2, 0.3]
    with store.create_run("extremes", heartbeat_interval=None) as w:
        w.extend("score", [{"p": v, "q": [0.1, 0.2, 0.3][i % 3]} for i, v in enumerate(values)])
    report = build_report([store.open_run(w.run_id)], "score", ["p", "q"])
    assert report.rows[0].metrics["p"].mean == pytest.approx(1e308 / 6, rel=1e-15)
    assert report.rows[0].metrics["q"].mean == math.fsum([0.1, 0.2, 0.3] * 2) / 6
    tiny = [1e-300, 3e-300, 2e-300, 1e-310, 1e-310, 1e-310]
    with store.create_run("tiny", heartbeat_interval=None) as w:
        w.extend("score", [{"p": v} for v in tiny])
    [row] = build_report([store.open_run(w.run_id)], "score", ["p"]).rows
    assert row.metrics["p"].mean == math.fsum(tiny) / 6
    document = json.loads(
        render(report, "json"), parse_constant=lambda c: pytest.fail(f"not JSON: {c}")
    )
    assert document["runs"][0]["metrics"]["p"]["mean"] == pytest.approx(1e308 / 6, rel=1e-15)
