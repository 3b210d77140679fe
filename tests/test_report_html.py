"""`runfmt report --format html`: one self-contained page, rendered in headless Chromium."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from runfmt.store import Store
from tests.fixtures_manage import Cli, MakeRun

Browser = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def page(store: Store, make_run: MakeRun, cli: Cli, tmp_path: Path) -> tuple[Path, list[str]]:
    ids = []
    for i, (name, acc) in enumerate([("base <b>", 0.25), ("tuned", 0.75), ("worse", -0.5)]):
        records = [{"id": f"q{k}", "acc": acc} for k in range(4)]
        if i == 1:
            records.append({"id": "q9", "_error": "timeout"})
        ids.append(
            make_run(
                store,
                name,
                {"i": i},
                {"score": ("id", records), "gen": (None, [{}] * (i + 1))},
                run_id=f"run-{i}",
                status="running" if i == 2 else "completed",
            )
        )
    target = tmp_path / "report.html"
    code, _, err = cli(
        store,
        "report",
        "--format",
        "html",
        "--stage",
        "score",
        "-m",
        "acc",
        "--title",
        "Eval <summary>",
        "--output",
        str(target),
    )
    assert code == 0, err
    return target, ids


def test_html_is_self_contained(page: tuple[Path, list[str]]) -> None:
    text = page[0].read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=|<script|<link|@import|url\(""", text)
    assert "base &lt;b&gt;" in text
    assert "<b>" not in text


def test_html_renders_runs_progress_and_chart_in_chromium(
    page: tuple[Path, list[str]], chromium: Browser, tmp_path: Path
) -> None:
    path, ids = page
    done = chromium("--dump-dom", path.as_uri(), profile=str(tmp_path / "profile"))
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "<title>Eval &lt;summary&gt;</title>" in dom
    rows = re.findall(r'<tr data-run="([^"]+)">', dom)
    assert rows == ids
    progress = re.search(r'<table id="progress">.*?</table>', dom, re.S)
    assert progress is not None
    assert progress[0].count('class="progress"') == 6
    assert 'title="5 records, 1 failed"' in progress[0]
    chart = re.search(r'<svg class="chart" data-metric="acc".*?</svg>', dom, re.S)
    assert chart is not None
    bars = re.findall(r'<rect class="value" data-run="([^"]+)"[^>]*height="([0-9.]+)"', chart[0])
    assert [b[0] for b in bars] == ids
    heights = {run: float(h) for run, h in bars}
    assert heights["run-1"] == pytest.approx(3 * heights["run-0"], rel=0.01)
    assert "0.750" in chart[0]
    assert "-0.500" in chart[0]
    shot = tmp_path / "page.png"
    done = chromium(
        f"--screenshot={shot}",
        "--window-size=1000,900",
        path.as_uri(),
        profile=str(tmp_path / "profile2"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000


def test_html_without_metrics_says_how_to_get_a_chart(
    store: Store, make_run: MakeRun, cli: Cli
) -> None:
    make_run(store, "only", {}, {"s": (None, [{"x": 1}])})
    code, out, _ = cli(store, "report", "--format", "html")
    assert code == 0
    assert "<svg" not in out
    assert "No chart: pass --stage and --metric" in out
