"""A receive worker process (``[node] workers`` > 1): serves the associations the supervisor hands it.

Started by :mod:`dmg_node.net.pool` as ``python -m dmg_node.net.worker FD`` with its end of a
control channel (:mod:`dmg_node.net.control`). It runs the same :class:`~dmg_node.net.scp.Receiver`
as a single-process node, with every input guard, writing the same spool and index (SQLite in
WAL mode serializes the short index writes of all workers); what must stay global it asks the
supervisor through :class:`WorkerLink`:

- pending-connection accounting: it reports each connection settled (associated or rejected) and
  closed;
- ``maximum_associations``: an association being negotiated takes a slot from the supervisor;
- receive metrics go to the supervisor, which serves /metrics.

Messages from the supervisor: ``init`` (settings, worker index), ``conn`` (a connection id and the
peer's address, with the socket's descriptor), ``slot`` (the answer to a slot request),
``settings`` (a hot reload), ``stop`` (grace seconds). When the supervisor goes away the worker
stops too. SIGTERM and SIGINT are left to the supervisor, which stops its workers itself (a
service manager signalling the whole process group must not cut associations short).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any

import structlog
from pynetdicom.association import Association

from dmg_node import logs, metrics
from dmg_node.config import Settings
from dmg_node.net.admission import AdmittingAE
from dmg_node.net.control import Channel, ChannelClosed
from dmg_node.net.scp import Receiver
from dmg_node.net.tls import handshake, tls_context
from dmg_node.storage.spool import Spool

log = structlog.get_logger(__name__)

#: How long an association waits for the supervisor's slot decision before it is refused.
SLOT_TIMEOUT_SECONDS = 10.0
#: Metric events are sent to the supervisor in batches this often.
METRICS_EVERY_SECONDS = 0.5
#: Connections whose association thread ended without a close event are reported this often.
PRUNE_EVERY_SECONDS = 2.0


class WorkerLink:
    """The worker's side of the global counts: the Receiver's gate, and the AE's admission.

    Receiver calls :meth:`bind` (connection open), :meth:`release` (associated, rejected or
    dropped), :meth:`closed` (connection closed); the AE calls :meth:`take_slot` while negotiating
    and :meth:`release_slot` when it refuses an association for another reason.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._by_socket: dict[int, int] = {}      # id(socket) -> connection id, until bound
        self._by_assoc: dict[int, tuple[int, Any]] = {}  # id(assoc) -> (connection id, assoc)
        self._settled: set[int] = set()
        self._answers: dict[int, tuple[threading.Event, list[bool]]] = {}
        self._events: list[tuple[Any, ...]] = []

    # -- connections -----------------------------------------------------------------------------

    def expect(self, sock: socket.socket, conn_id: int) -> None:
        """*sock* (handed over by the supervisor) is connection *conn_id*."""
        with self._lock:
            self._by_socket[id(sock)] = conn_id

    def rekey(self, old: socket.socket, new: socket.socket) -> None:
        """The TLS-wrapped socket replaces the plain one."""
        with self._lock:
            conn_id = self._by_socket.pop(id(old), None)
            if conn_id is not None:
                self._by_socket[id(new)] = conn_id

    def forget(self, sock: socket.socket) -> None:
        """*sock* never became an association (a failed TLS handshake): report it closed."""
        with self._lock:
            conn_id = self._by_socket.pop(id(sock), None)
        if conn_id is not None:
            self._send(("closed", conn_id))

    def bind(self, key: object, assoc: Any) -> None:
        with self._lock:
            conn_id = self._by_socket.pop(id(key), None)
            if conn_id is not None:
                self._by_assoc[id(assoc)] = (conn_id, assoc)

    def _conn_id(self, assoc: Any) -> int | None:
        with self._lock:
            entry = self._by_assoc.get(id(assoc))
            return entry[0] if entry is not None else None

    def release(self, assoc: Any) -> None:
        conn_id = self._conn_id(assoc)
        if conn_id is None:
            return
        with self._lock:
            if conn_id in self._settled:
                return
            self._settled.add(conn_id)
        self._send(("settled", conn_id))

    def closed(self, assoc: Any) -> None:
        with self._lock:
            entry = self._by_assoc.pop(id(assoc), None)
            if entry is None:
                return
            self._settled.discard(entry[0])
        self._send(("closed", entry[0]))

    def prune(self) -> None:
        """Report connections whose association thread has ended without a close event."""
        with self._lock:
            ended = [a for _, a in self._by_assoc.values() if a.ident is not None and not a.is_alive()]
        for assoc in ended:
            self.closed(assoc)

    # -- association slots -------------------------------------------------------------------------

    def take_slot(self, assoc: Any) -> bool:
        """Ask the supervisor for one of the node's ``maximum_associations`` slots."""
        conn_id = self._conn_id(assoc)
        if conn_id is None:
            return False
        done, answer = threading.Event(), [False]
        with self._lock:
            self._answers[conn_id] = (done, answer)
        try:
            self._send(("slot?", conn_id))
            if not done.wait(SLOT_TIMEOUT_SECONDS):
                log.warning("association_slot_timeout", seconds=SLOT_TIMEOUT_SECONDS)
                return False
            return answer[0]
        finally:
            with self._lock:
                self._answers.pop(conn_id, None)

    def answer(self, conn_id: int, granted: bool) -> None:
        with self._lock:
            waiting = self._answers.get(conn_id)
        if waiting is not None:
            waiting[1][0] = granted
            waiting[0].set()

    def release_slot(self, assoc: Any) -> None:
        conn_id = self._conn_id(assoc)
        if conn_id is not None:
            self._send(("release_slot", conn_id))

    def ae_class(self) -> type[AdmittingAE]:
        """An AE class whose association limit is the supervisor's (global over the workers)."""
        link = self

        class LinkedAE(AdmittingAE):
            @property
            def active_associations(self) -> list[Association]:
                assocs: list[Association] = super(AdmittingAE, self).active_associations
                me = threading.current_thread()
                if not (isinstance(me, Association) and me.is_acceptor and not me.is_established):
                    return assocs
                # pynetdicom refuses when more acceptors are counted than the limit
                granted = link.take_slot(me)
                return [me] if granted else [me] * (self.maximum_associations + 1)

            def release_slot(self, assoc: Association) -> None:
                link.release_slot(assoc)

        return LinkedAE

    # -- metrics -----------------------------------------------------------------------------------

    def metric(self, event: tuple[Any, ...]) -> None:
        with self._lock:
            self._events.append(event)

    def flush_metrics(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        if events:
            self._send(("metrics", events))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.channel.send(message)
        except ChannelClosed:
            pass  # the supervisor is gone; the control loop stops this worker


def _housekeeping(link: WorkerLink, stop: threading.Event) -> None:
    last_prune = time.monotonic()
    while not stop.wait(METRICS_EVERY_SECONDS):
        link.flush_metrics()
        if time.monotonic() - last_prune >= PRUNE_EVERY_SECONDS:
            last_prune = time.monotonic()
            link.prune()


def _tag_worker(index: int) -> None:
    """Every log line of this process carries ``receive_worker``."""
    config = structlog.get_config()
    processors = list(config["processors"])

    def add(_logger: Any, _method: str, event_dict: Any) -> Any:
        event_dict.setdefault("receive_worker", index)
        return event_dict

    structlog.configure(processors=[add, *processors])


def _serve(receiver: Receiver, link: WorkerLink, sock: socket.socket | ssl.SSLSocket,
           address: tuple[str, int]) -> None:
    try:
        receiver.serve_connection(sock, address)
    except Exception as exc:  # noqa: BLE001 - one bad connection must not end the worker
        log.error("connection_failed", peer=f"{address[0]}:{address[1]}", error=f"{type(exc).__name__}: {exc}")
        link.forget(sock)
        sock.close()


def _serve_tls(receiver: Receiver, link: WorkerLink, ctx: ssl.SSLContext, sock: socket.socket,
               address: tuple[str, int], settings: Settings) -> None:
    wrapped = handshake(ctx, sock, settings.node.acse_timeout, f"{address[0]}:{address[1]}")
    if wrapped is None:
        link.forget(sock)
        sock.close()
        return
    link.rekey(sock, wrapped)
    _serve(receiver, link, wrapped, address)


def run(channel: Channel) -> int:
    """Serve until the supervisor says stop (or goes away); the exit status."""
    message, _fds = channel.recv()
    if message[0] != "init":
        raise SystemExit(f"receive worker: expected init, got {message[0]!r}")
    settings: Settings = message[1]
    index: int = message[2]
    lg = settings.logging
    logs.configure(lg.level, lg.format, lg.include_phi)
    _tag_worker(index)
    link = WorkerLink(channel)
    metrics.forward_to(link.metric)
    spool = Spool(settings.storage.root, fsync=settings.storage.fsync)
    receiver = Receiver(settings, spool, link=link)
    receiver.attach()
    tls = tls_context(settings)
    log.info("receive_worker_ready", pid=os.getpid(), fast_path=receiver.fast_path, input_guards=receiver.guarded,
             tls=tls is not None)
    stop = threading.Event()
    keeper = threading.Thread(target=_housekeeping, args=(link, stop), name="housekeeping", daemon=True)
    keeper.start()
    channel.send(("ready", os.getpid()))
    grace = 30.0
    try:
        while True:
            try:
                message, fds = channel.recv()
            except ChannelClosed:
                # the node process is gone (killed?): a new node may be starting on this spool, so
                # abort at once; senders resend what was not answered
                log.warning("receive_worker_orphaned", action="aborting its associations and exiting")
                grace = 0.0
                break
            kind = message[0]
            if kind == "conn" and fds:
                sock = socket.socket(fileno=fds[0])
                link.expect(sock, message[1])
                if tls is None:
                    _serve(receiver, link, sock, message[2])
                else:  # off the control thread: a stalled handshake holds only its own thread
                    threading.Thread(target=_serve_tls, args=(receiver, link, tls, sock, message[2], settings),
                                     name="tls-handshake", daemon=True).start()
            elif kind == "slot":
                link.answer(message[1], message[2])
            elif kind == "settings":
                new: Settings = message[1]
                if new.logging != settings.logging:
                    logs.configure(new.logging.level, new.logging.format, new.logging.include_phi)
                    _tag_worker(index)
                settings = new
                receiver.apply(new)
            elif kind == "stop":
                grace = float(message[1])
                break
    finally:
        receiver.stop(grace)
        stop.set()
        link.flush_metrics()
        spool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m dmg_node.net.worker FD (started by dmg-node serve, not by hand)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(argv[0])))
    return run(channel)


if __name__ == "__main__":
    sys.exit(main())
