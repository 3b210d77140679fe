"""``runfmt sync SRC DST``: copy new and changed runs between any two locations."""

import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from runfmt.cli import _parse_options, app, check_location, print_json, state

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from runfmt.sync import SyncReport


class _Bar:
    """A rich progress bar in bytes, with files done out of files planned."""

    def __init__(self, progress: "Progress") -> None:
        self._progress = progress
        self._files = 0
        self._done = 0
        self._task: TaskID = progress.add_task("sync", total=0, files="0/0")

    def planned(self, files: int, nbytes: int) -> None:
        self._files += files
        task = self._progress.tasks[0]
        self._progress.update(
            self._task, total=(task.total or 0) + nbytes, files=f"{self._done}/{self._files}"
        )

    def advanced(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)

    def file_done(self) -> None:
        self._done += 1
        self._progress.update(self._task, files=f"{self._done}/{self._files}")


def _side(location: str, ctx: typer.Context) -> str:
    """The id of a run in the ``--store`` means that run; anything else is a path or URL."""
    from runfmt.format import names

    if "://" in location or os.path.exists(location) or not names.is_run_id(location):
        return location
    run = state(ctx).store(read_only=True).storage.child(location)
    return run.where() if run.exists(names.MANIFESTS_DIR) else location


def _summary(report: "SyncReport") -> str:
    verb = "would copy" if report.dry_run else "copied"
    parts = [
        f"{verb} {report.count('new')} new and {report.count('update')} changed runs "
        f"({report.files} files, {report.bytes:,} bytes)",
        f"{report.count('same')} unchanged",
    ]
    if report.count("delete"):
        parts.append(f"{report.count('delete')} {'to delete' if report.dry_run else 'deleted'}")
    if report.count("conflict"):
        parts.append(f"{report.count('conflict')} refused")
    if report.count("error"):
        parts.append(f"{report.count('error')} failed")
    return ", ".join(parts)


@app.command()
def sync(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="A store, a run folder (path or URL), or a run id.")],
    dst: Annotated[str, typer.Argument(help="The destination store (or run folder).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be copied.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check every synced run's checksums at DST.")
    ] = False,
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete runs at DST that SRC does not have.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Overwrite DST runs that changed independently, and copy again the files "
            "of unchanged DST runs that are missing or damaged.",
        ),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Files in flight.")] = 16,
    src_option: Annotated[
        list[str] | None,
        typer.Option("--src-option", help="KEY=VALUE for SRC only (replaces -o there)."),
    ] = None,
    dst_option: Annotated[
        list[str] | None,
        typer.Option("--dst-option", help="KEY=VALUE for DST only (replaces -o there)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary only.")] = False,
) -> None:
    """Copy new and changed runs from SRC to DST: data first, manifest last (SYNC-1..7).

    Runs unchanged at DST cost one small read each. A DST run that changed on
    its own is refused unless --force. Exit 1 if a run was refused or failed,
    or --verify found a problem.
    """
    from runfmt.sync import sync as run_sync

    shared = state(ctx)
    src_opts = _parse_options(src_option) if src_option else shared.storage_options
    dst_opts = _parse_options(dst_option) if dst_option else shared.storage_options
    kwargs: dict[str, Any] = {
        "src_options": src_opts,
        "dst_options": dst_opts,
        "dry_run": dry_run,
        "verify": verify,
        "delete": delete,
        "force": force,
        "workers": workers,
        "single_writer": shared.single_writer,
    }
    source, target = _side(src, ctx), _side(dst, ctx)
    check_location(source, "SRC")
    check_location(target, "DST")
    if json_out or not sys.stderr.isatty():
        report = run_sync(source, target, **kwargs)
    else:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[files]} files"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            report = run_sync(source, target, progress=_Bar(progress), **kwargs)
    if json_out:
        print_json(report.to_json())
    else:
        for run in report.runs:
            if run.action in ("conflict", "error"):
                sys.stderr.write(f"runfmt: {run.action}: {run.run_id}: {run.message}\n")
            for problem in run.problems:
                sys.stderr.write(f"runfmt: verify: {run.run_id}: {problem}\n")
        sys.stdout.write(_summary(report) + "\n")
    if not report.ok:
        raise typer.Exit(1)
