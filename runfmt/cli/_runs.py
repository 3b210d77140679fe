"""Commands on single runs: demo, show, cat, verify, repair, schema.

RUN is a run id in the store or the path/URL of a run folder, so a copied
folder works with no store. None of these commands needs the index.
"""

import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runfmt.cli import (
    JsonOpt,
    RunArg,
    State,
    app,
    at_most_max_count,
    echo,
    fail,
    held_commit_lock,
    no_runs,
    output_closed,
    print_json,
    require_store,
    state,
    store_missing,
    table,
)
from runfmt.units import format_number, printable

if TYPE_CHECKING:
    from runfmt.errors import RunfmtError
    from runfmt.format.validate import Problem
    from runfmt.run import RunReader
    from runfmt.storage import Storage
    from runfmt.store import Store


@app.command()
def demo(
    ctx: typer.Context,
    seed: Annotated[
        int,
        typer.Option(
            min=0, max=2**53 - 1, help="Seed of the dataset and the simulated model (0 to 2^53-1)."
        ),
    ] = 0,
    items: Annotated[
        int, typer.Option(min=1, max=100_000, help="Number of questions to evaluate.")
    ] = 200,
) -> None:
    """Write a realistic evaluation run (generate -> parse -> score) into the store and show it."""
    from runfmt.demo import write_demo_run

    store = state(ctx).store()
    result = write_demo_run(store, seed=seed, items=items, reuse=store.cache.record)
    sys.stdout.write(f"wrote run {result.run_id} to {store.url}\n\n")
    _print_summary(run_summary(store.open_run(result.run_id)))
    global_options, masked = _global_options(state(ctx))
    sys.stdout.write(f"\nreused {result.reused} of {result.total} results from earlier runs\n")
    if store.storage.protocol == "memory":
        sys.stdout.write("(a memory:// store ends with this process: nothing to read next)\n")
        return
    sys.stdout.write(f"next: runfmt {global_options}cat {result.run_id} score | head -3\n")
    if masked:
        sys.stdout.write("(*** stands for the value you gave: secrets are not printed)\n")


_SECRET = re.compile(r"key|secret|token|passw|credential|auth|session|signature|sas|connection",
                     re.IGNORECASE)  # fmt: skip
"""A storage option whose KEY=VALUE matches is shown as ``KEY=***``."""


def _global_options(st: State) -> tuple[str, bool]:
    """``-s STORE -o KEY=VALUE ... `` as given (shell-quoted), for a command to run next;
    empty for the default store. Secret-like options, and a password in the store's URL,
    are shown as ``***``; the bool says whether any was."""
    import shlex
    from urllib.parse import urlsplit

    words: list[str] = []
    masked = False
    if st.store_url is not None:
        url = st.store_url
        parts = urlsplit(url) if "://" in url else None
        if parts is not None and parts.password:
            host = parts.netloc.rsplit("@", 1)[1]
            url = parts._replace(netloc=f"{parts.username}:***@{host}").geturl()
            masked = True
        words += ["-s", url]
    for item in st.storage_option_args:
        secret = bool(_SECRET.search(item))
        words += ["-o", f"{item.partition('=')[0]}=***" if secret else item]
        masked |= secret
    return "".join(f"{shlex.quote(w)} " for w in words), masked


@app.command()
def show(ctx: typer.Context, run: RunArg, json_: JsonOpt = False) -> None:
    """Show a run: identity, status, config, tags, counters, stages, files and artifacts."""
    summary = run_summary(state(ctx).store(read_only=True).open_run(run))
    if json_:
        print_json(summary)
    else:
        _print_summary(summary)


@app.command("cat")
def cat(
    ctx: typer.Context,
    run: RunArg,
    stage: Annotated[str | None, typer.Argument(help="The stage whose records to print.")] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n", min=0, callback=at_most_max_count, help="Print at most N records."
        ),
    ] = None,
    artifact: Annotated[
        str | None,
        typer.Option("--artifact", "-a", help="Write this artifact's bytes instead of records."),
    ] = None,
) -> None:
    """Print a stage's committed records as JSON Lines, or an artifact's bytes, on stdout."""
    if (stage is None) == (artifact is None):
        fail("give either a STAGE or --artifact NAME", 2)
    reader = state(ctx).store(read_only=True).open_run(run)
    out = sys.stdout.buffer
    if artifact is not None:
        for chunk in reader.stream_artifact(artifact):
            out.write(chunk)
            if output_closed():
                break
    else:
        assert stage is not None
        _write_records(out, reader, stage, limit)
    out.flush()


def _write_records(out: Any, reader: "RunReader", stage: str, limit: int | None) -> None:
    from runfmt.format.records import line_of

    left = limit
    if left == 0:
        reader.stage(stage)
        return
    for batch in reader.record_batches(stage):
        records = batch if left is None else batch[:left]
        out.write(b"".join(map(line_of, records)))
        if output_closed():
            return
        if left is not None:
            left -= len(records)
            if left == 0:
                return


@app.command()
def verify(
    ctx: typer.Context,
    runs: Annotated[
        list[str] | None,
        typer.Argument(help="Run ids or run folder paths; every run in the store when none."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Check runs against the spec and their manifests; print every problem; exit 1 if any.

    Without RUN, the store's folders that hold no run (LAYOUT-2) are skipped, not failed.
    A RUN that names no run fails, and the other RUNs are still checked.
    """
    from runfmt.check import being_written_by, verify_run
    from runfmt.errors import RunfmtError, RunNotFoundError

    store = state(ctx).store(read_only=True)
    runs = runs or []
    found: list[tuple[Storage, list[Problem], list[str]]] = []
    skipped: list[str] = []
    unchecked: list[dict[str, Any]] = []

    def check(run: "Storage", run_id: str | None = None) -> None:
        live = being_written_by(run)
        found.append((run, verify_run(run, run_id=run_id, live=frozenset(live)), live))

    missing_store = None if runs else store_missing(ctx)
    if missing_store:
        unchecked.append(_unchecked_json(None, store.url, f"no such {missing_store}"))
        if not json_:
            require_store(ctx)
    for arg in runs:
        try:
            check(store.locate(arg))
        except RunfmtError as exc:
            if len(runs) == 1 and not json_:
                raise
            unchecked.append(_error_json(arg, exc))
            sys.stderr.write(f"runfmt: error: {printable(str(exc))}\n")
    for run_id in [] if runs or missing_store else store.run_ids():
        run = store.storage.child(run_id)
        try:
            check(run, run_id)
        except RunNotFoundError as exc:
            skipped.append(f"skip  {run.name}: {exc.problem}")
        except RunfmtError as exc:  # a folder this user may not read, a backend failure
            unchecked.append(_error_json(run_id, exc))
            sys.stderr.write(f"runfmt: error: {printable(str(exc))}\n")
    if not (runs or missing_store):
        skipped += _misnamed_runs(store)
    bad = [(run, problems) for run, problems, _ in found if problems]
    if json_:
        print_json([_problem_json(run, p) for run, problems in bad for p in problems] + unchecked)
    elif not (found or skipped or unchecked):
        echo(no_runs(ctx, store.url, filtered=False))
    else:
        for run, problems, live in found:
            _print_verdict(run, problems, live)
        for line in skipped:
            echo(line)
        failed = f", {len(unchecked)} could not be checked" if unchecked else ""
        sys.stdout.write(f"checked {_count(len(found), 'run')}: {len(bad)} with problems{failed}\n")
    if bad:
        total = sum(len(problems) for _, problems in bad)
        fail(f"{_count(total, 'problem')} in {len(bad)} of {_count(len(found), 'run')}")
    if missing_store:
        require_store(ctx)
    if unchecked and len(runs) == 1:
        raise typer.Exit(1)  # its error is said above
    if unchecked and runs:
        fail(f"{len(unchecked)} of {len(runs)} RUNs name no run that could be checked")
    if unchecked:
        fail(f"{_count(len(unchecked), 'run')} could not be checked")


def _error_json(arg: str, exc: "RunfmtError") -> dict[str, Any]:
    """A RUN that could not be checked, as a `verify --json` entry; ``rule`` is the spec
    rule the error names (``not a run ... (LAYOUT-2)``), if any."""
    from runfmt.format.validate import cited_rule

    problem, rule = cited_rule(exc.problem, "")
    problem = f"{problem} ({exc.hint})" if exc.hint else problem
    return _unchecked_json(arg, exc.location or arg, problem, rule or None)


def _unchecked_json(
    run: str | None, location: str, problem: str, rule: str | None = None
) -> dict[str, Any]:
    return {
        "run": run,
        "location": location,
        "problem": problem,
        "rule": rule,
        "repairable": False,
    }


def _misnamed_runs(store: "Store") -> list[str]:
    """A skip line for each folder of the store that holds a run but is not named as a run
    id, so that the store does not list it (LAYOUT-1): a copy renamed by hand."""
    from runfmt.format import names

    lines = []
    for entry in store.storage.list():
        if not entry.is_dir or entry.name.startswith(".") or names.is_run_id(entry.name):
            continue
        folder = store.storage.child(entry.name)
        if folder.exists(names.MANIFESTS_DIR) or folder.exists(names.MANIFEST_FILE):
            lines.append(
                f"skip  {printable(entry.name)}: holds a run, but a store lists only folders "
                "named as run ids (LAYOUT-1): rename it to its run id"
            )
    return lines


_LEFT_BY_SYNC = frozenset({"LAYOUT-4", "COMMIT-7", "CHECK-3"})
"""What a sync stopped before its revision's `manifest.json` leaves (SYNC-5)."""


def _print_verdict(run: "Storage", problems: "Sequence[Problem]", live: list[str]) -> None:
    """The problems of a run, and its verdict line; ``live``: ids of its live writers."""
    from runfmt.check import ANY_WRITER

    label = run.name
    if ANY_WRITER in live:
        note = " (running and heard from within 300 s: uncommitted data not checked)"
    elif live:
        note = (
            f" (being written by live writer{'s' * (len(live) > 1)} {', '.join(live)}: "
            "uncommitted data not checked)"
        )
    else:
        note = ""
    if not problems:
        echo(f"ok    {label}{note}")
        return
    for p in problems:
        rule = f" ({p.rule})" if p.rule else ""
        echo(f"{_full_location(run, p.location)}: {p.problem}{rule}")
    fixable = sum(p.repairable for p in problems)
    hint = f"; `runfmt repair {shlex.quote(run.where())}` fixes {fixable}" if fixable else ""
    if fixable and {p.rule for p in problems} <= _LEFT_BY_SYNC:
        hint += " (if an interrupted `runfmt sync` made this copy, run that sync again instead)"
    echo(f"FAIL  {label}: {_count(len(problems), 'problem')}{hint}{note}")


def _problem_json(run: "Storage", p: "Problem") -> dict[str, Any]:
    return {
        "run": run.name,
        "location": _full_location(run, p.location),
        "problem": p.problem,
        "rule": p.rule,
        "repairable": p.repairable,
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _full_location(run: "Storage", location: str) -> str:
    root = run.where()
    return location if location.startswith(root) else run.where(location)


def _by_hand(rule: str) -> str:
    """What a user can do about a problem `repair` leaves (repair never changes committed
    bytes, nor touches files it cannot tell are uncommitted data)."""
    if rule == "LAYOUT-4":
        return "move away or delete the files no revision lists"
    if rule == "LAYOUT-5":
        return "replace each symbolic link with the file it points to"
    return "restore the damaged files from a copy of the run"


REPAIR_LOCK_WAIT = 60.0
"""Seconds `repair` waits for a commit lock another writer holds (as `repair_run`)."""


@app.command()
def repair(
    ctx: typer.Context,
    run: RunArg,
    drop: Annotated[
        bool,
        typer.Option(
            "--drop",
            help="Cut off everything written after the last commit instead of salvaging "
            "complete frames.",
        ),
    ] = False,
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback",
            help="For a copy made while the run was written (listed files missing or cut "
            "short, the rest whole): go back to the newest revision its files hold whole.",
        ),
    ] = False,
) -> None:
    """Bring a crashed run back to a consistent state; exit 0 when it then verifies."""
    from runfmt.check import being_written_by, repair_run, verify_run
    from runfmt.run import load_manifest, revisions

    storage = state(ctx).store().locate(run)
    if not revisions(storage):
        load_manifest(storage)  # raises for a folder that holds no run, before it is locked
    with held_commit_lock(storage, REPAIR_LOCK_WAIT, storage.name):
        report = repair_run(storage, salvage=not drop, rollback=rollback)
    for action in report.actions:
        echo(action)
    for p in report.left:
        echo(f"not repaired: {_full_location(storage, p.location)}: {p.problem}")
    if not report.actions and not report.left:
        sys.stdout.write("nothing to repair\n")
    live = being_written_by(storage)
    problems = verify_run(storage, live=frozenset(live))
    label = storage.name
    if problems:
        _print_verdict(storage, problems, live)
        advice = "; ".join(dict.fromkeys(_by_hand(p.rule) for p in problems))
        copy_again = "if it is a copy taken while the run was written, copy it again"
        if report.rollback_to is not None:
            advice = (f"{copy_again}, or `runfmt repair --rollback` goes back to revision "
                      f"{report.rollback_to}; else {advice}")  # fmt: skip
        elif any(p.rule == "COMMIT-13" for p in report.left):
            advice = f"{copy_again}; else {advice}"
        fail(f"{label}: {_count(len(problems), 'problem')} left after repair ({advice})")
    echo(f"ok    {label}: consistent")


@app.command()
def schema(
    name: Annotated[
        str | None, typer.Argument(help="A schema name; lists the names when omitted.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Print a JSON Schema of the format (manifest, stage-header, ...)."""
    from runfmt.format.schemas import SCHEMA_NAMES, load_schema

    if name is None:
        listed = [{"name": n, "$id": load_schema(n).get("$id", "")} for n in SCHEMA_NAMES]
        if json_:
            print_json(listed)
        else:
            sys.stdout.write("".join(f"{e['name']}\t{e['$id']}\n" for e in listed))
        return
    if name not in SCHEMA_NAMES:
        fail(f"unknown schema {name!r}; known: {', '.join(SCHEMA_NAMES)}", 2)
    print_json(load_schema(name))


def run_summary(reader: "RunReader") -> dict[str, Any]:
    """The stable JSON view of a run that ``runfmt show --json`` prints."""
    from runfmt.format.manifest import to_json

    m = reader.manifest
    stages = [
        entry | {"records": s.records, "failures": s.failures, "bytes": s.bytes}
        for s, entry in zip(m.stages, to_json(m)["stages"], strict=True)
    ]
    artifacts = [
        {
            "name": a.path.removeprefix("artifacts/"),
            "path": a.path,
            "bytes": a.bytes,
            "media_type": a.media_type,
            "sha256": a.sha256,
            "parents": [dict(p) for p in a.parents],
        }
        for a in m.artifacts
    ]
    from runfmt.lifecycle import now, observed_health

    return {
        "run_id": m.run_id,
        "name": m.name,
        "location": reader.storage.where(),
        "status": m.status,
        "health": observed_health(reader.storage, m, now()),
        "completed_through_stage": m.completed_through_stage,
        "heartbeat_at": m.heartbeat_at,
        "forked_from": m.forked_from,
        "forked_at_stage": m.forked_at_stage,
        "error": m.error,
        "revision": m.revision,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
        "finished_at": m.finished_at,
        "config": m.config,
        "config_hash": m.config_hash,
        "tags": dict(m.tags),
        "counters": dict(m.counters),
        "stages": stages,
        "artifacts": artifacts,
        "totals": {
            "records": sum(s.records for s in m.stages),
            "failures": sum(s.failures for s in m.stages),
            "files": sum(len(s.files) for s in m.stages) + len(m.artifacts),
            "bytes": sum(s.bytes for s in m.stages) + sum(a.bytes for a in m.artifacts),
        },
        "writer": dict(m.writer),
    }


def _print_summary(s: Mapping[str, Any]) -> None:
    from runfmt.units import format_size

    fields = [
        ("run", s["run_id"]),
        ("name", s["name"]),
        ("location", s["location"]),
        ("status", _status_text(s)),
        ("forked", s["forked_from"] and f"from {s['forked_from']} at stage {s['forked_at_stage']}"),
        ("heartbeat", s["heartbeat_at"] if s["status"] == "running" else None),
        ("error", s["error"]),
        ("created", s["created_at"]),
        ("updated", f"{s['updated_at']} (revision {s['revision']})"),
        ("finished", s["finished_at"]),
        ("tags", " ".join(f"{k}={v}" for k, v in sorted(s["tags"].items()))),
        ("counters", " ".join(f"{k}={format_number(v)}" for k, v in sorted(s["counters"].items()))),
        ("config", s["config_hash"]),
    ]
    for label, value in fields:
        if value:
            echo(f"{label:<10}{value}")
    for key, value in _flatten(s["config"]):
        echo(f"  {key} = {value}")
    totals = s["totals"]
    sys.stdout.write(
        f"total     {totals['records']} records ({totals['failures']} failures), "
        f"{totals['files']} files, {format_size(totals['bytes'])}\n"
    )
    if s["stages"]:
        _titled_table(
            "stages",
            ["stage", "status", "records", "failures", "files", "size", "key field", "schema"],
            [
                [
                    st["name"],
                    st["status"],
                    str(st["records"]),
                    str(st["failures"]),
                    str(len(st["files"])),
                    format_size(st["bytes"]),
                    st["key_field"] or "-",
                    st["record_schema_version"],
                ]
                for st in s["stages"]
            ],
            right={2, 3, 4, 5},
        )
    if s["artifacts"]:
        _titled_table(
            "artifacts",
            ["artifact", "size", "media type", "sha256"],
            [
                [a["name"], format_size(a["bytes"]), a["media_type"], a["sha256"][:16]]
                for a in s["artifacts"]
            ],
            right={1},
        )


def _status_text(s: Mapping[str, Any]) -> str:
    text = str(s["health"])
    if s["health"] == "abandoned":
        text += (" (status running, but no heartbeat for over 5 minutes: its writer died; "
                 "resume it to continue, e.g. store.resume_run(run_id))")  # fmt: skip
    if s["completed_through_stage"]:
        text += f" (through stage {s['completed_through_stage']})"
    return text


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, str]]:
    import json

    if isinstance(value, Mapping) and value:
        for key in sorted(value):
            yield from _flatten(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, json.dumps(value, ensure_ascii=False)


def _titled_table(title: str, headers: list[str], rows: list[list[str]], right: set[int]) -> None:
    """A table: rich on a terminal, plain aligned columns in a pipe."""
    if sys.stdout.isatty():
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        grid = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            padding=(0, 1, 0, 0),
        )
        for i, header in enumerate(headers):
            grid.add_column(header, justify="right" if i in right else "left", no_wrap=True)
        for row in rows:
            grid.add_row(*(Text(printable(c)) for c in row))  # Text: no rich markup in names
        console = Console()
        console.print()
        console.print(grid)
        return
    sys.stdout.write(f"\n{title}\n")
    table(headers, rows, right)
