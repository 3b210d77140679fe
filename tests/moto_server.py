"""moto's S3 server on 127.0.0.1, one request at a time: ``python tests/moto_server.py PORT``.

moto checks ``If-None-Match: *`` and then stores the object without a lock, so on its
threaded server racing create-only PUTs can all succeed (seen here: 3 winners of 4);
S3 itself makes the check and the write one step. Serving requests one at a time
gives the test server S3's semantics. Used by tests/fixtures_s3.py and
bench/bench_sync.py.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

_app = DomainDispatcherApplication(create_backend_app)
_lock = threading.Lock()


def one_at_a_time(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with _lock:
        return [b"".join(_app(environ, start_response))]


if __name__ == "__main__":
    run_simple("127.0.0.1", int(sys.argv[1]), one_at_a_time, threaded=True)
