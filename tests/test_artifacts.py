"""Artifacts: binary files kept in a run, listed with sha256, size and media type,
verified like stage files, read whole or as a stream, and printed by `runfmt cat`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runfmt.check import repair_run, verify_run
from runfmt.cli import app
from runfmt.errors import ChecksumMismatchError, ConflictError, InvalidInputError
from runfmt.format.checksum import sha256_hex
from runfmt.format.manifest import ArtifactEntry, ChangeSet, apply_changes, decode_manifest
from runfmt.run import WRITER
from runfmt.store import Store
from tests.test_format_manifest import TS, doc

BLOB = bytes(range(256)) * 1000


@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("plot.png", None, "image/png"),
        ("trace.json", None, "application/json"),
        ("notes/readme.md", None, "text/markdown"),
        ("Plot.PNG", None, "image/png"),
        ("logs/run.log", None, "text/plain"),
        ("cfg.yaml", None, "application/yaml"),
        ("data.tar.gz", None, "application/gzip"),
        ("preds.jsonl", None, "application/octet-stream"),
        ("v1.2/weights", None, "application/octet-stream"),
        ("weights.bin", None, "application/octet-stream"),
        ("no-extension", None, "application/octet-stream"),
        ("out.png", "application/x-custom+v1", "application/x-custom+v1"),
    ],
)
def test_media_type_is_guessed_from_the_name(
    store: Store, name: str, given: str | None, expected: str
) -> None:
    w = store.create_run("art", heartbeat_interval=None)
    path = w.add_artifact(name, b"data", given)
    m = w.finish()
    [entry] = m.artifacts
    assert (entry.path, entry.media_type, entry.bytes) == (path, expected, 4)
    assert entry.sha256 == sha256_hex(b"data")
    assert verify_run(w.storage) == []


def test_stream_reads_in_chunks_and_matches(store: Store) -> None:
    w = store.create_run("art", heartbeat_interval=None)
    w.add_artifact("big.bin", BLOB)
    w.finish()
    reader = store.open_run(w.run_id)
    chunks = list(reader.stream_artifact("big.bin", chunk_size=4096))
    assert len(chunks) == len(BLOB) // 4096 + 1
    assert b"".join(chunks) == BLOB
    assert reader.read_artifact("artifacts/big.bin") == BLOB


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(BLOB[:-1]),
        lambda p: p.write_bytes(BLOB + b"x"),
        lambda p: p.write_bytes(b"\xff" + BLOB[1:]),
        lambda p: p.unlink(),
    ],
)
def test_damaged_artifact_is_detected_before_the_last_chunk(store: Store, damage) -> None:
    """ART-2."""
    w = store.create_run("art", heartbeat_interval=None)
    w.add_artifact("big.bin", BLOB)
    w.finish()
    path = Path(w.storage.root) / "artifacts" / "big.bin"
    damage(path)
    reader = store.open_run(w.run_id)
    received: list[bytes] = []
    with pytest.raises(ChecksumMismatchError, match="artifact"):
        received.extend(reader.stream_artifact("big.bin", chunk_size=65536))
    assert len(b"".join(received)) < len(BLOB), "the last chunk waits for the check"
    assert any(p.rule in ("CHECK-1", "LAYOUT-3") for p in verify_run(w.storage))


def test_listed_artifact_is_never_overwritten(store: Store) -> None:
    """ART-1."""
    w = store.create_run("art", heartbeat_interval=None)
    w.add_artifact("a.txt", b"one")
    with pytest.raises(ConflictError, match="listed bytes never change"):
        w.add_artifact("a.txt", b"two")
    w.flush()
    with pytest.raises(ConflictError):
        w.add_artifact("a.txt", b"three")
    w.finish()
    assert store.open_run(w.run_id).read_artifact("a.txt") == b"one"


@pytest.mark.parametrize("first_commits", [True, False])
@pytest.mark.parametrize(("first", "second"), [("Report.txt", "report.txt"), ("d/x", "D/x")])
def test_artifact_names_differing_only_in_case_are_refused(
    store: Store, first_commits: bool, first: str, second: str
) -> None:
    """MAN-7: a case-insensitive filesystem (a USB stick, macOS, Windows) would hold one
    file for both, and the manifest would be invalid."""
    w = store.create_run("art", heartbeat_interval=None)
    w.add_artifact(first, b"one")
    if first_commits:
        w.flush()
    with pytest.raises(ConflictError, match=r"only in case.*\(MAN-7\)"):
        w.add_artifact(second, b"two")
    w.finish()
    assert verify_run(w.storage) == []
    assert [a.path for a in store.open_run(w.run_id).manifest.artifacts] == [f"artifacts/{first}"]


@pytest.mark.parametrize("where", ["store", "memory_store"])
@pytest.mark.parametrize("first_commits", [True, False])
def test_another_writer_of_the_run_cannot_overwrite_an_artifact(
    request: pytest.FixtureRequest, where: str, first_commits: bool
) -> None:
    """ART-1, COMMIT-1: two writers of one run store the same artifact name, the second
    after the first committed it or before: the file is created exclusively, so the second
    is refused and the first one's bytes stay as listed."""
    any_store: Store = request.getfixturevalue(where)
    w1 = any_store.create_run("art", heartbeat_interval=None)
    w1.append("gen", {"i": 1})
    w1.flush()
    w2 = any_store.resume_run(w1.run_id, heartbeat_interval=None)
    w1.add_artifact("report.txt", b"from w1\n")
    if first_commits:
        w1.flush()
    with pytest.raises(ConflictError, match="another writer of the run stored it"):
        w2.add_artifact("report.txt", b"from w2, longer\n")
    w2.close()
    w1.finish()
    assert any_store.open_run(w1.run_id).read_artifact("report.txt") == b"from w1\n"
    assert verify_run(any_store.locate(w1.run_id)) == []


def test_a_resumed_writer_may_store_again_what_a_dead_writer_left_uncommitted(
    store: Store,
) -> None:
    """Resume after a crash: the final step runs again and stores its artifact under the
    same name; the file the dead writer left is listed by no revision, so it is replaced."""
    w = store.create_run("art", heartbeat_interval=None)
    w.append("gen", {"i": 1})
    w.flush()
    w.add_artifact("report.txt", b"half-finished report")
    w.discard()
    again = store.resume_run(w.run_id, heartbeat_interval=None)
    again.add_artifact("report.txt", b"the report")
    again.finish()
    assert store.open_run(w.run_id).read_artifact("report.txt") == b"the report"
    assert verify_run(store.locate(w.run_id)) == []


def test_a_commit_never_relists_an_artifact_another_writer_listed() -> None:
    """ART-1 in the merge itself (COMMIT-5), whatever the files on storage say."""
    listed = ArtifactEntry("artifacts/a.txt", 3, "ab" * 32, "text/plain")
    other = ArtifactEntry("artifacts/a.txt", 4, "cd" * 32, "text/plain")
    base = apply_changes(
        decode_manifest(json.dumps(doc()).encode()),
        ChangeSet(artifacts={listed.path: listed}), 2, TS, WRITER,
    )  # fmt: skip
    with pytest.raises(ConflictError, match="another writer listed this artifact"):
        apply_changes(base, ChangeSet(artifacts={other.path: other}), 3, TS, WRITER)
    again = apply_changes(base, ChangeSet(artifacts={listed.path: listed}), 3, TS, WRITER)
    assert again.artifacts == (listed,)


@pytest.mark.parametrize(
    ("name", "data", "media_type", "message"),
    [
        ("../escape", b"x", None, "NAME-5"),
        ("con.txt", b"x", None, "NAME-5"),
        ("a:b", b"x", None, "NAME-5"),
        ("ok.bin", "text", None, "must be bytes"),
        ("ok.bin", b"x", "Not A Type", "invalid media type"),
        ("ok.bin", b"x", 5, "media type must be a string, not int"),
        ("ok.bin", b"x", b"application/json", "media type must be a string, not bytes"),
    ],
)
def test_bad_artifacts_are_refused_and_nothing_is_written(
    store: Store, name: str, data: object, media_type: str | None, message: str
) -> None:
    w = store.create_run("art", heartbeat_interval=None)
    with pytest.raises(InvalidInputError, match=message):
        w.add_artifact(name, data, media_type)  # type: ignore[arg-type]
    m = w.finish()
    assert m.artifacts == ()
    assert not (Path(w.storage.root) / "artifacts").exists()


def test_unknown_artifact_names_the_known_ones(store: Store) -> None:
    w = store.create_run("art", heartbeat_interval=None)
    w.add_artifact("a.txt", b"1")
    w.finish()
    with pytest.raises(InvalidInputError, match=r"no artifact 'b.txt' \(artifacts: a.txt"):
        store.open_run(w.run_id).read_artifact("b.txt")


def test_cat_artifact_writes_its_bytes(store: Store) -> None:
    w = store.create_run("art", heartbeat_interval=None)
    w.add_artifact("big.bin", BLOB)
    w.finish()
    result = CliRunner().invoke(
        app, ["--store", store.url, "cat", w.run_id, "--artifact", "big.bin"]
    )
    assert result.exit_code == 0
    assert result.stdout_bytes == BLOB
    (Path(w.storage.root) / "artifacts" / "big.bin").write_bytes(BLOB[:10])
    bad = CliRunner().invoke(app, ["--store", store.url, "cat", w.run_id, "--artifact", "big.bin"])
    assert bad.exit_code == 1
    assert bad.stdout_bytes == b""


def test_artifacts_on_memory_store(memory_store: Store) -> None:
    w = memory_store.create_run("art", heartbeat_interval=None)
    w.add_artifact("x/y.json", b"{}")
    w.finish()
    reader = memory_store.open_run(w.run_id)
    assert reader.artifact("x/y.json").media_type == "application/json"
    assert list(reader.stream_artifact("x/y.json")) == [b"{}"]


@pytest.mark.parametrize("salvage", [True, False], ids=["salvage", "drop"])
def test_repair_lists_or_deletes_an_artifact_a_dead_writer_left_unlisted(
    store: Store, salvage: bool
) -> None:
    """COMMIT-8, crash row 8: the run verifies after repair, with no manual step."""
    w = store.create_run("x", flush_every=None, flush_interval=None, heartbeat_interval=None)
    w.append("s", {"i": 0})
    w.flush()
    w.add_artifact("report.json", b'{"ok": true}\n')
    w.discard()  # the writer dies before the commit that lists the artifact
    problems = verify_run(w.storage)
    assert [(p.location, p.rule, p.repairable) for p in problems] == [
        ("artifacts/report.json", "LAYOUT-4", True)
    ]
    with store.create_run("other", heartbeat_interval=None) as live:
        live.add_artifact("draft.txt", b"mine")
        assert repair_run(live.storage).actions == []  # its writer is alive: left alone
    report = repair_run(w.storage, salvage=salvage)
    assert report.left == []
    assert verify_run(w.storage) == []
    artifacts = store.open_run(w.run_id).manifest.artifacts
    if salvage:
        [entry] = artifacts
        assert (entry.path, entry.media_type, entry.bytes) == (
            "artifacts/report.json",
            "application/json",
            13,
        )
        assert store.open_run(w.run_id).read_artifact("report.json") == b'{"ok": true}\n'
    else:
        assert artifacts == ()
        assert not Path(w.storage.path("artifacts/report.json")).exists()
