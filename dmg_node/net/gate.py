"""A cap on TCP connections that are not yet associations, in total and per peer address.

``maximum_associations`` counts associations once they negotiate. Before that, each accepted
connection costs pynetdicom two threads (the association and its DUL) and is counted nowhere:
400 connections sending half an A-ASSOCIATE-RQ held 822 threads and slowed everyone's C-ECHO to
3.9 s. :class:`GatedServer` refuses a connection at ``accept`` (closing it, before any thread
starts) when ``max_pending`` connections are already waiting for their association, or
``max_pending_per_peer`` from the same address. A connection stops counting as pending when its
association is accepted or rejected, when it is dropped (:mod:`dmg_node.net.pdu_reader`), or
when its thread ends. How long one can stay pending is bounded by ``node.pdu_timeout`` once it
sends a byte and by ``node.acse_timeout`` (the ARTIM timer, PS3.8 9.1.5) before that.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

log = structlog.get_logger(__name__)

#: An entry whose association never started (the handler failed) is forgotten after this.
_UNBOUND_SECONDS = 60.0


@dataclass
class _Pending:
    host: str
    since: float
    assoc: Any = None


class ConnectionGate:
    """Counts connections not yet associated; :meth:`admit` decides on each new one.

    Parameters
    ----------
    max_pending
        Connections waiting for their association, in total (``node.max_pending_connections``).
    max_pending_per_peer
        The same, from one peer address (``node.max_pending_per_peer``).
    """

    def __init__(self, max_pending: int, max_pending_per_peer: int) -> None:
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self._lock = threading.Lock()
        self._pending: dict[object, _Pending] = {}

    def admit(self, key: object, host: str, now: float | None = None) -> str | None:
        """Count connection *key* from *host* as pending; return why not instead when it is refused."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            if len(self._pending) >= self.max_pending:
                return f"{len(self._pending)} connections are already waiting to associate (node.max_pending_connections)"
            same = sum(1 for p in self._pending.values() if p.host == host)
            if same >= self.max_pending_per_peer:
                return f"{same} connections from this address are already waiting to associate (node.max_pending_per_peer)"
            self._pending[key] = _Pending(host, now)
            return None

    def bind(self, key: object, assoc: Any) -> None:
        """Tie pending connection *key* to the association that serves it."""
        with self._lock:
            entry = self._pending.get(key)
            if entry is not None:
                entry.assoc = assoc

    def release(self, assoc: Any) -> None:
        """*assoc* is associated, rejected or gone: its connection no longer counts."""
        with self._lock:
            for key, entry in list(self._pending.items()):
                if entry.assoc is assoc:
                    del self._pending[key]

    def pending(self) -> int:
        with self._lock:
            self._prune(time.monotonic())
            return len(self._pending)

    def _prune(self, now: float) -> None:
        for key, entry in list(self._pending.items()):
            assoc = entry.assoc
            ended = assoc is not None and assoc.ident is not None and not assoc.is_alive()
            if ended or (assoc is None and now - entry.since > _UNBOUND_SECONDS):
                del self._pending[key]


class GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server that asks a :class:`ConnectionGate` before serving a connection."""

    gate: ConnectionGate | None = None
    #: listen() backlog; socketserver's 5 made the kernel drop the SYNs of a burst of callers
    #: (each then retried a second later), so a flood delayed everyone's connect, not only its own.
    request_queue_size = 128

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook, called on the accept thread: False closes the connection at once."""
        gate = self.gate
        if gate is None:
            return True
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        reason = gate.admit(request, host)
        if reason is None:
            return True
        log.warning("connection_refused", peer=f"{host}:{client_address[1]}" if isinstance(client_address, tuple)
                    else host, reason=reason)
        return False


class GatedAE(AE):
    """An AE whose servers are :class:`GatedServer` sharing :attr:`gate` (None: no gate)."""

    gate: ConnectionGate | None = None

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        """pynetdicom's ``make_server`` (as ``start_server`` calls it) with :class:`GatedServer`."""
        kwargs["server_class"] = GatedServer
        server: Any = super().make_server(*args, **kwargs)
        server.gate = self.gate
        return server
