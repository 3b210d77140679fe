"""verify and repair: every problem in a run, and the way back to a consistent state."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import orjson

from runfmt._local import NotAFileError
from runfmt.errors import (
    ConflictError,
    FormatError,
    InvalidInputError,
    ManifestError,
    RunfmtError,
    RunNotFoundError,
    StageFileError,
    StorageError,
    UnsupportedFormatError,
)
from runfmt.format import names
from runfmt.format.checksum import parse_sums
from runfmt.format.frames import MAX_HEADER_SIZE, PREFIX, CounterFrame, DataFrame, FrameDecoder
from runfmt.format.manifest import (
    ArtifactEntry,
    ChangeSet,
    FileEntry,
    Manifest,
    StageEntry,
    apply_changes,
    check_counter,
    decode_manifest,
    encode_manifest,
    same_instant,
)
from runfmt.format.media import guess_media_type
from runfmt.format.records import decode_lines, first_too_deep, is_failure, is_key
from runfmt.format.validate import (
    FileCheck,
    Problem,
    check_listing,
    cited_rule,
    folder_name_problem,
    header_problem,
    is_repairable,
)
from runfmt.lifecycle import ABANDON_AFTER, may_be_alive, now
from runfmt.locking import commit_lock, live_writers, writer_alive
from runfmt.run import (
    WRITER,
    commit_locked,
    create_revision,
    load_manifest,
    load_revision,
    now_utc,
    revisions,
    sums_of,
    write_manifest_copy,
    write_sums,
)
from runfmt.storage import Storage

__all__ = ["RepairReport", "being_written_by", "repair_run", "verify_run"]

_CHUNK = 1 << 20
_SNAPSHOTS = 3
"""Times `verify_run` checks a run that writers keep committing to before it reports."""
_SALVAGE_STEP = 64 << 10
_FOLDER = "is a folder, where the run keeps a file: move it away, then run repair"


def verify_run(
    run: Storage, *, run_id: str | None = None, live: frozenset[str] | None = None
) -> list[Problem]:
    """Check a run against the spec and its manifest; every problem found.

    ``run_id`` is the id a store's folder name gives the run (LAYOUT-1). The uncommitted
    data of writers that are alive (``live``, else `being_written_by` the run) is no
    problem: they are writing it, and `repair_run` leaves it alone (COMMIT-8). Only a
    folder that holds no run (LAYOUT-2) raises: `RunNotFoundError`.
    """
    if live is None:  # before reading: what a writer dead by then committed is in the run
        live = frozenset(being_written_by(run))
    for _ in range(_SNAPSHOTS):
        try:
            manifest, manifest_bytes = load_revision(run)
        except RunNotFoundError:
            raise
        except RunfmtError as exc:
            return _unreadable_problems(run, exc, run_id, live)
        problems = _problems(run, manifest, manifest_bytes, run_id, live)
        if not problems or revisions(run)[-1:] == [manifest.revision]:
            break  # else a writer committed while the run was checked: check it again
    return problems


def _unreadable_problems(
    run: Storage, exc: RunfmtError, run_id: str | None, live: frozenset[str]
) -> list[Problem]:
    """`verify_run` of a run whose newest revision does not read: that problem and, when
    repair mends it (§9.3), the revisions it sets aside and the run checked as the revision
    standing in then describes it; else the older revisions' problems."""
    problem = _manifest_problem(exc, exc.location or run.where())
    revs = revisions(run)
    unreadable = isinstance(exc, FormatError) and not isinstance(exc, UnsupportedFormatError)
    copy, older = _mending(run, revs) if unreadable and revs else (None, None)
    if copy is not None:
        stand_in, data, aside = decode_manifest(copy), copy, []
    elif older is not None:
        stand_in, data = older, run.read(names.revision_file(older.revision))
        aside = [p for p in _older_revision_problems(run, revs[-1], older.revision) if p.repairable]
    else:
        return [problem, *(_older_revision_problems(run, revs[-1]) if revs else [])]
    # rewritten or set aside: their problems are the ones reported here
    mended = {names.revision_file(r) for r in revs if r > stand_in.revision or r == revs[-1]}
    rest = [p for p in _problems(run, stand_in, data, run_id, live) if p.location not in mended]
    return [replace(problem, repairable=True), *aside, *rest]


def _problems(
    run: Storage,
    manifest: Manifest,
    manifest_bytes: bytes,
    run_id: str | None,
    live: frozenset[str],
) -> list[Problem]:
    """`verify_run` of one revision of the run."""
    problems = _older_revision_problems(run, manifest.revision) + _mixed(run, manifest)
    misnamed = None if run_id is None else folder_name_problem(manifest, run_id)
    if misnamed is not None:
        problems.append(Problem(run.where(), *cited_rule(misnamed, "LAYOUT-1")))
    current = _read_optional(run, names.MANIFEST_FILE)
    copy, held = _judge_copy(run, current, manifest_bytes, manifest)
    if copy == "stale" and _folder(run, names.MANIFEST_FILE):
        problems.append(Problem(names.MANIFEST_FILE, _FOLDER, "LAYOUT-2"))
    elif copy == "stale":
        if not live:  # a live writer replaces the copy next
            what = "is missing" if current is None else "differs from the newest revision"
            what += " (a crash leaves it so, as does a sync cut short: run that sync again)"
            problems.append(Problem(names.MANIFEST_FILE, what, "COMMIT-7", repairable=True))
    elif copy != "same":
        problems.append(_copy_damage(copy, manifest.revision, held))
    if copy == "damaged revision" and current is not None:  # the run as repair restores it
        manifest, manifest_bytes = decode_manifest(current), current
    files = run.walk()
    links = frozenset(run.symlinks())
    problems += [_name_replaced_runs(run, p, manifest.created_at)
                 for p in check_listing(manifest, files, links)]  # fmt: skip
    for stage in manifest.stages:
        for entry in stage.files:
            problems += _check_file(run, entry, stage, files.get(entry.path))
    for art in manifest.artifacts:
        if art.path not in files:
            problems.append(Problem(art.path, "listed artifact is missing", "LAYOUT-3"))
        elif not run.inside(art.path):
            problems.append(Problem(art.path, "artifact goes through a link", "LAYOUT-5"))
        elif not run.is_file(art.path):
            problems.append(Problem(art.path, "listed path is not a regular file", "LAYOUT-3"))
        elif files[art.path] != art.bytes or run.prefix_sha256(art.path, art.bytes) != art.sha256:
            problems.append(Problem(art.path, "length or sha256 does not match", "CHECK-1"))
    if names.SUMS_FILE in files:
        problems += _check_sums(run, manifest, manifest_bytes)
    problems = [p for p in problems if not _uncommitted_of(p, live)]
    if copy in _UNJUDGED or any(p.rule == "COMMIT-4" for p in problems):
        problems = [replace(p, repairable=False) for p in problems]  # repair changes nothing
    short = _cut_short(run, manifest, files)
    if short and not live and all(p.repairable or p.location in short for p in problems):
        whole = _whole_revision(run, manifest, files, links, short)
        went_back = (
            "if this is a copy cut short, copy the run again from its source: no revision "
            "this folder keeps is whole"
            if whole is None
            else f"`repair --rollback` goes back to revision {whole.revision}, the newest the "
            "folder holds whole, if this is a copy taken while the run was written (COMMIT-13)"
        )
        problems = [replace(p, problem=f"{p.problem}; {went_back}") if p.location in short
                    else p for p in problems]  # fmt: skip
    return problems


def _cut_short(run: Storage, manifest: Manifest, files: Mapping[str, int]) -> set[str]:
    """The listed files missing or shorter than listed (COMMIT-13): no link, or FIFO or
    other file that is not regular, in their place (damage, not a copy cut short)."""
    return {
        path
        for path, (size, _) in manifest.listed_files().items()
        if files.get(path, -1) < size
        and run.inside(path)
        and (path not in files or run.is_file(path))
    }


def _holds(
    run: Storage, files: Mapping[str, int], links: frozenset[str], path: str, entry: tuple[int, str]
) -> bool:
    """Whether the folder holds a listed file's bytes: all of an artifact, the listed
    prefix of a stage file."""
    size, sha256 = entry
    have = files.get(path, -1)
    artifact = path.startswith(f"{names.ARTIFACTS_DIR}/")
    if path in links or have < size or (have > size and artifact):
        return False
    return run.prefix_sha256(path, size) == sha256


def _whole_revision(
    run: Storage,
    newest: Manifest,
    files: Mapping[str, int],
    links: frozenset[str],
    short: set[str],
) -> Manifest | None:
    """The newest kept older revision whose listed files the folder holds, where the
    newest revision lists files missing or cut short (``short``): what `repair` goes back
    to (COMMIT-13)."""
    listed_by_newest = newest.listed_files()
    for revision in reversed(revisions(run)):
        if revision >= newest.revision:
            continue
        try:
            older = load_manifest(run, revision)
        except RunfmtError:
            continue
        if all(_holds(run, files, links, path, entry)
               for path, entry in older.listed_files().items()
               if path in short or path not in listed_by_newest):  # fmt: skip
            return older
    return None


def _going_back(
    run: Storage, newest: Manifest, files: Mapping[str, int], links: frozenset[str]
) -> tuple[Manifest | None, str]:
    """The revision `repair_run` goes back to, when the newest lists files missing or cut
    short, the rest of what it lists is whole and no writer is alive (COMMIT-13); else
    why not ("" when nothing is cut short)."""
    short = _cut_short(run, newest, files)
    if not short:
        return None, ""
    if live_writers(run):
        return None, "a writer of the run is alive"
    listed = newest.listed_files()
    if not all(_holds(run, files, links, p, listed[p]) for p in listed.keys() - short):
        return None, "another listed file is damaged, not cut short"
    whole = _whole_revision(run, newest, files, links, short)
    return whole, "" if whole else "no kept revision is whole in this folder"


def _go_back(run: Storage, newest: Manifest, whole: Manifest, report: RepairReport) -> Manifest:
    """Commit ``whole``'s members again as the revision after ``newest`` (COMMIT-13)."""
    new = apply_changes(whole, ChangeSet(), newest.revision + 1, now_utc(), WRITER)
    if not create_revision(run, new.revision, encode_manifest(new)):
        raise ConflictError("another process committed to the run while it was repaired",
                            location=run.where(), hint="run `runfmt repair` again")  # fmt: skip
    report.actions.append(
        f"went back to revision {whole.revision}, the newest the folder holds whole (revision "
        f"{newest.revision} lists files missing or cut short, as a copy taken while the run "
        f"was written holds them): committed as revision {new.revision}"
    )
    return new


ANY_WRITER = "*"
"""`being_written_by` where no lock names the live writers: any writer may be alive."""


def being_written_by(run: Storage) -> list[str]:
    """Ids of the run's live writers: on local disk those holding their locks (COMMIT-12),
    none when the locks cannot be probed (a run this user may not write); elsewhere, with
    no locks, `ANY_WRITER` while the run is running and was heard from within
    `ABANDON_AFTER`, or when that cannot be told (LIFE-4, STORE-3)."""
    if run.is_local:
        try:
            return live_writers(run)
        except OSError:
            return []
    try:
        return [ANY_WRITER] if may_be_alive(run, load_manifest(run), now()) else []
    except RunfmtError:
        return [ANY_WRITER]  # not told: nothing may be taken for a dead writer's


def _uncommitted_of(problem: Problem, writers: frozenset[str]) -> bool:
    """Whether ``problem`` is uncommitted data one of ``writers`` may be writing: in a
    stage file of its own, which repair leaves alone while it is alive, or an artifact
    not listed yet (whose writer no name tells)."""
    if not writers:
        return False
    if problem.rule == "LAYOUT-4" and problem.location.startswith(names.ARTIFACTS_DIR + "/"):
        return True
    if not problem.repairable:
        return False
    try:
        _, parsed = names.parse_stage_file(problem.location)
    except InvalidInputError:
        return False
    return parsed.writer in writers or ANY_WRITER in writers


def _salvage_order(item: tuple[str, int]) -> tuple[str, str, int]:
    """Stage files by stage, writer and number (``part-1000000`` after ``part-999999``), so
    that repair lists each writer's files in the order they were written (COMMIT-8)."""
    try:
        stage, parsed = names.parse_stage_file(item[0])
    except InvalidInputError:
        return item[0], "", 0
    return stage, parsed.writer, parsed.seq


def _older_revision_problems(
    run: Storage, newest: int, set_aside_above: int | None = None
) -> list[Problem]:
    """Each kept older revision must be a valid manifest too (MAN-2): `repair` falls back
    on them; one above ``set_aside_above`` it sets aside (§9.3)."""
    problems = []
    for revision in revisions(run):
        if revision < newest:
            try:
                load_manifest(run, revision)
            except RunNotFoundError:  # pruned by a live writer meanwhile
                continue
            except RunfmtError as exc:
                problem = _manifest_problem(exc, names.revision_file(revision))
                aside = set_aside_above is not None and revision > set_aside_above
                problems.append(replace(problem, repairable=aside))
    return problems


def _mixed(run: Storage, newest: Manifest) -> list[Problem]:
    """The kept older revisions of another run than ``newest``: two runs' revisions in one
    folder, which neither a crash nor a rerun leaves (COMMIT-4, POLICY-4)."""
    problems = []
    identity = (newest.run_id, newest.created_at)
    for revision in revisions(run):
        older = _identity(run, revision) if revision < newest.revision else None
        if older is None or older == identity:
            continue
        what = (
            f"is a revision of another run than revision {newest.revision} (run {older[0]} "
            f"created {older[1]}, not {newest.run_id} created {newest.created_at}): two "
            "runs' revisions in one folder are no crash's; keep the folder of the run you "
            "want from a copy"
        )
        problems.append(Problem(names.revision_file(revision), what, "COMMIT-4"))
    return problems


def _identity(run: Storage, revision: int) -> tuple[object, object] | None:
    """A kept revision's ``run_id`` and ``created_at``, read without validating it (a resume
    repairs, and validating every kept revision tripled its cost; `verify` reports an
    invalid one); None when it does not parse or is gone."""
    try:
        doc = orjson.loads(run.read(names.revision_file(revision)))
    except (ValueError, OSError, RunfmtError):
        return None
    return (doc.get("run_id"), doc.get("created_at")) if isinstance(doc, dict) else None


def _manifest_problem(exc: RunfmtError, location: str) -> Problem:
    """A manifest that could not be loaded, under the rule its error cites (else MAN-2;
    none when the storage failed, as on a folder this process may not read)."""
    return Problem(
        location, *cited_rule(exc.problem, "" if isinstance(exc, StorageError) else "MAN-2")
    )


def _folder(run: Storage, rel: str) -> bool:
    """Whether ``rel`` is a folder, not a link to one (which repair replaces, LAYOUT-5)."""
    return run.is_dir(rel) and not run.is_link(rel)


def _read_optional(run: Storage, rel: str) -> bytes | None:
    try:
        return run.read(rel)
    except FileNotFoundError:
        return None


def _check_file(
    run: Storage, entry: FileEntry, stage: StageEntry, size: int | None
) -> list[Problem]:
    if not run.inside(entry.path):
        return [Problem(entry.path, "listed file goes through a link", "LAYOUT-5")]
    check = FileCheck(entry, stage)
    if size is not None:
        try:
            stream = run.open_read(entry.path)
        except NotAFileError:
            return [Problem(entry.path, "listed path is not a regular file", "LAYOUT-3")]
        with stream:
            remaining = entry.bytes
            while remaining > 0:
                chunk = stream.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                check.feed(chunk)
                remaining -= len(chunk)
    return check.finish(size)


def _check_sums(run: Storage, manifest: Manifest, manifest_bytes: bytes) -> list[Problem]:
    """``SHA256SUMS`` must be byte for byte what CHECK-3 makes of the manifest."""
    if manifest.status == "running":
        return [Problem(names.SUMS_FILE, "present in a running run", "CHECK-3", repairable=True)]
    try:
        data = run.read(names.SUMS_FILE)
    except FileNotFoundError:
        return [Problem(names.SUMS_FILE, "missing in a finished run", "CHECK-3", repairable=True)]
    if data == sums_of(manifest, manifest_bytes):
        return []
    try:
        parse_sums(data.decode("utf-8", "replace"))
    except FormatError as exc:
        return [Problem(names.SUMS_FILE, exc.problem, "CHECK-3", repairable=True)]
    return [Problem(names.SUMS_FILE, "differs from the manifest's digests, their order or "
                    "their line endings", "CHECK-3", repairable=True)]  # fmt: skip


@dataclass
class RepairReport:
    """What `repair_run` did, and what it met and left alone. It is no verdict: a damaged
    committed file is no crash to repair, and only `verify_run` reports it."""

    actions: list[str] = field(default_factory=list)
    salvaged_records: int = 0
    left: list[Problem] = field(default_factory=list)
    """What repair met and did not change: a file that is no stage file, a rollback it
    could not make."""
    rollback_to: int | None = None
    """The revision ``rollback=True`` would go back to (COMMIT-13), when it was not given."""


def repair_run(
    run: Storage,
    *,
    salvage: bool = True,
    artifacts: Literal["auto", "leave", "drop"] = "auto",
    rollback: bool = False,
    writer: str | None = None,
) -> RepairReport:
    """Bring a crashed run back to a consistent state without losing a committed record.

    Bytes written after the last commit by writers that are gone are salvaged
    when they form complete, valid frames (``salvage=True``) and are otherwise
    cut off; files of live writers are left alone (COMMIT-8). Artifacts no revision
    lists are listed or deleted alike (``"auto"``), deleted (``"drop"``) or left
    (``"leave"``: a local resume, whose writer replaces them, ART-1). ``rollback`` takes a
    copy made while the run was written back to the newest revision its files hold whole
    (COMMIT-13); without it, the report names that revision (``rollback_to``). Where no
    lock tells, dropping is refused while a writer may be alive (STORE-3). ``writer``: the
    id of a live writer (one finishing the run, COMMIT-11) whose files are left alone.
    """
    if not revisions(run):
        load_manifest(run)  # raises: not a run, or one copied without _manifests/ (LAYOUT-2)
    maybe_live = not run.is_local and bool(being_written_by(run))
    if maybe_live and not salvage:
        raise ConflictError(
            f"the run is running and was heard from within {ABANDON_AFTER:g} s: a writer may "
            "be alive, and where no lock tells, dropping what is not committed yet could "
            "delete what it is about to commit (STORE-3)",
            location=run.where(),
            hint="repair without dropping (complete frames are kept), or drop once the run "
            "is abandoned (LIFE-4)",
        )
    report = RepairReport()
    with commit_lock(run, timeout=60.0):
        manifest = _newest_readable(run, report)
        copy = _read_optional(run, names.MANIFEST_FILE)
        state, held = _judge_copy(run, copy, run.read(names.revision_file(manifest.revision)),
                                  manifest)  # fmt: skip
        mixed = _mixed(run, manifest)
        if state in _UNJUDGED or mixed:
            report.left += mixed or [_copy_damage(state, manifest.revision, held)]
            return report
        if state == "damaged revision" and copy is not None and held is not None:
            rel = names.revision_file(held)
            run.write_atomic(rel, copy)
            report.actions.append(f"{rel}: rewritten from manifest.json, which SHA256SUMS "
                                  "vouches for")  # fmt: skip
            manifest = load_manifest(run)
        files = run.walk()
        links = frozenset(run.symlinks())
        whole, why_not = _going_back(run, manifest, files, links)
        if whole is not None and rollback:
            manifest = _go_back(run, manifest, whole, report)
        elif whole is not None:
            report.rollback_to = whole.revision
        elif rollback and why_not:
            report.left.append(Problem("", f"not rolled back: {why_not}", "COMMIT-13"))
        changes = ChangeSet()
        listed = {f.path: (f, s) for s in manifest.stages for f in s.files}
        for path, size in sorted(files.items(), key=_salvage_order):
            if not path.startswith(names.STAGES_DIR + "/") or path in links:
                continue
            try:
                stage_name, parsed = names.parse_stage_file(path)
            except InvalidInputError:
                report.left.append(Problem(path, "not a stage file name; left alone", "NAME-4"))
                continue
            if parsed.writer == writer or writer_alive(run, parsed.writer):
                report.actions.append(f"{path}: writer {parsed.writer} is still running; skipped")
                continue
            if not run.is_file(path):
                report.left.append(Problem(path, "not a regular file; left alone", "LAYOUT-3"))
                continue
            declared = manifest.stage(stage_name) or changes.stages.get(stage_name)
            entry, stage = listed.get(path, (None, declared))
            if entry is not None and size == entry.bytes:
                continue
            if entry is not None and size < entry.bytes:
                report.left.append(
                    Problem(path, f"has {size} bytes, {entry.bytes} committed", "CHECK-1")
                )
                continue
            _repair_file(run, path, entry, stage, salvage, changes, report, manifest,
                         count=not maybe_live)  # fmt: skip
        if artifacts != "leave":
            drop = artifacts == "drop" or not salvage
            _repair_artifacts(run, manifest, files, links, drop, changes, report)
        _remove_leftovers(run, report)
        report.actions += [f"salvaged counter delta {name} {delta:+}"
                           for name, delta in changes.counters.items()]  # fmt: skip
        if changes:
            manifest = commit_locked(run, changes, manifest, repairing=True)
            report.actions.append(f"committed revision {manifest.revision}")
        data = run.read(names.revision_file(manifest.revision))
        folders = [name for name in (names.MANIFEST_FILE, names.SUMS_FILE) if _folder(run, name)]
        report.left += [Problem(name, _FOLDER, "LAYOUT-2") for name in folders]
        if names.MANIFEST_FILE not in folders and _read_optional(run, names.MANIFEST_FILE) != data:
            write_manifest_copy(run, data, finished=manifest.finished)
            report.actions.append("rewrote manifest.json from the newest revision")
        sums = names.SUMS_FILE not in folders
        if sums and manifest.finished and _check_sums(run, manifest, data):
            write_sums(run, manifest)
            report.actions.append("rewrote SHA256SUMS")
        elif (
            sums
            and not manifest.finished
            and (run.exists(names.SUMS_FILE) or run.is_link(names.SUMS_FILE))
        ):
            run.delete(names.SUMS_FILE)
            report.actions.append("removed SHA256SUMS of a running run")
    return report


def _repair_artifacts(
    run: Storage,
    manifest: Manifest,
    files: dict[str, int],
    links: frozenset[str],
    drop: bool,
    changes: ChangeSet,
    report: RepairReport,
) -> None:
    """List or delete (``drop``) the artifacts no revision lists, once no writer of the run
    is alive: a dead writer's, created whole but not committed (COMMIT-8, ART-1)."""
    listed = {a.path for a in manifest.artifacts}
    unlisted = [p for p in sorted(files) if p.startswith(names.ARTIFACTS_DIR + "/")
                and p not in listed and p not in links and is_repairable(p, listed)]  # fmt: skip
    if not unlisted or live_writers(run):
        return
    for path in unlisted:
        if drop:
            run.delete(path)
            report.actions.append(f"{path}: deleted (no revision lists it)")
            continue
        size = files[path]
        digest = run.prefix_sha256(path, size)
        if digest is None:  # cut short since it was listed
            continue
        guessed = guess_media_type(path)
        changes.artifacts[path] = ArtifactEntry(path, size, digest, guessed)
        report.actions.append(f"{path}: listed as an artifact ({guessed}), as its writer died")


def _remove_leftovers(run: Storage, report: RepairReport) -> None:
    """Delete local state left by writers that are gone: temp files older than a minute
    (none while a writer is alive: a big file may take it longer to write) and lock files
    older than a minute that no process holds (a younger one may be a starting writer's,
    between its open and its lock)."""
    if not run.is_local:  # local state exists on local disk only
        return
    cutoff = time.time_ns() - 60 * 10**9
    writing = bool(being_written_by(run))
    stages = [f"{names.STAGES_DIR}/{s}" for s in run.names(names.STAGES_DIR)]
    for folder in ("", names.MANIFESTS_DIR, names.ARTIFACTS_DIR, *stages):
        for name in run.local_state(folder):
            rel = f"{folder}/{name}" if folder else name
            if (run.mtime_ns(rel) or cutoff) >= cutoff:
                continue
            stale_temp = name.startswith(".tmp-") and not writing
            dead_writer = (
                name.startswith(".writer-")
                and name.endswith(".lock")
                and not writer_alive(run, name[len(".writer-") : -len(".lock")])
            )
            if stale_temp or dead_writer:
                run.delete(rel)
                report.actions.append(f"{rel}: removed leftover local state")


def _newest_readable(run: Storage, report: RepairReport) -> Manifest:
    """The newest revision; an unreadable one is rewritten from its copy, or set aside with
    those after the newest older revision that reads (§9.3). Nothing changes when neither
    can be done."""
    revs = revisions(run)
    try:
        return load_manifest(run, revs[-1])
    except UnsupportedFormatError:
        raise
    except FormatError as exc:
        copy, older = _mending(run, revs)
        rel = names.revision_file(revs[-1])
        if copy is not None:
            run.write_atomic(rel, copy)
            report.actions.append(f"{rel}: unreadable ({exc.problem}); rewritten from "
                                  "manifest.json, its copy")  # fmt: skip
            return load_manifest(run, revs[-1])
        if older is None:
            raise
        for rev in reversed(revs):
            if rev == older.revision:
                break
            rel = names.revision_file(rev)
            aside = f"{names.MANIFESTS_DIR}/.corrupt-{rev:08d}.json"
            if run.exists(aside):  # a revision of this number set aside before
                aside = f"{names.MANIFESTS_DIR}/.corrupt-{rev:08d}-{time.time_ns()}.json"
            run.put(aside, run.read(rel))
            run.delete(rel)
            report.actions.append(f"{rel}: unreadable; moved aside")
        return older


def _mending(run: Storage, revs: list[int]) -> tuple[bytes | None, Manifest | None]:
    """How an unreadable newest revision is mended: ``manifest.json``'s bytes to rewrite it
    from; else the newest older revision that reads, when every revision after it is a
    regular file to set aside; else neither, as when a revision of a newer format comes
    first (repair goes back no further)."""
    copy = _copy_of_unreadable(run, revs)
    if copy is not None:
        return copy, None
    for rev in reversed(revs[:-1]):
        try:
            older = load_manifest(run, rev)
        except UnsupportedFormatError:
            return None, None
        except (FormatError, RunNotFoundError):
            continue
        later = [names.revision_file(r) for r in revs if r > rev]
        state, _ = _judge_copy(
            run, _read_optional(run, names.MANIFEST_FILE), run.read(names.revision_file(rev)), older
        )
        usable = all(map(run.is_file, later)) and state not in _UNJUDGED
        return None, older if usable and not _mixed(run, older) else None
    return None, None


def _copy_of_unreadable(run: Storage, revs: list[int]) -> bytes | None:
    """``manifest.json``'s bytes when they may replace the unreadable newest revision: a
    valid manifest of that revision of this run (§9.3), and no folder in its place."""
    copy = _read_optional(run, names.MANIFEST_FILE)
    found = None if copy is None else _manifest_in(copy)
    if copy is None or found is None or found.revision != revs[-1]:
        return None
    if _folder(run, names.revision_file(revs[-1])):
        return None
    return copy if _same_run(run, found, copy, revs[:-1]) and not _mixed(run, found) else None


def _manifest_at(run: Storage, revision: int) -> Manifest | None:
    """Revision ``revision``; None when it does not read, or was pruned meanwhile."""
    try:
        return load_manifest(run, revision)
    except (FormatError, RunNotFoundError):
        return None


def _same_run(run: Storage, found: Manifest, copy: bytes, older: list[int]) -> bool:
    """Whether ``found``, decoded from ``copy``, is a manifest of this run: of the newest
    older revision that reads; else of the run its folder is named after, whose files it
    lists are at hand, and of which any ``SHA256SUMS`` was made (a copy from another run
    is no evidence)."""
    for revision in reversed(older):
        kept = _manifest_at(run, revision)
        if kept is not None:
            return (kept.run_id, kept.created_at) == (found.run_id, found.created_at)
    if run.name != found.run_id:
        return False
    sums = _read_optional(run, names.SUMS_FILE)
    if sums is not None and sums != sums_of(found, copy):
        return False
    return _holds_all(run, found)


def _holds_all(run: Storage, manifest: Manifest) -> bool:
    """Whether every file ``manifest`` lists is present, with at least its listed length."""
    files = run.walk()
    return all(files.get(path, -1) >= size for path, (size, _) in manifest.listed_files().items())


def _manifest_in(data: bytes) -> Manifest | None:
    """The manifest in ``data``; None when they hold no valid manifest."""
    try:
        return decode_manifest(data)
    except FormatError:
        return None


_CopyState = Literal["same", "stale", "damaged copy", "damaged revision", "diverged", "not held"]
_UNJUDGED: frozenset[_CopyState] = frozenset({"diverged", "not held"})
"""Copy states with which `repair` changes nothing (COMMIT-14)."""


def _judge_copy(
    run: Storage, copy: bytes | None, newest: bytes, truth: Manifest
) -> tuple[_CopyState, int | None]:
    """How ``manifest.json`` (``copy``) stands beside the newest revision (``truth``, whose
    bytes are ``newest``), and the revision the copy holds.

    A crash leaves it *stale*: missing, no manifest (empty after a power loss) or an older
    revision (COMMIT-7); a copy of the folder taken while a writer committed, a later
    one. Other bytes of the same revision are damage to one of the two: ``SHA256SUMS``
    tells which when it is what CHECK-3 makes of one of them, of this run (COMMIT-14); a
    later revision of this run that it vouches for so is one missing from ``_manifests/``.
    """
    if copy == newest:
        return "same", truth.revision
    found = None if copy is None else _manifest_in(copy)
    held = None if found is None else found.revision
    if copy is None or found is None or found.revision < truth.revision:
        return "stale", held
    same_run = (found.run_id, found.created_at) == (truth.run_id, truth.created_at)
    sums = _read_optional(run, names.SUMS_FILE)
    if same_run and sums == sums_of(found, copy):
        if found.revision > truth.revision and not _holds_all(run, found):
            return "not held", held
        return "damaged revision", held
    if found.revision > truth.revision:
        return "stale", held
    if same_run and sums == sums_of(truth, newest):
        return "damaged copy", held
    return "diverged", held


def refuse_damaged_copy(run: Storage, newest: bytes, truth: Manifest, hint: str) -> None:
    """`ManifestError` when ``manifest.json`` and the newest revision (``truth``, whose bytes
    are ``newest``) disagree as no crash leaves them (COMMIT-14): a copy of the run would
    publish a changed revision as intact."""
    state, held = _judge_copy(run, _read_optional(run, names.MANIFEST_FILE), newest, truth)
    if state not in ("same", "stale"):
        raise ManifestError(str(_copy_damage(state, truth.revision, held)),
                            location=run.where(), hint=hint)  # fmt: skip


def _copy_damage(state: _CopyState, revision: int, held: int | None) -> Problem:
    """The problem `_judge_copy` found, when no crash leaves it (``held``: the revision
    ``manifest.json`` holds)."""
    rel = names.revision_file(revision)
    if state == "not held":
        what = (
            f"holds revision {held}, which SHA256SUMS vouches for, but the folder does not "
            f"hold the files it lists whole (the newest revision here is {revision}): a copy "
            "taken while the run was written? copy the run again"
        )
        return Problem(names.MANIFEST_FILE, what, "COMMIT-14")
    if state == "damaged revision" and held is not None and held != revision:
        what = "is missing: manifest.json, which SHA256SUMS vouches for, holds it"
        return Problem(names.revision_file(held), what, "COMMIT-14", repairable=True)
    if state == "damaged revision":
        what = "differs from manifest.json, which SHA256SUMS vouches for: it was changed"
        return Problem(rel, what, "COMMIT-14", repairable=True)
    if state == "damaged copy":
        what = f"holds other bytes than {rel}, which SHA256SUMS vouches for: it was changed"
        return Problem(names.MANIFEST_FILE, what, "COMMIT-14", repairable=True)
    what = (
        f"holds revision {revision} with other bytes than {rel}: one of the two was "
        "changed (no crash does this); compare them and put the right one in both places"
    )
    return Problem(names.MANIFEST_FILE, what, "COMMIT-14")


def _name_replaced_runs(run: Storage, problem: Problem, born: str) -> Problem:
    """``problem``, saying so when it is an unlisted stage file written for a run that this
    one replaced, which `repair` deletes rather than salvages (COMMIT-8)."""
    if problem.rule != "LAYOUT-4" or not problem.location.startswith(names.STAGES_DIR + "/"):
        return problem
    decoder = FrameDecoder()
    try:
        head = run.read_range(problem.location, 0, len(PREFIX) + 8 + MAX_HEADER_SIZE)
        header = next((e for e in decoder.decode(head) if not isinstance(e, DataFrame)), None)
    except (RunfmtError, OSError):
        return problem
    if header is None or not _written_for_another_run(header, born):
        return problem
    what = f"{problem.problem}: written for a run this one replaced; `repair` deletes it"
    return replace(problem, problem=what)


def _written_for_another_run(header: Mapping[str, object], born: str) -> bool:
    """Whether a valid stage header's ``run_created_at`` names another instant than
    ``born`` (COMMIT-8); timestamps with other fraction digits can name the same one."""
    stamp = header.get("run_created_at")
    return isinstance(stamp, str) and not same_instant(stamp, born)


def _repair_file(
    run: Storage,
    path: str,
    entry: FileEntry | None,
    stage: StageEntry | None,
    salvage: bool,
    changes: ChangeSet,
    report: RepairReport,
    manifest: Manifest,
    *,
    count: bool,
) -> None:
    """Salvage or cut what a dead writer left in one stage file past its committed bytes;
    a header naming another ``created_at`` than the run's (``manifest``) contradicts it.
    ``count``: add the deltas of its counter frames (FRAME-6), which a writer that may be
    alive would commit too (STORE-3)."""
    committed = entry.bytes if entry else 0
    keep, records, failures, header, counter_frames = (
        _complete_prefix(run.read(path), committed) if salvage else (0, 0, 0, None, [])
    )
    stage_name, _ = names.parse_stage_file(path)
    misfit = None if header is None else header_problem(header, path, stage)
    fits = header is not None and misfit is None
    foreign = header is not None and fits and _written_for_another_run(header, manifest.created_at)
    if not fits or foreign or records <= (entry.records if entry else 0):
        keep = committed
    if keep == 0:
        run.delete(path)
        why = "no committed or complete records" if salvage else "uncommitted, dropped"
        if foreign:
            why = "written for a run this one replaced"
        elif misfit is not None:
            why = f"{misfit[0]} ({misfit[1]})"
        report.actions.append(f"{path}: removed ({why})")
        return
    if keep > committed:
        assert header is not None
        if stage is None:
            changes.stages[stage_name] = StageEntry(
                stage_name,
                "running",
                str(header["record_schema_version"]),
                None if header["key_field"] is None else str(header["key_field"]),
            )
        run.unshare(path)  # the records it lists now are no fork's (FORK-3)
        digest = hashlib.sha256(run.read_range(path, 0, keep)).hexdigest()
        changes.files[path] = FileEntry(path, keep, records, failures, digest)
        report.salvaged_records += records - (entry.records if entry else 0)
        report.actions.append(
            f"{path}: salvaged {records - (entry.records if entry else 0)} records"
        )
        frames = [f for f in counter_frames if f.start < keep]
        if frames and not count:
            report.actions.append(f"{path}: counter deltas not added: a writer of the run may "
                                  "be alive and commit them itself (STORE-3)")  # fmt: skip
        elif count:
            for frame in frames:
                for name, delta in frame.counters.items():
                    _add_counter_delta(name, delta, manifest, changes, report)
    size = run.size(path) or 0
    if size > keep:
        if run.is_local:
            run.truncate(path, keep)
            after = "the last committed byte" if keep == committed else "the last complete frame"
            report.actions.append(f"{path}: cut {size - keep} bytes after {after}")
        else:
            report.left.append(Problem(path, "object has a torn tail", "COMMIT-8"))


def _add_counter_delta(
    name: str, delta: float, manifest: Manifest, changes: ChangeSet, report: RepairReport
) -> None:
    """Add a salvaged counter delta (FRAME-6) to ``changes``; leave it out, as a problem,
    when it would make its counter one that a manifest cannot hold (COMMIT-5)."""
    total = changes.counters.get(name, 0) + delta
    try:
        check_counter(name, manifest.counters.get(name, 0) + total)
    except InvalidInputError as exc:
        report.left.append(
            Problem("", f"salvaged counter delta not added: {exc.problem}", "FRAME-6")
        )
    else:
        changes.counters[name] = total


def _complete_prefix(
    data: bytes, committed: int
) -> tuple[int, int, int, dict[str, object] | None, list[CounterFrame]]:
    """Length, records and failures of the longest valid prefix of whole frames, the header,
    and the counter frames read from the ``committed`` length on (FRAME-6)."""
    decoder = FrameDecoder(counters_from=committed)
    records = failures = end = 0
    header = None
    try:
        for start in range(0, len(data), _SALVAGE_STEP):
            for event in decoder.decode(data[start : start + _SALVAGE_STEP]):
                if isinstance(event, DataFrame):
                    batch = decode_lines(event.content)
                    if first_too_deep(event.content, batch) is not None:
                        raise StageFileError("a record nests too deep (REC-3)")
                    key_field = header.get("key_field") if header else None
                    if isinstance(key_field, str) and any(
                        (key := record.get(key_field)) is not None and not is_key(key)
                        for record in batch
                    ):
                        raise StageFileError("a record's key field holds no key (REC-6)")
                    records += len(batch)
                    failures += sum(map(is_failure, batch))
                    end = event.end
                else:
                    header, end = event, decoder.header_end
    except StageFileError:
        pass
    if header is None:
        return 0, 0, 0, None, []
    return end, records, failures, header, decoder.counter_frames
