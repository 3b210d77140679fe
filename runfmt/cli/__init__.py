"""The ``runfmt`` command line: parse, call the library, render (rich, or ``--json``).

Commands live in the ``_*.py`` modules of this package, grouped by area and
listed in `_AREAS`; each registers on `app`. Heavy imports happen inside commands so that
``runfmt --help`` starts fast. For the same reason these modules do not use
``from __future__ import annotations``: typer evaluates every string annotation of a
command several times as it builds it (35 ms of ``--help``); names imported only for type
checking are quoted instead. Exit codes: 0 ok, 1 a problem found or an operation failed,
2 bad usage.
"""

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.main import get_command_name

if TYPE_CHECKING:
    from typer.models import CommandInfo

    from runfmt.store import Store

__all__ = ["app", "main"]

app = typer.Typer(
    name="runfmt",
    help="Write, read, verify and manage runs stored in the runfmt format.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class State:
    """Options given before the command, shared by every command."""

    store_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    single_writer: bool = False

    def store(self, *, read_only: bool = False) -> "Store":
        from runfmt.store import Store

        return Store(
            self.store_url, self.storage_options, read_only=read_only,
            single_writer=self.single_writer,
        )  # fmt: skip


def _parse_options(values: list[str]) -> dict[str, Any]:
    import json

    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter("expected KEY=VALUE (the value is not shown)")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _print_version(value: bool) -> None:
    if value:
        from runfmt._version import __version__

        sys.stdout.write(f"runfmt {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            envvar="RUNFMT_STORE",
            help="Store location: a folder or fsspec URL (s3://bucket/prefix). Default ./runs.",
            show_envvar=True,
        ),
    ] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            "-o",
            help="KEY=VALUE passed to fsspec (repeatable; VALUE parsed as JSON when it can be). "
            "Never stored or printed.",
        ),
    ] = None,
    single_writer: Annotated[
        bool,
        typer.Option(
            "--single-writer",
            help="Allow writing to a backend without create-only writes; only one process "
            "may write at a time.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version."
        ),
    ] = False,
) -> None:
    """Write, read, verify and manage runs stored in the runfmt format."""
    if (
        store is not None
        and "://" not in store
        and os.path.isdir(os.path.join(store, "_manifests"))
    ):
        raise typer.BadParameter(
            f"{store} is a run folder, not a store: give it as RUN (runfmt show {store}), "
            "or its parent folder as --store",
            param_hint="--store",
        )
    ctx.obj = State(store, _parse_options(storage_option or []), single_writer)


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def print_json(value: Any) -> None:
    """Write one JSON document to stdout."""
    import json

    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\n``, ``\\x1b``): a
    run's name, tags or error, shown on a terminal, can neither fake lines nor send it
    escape sequences."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@contextlib.contextmanager
def usage_of(option: str) -> Iterator[None]:
    """An `InvalidInputError` raised in the block is bad usage of ``option`` (exit 2)."""
    from runfmt.errors import InvalidInputError

    try:
        yield
    except InvalidInputError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error to stderr and exit with ``code``."""
    sys.stderr.write(f"runfmt: error: {message}\n")
    raise typer.Exit(code)


class _OutputClosed(Exception):
    """Whoever read stdout has stopped reading (``runfmt ls | head -1``)."""


class _GuardedOutput:
    """stdout whose writes raise `_OutputClosed` once its reader has gone, where click
    would make the BrokenPipeError a silent exit 1."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        try:
            written: int = self._stream.write(data)
        except BrokenPipeError:
            raise _OutputClosed from None
        return written

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise _OutputClosed from None

    @property
    def buffer(self) -> "_GuardedOutput":
        return _GuardedOutput(self._stream.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main() -> None:
    """Entry point: run the app; a `RunfmtError` or a failed file operation becomes a
    message and exit 1; a closed stdout ends the output quietly with exit 0, as after
    the last line the reader wanted."""
    stdout = sys.stdout
    sys.stdout = _GuardedOutput(stdout)
    try:
        _run()
    finally:
        sys.stdout = stdout


def _run() -> None:
    from runfmt.errors import RunfmtError

    try:
        code = _app_for(sys.argv[1:])(standalone_mode=False)
    except _OutputClosed:
        with contextlib.suppress(OSError, ValueError):  # a captured stream has no descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("runfmt: aborted\n")
        sys.exit(130)
    except RunfmtError as exc:
        sys.stderr.write(f"runfmt: error: {exc}\n")
        sys.exit(1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"runfmt: error: {exc.strerror or exc}{where}\n")
        sys.exit(1)
    except Exception as exc:
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):  # click's, or typer's vendored click's
            show()
            sys.exit(exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


_ROOT_VALUE_OPTIONS = frozenset({"--store", "-s", "--storage-option", "-o"})


def _command_name(info: "CommandInfo") -> str:
    """The name typer gives a command (as `typer.main.get_command` does)."""
    return info.name or get_command_name(getattr(info.callback, "__name__", ""))


def _app_for(args: list[str]) -> typer.Typer:
    """`app` with only the command ``args`` invoke, when they name one: building every
    command's parameters costs more than the rest of a short command's start-up."""
    words = iter(args)
    for word in words:
        if word in _ROOT_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            break
    else:
        return app
    commands = [c for c in app.registered_commands if _command_name(c) == word]
    groups = [g for g in app.registered_groups if g.name == word]
    if not commands and not groups:
        return app
    only = copy.copy(app)
    only.registered_commands, only.registered_groups = commands, groups
    return only


_AREAS = ("_runs", "_index", "_lifecycle", "_manage", "_sync", "_conformance")
"""Command modules, in the order ``runfmt --help`` lists their commands."""


def _load_commands() -> None:
    import importlib

    for area in _AREAS:
        importlib.import_module(f"{__name__}.{area}")


_load_commands()
