"""Run any implementation's reader over the conformance suite (spec §13).

    python -m tests.conformance.run --reader "runfmt dump" [--repair "runfmt repair"]

The reader command gets the path of a run folder as its last argument. For a
valid case it must exit 0 and print the normalized view, equal to
``expected.json``; for an invalid case it must exit 1 (problems on stderr).
With ``--repair``, each repairable invalid case is repaired on a fresh copy
and must then read as ``expected.json``. Every case runs on a temporary copy,
so the suite is never modified.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE = Path(__file__).resolve().parent
TIMEOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    """What a reader or repair command did with one run folder."""

    exit_code: int
    stdout: str
    stderr: str


Command = Callable[[Path], Outcome]
"""Runs a reader (or repair) on a run folder."""


@dataclass(frozen=True)
class Case:
    name: str
    folder: Path
    meta: dict[str, Any]

    @property
    def valid(self) -> bool:
        return bool(self.meta["outcome"] == "valid")

    def expected(self) -> Any:
        return json.loads((self.folder / "expected.json").read_text("utf-8"))


@dataclass(frozen=True)
class Result:
    case: Case
    step: str
    error: str
    """Empty when the case passed."""
    outcome: Outcome | None = None


def cases(pattern: str = "*") -> list[Case]:
    """Every case whose ``valid/<name>`` or ``invalid/<name>`` matches ``pattern``.

    ``pattern`` is a glob, or several separated by commas.
    """
    patterns = pattern.split(",")
    found = []
    for kind in ("valid", "invalid"):
        for folder in sorted((SUITE / kind).iterdir()):
            name = f"{kind}/{folder.name}"
            matched = any(fnmatch.fnmatch(name, p) for p in patterns)
            if matched and (folder / "case.json").is_file():
                meta = json.loads((folder / "case.json").read_text("utf-8"))
                found.append(Case(name, folder, meta))
    return found


def shell_command(command: str) -> Command:
    """A `Command` that runs ``command RUN_FOLDER`` in a process."""
    argv = shlex.split(command)

    def run(folder: Path) -> Outcome:
        try:
            done = subprocess.run(
                [*argv, str(folder)], capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            return Outcome(-1, "", f"timed out after {TIMEOUT:g} s")
        return Outcome(done.returncode, done.stdout, done.stderr)

    return run


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 equals 1.0), but booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    return type(a) is type(b) and a == b


def _copy(case: Case, tmp: Path) -> Path:
    """A fresh copy of the case folder with its setup steps applied; returns the run folder."""
    dest = tmp / case.folder.name
    shutil.copytree(case.folder, dest, symlinks=True)
    for step in case.meta.get("setup", []):
        link = dest / step["symlink"]
        link.unlink(missing_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(dest / step["target"], link.parent), link)
    return dest / "run"


def _read_check(case: Case, outcome: Outcome, expect_valid: bool) -> str:
    if not expect_valid:
        if outcome.exit_code != 1:
            return f"expected exit 1 for an invalid run, got {outcome.exit_code}"
        return "" if outcome.stderr.strip() else "exit 1 but nothing on stderr"
    if outcome.exit_code != 0:
        return f"expected exit 0, got {outcome.exit_code}: {outcome.stderr.strip()[:500]}"
    try:
        view = json.loads(outcome.stdout)
    except json.JSONDecodeError as exc:
        return f"stdout is not JSON: {exc}"
    if not same_json(view, case.expected()):
        return "view differs from expected.json:\n" + _diff(case.expected(), view)
    return ""


def _diff(expected: Any, actual: Any) -> str:
    import difflib

    a = json.dumps(expected, indent=1, sort_keys=True).splitlines()
    b = json.dumps(actual, indent=1, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "expected", "actual", lineterm="", n=2))


def check_case(case: Case, reader: Command, repair: Command | None = None) -> Iterator[Result]:
    """Read the case (and, with ``repair``, repair then read it); one `Result` per step."""
    with tempfile.TemporaryDirectory() as tmp:
        outcome = reader(_copy(case, Path(tmp) / "read"))
        yield Result(case, "read", _read_check(case, outcome, case.valid), outcome)
        if repair is None or not case.meta.get("repairable"):
            return
        run = _copy(case, Path(tmp) / "repair")
        fixed = repair(run)
        if fixed.exit_code != 0:
            error = f"repair exited {fixed.exit_code}: {fixed.stderr.strip()[:500]}"
            yield Result(case, "repair", error, fixed)
            return
        outcome = reader(run)
        yield Result(case, "repair", _read_check(case, outcome, True), outcome)


def run_suite(
    reader: Command, repair: Command | None = None, pattern: str = "*", jobs: int = 2
) -> list[Result]:
    """Check every matching case; the results in case order."""

    def one(case: Case) -> list[Result]:
        return list(check_case(case, reader, repair))

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [r for results in pool.map(one, cases(pattern)) for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reader", required=True, help='reader command, e.g. "runfmt dump"')
    parser.add_argument("--repair", help='repair command, e.g. "runfmt repair"')
    parser.add_argument(
        "--cases", default="*", help="globs over valid/<name>, invalid/<name>, comma-separated"
    )
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    args = parser.parse_args(argv)
    repair = shell_command(args.repair) if args.repair else None
    results = run_suite(shell_command(args.reader), repair, args.cases, args.jobs)
    failed = [r for r in results if r.error]
    for r in results:
        status = "FAIL" if r.error else "ok  "
        print(f"{status} {r.case.name} ({r.step})")
        if r.error:
            print("     " + r.error.replace("\n", "\n     "))
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
