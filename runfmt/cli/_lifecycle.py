"""Commands on the life of runs: status (quick check), lineage, fork."""

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runfmt.cli import (
    JsonOpt,
    RunArg,
    app,
    at_most_max_count,
    checked_run_id,
    echo,
    fail,
    no_runs,
    print_json,
    state,
    store_index,
    usage_of,
)

if TYPE_CHECKING:
    from runfmt.errors import FormatError, StorageError
    from runfmt.lifecycle import RunSummary
    from runfmt.lineage import LineageNode
    from runfmt.run import RunReader
    from runfmt.store import Store

_HEALTH = ("running", "abandoned", "completed", "failed", "cancelled", "unreadable")


@app.command()
def status(
    ctx: typer.Context,
    json_: JsonOpt = False,
    health: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Only runs in this state (repeatable): " + ", ".join(_HEALTH) + ".",
        ),
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", help="Only runs whose config hash is this k1:...")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=0, callback=at_most_max_count, help="The newest N readable runs."
        ),
    ] = None,
) -> None:
    """One line per run, newest first: id, name, state (abandoned when a running run's
    writer is gone), progress per stage, age; then the runs that cannot be read. Exit 1 if
    one of those is shown."""
    from runfmt.errors import FormatError, StorageError
    from runfmt.lifecycle import RunSummary, now, observed_health, runs_with_config, summarize

    unknown = sorted(set(health or ()) - set(_HEALTH))
    if unknown:
        raise typer.BadParameter(
            f"must be one of {', '.join(_HEALTH)}, not {', '.join(unknown)}", param_hint="--status"
        )
    store = state(ctx).store(read_only=True)
    clock = now()
    if config:
        with usage_of("--config"):
            runs: list[tuple[str, RunReader | None]] = [
                (r.run_id, r) for r in runs_with_config(store, config)
            ]
        unreadable = None
    else:
        listed = store_index(ctx).runs()  # newest first, kept in step with the folders
        runs = [(r.run_id, None) for r in listed]  # read below, as far as they are shown
        unreadable = {r.run_id for r in listed if r.status == "unreadable"}
    summaries: list[RunSummary] = []
    broken: list[tuple[str, FormatError | StorageError]] = []
    for run_id, found in runs:
        full = limit is not None and len(summaries) >= limit
        if full and (unreadable is None or run_id not in unreadable):
            continue  # the run is read only to show it, or to show it cannot be read
        run = found if found is not None else _read(store, run_id)
        if isinstance(run, FormatError | StorageError):
            if not health or "unreadable" in health:
                broken.append((run_id, run))
        elif run is not None:
            summary = summarize(run.manifest, clock)
            if summary.health == "abandoned":  # unless its writer is seen alive otherwise
                seen = observed_health(run.storage, run.manifest, clock)
                summary = dataclasses.replace(summary, health=seen)
            if not health or summary.health in health:
                summaries.append(summary)
    # newest first by creation time, as `ls` (run ids need not sort by time: --run-id)
    summaries.sort(key=lambda s: s.run_id, reverse=True)
    summaries.sort(key=lambda s: s.age_seconds)
    summaries = summaries[:limit]
    if json_:
        print_json(
            [s.to_json() for s in summaries]
            + [RunSummary.unreadable_json(run_id, str(exc)) for run_id, exc in broken]
        )
    else:
        for s in summaries:
            echo(_status_line(s))
        for _, exc in broken:
            echo(f"{exc.location or '?'}  unreadable: {exc.problem}")
        if not summaries and not broken and limit != 0:
            echo(no_runs(ctx, store.url, filtered=bool(health or config)))
    if broken:
        fail(f"{len(broken)} run(s) cannot be read; `runfmt verify` lists every problem")


def _read(store: "Store", run_id: str) -> "RunReader | FormatError | StorageError | None":
    """The run's reader, or why it cannot be read (damage, or a folder this user may not
    read); None when it is gone."""
    from runfmt.errors import FormatError, RunNotFoundError, StorageError

    try:
        return store.open_run(run_id)
    except RunNotFoundError:
        return None
    except (FormatError, StorageError) as exc:
        return exc


def _status_line(s: "RunSummary") -> str:
    state_text = s.health + (
        f" through {s.completed_through_stage}" if s.completed_through_stage else ""
    )
    stages = (
        ", ".join(
            f"{st.name} {st.records}"
            + (f" ({st.failures} failed)" if st.failures else "")
            + ("" if st.status == "completed" else f" {st.status}")
            for st in s.stages
        )
        or "no stages"
    )
    when = f"{_ago(s.age_seconds)} old"
    if s.health in ("running", "abandoned"):
        when += f", seen {_ago(s.idle_seconds)} ago"
    return f"{s.run_id}  {s.name}  {state_text}  [{stages}]  {when}"


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@app.command()
def lineage(
    ctx: typer.Context,
    run: RunArg,
    stage: Annotated[str, typer.Argument(help="The stage of the record.")],
    key: Annotated[str, typer.Argument(help="The record's key (its stage's key field).")],
    json_: JsonOpt = False,
    max_depth: Annotated[
        int,
        typer.Option(
            "--max-depth",
            min=1,
            max=100,
            help="Stop following parents this deep (a cut there is noted, not a problem).",
        ),
    ] = 100,
) -> None:
    """Walk a record's lineage (its _parents, their parents, ...) and print the tree.

    Exit 1 if a parent is dangling, part of a cycle, or malformed; a tree cut at
    --max-depth is noted on stderr and exits 0."""
    from runfmt.lineage import MAX_DEPTH
    from runfmt.lineage import lineage as walk

    reader = state(ctx).store(read_only=True).open_run(run)
    root = walk(reader, stage, key, max_depth=max_depth)
    if json_:
        print_json(root.to_json())
    else:
        _print_tree(root, 0, max_depth)
    cut = [n for n in root.walk() if n.cut]
    problems = root.problems()
    if cut:
        branches = "1 branch" if len(cut) == 1 else f"{len(cut)} branches"
        further = "raise it to follow further"
        if max_depth >= MAX_DEPTH:  # as deep as a walk goes: start another from a cut node
            ref = cut[0].ref
            further = (
                f"walk on from a cut record: runfmt lineage RUN {ref.stage} {ref.key}"
                if ref.key is not None
                else "walk on from the cut artifact's parents"
            )
        sys.stderr.write(f"runfmt: note: {branches} cut at --max-depth {max_depth} ({further})\n")
    if problems:
        fail(f"{len(problems)} lineage problem(s): " + "; ".join(problems))


def _print_tree(node: "LineageNode", depth: int, max_depth: int) -> None:
    note = ""
    if node.cut:
        note = f"  ... (not followed: deeper than --max-depth {max_depth})"
    elif node.problem:
        note = f"  !! {node.problem}"
    elif node.repeated:
        note = "  (parents shown above)"
    elif node.artifact is not None:
        note = f"  ({node.artifact.media_type}, {node.artifact.bytes} bytes)"
    echo(f"{'  ' * depth}{node.ref}{note}")
    for parent in node.parents:
        _print_tree(parent, depth + 1, max_depth)


@app.command()
def fork(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="The run to fork: its id, or its folder's path.")],
    at_stage: Annotated[
        str, typer.Argument(help="The first stage to recompute; earlier stages are taken.")
    ],
    run_id: Annotated[str | None, typer.Option("--run-id", help="Id of the new run.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name of the new run.")] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="A JSON file with the new run's config (default: the same)."),
    ] = None,
    no_artifacts: Annotated[
        bool, typer.Option("--no-artifacts", help="Do not take the source's artifacts.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Create a run holding RUN's stages before AT_STAGE, ready to be resumed from there.

    The new run records forked_from and forked_at_stage; its files are hard links
    where the filesystem allows, copies otherwise.
    """
    config: dict[str, Any] | None = None
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text("utf-8"))
        except OSError as exc:
            fail(f"{config_file}: cannot read the config: {exc.strerror or exc}", 2)
        except ValueError as exc:
            fail(f"{config_file}: not a JSON config: {exc}", 2)
        if not isinstance(config, dict):
            fail(f"{config_file}: the config must be a JSON object", 2)
    store = state(ctx).store()
    writer = store.fork_run(
        run,
        at_stage,
        run_id=checked_run_id(run_id),
        name=name,
        config=config,
        artifacts=not no_artifacts,
        heartbeat_interval=None,
    )
    writer.close()
    m = writer.manifest
    taken = [s.name for s in m.stages]
    if json_:
        print_json({"run_id": m.run_id, "forked_from": m.forked_from,
                    "forked_at_stage": m.forked_at_stage, "stages_taken": taken})  # fmt: skip
    else:
        sys.stdout.write(
            f"forked {m.forked_from} at stage {at_stage} into {m.run_id} "
            f"(took: {', '.join(taken) or 'no stages'})\n"
        )
