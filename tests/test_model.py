"""Model-based test: random sequences of writes, flushes, crashes, repairs, resumes and
finishes, driven through the public Python API and checked after every step against an
in-memory model of what each run must hold (COMMIT-5, COMMIT-6, COMMIT-8, COMMIT-11,
REC-3 to REC-7, KEY-5, LIFE-2, LIFE-5, CHECK-3), on local disk and on ``memory://``.

A crash is simulated by making the creation of the next manifest revision (COMMIT-2)
raise after a flush wrote its stage bytes, then dropping the writer with ``discard``:
what a writer killed at that moment leaves. On local disk a run may have two live
writers at once. ``RUNFMT_MODEL_EXAMPLES`` and ``RUNFMT_MODEL_STEPS`` search harder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import fsspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import runfmt.check
import runfmt.run
from runfmt.check import repair_run, verify_run
from runfmt.errors import ConflictError, InvalidInputError, StorageError
from runfmt.format.manifest import RunStatus
from runfmt.run import RunWriter, StageWriter
from runfmt.storage import Storage
from runfmt.store import Store

Record = dict[str, Any]
Spec = tuple[Any, Any, Any]
FileId = tuple[str, int]
Counters = dict[str, float]
Part = tuple[FileId, list[Record], Counters]
"""A flush's frames in one file: their records, and the counter deltas of the counter
frame before the last of them (FRAME-6), if any."""

KEY_FIELDS: dict[str, str | None] = {"gen": "key", "judge": "key", "log": None}
STAGES = tuple(KEY_FIELDS)
KEYS = ("a", "b", "c")
ABSENT = "<absent>"
WRITER_OPTIONS: dict[str, Any] = {"flush_interval": None, "heartbeat_interval": None}
EXAMPLES = int(os.environ.get("RUNFMT_MODEL_EXAMPLES", "20"))
STEPS = int(os.environ.get("RUNFMT_MODEL_STEPS", "35"))

PAYLOADS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63) + 1, 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3),
)
RECORDS = st.tuples(
    st.sampled_from([*KEYS, None, ABSENT]),
    st.sampled_from([ABSENT, None, "boom", {"message": "judge timed out"}]),
    PAYLOADS,
)
FLUSH_EVERY = st.sampled_from([None, 1, 2, 3, 5])
PICK = st.integers(0, 7)


def nested(depth: int) -> list[Any]:
    """A list nested ``depth`` levels deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


BAD_RECORDS: tuple[Any, ...] = (
    [1],
    "text",
    None,
    {"x": math.nan},
    {"x": -math.inf},
    {3: "int member name"},
    {"x": dt.datetime(2026, 1, 1)},
    {"x": uuid.UUID(int=1)},
    {"x": "\ud800"},
    {"x": nested(300)},
)
BAD_KEYS: tuple[Any, ...] = (42, "", "k" * 1025, ["a"])


class SimulatedCrash(Exception):
    """The process died here."""


@contextlib.contextmanager
def failing(target: object, name: str, exc: BaseException) -> Iterator[None]:
    """Make ``target.name`` raise ``exc`` while the block runs."""
    original = getattr(target, name)

    def fail(*args: object, **kwargs: object) -> NoReturn:
        raise exc

    setattr(target, name, fail)
    try:
        yield
    finally:
        setattr(target, name, original)


def is_failure(record: Record) -> bool:
    """REC-5: ``_error`` present and not null."""
    return record.get("_error") is not None


def parse_time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@dataclass
class FileModel:
    """A listed stage file: its writer and number, and the records of its listed prefix."""

    fid: FileId
    records: list[Record]


@dataclass
class StageModel:
    """A committed stage; its records are its files' in manifest order (REC-7)."""

    key_field: str | None
    status: str = "running"
    files: list[FileModel] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        return [r for f in self.files for r in f.records]

    def add(self, fid: FileId, records: list[Record]) -> None:
        """List more records of a file: a longer prefix of a listed one, or a new one."""
        for f in self.files:
            if f.fid == fid:
                f.records += records
                return
        self.files.append(FileModel(fid, list(records)))


@dataclass
class WriterModel:
    """What a live `RunWriter` holds that is not committed yet."""

    handle: RunWriter
    flush_every: int | None
    local: bool
    pending: int = 0
    taken: dict[str, None] = field(default_factory=dict)
    """The stages the writer took up, in the order it first used them."""
    declared: list[str] = field(default_factory=list)
    buffered: dict[str, list[Record]] = field(default_factory=dict)
    written: dict[str, list[Part]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    unframed: Counters = field(default_factory=dict)
    """Deltas of ``counters`` that no counter frame holds yet."""
    tags: dict[str, str] = field(default_factory=dict)
    stage_status: dict[str, str] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)

    def has_changes(self) -> bool:
        return any(
            (self.declared, self.counters, self.tags, self.stage_status, self.written)
        ) or any(self.buffered.values())

    def write(self) -> dict[str, list[Part]]:
        """The parts a flush has written when it commits: the unlisted ones of earlier
        failed flushes, then the buffered records of each stage, appended to the
        writer's file (local disk) or as a new object (object store); the last stage
        written, in the order the writer took them up, carries the unframed deltas."""
        parts = {name: list(p) for name, p in self.written.items()}
        fresh = [name for name in self.taken if self.buffered.get(name)]
        for name in fresh:
            if not self.local or name not in self.seq:
                self.seq[name] = self.seq.get(name, 0) + 1
            fid = (self.handle.writer_id, self.seq[name])
            deltas = self.unframed if name == fresh[-1] else {}
            parts.setdefault(name, []).append((fid, list(self.buffered[name]), deltas))
        if fresh:
            self.unframed = {}
        self.buffered = {}
        return parts


@dataclass
class RunModel:
    """What the newest revision of a run must say, and the debris dead writers left."""

    run_id: str
    created_at: str
    tags: dict[str, str]
    status: str = "running"
    error: str | None = None
    through: str | None = None
    stages: dict[str, StageModel] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    writers: list[WriterModel] = field(default_factory=list)
    debris: dict[str, list[Part]] = field(default_factory=dict)
    """Whole frames that dead writers wrote and no revision lists."""
    dirty: bool = False
    """Whether dead writers left uncommitted bytes (whole frames or torn ones)."""
    sums: bool = False

    @property
    def finished(self) -> bool:
        return self.status != "running"


class RunfmtModel(RuleBasedStateMachine):
    """Up to three runs in one store; on local disk up to two live writers per run."""

    memory: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        if self.memory:
            self.url = f"memory://runfmt-model-{uuid.uuid4().hex}"
            self.store = Store(self.url)
        else:
            self.url = tempfile.mkdtemp(prefix="runfmt-model-")
            self.store = Store(Path(self.url) / "runs")
        self.runs: list[RunModel] = []
        self.released: list[RunWriter] = []
        self.n = 0

    def teardown(self) -> None:
        for run in self.runs:
            for w in run.writers:
                w.handle.discard()
        if self.memory:
            fs = fsspec.filesystem("memory")
            if fs.exists(self.url):
                fs.rm(self.url, recursive=True)
        else:
            shutil.rmtree(self.url, ignore_errors=True)

    # selection

    def writing(self) -> list[tuple[RunModel, WriterModel]]:
        return [(r, w) for r in self.runs for w in r.writers]

    def pick_writer(self, pick: int) -> tuple[RunModel, WriterModel]:
        pairs = self.writing()
        return pairs[pick % len(pairs)]

    def resumable(self) -> list[RunModel]:
        """Runs a writer may open: on an object store, repair (which resume runs) must
        only run when no writer of the run is alive (STORE-3)."""
        limit = 1 if self.memory else 2
        return [r for r in self.runs if len(r.writers) < limit]

    def repairable(self) -> list[RunModel]:
        return [r for r in self.runs if not (self.memory and r.writers)]

    def storage(self, run: RunModel) -> Storage:
        return self.store.locate(run.run_id)

    def record(self, stage: str, spec: Spec) -> Record:
        key, error, payload = spec
        self.n += 1
        record: Record = {"n": self.n, "stage": stage, "p": payload}
        if key != ABSENT:
            record["key"] = key
        if error != ABSENT:
            record["_error"] = error
        return record

    # model updates

    @staticmethod
    def take(w: WriterModel, stage: str) -> None:
        if stage not in w.taken:
            w.taken[stage] = None
            w.declared.append(stage)

    def stage_writer(self, w: WriterModel, stage: str) -> StageWriter:
        """The stage's writer, declared with its key field (run.append would declare none)."""
        writer = w.handle.stage(stage, key_field=KEY_FIELDS[stage])
        self.take(w, stage)
        return writer

    def appended(self, run: RunModel, w: WriterModel, stage: str, records: list[Record]) -> bool:
        """Buffer records one by one, flushing every ``flush_every``; False when a flush
        was refused (the writer is gone then)."""
        for record in records:
            self.take(w, stage)
            w.buffered.setdefault(stage, []).append(record)
            w.pending += 1
            if (
                w.flush_every is not None
                and w.pending >= w.flush_every
                and not self.flushed(run, w)
            ):
                return False
        return True

    def flushed(self, run: RunModel, w: WriterModel, *, heartbeat: bool = False) -> bool:
        """A flush: nothing to commit, a commit, or (COMMIT-11) a refusal because another
        writer finished the run, which drops what the writer wrote and releases it."""
        w.pending = 0
        if not (heartbeat or w.has_changes()):
            return True
        if run.finished:
            self.gone(run, w)
            return False
        self.committed(run, w)
        return True

    @staticmethod
    def committed(run: RunModel, w: WriterModel) -> None:
        """A successful commit of everything the writer holds (COMMIT-5)."""
        w.pending = 0
        for name in w.declared:
            run.stages.setdefault(name, StageModel(KEY_FIELDS[name]))
        for name, parts in w.write().items():
            for fid, records, _ in parts:
                run.stages[name].add(fid, records)
        w.written = {}
        for name, status in w.stage_status.items():
            run.stages[name].status = status
        for name, delta in w.counters.items():
            run.counters[name] = run.counters.get(name, 0) + delta
        run.tags.update(w.tags)
        w.declared, w.counters, w.unframed, w.tags, w.stage_status = [], {}, {}, {}, {}

    def gone(self, run: RunModel, w: WriterModel) -> None:
        run.writers.remove(w)
        self.released.append(w.handle)

    def died(
        self, run: RunModel, w: WriterModel, parts: dict[str, list[Part]], *, dirty: bool
    ) -> None:
        """The writer is gone; ``parts`` are its unlisted whole frames, ``dirty`` whether
        it left any uncommitted bytes at all."""
        w.handle.discard()
        run.dirty = run.dirty or dirty
        for name, p in parts.items():
            run.debris.setdefault(name, []).extend(p)
        self.gone(run, w)

    def salvaged(self, run: RunModel, salvage: bool) -> int:
        """COMMIT-8: dead writers' whole frames are listed (salvage), with the deltas of
        their counter frames unless a writer may be alive where no lock tells (a running
        run on memory://, STORE-3), or cut (drop); a listed file grows in place, new files
        follow by writer id, then number."""
        count = 0
        add_deltas = not self.memory or run.finished
        if salvage:
            for name in sorted(run.debris):
                by_file: dict[FileId, list[Record]] = {}
                for fid, records, deltas in run.debris[name]:
                    by_file.setdefault(fid, []).extend(records)
                    for counter, delta in deltas.items() if add_deltas else ():
                        run.counters[counter] = run.counters.get(counter, 0) + delta
                by_file = {fid: records for fid, records in by_file.items() if records}
                if not by_file:
                    continue
                stage = run.stages.setdefault(name, StageModel(KEY_FIELDS[name]))
                listed = {f.fid for f in stage.files}
                for fid in [f.fid for f in stage.files] + sorted(set(by_file) - listed):
                    if fid in by_file:
                        stage.add(fid, by_file[fid])
                        count += len(by_file[fid])
        run.debris.clear()
        run.dirty = False
        return count

    def expect(self, exc: type[BaseException] | None, call: Callable[[], object]) -> None:
        if exc is None:
            call()
        else:
            with pytest.raises(exc):
                call()

    # rules

    @initialize(flush_every=FLUSH_EVERY, team=st.sampled_from(["a", "b"]))
    def first(self, flush_every: int | None, team: str) -> None:
        self.create(flush_every, team)

    @precondition(lambda self: len(self.runs) < 3)
    @rule(flush_every=FLUSH_EVERY, team=st.sampled_from(["a", "b"]))
    def create(self, flush_every: int | None, team: str) -> None:
        handle = self.store.create_run(
            "model", {"i": len(self.runs)}, tags={"team": team}, flush_every=flush_every,
            **WRITER_OPTIONS,
        )  # fmt: skip
        run = RunModel(handle.run_id, handle.manifest.created_at, {"team": team})
        run.writers.append(WriterModel(handle, flush_every, not self.memory))
        self.runs.append(run)

    @precondition(lambda self: self.resumable())
    @rule(pick=PICK, flush_every=FLUSH_EVERY, crash_first=st.booleans())
    def resume(self, pick: int, flush_every: int | None, crash_first: bool) -> None:
        """COMMIT-11: repair, then reopen a finished run; other live writers go on. With
        ``crash_first`` an earlier attempt died at its first commit."""
        run = self.resumable()[pick % len(self.resumable())]
        if crash_first:
            self.crash_while_resuming(run)
            self.check_run(run)
        self.reopen(run, flush_every)

    @precondition(lambda self: not self.memory and any(len(r.writers) == 1 for r in self.runs))
    @rule(pick=PICK, flush_every=FLUSH_EVERY)
    def second_writer(self, pick: int, flush_every: int | None) -> None:
        """Another writer opens a run that has one: both commit (COMMIT-6)."""
        runs = [r for r in self.runs if len(r.writers) == 1]
        self.reopen(runs[pick % len(runs)], flush_every)

    def reopen(self, run: RunModel, flush_every: int | None) -> None:
        handle = self.store.resume_run(run.run_id, flush_every=flush_every, **WRITER_OPTIONS)
        self.salvaged(run, salvage=True)
        if run.finished:
            run.status, run.error = "running", None
        run.sums = False
        run.writers.append(WriterModel(handle, flush_every, not self.memory))

    def crash_while_resuming(self, run: RunModel) -> None:
        """The process dies at the first commit of ``resume_run``: the salvage commit of its
        repair, when there is debris, else the one reopening the run, after ``SHA256SUMS``
        was deleted (section 9.3, rows 10 and 11). Nothing committed changes."""
        with failing(runfmt.run, "create_revision", SimulatedCrash()):
            self.expect(SimulatedCrash, lambda: self.store.resume_run(run.run_id, **WRITER_OPTIONS))
        gc.collect()
        if not any(records for parts in run.debris.values() for _, records, _ in parts):
            run.debris.clear()
            run.dirty = False
            run.sums = False

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, stage=st.sampled_from(STAGES), spec=RECORDS, short=st.booleans())
    def append(self, pick: int, stage: str, spec: Spec, short: bool) -> None:
        run, w = self.pick_writer(pick)
        record = self.record(stage, spec)
        if short and (stage in w.taken or KEY_FIELDS[stage] is None):
            target: Callable[[Record], None] = functools.partial(w.handle.append, stage)
        else:
            target = self.stage_writer(w, stage).append
        ok = self.appended(run, w, stage, [record])
        self.expect(None if ok else ConflictError, lambda: target(record))

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, stage=st.sampled_from(STAGES), specs=st.lists(RECORDS, max_size=7))
    def extend(self, pick: int, stage: str, specs: list[Spec]) -> None:
        run, w = self.pick_writer(pick)
        self.extended(run, w, stage, specs)

    def extended(self, run: RunModel, w: WriterModel, stage: str, specs: list[Spec]) -> bool:
        records = [self.record(stage, spec) for spec in specs]
        writer = self.stage_writer(w, stage)
        ok = self.appended(run, w, stage, records)
        self.expect(None if ok else ConflictError, lambda: writer.extend(records))
        return ok

    @precondition(lambda self: self.writing())
    @rule(
        pick=PICK,
        stage=st.sampled_from(STAGES),
        bad=st.sampled_from(BAD_RECORDS + BAD_KEYS),
        before=st.lists(RECORDS, max_size=3),
        how=st.sampled_from(["append", "extend"]),
    )
    def invalid_record(self, pick: int, stage: str, bad: Any, before: list[Spec], how: str) -> None:
        """REC-3, REC-6: refused with InvalidInputError, changing nothing; ``extend``
        appends the records before it."""
        run, w = self.pick_writer(pick)
        if bad in BAD_KEYS:
            if KEY_FIELDS[stage] is None:
                return
            bad = {"key": bad}
        good = [self.record(stage, spec) for spec in before] if how == "extend" else []
        if KEY_FIELDS[stage] is None:
            target: Any = w.handle
            args: tuple[Any, ...] = (stage,)
        else:
            target, args = self.stage_writer(w, stage), ()
        ok = self.appended(run, w, stage, good)
        if how == "append":
            self.expect(InvalidInputError, lambda: target.append(*args, bad))
        else:
            self.expect(
                InvalidInputError if ok else ConflictError,
                lambda: target.extend(*args, [*good, bad]),
            )

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, heartbeat=st.booleans())
    def flush(self, pick: int, heartbeat: bool) -> None:
        """``flush``, or ``heartbeat``, which commits what is buffered too."""
        run, w = self.pick_writer(pick)
        ok = self.flushed(run, w, heartbeat=heartbeat)
        self.expect(
            None if ok else ConflictError, w.handle.heartbeat if heartbeat else w.handle.flush
        )

    @precondition(lambda self: self.writing())
    @rule(
        pick=PICK,
        name=st.sampled_from(["tokens", "cost"]),
        delta=st.integers(-5, 1000) | st.sampled_from([0.5, 0.25, 1.5]),
    )
    def count(self, pick: int, name: str, delta: float) -> None:
        _, w = self.pick_writer(pick)
        w.handle.count(name, delta)
        w.counters[name] = w.counters.get(name, 0) + delta
        w.unframed[name] = w.unframed.get(name, 0) + delta

    @precondition(lambda self: self.writing())
    @rule(
        pick=PICK,
        name=st.sampled_from(["team", "phase"]),
        value=st.text("abcxyz -", max_size=5),
    )
    def tag(self, pick: int, name: str, value: str) -> None:
        _, w = self.pick_writer(pick)
        w.handle.tag(**{name: value})
        w.tags[name] = value

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, how=st.sampled_from(["nan", "inf", "bool", "text", "tag name", "tag long"]))
    def invalid_counter_or_tag(self, pick: int, how: str) -> None:
        _, w = self.pick_writer(pick)
        calls: dict[str, Callable[[], object]] = {
            "nan": lambda: w.handle.count("tokens", math.nan),
            "inf": lambda: w.handle.count("tokens", math.inf),
            "bool": lambda: w.handle.count("tokens", True),
            "text": lambda: w.handle.count("tokens", "3"),  # type: ignore[arg-type]
            "tag name": lambda: w.handle.tag(**{"bad name": "x"}),
            "tag long": lambda: w.handle.tag(team="x" * 1025),
        }
        self.expect(InvalidInputError, calls[how])

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, stage=st.sampled_from(STAGES), status=st.sampled_from([None, "c", "f"]))
    def mark_stage(self, pick: int, stage: str, status: str | None) -> None:
        """Declare a stage, and maybe mark it completed or failed (LIFE-5)."""
        _, w = self.pick_writer(pick)
        writer = self.stage_writer(w, stage)
        if status == "c":
            writer.complete()
            w.stage_status[stage] = "completed"
        elif status == "f":
            writer.fail()
            w.stage_status[stage] = "failed"

    @precondition(lambda self: self.writing())
    @rule(pick=PICK)
    def close(self, pick: int) -> None:
        run, w = self.pick_writer(pick)
        ok = self.flushed(run, w)
        self.expect(None if ok else ConflictError, w.handle.close)
        if ok:
            self.gone(run, w)

    @precondition(lambda self: self.writing())
    @rule(
        pick=PICK,
        status=st.sampled_from(["completed", "failed", "cancelled"]),
        error=st.none() | st.text("ab: ", max_size=6),
        through=st.none() | st.sampled_from(STAGES),
        sums_crash=st.booleans(),
    )
    def finish(
        self,
        pick: int,
        status: RunStatus,
        error: str | None,
        through: str | None,
        sums_crash: bool,
    ) -> None:
        """Finish (again, when another writer finished the run: COMMIT-11); with
        ``sums_crash`` the process dies after the final commit, before ``SHA256SUMS``,
        leaving a finished run without one (section 9.3, row 9), never a stale one."""
        run, w = self.pick_writer(pick)
        if status != "completed":
            through = None
        else:
            error = None
        if through is not None and through not in w.taken and through not in run.stages:
            self.expect(InvalidInputError, lambda: w.handle.finish(through_stage=through))
            return
        final = functools.partial(w.handle.finish, status, error, through_stage=through)
        if sums_crash:
            with (
                failing(runfmt.run, "write_sums", SimulatedCrash()),
                failing(runfmt.check, "write_sums", SimulatedCrash()),
            ):
                self.expect(SimulatedCrash, final)
            w.handle.discard()
        else:
            final()
        if status == "completed":
            order = list(run.stages) + [n for n in w.declared if n not in run.stages]
            if through is not None:
                w.stage_status[through] = "completed"
                order = order[: order.index(through) + 1]
            for name in order:
                current = run.stages[name].status if name in run.stages else "running"
                if name in w.taken and name not in w.stage_status and current == "running":
                    w.stage_status[name] = "completed"
        self.committed(run, w)
        self.finished_salvaging(run)
        if status == "completed":
            run.through = through
        run.status, run.error, run.sums = status, error, not sums_crash
        self.gone(run, w)

    def finished_salvaging(self, run: RunModel) -> None:
        """COMMIT-11: on local disk, finishing salvages what dead writers left."""
        if not self.memory:
            self.salvaged(run, salvage=True)

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, interrupt=st.booleans(), message=st.sampled_from(["", "judge crashed"]))
    def with_block_raises(self, pick: int, interrupt: bool, message: str) -> None:
        """An exception escaping the ``with`` block fails the run with it as its error; a
        KeyboardInterrupt cancels it."""
        run, w = self.pick_writer(pick)
        exc: BaseException = KeyboardInterrupt(message) if interrupt else RuntimeError(message)
        with pytest.raises(type(exc)), w.handle:
            raise exc
        name = type(exc).__name__
        self.committed(run, w)
        self.finished_salvaging(run)
        run.status = "cancelled" if interrupt else "failed"
        run.error = f"{name}: {message}" if message else name
        run.sums = True
        self.gone(run, w)

    @precondition(lambda self: self.writing())
    @rule(pick=PICK)
    def discard(self, pick: int) -> None:
        """The writer goes away: buffered records are lost, written frames are debris."""
        run, w = self.pick_writer(pick)
        self.died(run, w, w.written, dirty=bool(w.written))

    @precondition(lambda self: self.writing())
    @rule(pick=PICK, stage=st.sampled_from(STAGES), specs=st.lists(RECORDS, max_size=4))
    def commit_fails(self, pick: int, stage: str, specs: list[Spec]) -> None:
        """After appending ``specs``, creating the revision fails (disk full): the flush
        raises, its frames are written but unlisted, and a later flush lists them."""
        run, w = self.pick_writer(pick)
        if not self.extended(run, w, stage, specs):
            return
        if not w.has_changes() or run.finished:
            ok = self.flushed(run, w)
            self.expect(None if ok else ConflictError, w.handle.flush)
            return
        w.pending = 0
        with failing(runfmt.run, "create_revision", StorageError("no space left on device")):
            self.expect(StorageError, w.handle.flush)
        w.written = w.write()

    @precondition(lambda self: self.writing())
    @rule(
        pick=PICK,
        stage=st.sampled_from(STAGES),
        specs=st.lists(RECORDS, max_size=4),
        during=st.sampled_from(["flush", "finish"]),
        tear=st.sets(st.sampled_from(STAGES)),
        cut=st.integers(0, 2**20),
    )
    def crash(
        self, pick: int, stage: str, specs: list[Spec], during: str, tear: set[str], cut: int
    ) -> None:
        """After appending ``specs``, the writer dies once a flush wrote its frames, before
        the revision exists; the frames of the stages in ``tear`` are cut short (local)
        or never stored (object store)."""
        run, w = self.pick_writer(pick)
        if not self.extended(run, w, stage, specs):
            return
        if during == "flush" and (not w.has_changes() or run.finished):
            ok = self.flushed(run, w)
            self.expect(None if ok else ConflictError, w.handle.flush)
            return
        storage = self.storage(run)
        before = storage.walk("stages")
        with failing(runfmt.run, "create_revision", SimulatedCrash()):
            self.expect(SimulatedCrash, w.handle.flush if during == "flush" else w.handle.finish)
        if during == "finish" and run.finished:
            run.sums = False  # finishing again deleted the other finish's (COMMIT-11, state 9)
        after = storage.walk("stages")
        fresh = {name for name, records in w.buffered.items() if records}
        parts = w.write()
        dirty = bool(parts)
        for name in sorted(tear & fresh):
            [path] = [
                p for p, size in after.items()
                if p.startswith(f"{name}/") and before.get(p) != size
            ]  # fmt: skip
            if storage.is_local:
                start = before.get(path, 0)
                storage.truncate(f"stages/{path}", start + 1 + cut % (after[path] - start - 1))
            else:
                storage.delete(f"stages/{path}")
            parts[name].pop()
        if not storage.is_local:
            dirty = any(records for p in parts.values() for _, records, _ in p)
        self.died(run, w, parts, dirty=dirty)

    @precondition(lambda self: self.repairable())
    @rule(pick=PICK, salvage=st.booleans())
    def repair(self, pick: int, salvage: bool) -> None:
        """COMMIT-8; a live writer's files are left alone."""
        run = self.repairable()[pick % len(self.repairable())]
        storage = self.storage(run)
        if self.memory and not salvage and run.status == "running":
            self.expect(ConflictError, lambda: repair_run(storage, salvage=False))
            return  # without locks, any writer of a run heard from lately may be alive
        report = repair_run(storage, salvage=salvage)
        assert report.left == []
        assert report.salvaged_records == self.salvaged(run, salvage)
        run.sums = run.finished

    # invariants

    @invariant()
    def released_writers_refuse(self) -> None:
        """A released writer raises instead of taking what it would never commit."""
        for handle in self.released:
            self.refuses(handle)
        self.released.clear()

    def refuses(self, handle: RunWriter) -> None:
        calls: list[Callable[[], object]] = [
            lambda: handle.append("gen", {"n": 0}),
            lambda: handle.extend("log", [{"n": 0}]),
            handle.flush,
            lambda: handle.stage("judge"),
            lambda: handle.count("tokens", 1),
            lambda: handle.tag(team="z"),
            handle.finish,
        ]
        self.expect(InvalidInputError, calls[self.n % len(calls)])

    @invariant()
    def runs_read_back_as_modelled(self) -> None:
        for run in self.runs:
            self.check_run(run)

    def check_run(self, run: RunModel) -> None:
        reader = self.store.open_run(run.run_id)
        m = reader.manifest
        where = f"run {run.run_id}"
        assert (m.status, m.error, m.completed_through_stage) == (
            run.status, run.error, run.through,
        ), where  # fmt: skip
        assert (m.finished_at is None) == (not run.finished), where
        assert dict(m.counters) == run.counters, where
        assert dict(m.tags) == run.tags, where
        expected = [
            (name, s.status, s.key_field, len(s.records), sum(map(is_failure, s.records)))
            for name, s in run.stages.items()
        ]
        assert [
            (s.name, s.status, s.key_field, s.records, s.failures) for s in m.stages
        ] == expected, where
        for name, stage in run.stages.items():
            assert list(reader.records(name)) == stage.records, f"{where}, stage {name}"
            batches = reader.record_batches(name)
            assert [r for batch in batches for r in batch] == stage.records, where
            if stage.key_field is not None:
                keys = {
                    r["key"]
                    for r in stage.records
                    if isinstance(r.get("key"), str) and not is_failure(r)
                }
                assert reader.keys(name) == keys, f"{where}, stage {name}"
        problems = verify_run(reader.storage)
        unlisted = any(w.written for w in run.writers)
        if not reader.storage.is_local and run.status == "running":
            assert problems == [], (where, problems)  # every writer may be alive (LIFE-4)
        elif run.dirty or (unlisted and not reader.storage.is_local):
            assert problems, where
            assert all(p.repairable for p in problems), (where, problems)
        else:
            assert problems == [], (where, problems)
        assert reader.storage.exists("SHA256SUMS") == run.sums, where

    @invariant()
    def index_lists_runs_as_modelled(self) -> None:
        listed = {s.run_id: s for s in self.store.index.runs()}
        assert sorted(listed) == sorted(r.run_id for r in self.runs)
        for run in self.runs:
            s = listed[run.run_id]
            one = self.store.index.run(run.run_id)
            assert one is not None
            assert one.to_json() == s.to_json(), run.run_id
            assert (s.status, s.error) == (run.status, run.error), run.run_id
            assert dict(s.counters) == run.counters, run.run_id
            assert dict(s.tags) == run.tags, run.run_id
            assert [(x.name, x.status, x.records, x.failures) for x in s.stages] == [
                (name, m.status, len(m.records), sum(map(is_failure, m.records)))
                for name, m in run.stages.items()
            ], run.run_id

    @invariant()
    def cache_returns_the_newest_committed_success(self) -> None:
        """KEY-5 and the index's ranking: newest run, then last record; never a failure."""
        self.store.cache.refresh()
        ranked = sorted(self.runs, key=lambda r: (parse_time(r.created_at), r.run_id))
        for stage in ("gen", "judge"):
            expected: dict[str, tuple[str, Record]] = {}
            for key in KEYS:
                for run in ranked:
                    model = run.stages.get(stage)
                    hits = [
                        r for r in (model.records if model else [])
                        if r.get("key") == key and not is_failure(r)
                    ]  # fmt: skip
                    if hits:
                        expected[key] = (run.run_id, hits[-1])
                hit = self.store.cache.get(stage, key)
                found = None if hit is None else (hit.provenance.run_id, hit.record)
                assert found == expected.get(key), (stage, key)
            many = self.store.cache.get_many(stage, KEYS)
            assert {k: (h.provenance.run_id, h.record) for k, h in many.items()} == expected
            assert self.store.cache.contains(stage, KEYS) == set(expected), stage


class MemoryModel(RunfmtModel):
    """The same model on ``memory://``: a new object per flush, no locks, no append."""

    memory = True


MODEL_SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None)
TestLocalModel = RunfmtModel.TestCase
TestLocalModel.settings = MODEL_SETTINGS
TestMemoryModel = MemoryModel.TestCase
TestMemoryModel.settings = MODEL_SETTINGS
