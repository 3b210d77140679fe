"""Commands served by the store index: ``ls``, ``index rebuild``, ``cache get``.

A local store's index is opened without importing the storage layer, so that
``runfmt ls`` stays fast on thousands of runs.
"""

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from runfmt.cli import (
    JsonOpt,
    app,
    at_most_max_count,
    echo,
    fail,
    no_runs,
    print_json,
    require_store,
    store_index,
    table,
    usage_of,
)
from runfmt.units import printable

if TYPE_CHECKING:
    from runfmt.index import RunSummary

index_app = typer.Typer(
    help="Manage the store's index (derived data, rebuilt from the run folders).",
    no_args_is_help=True,
)
cache_app = typer.Typer(
    help="Look up committed records by key across every run of the store.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")
app.add_typer(cache_app, name="cache")


def _tags(values: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--tag")
        if tags.get(key, value) != value:
            raise typer.BadParameter(
                f"tag {key!r} asked with two values; a run has one", param_hint="--tag"
            )
        tags[key] = value
    return tags


@app.command("ls")
def ls(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Only runs with this status: running, completed, failed, cancelled or "
            "unreadable (repeatable).",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Only runs whose name matches this glob.")
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="Only runs with tag KEY=VALUE (repeatable; all must match)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only runs created since a date (2026-11-01), an ISO time, or an age (7d, 12h).",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", min=0, callback=at_most_max_count, help="Show at most this many runs."
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """List the store's runs, newest first, from the index (kept in step with the folders)."""
    from runfmt.units import parse_since

    if since is not None:
        with usage_of("--since"):
            parse_since(since)
    index = store_index(ctx)
    with usage_of("--status"):
        runs = index.runs(
            status=status or None, name=name, tags=_tags(tag or []), since=since, limit=limit
        )
    if json_:
        print_json(r.to_json() for r in runs)
    elif runs:
        _print_runs(runs)
    elif limit != 0:
        echo(no_runs(ctx, index.url, filtered=bool(status or name or tag or since)))


def _print_runs(runs: "list[RunSummary]") -> None:
    header = ["RUN ID", "NAME", "STATUS", "CREATED", "STAGES", "RECORDS"]
    rows = [
        [
            r.run_id,
            r.name,
            r.status,
            (r.created_at or "")[:19].replace("T", " "),
            str(len(r.stages)),
            str(r.records),
        ]
        for r in runs
    ]
    table(header, rows, {4, 5})
    for r in runs:
        if r.problem:
            sys.stderr.write(printable(f"runfmt: {r.run_id}: {r.problem}") + "\n")


@index_app.command("rebuild")
def rebuild(ctx: typer.Context, json_: JsonOpt = False) -> None:
    """Read every run folder again and replace what the index holds of each."""
    require_store(ctx)
    index = store_index(ctx)
    stats = index.rebuild()
    if json_:
        print_json({"index": index.path, "runs": stats.runs, "cache_entries": stats.cache_entries,
                    "seconds": round(stats.seconds, 3)})  # fmt: skip
        return
    sys.stdout.write(
        f"indexed {stats.runs} runs and {stats.cache_entries} cache entries in "
        f"{stats.seconds:.2f} s ({index.path})\n"
    )


@cache_app.command("get")
def cache_get(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(help="The stage whose records to search.")],
    key: Annotated[str, typer.Argument(help="The record key (e.g. a k1:... cache key).")],
    record_schema_version: Annotated[
        str | None,
        typer.Option(
            "--record-schema-version",
            help="Only records of this record schema version (default: any version).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Print the newest committed record with KEY in STAGE, from any run, with its provenance."""
    from runfmt.cache import Cache

    require_store(ctx)
    cache = Cache(store_index(ctx))
    hit = cache.get(stage, key, record_schema_version=record_schema_version)
    if hit is None:
        stages = cache.stages()
        other = None
        if record_schema_version is not None:
            other = cache.get(stage, key, record_schema_version=None)
        if other is not None:
            known = (
                f" of record schema version {record_schema_version!r}; one of version "
                f"{other.provenance.record_schema_version!r} exists (drop --record-schema-version)"
            )
        elif stage not in stages:
            known = (
                f"; no run the index could read has a keyed stage {stage!r} (keyed stages: "
                f"{', '.join(map(repr, stages)) or 'none'}; `runfmt status` shows unreadable "
                "runs)"
            )
        else:
            known = " (a failure record, or one whose key field is not that key, is no hit)"
        fail(f"no committed record with key {key!r} in stage {stage!r}{known}")
    if json_:
        print_json(hit.to_json())
        return
    p = hit.provenance
    sys.stdout.write(
        f"run     {p.run_id}\nstage   {p.stage} (record schema version "
        f"{p.record_schema_version})\nfile    {p.path} (frame at byte {p.frame_start}, "
        f"line {p.line + 1})\n"
    )
    print_json(hit.record)
