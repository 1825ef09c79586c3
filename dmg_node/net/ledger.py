"""The receive supervisor's count of connections and associations across all worker processes.

With several receive workers (``[node] workers``) every limit on what peers can hold stays one
limit for the node, decided in one place (issue 23):

- ``max_pending_connections`` / ``max_pending_per_peer``: connections not yet associated are
  counted here at ``accept`` (before the connection goes to a worker) and stop counting when the
  worker reports them associated, rejected or closed;
- ``maximum_associations``: a worker negotiating an association asks for a slot
  (:meth:`Ledger.take_slot`); the first comers get one, the excess is refused, as
  :class:`dmg_node.net.admission.AdmittingAE` does within one process;
- a worker that dies takes its connections with it (:meth:`Ledger.worker_gone`), so a killed
  worker never leaks slots.

Pure bookkeeping behind a lock; no sockets here (:mod:`dmg_node.net.pool` does the I/O).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from dmg_node.net.gate import pending_refusal


@dataclass
class _Conn:
    host: str
    worker: int | None
    since: float
    pending: bool = True
    slot: bool = False


class Ledger:
    """Connections by id: where each went, whether it is still pending, whether it holds a slot."""

    def __init__(self, max_pending: int, max_pending_per_peer: int, max_associations: int) -> None:
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.max_associations = max_associations
        self._lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._next = 1

    def admit(self, host: str, now: float | None = None) -> tuple[int | None, str | None]:
        """A new connection from *host*: its id, or None and why it is refused (too many pending)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            reason = pending_refusal([c.host for c in self._conns.values() if c.pending], host, self.max_pending,
                                     self.max_pending_per_peer)
            if reason is not None:
                return None, reason
            conn_id = self._next
            self._next += 1
            self._conns[conn_id] = _Conn(host, None, now)
            return conn_id, None

    def assign(self, conn_id: int, worker: int) -> None:
        """Connection *conn_id* was handed to *worker*."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.worker = worker

    def settled(self, conn_id: int) -> None:
        """Associated or rejected: no longer pending (a slot, if taken, is kept)."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.pending = False

    def take_slot(self, conn_id: int) -> bool:
        """Give *conn_id* an association slot if one is free; True when it holds one."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None:
                return False
            if conn.slot:
                return True
            if sum(1 for c in self._conns.values() if c.slot) >= self.max_associations:
                return False
            conn.slot = True
            return True

    def release_slot(self, conn_id: int) -> None:
        """The association was refused for another reason: its slot goes back."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.slot = False

    def closed(self, conn_id: int) -> None:
        """The connection ended: it counts nowhere any more."""
        with self._lock:
            self._conns.pop(conn_id, None)

    def worker_gone(self, worker: int) -> int:
        """Forget every connection of a worker that exited; the number forgotten."""
        with self._lock:
            gone = [k for k, c in self._conns.items() if c.worker == worker]
            for k in gone:
                del self._conns[k]
            return len(gone)

    def by_worker(self, workers: list[int]) -> dict[int, int]:
        """Open connections per worker (0 for a worker with none)."""
        with self._lock:
            counts = dict.fromkeys(workers, 0)
            for c in self._conns.values():
                if c.worker in counts:
                    counts[c.worker] += 1
            return counts

    def associations(self) -> int:
        """Associations holding a slot now, over all workers."""
        with self._lock:
            return sum(1 for c in self._conns.values() if c.slot)

    def pending(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns.values() if c.pending)
