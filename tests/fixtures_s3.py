"""An S3 API server (moto) on 127.0.0.1 for the session, and stores inside it.

The server runs as a separate process on a free port with dummy credentials;
tests that need it get the endpoint from `s3_endpoint`. Without ``CI=true`` a
server that cannot start skips those tests; with it, they fail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.fixtures_tools import unavailable

__all__ = [
    "S3_BUCKET",
    "SERVER",
    "s3_endpoint",
    "s3_env",
    "s3_options",
    "s3_requests",
    "s3_server",
    "s3_url",
]

S3_BUCKET = "runfmt-test"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "runfmt-dummy-key",
    "AWS_SECRET_ACCESS_KEY": "runfmt-dummy-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SERVER = str(Path(__file__).with_name("moto_server.py"))
"""The moto server script (tests/moto_server.py), run as ``python SERVER PORT``."""


def _start(port: int, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, SERVER, str(port)]
    env = {**os.environ, **DUMMY_CREDENTIALS}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"moto server exited {proc.returncode}: {err[-500:]}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
        except OSError:
            time.sleep(0.1)
        else:
            return proc, endpoint
    proc.kill()
    raise RuntimeError("moto server did not answer within 30 s")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[str, IO[bytes]]]:
    """A moto S3 server on 127.0.0.1 holding the bucket `S3_BUCKET`: its URL and request log."""
    log = tempfile.TemporaryFile("a+b")  # noqa: SIM115 - open while the server lives; appends only
    try:
        import s3fs

        proc, endpoint = _start(_free_port(), log)
    except (ImportError, RuntimeError) as exc:
        log.close()
        unavailable("an S3 server on 127.0.0.1", str(exc))
    try:
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            key=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        fs.mkdir(S3_BUCKET)
        yield endpoint, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3_endpoint(s3_server: tuple[str, IO[bytes]]) -> str:
    """The URL of the test S3 server."""
    return s3_server[0]


@pytest.fixture
def s3_requests(s3_server: tuple[str, IO[bytes]]) -> Callable[[], list[str]]:
    """A function returning the requests (``"GET /bucket/key"``) served since it was made."""
    log = s3_server[1]
    start = log.seek(0, os.SEEK_END)

    def served() -> list[str]:
        time.sleep(0.1)
        log.seek(start)
        lines = log.read().decode(errors="replace").splitlines()
        return [m[1] for line in lines if (m := re.search(r'"([A-Z]+ \S+) HTTP/1\.1"', line))]

    return served


@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """Storage options that reach the test server (what ``-o`` would pass)."""
    return {
        "endpoint_url": s3_endpoint,
        "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def cli_options(options: dict[str, Any]) -> list[str]:
    """``options`` as the CLI takes them: ``-oKEY=VALUE``, a dict value as JSON."""
    return [f"-o{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in options.items()]


@pytest.fixture
def s3_env(s3_endpoint: str) -> dict[str, str]:
    """Environment for a subprocess that reaches the server with no options given."""
    return {**os.environ, **DUMMY_CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """A fresh, empty ``s3://`` prefix for one test."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"
