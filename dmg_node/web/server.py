"""uvicorn serving the status app in a daemon thread of the node's process.

The listening socket is bound here, in the caller's thread, so a taken port is known at start-up
and ``port = 0`` gives the real port at once. The page is a convenience: if it cannot start, the
node logs ``web_start_failed`` and goes on receiving and contouring.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import uvicorn

from dmg_node.config import Settings
from dmg_node.web.app import Sources, SpoolView, build_app

log = structlog.get_logger(__name__)

START_TIMEOUT_SECONDS = 10.0


class WebServer:
    """One uvicorn server on a socket already bound; :meth:`stop` ends it and joins its thread."""

    def __init__(self, sources: Sources, sock: socket.socket) -> None:
        self.sock = sock
        self.host, self.port = sock.getsockname()[:2]
        # log_config=None: uvicorn must not reconfigure logging (structlog owns stdout); no access log,
        # so no URL lands in the journal.
        config = uvicorn.Config(build_app(sources), log_config=None, access_log=False, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="web",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("web_started", host=self.host, port=self.port, started=self._server.started)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()
        log.info("web_stopped", clean=not self._thread.is_alive())


def start(settings: Settings, spool: SpoolView, status_path: Path,
          include_phi: Callable[[], bool], warnings: Callable[[], list[dict[str, str]]]) -> WebServer | None:
    """Start the status page if ``[web] enabled``; None when off or when its address cannot be bound."""
    web = settings.web
    if not web.enabled:
        return None
    try:
        sock = socket.create_server((web.host, web.port), reuse_port=False)
    except OSError as exc:
        log.error("web_start_failed", host=web.host, port=web.port, error=exc.strerror or str(exc))
        return None
    server = WebServer(Sources(spool, status_path, include_phi, warnings), sock)
    server.start()
    return server
