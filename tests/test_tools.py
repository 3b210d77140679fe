"""Hand inspection with standard tools, no runfmt involved: zstd, zstdcat | jq, sha256sum,
DuckDB. The fixtures install a missing tool; under CI=true one that cannot be had fails."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from runfmt.format.frames import DataFrame, FrameDecoder, iter_frames
from runfmt.store import Store
from tests import fixtures_tools

Tool = Callable[[str], str]


def records(n: int, stage: str) -> list[dict[str, Any]]:
    return [
        {"id": f"q{i:04d}", "stage": stage, "score": i / 7, "ok": i % 4 != 0, "tags": ["a", "b"],
         "text": "naïve café ✓ " * (i % 3)}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def finished_run(store: Store) -> Path:
    """A completed run with two stages, each file holding several zstd frames, the second
    counter frames (FRAME-6) among them."""
    generate, score = records(150, "generate"), records(150, "score")
    with store.create_run("tools", {"model": "m"}, flush_every=40, flush_interval=None) as w:
        for start in range(0, 150, 30):
            w.extend("generate", generate[start : start + 30])
            w.count("tokens", 30)
            w.extend("score", score[start : start + 30])
        w.append("score", {"id": "q9999", "_error": "judge timed out"})
    run_dir = Path(store.url) / w.run_id
    for stage in ("generate", "score"):
        [f] = stage_files(run_dir, stage)
        frames = [e for e in iter_frames(f.read_bytes()) if isinstance(e, DataFrame)]
        assert len(frames) >= 4
    decoder = FrameDecoder(counters_from=0)
    list(decoder.decode(stage_files(run_dir, "score")[0].read_bytes()))
    assert len(decoder.counter_frames) >= 4
    return run_dir


def run(cmd: list[str] | str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, check=False, shell=isinstance(cmd, str)
    )


def stage_files(run_dir: Path, stage: str) -> list[Path]:
    files = sorted((run_dir / "stages" / stage).glob("*.jsonl.zst"))
    assert files
    return files


def test_zstd_test_accepts_every_stage_file(finished_run: Path, require_tool: Tool) -> None:
    zstd = require_tool("zstd")
    for stage in ("generate", "score"):
        for f in stage_files(finished_run, stage):
            done = run([zstd, "-t", str(f)])
            assert done.returncode == 0, done.stderr


def test_zstd_test_rejects_a_flipped_byte(finished_run: Path, require_tool: Tool) -> None:
    zstd = require_tool("zstd")
    [f] = stage_files(finished_run, "score")
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x55
    f.write_bytes(bytes(data))
    assert run([zstd, "-t", str(f)]).returncode != 0


def test_zstdcat_pipes_plain_json_lines_to_jq(finished_run: Path, require_tool: Tool) -> None:
    zstdcat, jq = require_tool("zstdcat"), require_tool("jq")
    [f] = stage_files(finished_run, "score")
    done = run(f"'{zstdcat}' '{f}' | '{jq}' -c .")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == [*records(150, "score"), {"id": "q9999", "_error": "judge timed out"}]
    failures = run(f"'{zstdcat}' '{f}' | '{jq}' -c 'select(._error != null) | .id'")
    assert failures.stdout.split() == ['"q9999"']


def test_jq_reads_the_manifest(finished_run: Path, require_tool: Tool) -> None:
    jq = require_tool("jq")
    program = '.status, .run_id, (.stages[] | "\\(.name) \\(.files | map(.records) | add)")'
    done = run([jq, "-r", program, str(finished_run / "manifest.json")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == [
        "completed", finished_run.name, "generate 150", "score 151",
    ]  # fmt: skip


def test_sha256sum_checks_a_finished_run(finished_run: Path, require_tool: Tool) -> None:
    sha256sum = require_tool("sha256sum")
    done = run([sha256sum, "-c", "SHA256SUMS"], cwd=finished_run)
    assert done.returncode == 0, done.stdout + done.stderr
    checked = {line.rsplit(": ", 1)[0] for line in done.stdout.splitlines()}
    listed = {f.relative_to(finished_run).as_posix() for f in finished_run.rglob("*.jsonl.zst")}
    assert checked == {"manifest.json", *listed}
    assert all(line.endswith(": OK") for line in done.stdout.splitlines())

    [f] = stage_files(finished_run, "generate")
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    bad = run([sha256sum, "-c", "SHA256SUMS"], cwd=finished_run)
    assert bad.returncode != 0
    assert f"{f.relative_to(finished_run).as_posix()}: FAILED" in bad.stdout


def test_duckdb_reads_the_stage_files(finished_run: Path, duckdb_module: ModuleType) -> None:
    con = duckdb_module.connect()
    pattern = str(finished_run / "stages" / "score" / "*.jsonl.zst")
    rows = con.execute(
        f"SELECT id, score, ok FROM read_json('{pattern}') WHERE _error IS NULL ORDER BY id"
    ).fetchall()
    expected = [(r["id"], pytest.approx(r["score"]), r["ok"]) for r in records(150, "score")]
    assert rows == expected
    total = con.execute(f"SELECT count(*) FROM read_json('{pattern}')").fetchone()
    assert total == (151,)
    gen = str(finished_run / "stages" / "generate" / "*.jsonl.zst")
    joined = con.execute(
        f"SELECT count(*) FROM read_json('{gen}') g JOIN read_json('{pattern}') s USING (id)"
    ).fetchone()
    assert joined == (150,)


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_a_tool_that_cannot_be_had_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(fixtures_tools, "_apt_install", lambda package: "simulated failure")
    with pytest.raises(outcome, match=r"runfmt-no-such-tool.*simulated failure"):
        fixtures_tools._tool("runfmt-no-such-tool")
