"""Commands over several runs: diff, compare, report, gc, export, import.

RUN is a run id in the store or the path of a run folder. Heavy modules are
imported inside the commands.
"""

import errno
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runfmt.cli import (
    JsonOpt,
    RunArg,
    app,
    at_most_max_count,
    checked_run_id,
    cli_lock_error,
    echo,
    fail,
    held_commit_lock,
    no_runs,
    print_json,
    require_store,
    state,
    store_index,
    table,
    usage_of,
)
from runfmt.units import format_number, printable

if TYPE_CHECKING:
    from datetime import timedelta

    from runfmt.compare import Comparison, RunDiff
    from runfmt.gc import GcPlan
    from runfmt.run import RunReader
    from runfmt.store import Store

_FORMATS = ("json", "md", "csv", "latex", "html")


def _show(value: Any) -> str:
    """A config or tag value as JSON, so that ``1`` and ``"1"`` look different."""
    return json.dumps(value, ensure_ascii=False)


def _counters(a: float | None, b: float | None) -> list[str]:
    """Two runs' values of a counter, in their shortest exact form when 15 digits show
    two different values alike."""
    shown = ["" if v is None else format_number(v) for v in (a, b)]
    return [repr(a), repr(b)] if a != b and shown[0] == shown[1] else shown


@app.command()
def diff(ctx: typer.Context, run_a: RunArg, run_b: RunArg, json_: JsonOpt = False) -> None:
    """Show how two runs differ: config (nested paths), tags, status, counters, stages."""
    from runfmt.compare import diff_runs

    store = state(ctx).store(read_only=True)
    result = diff_runs(store.open_run(run_a), store.open_run(run_b))
    if json_:
        print_json(result.to_json())
    else:
        _print_diff(result)


def _print_diff(d: "RunDiff") -> None:
    from runfmt.units import format_size

    echo(f"A  {d.run_a}  {d.name[0]}  {d.status[0]}")
    echo(f"B  {d.run_b}  {d.name[1]}  {d.status[1]}")
    for title, changes in (("config", d.config), ("tags", d.tags)):
        if not changes:
            echo()
            echo(f"{title}: same")
            continue
        echo()
        echo(f"{title}: {len(changes)} difference{'s' * (len(changes) != 1)}")
        for c in changes:
            if c.kind == "added":
                echo(f"  + {c.path} = {_show(c.b)}  (only in B)")
            elif c.kind == "removed":
                echo(f"  - {c.path} = {_show(c.a)}  (only in A)")
            else:
                echo(f"  ~ {c.path}: {_show(c.a)} -> {_show(c.b)}")
    if d.counters:
        echo()
        echo("counters:")
        rows = [[k, *_counters(a, b)] for k, (a, b) in d.counters.items()]
        table(["  counter", "A", "B"], [["  " + r[0], *r[1:]] for r in rows], {1, 2})
    if d.stages:
        echo()
        echo("stages:")
        rows = [
            [
                "  " + s.name,
                s.status_a or "-",
                s.status_b or "-",
                str(s.records_a),
                str(s.records_b),
                str(s.failures_a),
                str(s.failures_b),
                format_size(s.bytes_a),
                format_size(s.bytes_b),
            ]
            for s in d.stages
        ]
        headers = [
            "  stage",
            "status A",
            "status B",
            "records A",
            "records B",
            "failed A",
            "failed B",
            "size A",
            "size B",
        ]
        table(headers, rows, {3, 4, 5, 6, 7, 8})


@app.command()
def compare(
    ctx: typer.Context,
    run_a: RunArg,
    run_b: RunArg,
    stage: Annotated[str, typer.Option("--stage", help="The stage whose records to pair.")],
    field: Annotated[
        str,
        typer.Option("--field", help="The numeric or boolean field to compare (a.b for nested)."),
    ],
    key: Annotated[
        str | None, typer.Option("--key", help="Pair on this field instead of the stage's key.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    resamples: Annotated[
        int, typer.Option("--resamples", min=1, max=1_000_000, help="Bootstrap resamples.")
    ] = 10_000,
    confidence: Annotated[
        float, typer.Option("--confidence", min=0.5, max=0.999, help="Confidence level.")
    ] = 0.95,
    json_: JsonOpt = False,
) -> None:
    """Pair the records of a stage by key and compare a field: means, B - A with a bootstrap CI."""
    from runfmt.compare import compare_runs

    if math.isnan(confidence):
        raise typer.BadParameter(
            "must be a number between 0.5 and 0.999", param_hint="--confidence"
        )
    store = state(ctx).store(read_only=True)
    result = compare_runs(
        store.open_run(run_a),
        store.open_run(run_b),
        stage,
        field,
        key=key,
        seed=seed,
        resamples=resamples,
        confidence=confidence,
    )
    if json_:
        print_json(result.to_json())
    else:
        _print_comparison(result)


def _print_comparison(c: "Comparison") -> None:
    def keys(found: list[str]) -> str:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        return f"{len(found)}" + (f" ({shown})" if found else "")

    echo(f"{c.stage}.{c.field} paired by {c.key_field}: n = {c.n}")
    echo(f"  A  {c.run_a}  mean {c.mean_a:.4f}")
    echo(f"  B  {c.run_b}  mean {c.mean_b:.4f}")
    echo(
        f"  B - A  {c.mean_diff:+.4f}  {c.confidence:.0%} CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}]"
        f"  (percentile bootstrap, {c.resamples} resamples, seed {c.seed})"
    )
    echo(f"  B > A: {c.wins}   B < A: {c.losses}   ties: {c.ties}")
    echo(f"  keys only in A: {keys(c.only_a)}   only in B: {keys(c.only_b)}")
    echo(f"  failure records left out: A {c.failures_a}, B {c.failures_b}")


def _runs(
    ctx: typer.Context, store: "Store", runs: list[str], name: str | None, limit: int | None
) -> "list[RunReader]":
    """The given runs, else the store's newest readable runs (``name`` a glob), oldest first."""
    if runs:
        return [store.open_run(r) for r in runs]
    chosen: list[str] = []
    index = store_index(ctx)
    for summary in index.runs(name=name):
        if summary.problem is not None:
            sys.stderr.write(
                f"runfmt: warning: skipped unreadable run {summary.run_id}: {summary.problem}\n"
            )
        elif limit is None or len(chosen) < limit:
            chosen.append(summary.run_id)
    if not chosen:
        message = no_runs(ctx, index.url, filtered=name is not None)
        sys.stderr.write(f"runfmt: warning: {message}\n")
    return [store.open_run(run_id) for run_id in reversed(chosen)]


@app.command()
def report(
    ctx: typer.Context,
    runs: Annotated[
        list[str] | None, typer.Argument(help="Runs to report (ids or folders); default: all.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="json, md, csv, latex or html.")
    ] = "md",
    stage: Annotated[
        str | None, typer.Option("--stage", help="The stage whose records give the metrics.")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help="A field of --stage to average (repeatable)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Only runs whose name matches a glob (no RUN).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            callback=at_most_max_count,
            help="Only the newest N runs (without RUN).",
        ),
    ] = None,
    digits: Annotated[
        int,
        typer.Option(
            "--digits", min=0, max=12, help="Decimals shown (significant digits under 1)."
        ),
    ] = 3,
    title: Annotated[str, typer.Option("--title", help="Title of the HTML page.")] = (
        "runfmt report"
    ),
    output: Annotated[
        str | None, typer.Option("--output", "-O", help="Write to this file, not stdout.")
    ] = None,
) -> None:
    """Tables of runs: status, stage counts, counters and metric means, for issues and papers."""
    if fmt not in _FORMATS:
        fail(f"unknown format {fmt!r}; choose one of {', '.join(_FORMATS)}", 2)
    if metric and stage is None:
        fail("--metric needs --stage", 2)
    if runs and (name is not None or limit is not None):
        fail("--name and --limit select runs from the store: give them or RUN, not both", 2)
    from runfmt.report import build_report, render

    store = state(ctx).store(read_only=True)
    result = build_report(_runs(ctx, store, runs or [], name, limit), stage, metric or [])
    if fmt == "json" and output is None:  # as every --json: \u escapes where not UTF-8
        print_json(result.to_json())
        return
    text = render(result, fmt, digits=digits, title=title)  # type: ignore[arg-type]
    if output is None:
        sys.stdout.write(text)
        return
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    sys.stderr.write(f"wrote {fmt} report of {len(result.rows)} runs to {output}\n")


@app.command()
def gc(
    ctx: typer.Context,
    keep_last: Annotated[
        int | None,
        typer.Option(
            "--keep-last",
            min=0,
            callback=at_most_max_count,
            help="Keep the newest N runs of each name.",
        ),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="Delete runs not updated for this long: 30d, 12h."),
    ] = None,
    only_completed: Annotated[
        bool, typer.Option("--only-completed", help="Delete only completed runs.")
    ] = False,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size",
            help="Delete the oldest runs while the store is over this size: 10GB, 512MiB "
            "(a unit is required; 100B for bytes).",
        ),
    ] = None,
    active_within: Annotated[
        str,
        typer.Option(
            "--active-within",
            help="A running run updated this recently counts as being written: never deleted.",
        ),
    ] = "24h",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete; without it, only print.")] = (
        False
    ),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print what would be deleted (the default).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Retention: print the runs a policy would delete; delete them with --yes."""
    if yes and dry_run:
        fail("--yes and --dry-run contradict each other", 2)
    if keep_last is None and older_than is None and max_size is None:
        fail("give a policy: --keep-last N, --older-than AGE or --max-size SIZE", 2)
    from runfmt.gc import plan_gc
    from runfmt.units import parse_duration, parse_size

    with usage_of("--active-within"):
        active = parse_duration(active_within)
    with usage_of("--older-than"):
        older = None if older_than is None else parse_duration(older_than)
    with usage_of("--max-size"):
        cap = None if max_size is None else parse_size(max_size, unit_required=True)
    require_store(ctx)
    store = state(ctx).store(read_only=not yes)
    plan = plan_gc(
        store,
        keep_last=keep_last,
        older_than=older,
        only_completed=only_completed,
        max_size=cap,
        active_within=active,
    )
    deleted: list[str] = []
    skipped: list[dict[str, str]] = []
    if yes:
        deleted, skipped = _delete(store, plan, active)
    if json_:
        print_json({**plan.to_json(), "deleted": deleted, "skipped": skipped})
    else:
        _print_plan(plan, yes, deleted, skipped)
    if skipped:
        raise typer.Exit(1)


GC_LOCK_WAIT = 5.0
"""Seconds gc waits for the commit lock of a run it deletes (as `delete_planned`)."""


def _delete(
    store: "Store", plan: "GcPlan", active: "timedelta"
) -> tuple[list[str], list[dict[str, str]]]:
    """`delete_planned`, one run at a time under its commit lock, taken here so that a wait
    for another writer is said (the library takes the held lock again at once); a run
    whose lock stays held is skipped with a reason a CLI user can act on."""
    import dataclasses

    from runfmt.errors import LockTimeoutError, RunfmtError
    from runfmt.format.names import validate_run_id
    from runfmt.gc import delete_planned

    deleted: list[str] = []
    skipped: list[dict[str, str]] = []
    for entry in plan.delete:
        run = store.storage.child(validate_run_id(entry.run_id))
        try:
            with held_commit_lock(run, GC_LOCK_WAIT, entry.run_id):
                done, refused = delete_planned(
                    store, dataclasses.replace(plan, delete=[entry]), active_within=active
                )
        except RunfmtError as exc:
            reason = cli_lock_error(exc) if isinstance(exc, LockTimeoutError) else exc
            skipped.append({"run_id": entry.run_id, "reason": str(reason)})
            continue
        deleted += done
        skipped += refused
    return deleted, skipped


def _print_plan(
    plan: "GcPlan", applied: bool, deleted: list[str], skipped: list[dict[str, str]]
) -> None:
    from runfmt.units import format_size

    verb = "deleting" if applied else "would delete"
    if plan.delete:
        echo(f"{verb} {len(plan.delete)} run(s), {format_size(sum(e.bytes for e in plan.delete))}:")
        rows = [
            ["  " + e.run_id, e.name, e.status, format_size(e.bytes), e.reason] for e in plan.delete
        ]
        table(["  run", "name", "status", "size", "why"], rows, {3})
    else:
        echo("nothing to delete")
    if plan.leftovers:
        size = format_size(sum(x["bytes"] for x in plan.leftovers))
        echo(f"{len(plan.leftovers)} folder(s), {size}, that a delete cut short left: no run; "
             "delete them by hand once nothing is copying into them:")  # fmt: skip
        for x in plan.leftovers:
            echo(f"  {x['run_id']}")
    echo(f"keeping {len(plan.keep)} run(s)")
    for e in plan.protected:
        echo(f"  never deleting {e.run_id} ({e.name}): {e.reason}")
    for u in plan.unreadable:
        echo(f"  leaving unreadable {u['run_id']} alone: {u['error']}")
    if plan.over_cap:
        echo(f"still {format_size(plan.over_cap)} over --max-size: the rest may not be deleted")
    if applied:
        echo(f"deleted {len(deleted)} run(s)")
        for s in skipped:
            sys.stderr.write(printable(f"runfmt: skipped {s['run_id']}: {s['reason']}") + "\n")
    elif plan.delete:
        echo("run again with --yes to delete")


@app.command("export")
def export(
    ctx: typer.Context,
    run: RunArg,
    output: Annotated[
        str, typer.Argument(help="FILE.tar for the run; FILE.jsonl.zst or FILE.jsonl with --stage.")
    ],
    stage: Annotated[
        str | None, typer.Option("--stage", help="Export only this stage, to one file.")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Replace FILE if it exists.")
    ] = False,
) -> None:
    """Export a run to one tar archive, or one stage to one .jsonl.zst / .jsonl file."""
    from runfmt.transfer import export_run, export_stage

    if stage is None and not output.endswith(".tar"):
        fail("a run exports to FILE.tar; pass --stage to export one stage", 2)
    if stage is not None and not output.endswith((".jsonl.zst", ".jsonl")):
        fail("a stage exports to FILE.jsonl.zst (with its header) or FILE.jsonl", 2)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.exists(folder):
        fail(
            f"{output}: cannot write: No such file or directory (its folder {folder} "
            "does not exist)"
        )
    if os.path.lexists(output) and not force:
        fail(f"{output} exists; pass --force to replace it")
    reader = state(ctx).store(read_only=True).open_run(run)
    try:
        if stage is None:
            manifest = export_run(reader, output)
            sys.stderr.write(
                f"exported run {manifest.run_id} (revision {manifest.revision}) to {output}\n"
            )
        else:
            count = export_stage(reader, stage, output)
            sys.stderr.write(f"exported {count} records of {reader.run_id}/{stage} to {output}\n")
    except OSError as exc:  # the run is read through storage: its errors are RunfmtErrors
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        fail(f"{output}: cannot write: {exc.strerror or exc} (in {folder})"
             + ("; free space there, then export again" if full else ""))  # fmt: skip


IMPORT_LOCK_WAIT = 30.0
"""Seconds `import --into` waits for the run's commit lock (a writer's lock_timeout)."""


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(help="A run archive (.tar, .tar.gz, .tgz) or a stage file.")
    ],
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Archive: import under this run id.")
    ] = None,
    into: Annotated[
        str | None, typer.Option("--into", help="Stage file: append to this existing run.")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Stage file: name of the new run (no --into).")
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="Stage file: the stage (must match the file's header)."),
    ] = None,
    key_field: Annotated[
        str | None, typer.Option("--key-field", help="Plain .jsonl: the stage's key field.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Import a run archive into the store, or a stage file into a run, checking checksums."""
    from runfmt.transfer import import_run, import_stage

    checked_run_id(run_id)
    is_archive = file.endswith((".tar", ".tar.gz", ".tgz"))
    if not os.path.exists(file):
        fail(f"{file}: no such file")
    takes = (
        "import takes a run archive (FILE.tar, FILE.tar.gz, FILE.tgz) or a stage file "
        "(FILE.jsonl.zst, FILE.jsonl)"
    )
    if os.path.isdir(file):
        fail(
            f"{file} is a folder: {takes}; to copy a run folder into the store use "
            "`runfmt sync FOLDER STORE`",
            2,
        )
    if not is_archive and not file.endswith((".jsonl.zst", ".jsonl")):
        fail(f"{file}: unknown stage file type: {takes}")
    if is_archive and (into or name or stage or key_field):
        fail("--into, --name, --stage and --key-field are for stage files, not archives", 2)
    if not is_archive and run_id:
        fail("--run-id is for run archives (.tar)", 2)
    if into and name:
        fail("--into appends to an existing run; --name names a new one: give one", 2)
    if file.endswith(".jsonl") and stage is None:
        fail(f"{file}: plain JSON Lines name no stage: give --stage", 2)
    store = state(ctx).store()
    if into is not None:
        target = store.locate(into)
        with held_commit_lock(target, IMPORT_LOCK_WAIT, into):
            pass  # wait here, saying so, for a writer holding the run's lock
    if is_archive:
        result = import_run(store, file, run_id=run_id)
    else:
        result = import_stage(store, file, run=into, name=name, stage=stage, key_field=key_field)
    if json_:
        print_json(result.to_json())
    else:
        counts = ", ".join(f"{k}: {v}" for k, v in result.stages.items()) or "no stages"
        sys.stdout.write(f"imported into run {result.run_id} ({counts})\n")
