"""The ``runfmt`` command line: parse, call the library, render (rich, or ``--json``).

Commands live in the ``_*.py`` modules of this package, grouped by area and
listed in `_AREAS`; each registers on `app`. Heavy imports happen inside commands so that
``runfmt --help`` starts fast. For the same reason these modules do not use
``from __future__ import annotations``: typer evaluates every string annotation of a
command several times as it builds it (35 ms of ``--help``); names imported only for type
checking are quoted instead. Exit codes: 0 ok, 1 a problem found or an operation failed,
2 bad usage.
"""

import codecs
import contextlib
import copy
import os
import signal
import sys
from collections.abc import Iterator, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.main import get_command_name

from runfmt.units import printable

if TYPE_CHECKING:
    from typer.models import CommandInfo

    from runfmt.errors import LockTimeoutError
    from runfmt.index import Index
    from runfmt.storage import Storage
    from runfmt.store import Store

__all__ = ["app", "main"]

RunArg = Annotated[str, typer.Argument(help="A run id in the store, or the path of a run folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

MAX_COUNT = 2**63 - 1
"""The largest count an option takes: SQLite's largest integer (``ls --limit``)."""


def at_most_max_count(value: int | None) -> int | None:
    """Callback of a count option (``--limit``, ``--keep-last``): a value SQLite or a range
    cannot hold is bad usage (exit 2), not a traceback."""
    if value is not None and value > MAX_COUNT:
        raise typer.BadParameter(f"{value} is too large: give at most {MAX_COUNT}")
    return value


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
    storage_option_args: list[str] = field(default_factory=list)
    """``--storage-option`` as given (``KEY=VALUE``), to show in a command to run next."""

    @property
    def url(self) -> str:
        """The store's location; a file or a run folder given as the store is bad usage
        (listing a run folder would find nothing and put an index inside the run). The
        default, when missing, may lie in a run folder: a run there is given by its path."""
        url = self.store_url or "./runs"
        check_location(url, "--store")
        local = url.removeprefix("file://")
        if "://" not in local and (self.store_url is not None or os.path.lexists(local)):
            from runfmt._local import run_folder_around

            if os.path.exists(local) and not os.path.isdir(local):
                raise typer.BadParameter(
                    f"{url} is a file, not a store folder", param_hint="--store"
                )
            run = run_folder_around(local)
            if run is not None:
                what = "a run folder" if run == os.path.abspath(local) else f"inside the run {run}"
                raise typer.BadParameter(
                    f"{url} is {what}, not a store: give the run as RUN "
                    f"(runfmt show {run}), or a folder of runs as --store",
                    param_hint="--store",
                )
        return url

    def store(self, *, read_only: bool = False) -> "Store":
        """The store; for a command that writes, one on an object store that is or lies in a
        run folder is bad usage too (local ones are refused by `url`)."""
        from runfmt.store import Store

        store = Store(
            self.url, self.storage_options, read_only=read_only, single_writer=self.single_writer
        )
        if not read_only and not store.storage.is_local:
            with usage_of("--store"):
                store._refuse_in_run()
        return store


def _parse_options(values: list[str]) -> dict[str, Any]:
    import json

    options: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                "expected KEY=VALUE (the value is not shown)",
                param_hint="'-o' / '--storage-option'",
            )
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
            "Never stored; a secret (a key named like key, secret, token or password) is "
            "never printed.",
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
    ctx.obj = State(
        store, _parse_options(storage_option or []), single_writer, list(storage_option or [])
    )


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State)
    return obj


def print_json(value: Any) -> None:
    """Write one JSON document to stdout. A list, or an iterator of items, is written as an
    array item by item (the same text), so that a listing of many runs is never held whole
    as text."""
    import json

    def dumps(item: Any) -> str:
        try:
            return json.dumps(item, indent=2, ensure_ascii=not _utf8(sys.stdout), default=str)
        except RecursionError:
            fail("a value nests too deep to print (REC-3, MAN-1): run `runfmt verify` on its run")

    if not isinstance(value, list | Iterator):
        sys.stdout.write(dumps(value) + "\n")
        return
    separator = "[\n  "
    for item in value:
        sys.stdout.write(separator + dumps(item).replace("\n", "\n  "))
        separator = ",\n  "
    sys.stdout.write("[]\n" if separator == "[\n  " else "\n]\n")


def store_index(ctx: typer.Context) -> "Index":
    """The index of the ``--store``, where `ls` keeps it (a local store's own folder)."""
    from runfmt.index import Index

    st = state(ctx)
    return Index.for_url(st.url, st.storage_options)


def no_runs(ctx: typer.Context, url: str, *, filtered: bool) -> str:
    """Why a listing of the store at ``url`` is empty: a missing folder or bucket (a
    mistyped ``--store``) before filters that ``match`` nothing."""
    missing = _missing(ctx, url)
    reason = f": no such {missing}" if missing else " match" if filtered else ""
    return f"no runs in {url}{reason}"


def require_store(ctx: typer.Context) -> None:
    """Fail (exit 1) when the store's folder or bucket does not exist: a command that checks
    or changes the store must not pass on a mistyped ``--store`` as on an empty store."""
    missing = store_missing(ctx)
    if missing:
        url = state(ctx).url
        shown = url if "://" in url else os.path.abspath(url)
        fail(f"{shown}: no such {missing} (check --store or RUNFMT_STORE)")


def store_missing(ctx: typer.Context) -> str | None:
    """``folder`` or ``bucket`` when the store does not exist, else None."""
    return _missing(ctx, state(ctx).url)


def _missing(ctx: typer.Context, url: str) -> str | None:
    """`Storage.missing` of the store (on local disk without building a `Storage`)."""
    if "://" not in url:
        return None if os.path.isdir(url) else "folder"
    from runfmt.storage import Storage

    return Storage(url, state(ctx).storage_options, read_only=True).missing()


def echo(text: str = "") -> None:
    """Write one line to stdout, made `printable`."""
    sys.stdout.write(printable(text) + "\n")


def table(headers: list[str], rows: list[list[str]], right: Set[int] = frozenset()) -> None:
    """Plain aligned columns on stdout, the columns in ``right`` right-aligned, the cells
    made `printable` (a wide character, as in CJK, takes two columns)."""
    lines = [headers, *([printable(c) for c in row] for row in rows)]
    widths = [max(map(_width, column)) for column in zip(*lines, strict=True)]

    def cell(i: int, text: str, width: int) -> str:
        pad = " " * (width - _width(text))
        return pad + text if i in right else text + pad

    out = []
    for line in lines:
        cells = (cell(i, c, w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        out.append("  ".join(cells).rstrip() + "\n")
    sys.stdout.write("".join(out))


def _width(text: str) -> int:
    """Terminal columns ``text`` takes: two for each wide (W) or full-width (F) character."""
    if text.isascii():
        return len(text)
    from unicodedata import east_asian_width

    return len(text) + sum(east_asian_width(c) in "WF" for c in text)


def check_location(location: str, option: str) -> None:
    """Bad usage of ``option`` when ``location`` is a URL `runfmt.storage.check_url`
    refuses; fsspec is imported only for a location that could be a URL."""
    if ":" in location:
        from runfmt.storage import check_url

        with usage_of(option):
            check_url(location)


def checked_run_id(run_id: str | None) -> str | None:
    """``run_id`` when it is one (LAYOUT-1); else bad usage of ``--run-id``."""
    if run_id is not None:
        from runfmt.format.names import validate_run_id

        with usage_of("--run-id"):
            validate_run_id(run_id)
    return run_id


@contextlib.contextmanager
def usage_of(option: str) -> Iterator[None]:
    """An `InvalidInputError` raised in the block is bad usage of ``option`` (exit 2)."""
    from runfmt.errors import InvalidInputError

    try:
        yield
    except InvalidInputError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


LOCK_NOTE_AFTER = 1.5
"""Seconds of waiting for a held commit lock before `held_commit_lock` says so."""
LOCK_HINT = (
    "a live process is writing this run: let it finish or stop it, then run the command "
    "again; `lsof {path}` names it"
)
"""What a CLI user can do about a `LockTimeoutError` (the library's hint names an API
parameter the CLI has no option for)."""
INDEX_LOCK_HINT = (
    "another runfmt command is updating the index: run the command again when it is done"
)


@contextlib.contextmanager
def held_commit_lock(run: "Storage", timeout: float, label: str) -> Iterator[None]:
    """Hold ``run``'s commit lock for the block; the library's own commits in this thread
    take it again at once. A wait longer than `LOCK_NOTE_AFTER` is said on stderr; a
    timeout raises `LockTimeoutError` with a hint a CLI user can act on."""
    from runfmt.errors import LockTimeoutError
    from runfmt.locking import commit_lock, live_writers

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(commit_lock(run, min(timeout, LOCK_NOTE_AFTER)))
        except LockTimeoutError as exc:
            if timeout <= LOCK_NOTE_AFTER:
                raise cli_lock_error(exc, timeout) from None
            writers = live_writers(run)
            by = f"live writer {', '.join(writers)}" if writers else "another process"
            sys.stderr.write(
                printable(f"runfmt: waiting for the commit lock of {label}, held by {by} ")
                + f"(up to {timeout:g} s)...\n"
            )
            sys.stderr.flush()
            try:
                held.enter_context(commit_lock(run, timeout - LOCK_NOTE_AFTER))
            except LockTimeoutError as again:
                raise cli_lock_error(again, timeout) from None
        yield


def cli_lock_error(exc: "LockTimeoutError", timeout: float | None = None) -> "LockTimeoutError":
    """``exc`` with a hint a CLI user can act on: `LOCK_HINT` for a commit lock (``timeout``:
    the whole wait, when given), `INDEX_LOCK_HINT` for the index's lock."""
    from runfmt.errors import LockTimeoutError

    if timeout is None and "commit lock" not in exc.problem:
        hint = INDEX_LOCK_HINT if "index" in exc.problem or ".sqlite" in exc.location else ""
        return LockTimeoutError(exc.problem, location=exc.location, hint=hint or exc.hint)
    problem = (
        exc.problem
        if timeout is None
        else f"another writer held the commit lock for over {timeout:g} s"
    )
    hint = LOCK_HINT.format(path=exc.location or "RUN/.lock")
    return LockTimeoutError(problem, location=exc.location, hint=hint)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error to stderr, made `printable`, and exit with ``code``."""
    sys.stderr.write(f"runfmt: error: {printable(message)}\n")
    raise typer.Exit(code)


_output_closed = False


def output_closed() -> bool:
    """Whether whoever read stdout has stopped reading (``runfmt cat ... | head -1``): a
    command printing a long output may stop early; it still ends with its own exit code."""
    return _output_closed


class _GuardedOutput:
    """stdout that discards what is written once its reader has gone, where click would
    make the BrokenPipeError a silent exit 1 whatever the command found."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        if not _output_closed:
            try:
                return int(self._stream.write(data))
            except BrokenPipeError:
                _discard_output(self._stream)
        return len(data)

    def flush(self) -> None:
        if not _output_closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                _discard_output(self._stream)

    @property
    def buffer(self) -> "_GuardedOutput":
        return _GuardedOutput(self._stream.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _utf8(stream: Any) -> bool:
    """Whether ``stream`` writes any text: its encoding is UTF-8 (else names and records
    are written with backslash escapes, JSON with ``\\u`` escapes)."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "utf-8").name == "utf-8"
    except LookupError:
        return False


def _discard_output(stream: Any) -> None:
    """Point ``stream``'s descriptor at the null device, so that what Python still holds
    in its buffers can be flushed at exit without another error."""
    global _output_closed
    _output_closed = True
    with contextlib.suppress(OSError, ValueError):  # a captured stream has no descriptor
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


def main() -> None:
    """Entry point: run the app; a `RunfmtError` or a failed file operation becomes a
    message and exit 1. A closed stdout discards the rest of the output: the command
    still exits with its own code (``runfmt verify | head -1`` exits 1 on a problem)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:  # closed (`>&-`): what goes there is lost, the exit code is not
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115
        elif not _utf8(stream) and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    stdout = sys.stdout
    sys.stdout = _GuardedOutput(stdout)
    try:
        _run()
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


_terminated = False


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (``timeout``, ``docker stop``, a CI job cancelled) stops a command as Ctrl-C
    does, held back as Ctrl-C is while a commit or a delete is recorded; exit 143."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _run() -> None:
    from runfmt.errors import RunfmtError

    try:
        code = _app_for(sys.argv[1:])(standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = _INTERRUPTED
    except RunfmtError as exc:
        from runfmt.errors import LockTimeoutError

        if isinstance(exc, LockTimeoutError):
            exc = cli_lock_error(exc)
        sys.stderr.write(f"runfmt: error: {printable(str(exc))}\n")
        sys.exit(1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"runfmt: error: {printable(f'{exc.strerror or exc}{where}')}\n")
        sys.exit(1)
    except Exception as exc:
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):  # click's, or typer's vendored click's
            _global_option_after_command(exc)
            show()
            sys.exit(exit_code)
        raise
    if code == _INTERRUPTED and _terminated:
        sys.stderr.write("runfmt: terminated\n")
        code = _TERMINATED
    elif code == _INTERRUPTED:  # typer turns Ctrl-C into this exit code, silently
        sys.stderr.write("runfmt: interrupted\n")
    sys.exit(code if isinstance(code, int) else 0)


_INTERRUPTED, _TERMINATED = 130, 143
"""The exit codes of a command stopped by Ctrl-C (128 + SIGINT) or SIGTERM (128 + 15)."""


_ROOT_VALUE_OPTIONS = frozenset({"--store", "-s", "--storage-option", "-o"})
_ROOT_OPTIONS = _ROOT_VALUE_OPTIONS | {"--single-writer"}


def _global_option_after_command(exc: Exception) -> None:
    """Make click's "No such option: --store" for a global option given after the command
    (``runfmt ls --store runs``) say where it goes; its value is not repeated (it may
    hold a secret)."""
    option, ctx = getattr(exc, "option_name", None), getattr(exc, "ctx", None)
    if option not in _ROOT_OPTIONS or ctx is None or ctx.parent is None:
        return
    words = []
    while ctx.parent is not None:
        words.append(ctx.info_name)
        ctx = ctx.parent
    command = " ".join(reversed(words))
    exc.message = (  # type: ignore[attr-defined]
        f"{option} is a global option: give it before the command (runfmt {option} ... {command})"
    )
    exc.possibilities = None  # type: ignore[attr-defined]


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
