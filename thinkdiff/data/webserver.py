"""A loopback HTTP server for a directory: the demo corpus's stand-in for the web."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        log.debug("http: " + format, *args)


@contextmanager
def serve_directory(directory: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `directory` over HTTP for the duration of the block; yields the base url.

    Binds loopback by default and an ephemeral port, so parallel runs do not collide.
    """
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="thinkdiff-http", daemon=True)
    thread.start()
    base_url = f"http://{host}:{server.server_address[1]}"
    log.info("serving %s at %s", directory, base_url)
    try:
        yield base_url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
