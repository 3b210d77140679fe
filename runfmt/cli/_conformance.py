"""``runfmt dump``: the reader contract of the conformance suite (spec §13)."""

import sys

import typer

from runfmt.cli import RunArg, app, fail, print_json, state


@app.command()
def dump(
    ctx: typer.Context,
    run: RunArg,
) -> None:
    """Verify a run and print its normalized JSON view; exit 1 with the problems if invalid."""
    from runfmt.conformance import check_run

    storage = state(ctx).store(read_only=True).locate(run)
    view, problems = check_run(storage)
    if view is None:
        for problem in problems:
            sys.stderr.write(f"{problem}\n")
        fail(f"{len(problems)} problem(s) in {storage.where()}")
    print_json(view)
