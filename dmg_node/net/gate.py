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

import copy
import gc
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

log = structlog.get_logger(__name__)

#: The least time between two full garbage collections on the accept thread.
GC_EVERY_SECONDS = 5.0
#: An entry whose association never started (the handler failed) is forgotten after this.
_UNBOUND_SECONDS = 60.0


def pending_refusal(pending_hosts: Sequence[str], host: str, max_pending: int, max_per_peer: int) -> str | None:
    """Why a new connection from *host* is refused, given the hosts of the connections already
    pending (``node.max_pending_connections``, ``node.max_pending_per_peer``); None: admit it."""
    if len(pending_hosts) >= max_pending:
        return f"{len(pending_hosts)} connections are already waiting to associate (node.max_pending_connections)"
    same = sum(1 for h in pending_hosts if h == host)
    if same >= max_per_peer:
        return f"{same} connections from this address are already waiting to associate (node.max_pending_per_peer)"
    return None


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
            reason = pending_refusal([p.host for p in self._pending.values()], host, self.max_pending,
                                     self.max_pending_per_peer)
            if reason is None:
                self._pending[key] = _Pending(host, now)
            return reason

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
    _last_gc = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def service_actions(self) -> None:
        """socketserver's per-loop hook: pynetdicom's full ``gc.collect()`` at most every few seconds.

        pynetdicom collects every 60 loops (it found dead association threads otherwise linger).
        One collection of the node's heap takes about 0.1 s; a flood of 300 connections a second
        made that five collections a second, holding the GIL from every association.
        """
        now = time.monotonic()
        if now - self._last_gc >= GC_EVERY_SECONDS:
            self._last_gc = now
            gc.collect()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """socketserver's hook, called on the accept thread: False closes the connection at once."""
        gate = self.gate
        if gate is None:
            return True
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        reason = gate.admit(request, host)
        if reason is None:
            return True
        self.log_refused(host, reason)
        return False

    def log_refused(self, host: str, reason: str) -> None:
        """Log a connection closed at accept: one line per address and second (a flood must not
        become a flood of log lines), with the count refused since the last one."""
        self._refused[host] = self._refused.get(host, 0) + 1
        now = time.monotonic()
        if now - self._logged.get(host, 0.0) >= 1.0:
            log.warning("connection_refused", peer=host, refused=self._refused.pop(host), reason=reason)
            self._logged[host] = now
            if len(self._logged) > 10_000:
                self._logged.clear()


class CheapCopyContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, copied for each connection without ``deepcopy``.

    pynetdicom gives each accepted connection ``deepcopy(server.contexts)`` (negotiation sets
    the copy's IDs, results and roles). For the 171 contexts this SCP supports that took 0.03-0.1 s
    of CPU, under the GIL, per TCP connection before a byte was read: a connection flood cost
    everyone seconds. A context's fields are UIDs, numbers and booleans plus one list of transfer
    syntaxes, so a shallow copy with its own list is the same copy (tests/test_hostile.py).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        if not all(hasattr(cx, "_transfer_syntax") for cx in self):  # not pynetdicom 3.0's layout
            return copy.deepcopy(list(self), memo)
        copies = []
        for cx in self:
            dup = copy.copy(cx)
            dup._transfer_syntax = list(cx._transfer_syntax)
            copies.append(dup)
        return copies


class GatedAE(AE):
    """An AE whose servers are :class:`GatedServer` sharing :attr:`gate` (None: no gate)."""

    gate: ConnectionGate | None = None

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        """pynetdicom's ``make_server`` (as ``start_server`` calls it, naming its own threaded server)
        with :class:`GatedServer`, or the subclass of it the caller names."""
        cls = kwargs.get("server_class")
        if not (isinstance(cls, type) and issubclass(cls, GatedServer)):
            kwargs["server_class"] = GatedServer
        server: Any = super().make_server(*args, **kwargs)
        server.gate = self.gate
        server.contexts = CheapCopyContexts(server.contexts)
        return server
