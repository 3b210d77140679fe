"""Sync to S3 (a moto server on 127.0.0.1): 1,000 small runs, a no-op re-sync, one large stage.

The baseline is fsspec's generic recursive copy (``fs.put(folder, url, recursive=True)``)
of the same folder, which moves every file every time. Requests are counted from
the server's request log.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from common import Row

from runfmt.store import Store
from runfmt.sync import sync

SECTION = "sync"
_BUCKET = "runfmt-bench"
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


_SERVER = str(Path(__file__).resolve().parents[1] / "tests" / "moto_server.py")
"""moto serving one request at a time, so create-only PUTs are atomic as on S3."""


class _Server:
    """A moto S3 server in its own process, logging one line per request to a file."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._log: IO[bytes] = tempfile.TemporaryFile("a+b")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, _SERVER, str(port)],
            env={**os.environ, **_CREDENTIALS},
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    def requests(self) -> int:
        """Requests served so far."""
        self._log.seek(0)
        return self._log.read().count(b' HTTP/1.1" ')

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(30)
        self._log.close()


def _small_runs(root: Path, runs: int) -> None:
    store = Store(root)
    for n in range(runs):
        with store.create_run(f"eval-{n % 20}", {"n": n}) as writer:
            writer.extend("score", ({"i": i, "ok": i % 3 == 0, "n": n} for i in range(20)))


def _large_run(root: Path, records: int) -> int:
    with Store(root).create_run("large", flush_every=100_000) as writer:
        writer.extend("generate", ({"i": i, "text": os.urandom(48).hex()} for i in range(records)))
    return sum(p.stat().st_size for p in root.rglob("*.zst"))


def _measure(server: _Server, fn: Any) -> tuple[float, int]:
    before = server.requests()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    time.sleep(0.2)
    return seconds, server.requests() - before


def run(quick: bool) -> Iterator[Row]:
    os.environ.update(_CREDENTIALS)
    import s3fs

    runs = 100 if quick else 1000
    records = 50_000 if quick else 400_000
    work = Path(tempfile.mkdtemp(prefix="runfmt-bench-sync-"))
    server = _Server()
    try:
        options = {"endpoint_url": server.endpoint}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(_BUCKET)
        small = work / "small"
        _small_runs(small, runs)
        files = sum(1 for p in small.rglob("*") if p.is_file() and not p.name.startswith("."))

        def ours() -> None:
            report = sync(str(small), f"s3://{_BUCKET}/ours", dst_options=options, workers=32)
            assert report.ok

        def generic(prefix: str) -> None:
            fs.put(str(small) + "/", f"{_BUCKET}/{prefix}/", recursive=True)

        t_ours, r_ours = _measure(server, ours)
        t_base, r_base = _measure(server, lambda: generic("generic"))
        yield Row.vs(f"first sync, {runs} runs ({files} files)", t_ours, "s",
                     "fs.put recursive", t_base, at_most=1.5)  # fmt: skip
        yield Row.vs("  its requests", r_ours, "req", "fs.put recursive", r_base)
        t_noop, r_noop = _measure(server, ours)
        t_again, r_again = _measure(server, lambda: generic("generic"))
        yield Row.vs("no-op re-sync", t_noop, "s", "fs.put again", t_again, at_most=0.5)
        yield Row.vs("  its requests", r_noop, "req", "fs.put again", r_again)
        yield Row.limit("  requests per run", r_noop / runs, "req/run", at_most=1.1)

        large = work / "large"
        nbytes = _large_run(large, records)
        mb = nbytes / 1e6

        def large_ours() -> None:
            assert sync(str(large), f"s3://{_BUCKET}/large", dst_options=options).ok

        t_large, r_large = _measure(server, large_ours)
        t_lbase, r_lbase = _measure(
            server, lambda: fs.put(str(large) + "/", f"{_BUCKET}/large-generic/", recursive=True)
        )
        yield Row.vs(f"one large stage ({mb:.0f} MB)", mb / t_large, "MB/s",
                     "fs.put recursive", mb / t_lbase, at_least=0.7)  # fmt: skip
        yield Row.vs("  its requests", r_large, "req", "fs.put recursive", r_lbase)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
