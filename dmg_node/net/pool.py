"""Receive on every core: a supervisor that accepts and hands each connection to a worker process.

One Python process serves its associations under one interpreter lock: with eight senders at once
a single-process node stored 0.39x what Orthanc did (issue 23). With ``[node] workers`` > 1 the
node process (the supervisor: it holds the spool lock and runs assembly, jobs and the outbox, as
before) listens and accepts, counts the connection (:class:`~dmg_node.net.ledger.Ledger`: pending
connections, per-peer caps and ``maximum_associations`` stay global), and passes the socket over
a Unix control channel to the worker with the fewest open connections
(:mod:`dmg_node.net.worker`). Workers store into the same spool and index, durably, before they
answer Success, exactly as a single-process node does.

A worker that dies (even ``kill -9``) loses only what it had not acknowledged; its connections are
forgotten and a new worker takes its place. :meth:`ReceiverPool.stop` stops accepting, asks each
worker to let its associations finish within the grace period, and kills what is left after it.
The pool has the :class:`~dmg_node.net.scp.Receiver` interface the node uses.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from dmg_node import metrics
from dmg_node.config import Settings
from dmg_node.errors import ReceiveError
from dmg_node.net.control import Channel, ChannelClosed, pair
from dmg_node.net.gate import GatedServer
from dmg_node.net.ledger import Ledger
from dmg_node.net.scp import Receiver
from dmg_node.storage.spool import Spool

log = structlog.get_logger(__name__)

#: How long start() waits for every worker to say it is ready.
READY_TIMEOUT_SECONDS = 60.0
#: A worker that dies sooner than this after its start is restarted with a growing delay.
CRASH_LOOP_SECONDS = 5.0
MAX_RESTART_DELAY_SECONDS = 30.0


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: Channel
    started: float = field(default_factory=time.monotonic)
    ready: threading.Event = field(default_factory=threading.Event)
    pid: int = 0


class DispatchServer(GatedServer):
    """Listens and accepts; each admitted connection goes to a worker instead of a thread here."""

    pool: ReceiverPool

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        conn_id, reason = self.pool.ledger.admit(host)
        if conn_id is None:
            self.log_refused(host, str(reason))
            return False
        self.pool.admitted[id(request)] = conn_id
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        conn_id = self.pool.admitted.pop(id(request))
        try:
            self.pool.dispatch(conn_id, request, client_address)
        except Exception as exc:  # noqa: BLE001 - the accept loop must live, and the count must not leak
            self.pool.ledger.closed(conn_id)
            log.error("connection_failed", peer=str(client_address[0]), error=f"{type(exc).__name__}: {exc}")
        finally:
            request.close()  # the worker holds its own descriptor now (or the connection is refused)


class ReceiverPool:
    """The receive supervisor: a listening socket here, associations in ``workers`` processes."""

    def __init__(self, settings: Settings, spool: Spool, workers: int) -> None:
        if workers < 2:
            raise ValueError("a receiver pool needs at least 2 workers; use Receiver for one process")
        self.settings = settings
        self.spool = spool
        self.size = workers
        node = settings.node
        self.ledger = Ledger(node.max_pending_connections, node.max_pending_per_peer, node.maximum_associations)
        self.admitted: dict[int, int] = {}
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Any = None
        self._restarts: dict[int, int] = {}
        self._turn = -1
        # an AE only to build the listening server with (the workers' AEs do the DICOM)
        self._listener = Receiver(settings, spool)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind (a port in use fails at once), start the workers, then accept."""
        node = self.settings.node
        try:
            server = self._listener.ae.make_server((node.host, node.port), server_class=DispatchServer)
        except OSError as exc:
            raise ReceiveError(f"cannot listen on {node.host}:{node.port} ([node] in {self.settings.source}): "
                               f"{exc.strerror or exc}") from exc
        server.pool = self
        server.gate = None
        for index in range(self.size):
            self._spawn(index)
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for w in list(self._workers.values()):
            while not w.ready.wait(0.1):
                code = w.proc.poll()
                if code is not None or time.monotonic() > deadline:
                    server.server_close()
                    self._kill_all()
                    why = (f"exited with status {code}" if code is not None
                           else f"did not start within {READY_TIMEOUT_SECONDS:.0f} s")
                    raise ReceiveError(f"receive worker {w.index} {why}")
        self._server = server
        threading.Thread(target=server.serve_forever, name="accept", daemon=True).start()
        threading.Thread(target=self._watch, name="receive-workers", daemon=True).start()
        log.info("scp_started", ae_title=node.ae_title, host=node.host, port=self.port,
                 maximum_associations=node.maximum_associations, tls=self.settings.tls.enabled,
                 workers=self.size, worker_pids=self.pids(), pynetdicom=self._listener.pynetdicom_version,
                 fast_path=self._listener.fast_path, input_guards=self._listener.guarded)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.settings.node.port

    def active_associations(self) -> int:
        return self.ledger.associations()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid or w.proc.pid for w in sorted(self._workers.values(), key=lambda w: w.index)]

    def apply(self, settings: Settings) -> None:
        """Hot reload: the allow-list and storage policy reach every worker."""
        self.settings = settings
        self._broadcast(("settings", settings))  # a worker being replaced starts with self.settings

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting; workers finish their associations within *grace_seconds*, then go."""
        self._stopping.set()
        if self._server is not None:
            server, self._server = self._server, None
            # socketserver's own shutdown: pynetdicom's also unregisters a server that make_server
            # never registered with its AE
            socketserver.BaseServer.shutdown(server)
            server.server_close()
        workers = self._broadcast(("stop", grace_seconds))
        deadline = time.monotonic() + grace_seconds + 10.0
        killed = 0
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                killed += 1
            w.channel.close()
        log.info("scp_stopped", workers=len(workers), killed_workers=killed)

    # -- workers -------------------------------------------------------------------------------------

    def _broadcast(self, message: tuple[Any, ...]) -> list[_Worker]:
        """Send *message* to every worker (one that has gone is skipped); the workers it went to."""
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            try:
                w.channel.send(message)
            except ChannelClosed:
                pass
        return workers

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = pair()
        cmd = [sys.executable, "-m", "dmg_node.net.worker", str(theirs.fileno())]
        # the worker inherits the spool lock too: a node killed with kill -9 leaves the spool locked
        # until its workers (aborting, see worker.py) have exited, so a new node never shares it
        lock = self.spool.owner_fd
        inherited = (theirs.fileno(),) if lock is None else (theirs.fileno(), lock)
        try:
            proc = subprocess.Popen(cmd, pass_fds=inherited, stdin=subprocess.DEVNULL, close_fds=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        w = _Worker(index, proc, Channel(ours))
        with self._lock:
            self._workers[index] = w
        w.channel.send(("init", self.settings, index))
        threading.Thread(target=self._read, args=(w,), name=f"receive-worker-{index}", daemon=True).start()
        return w

    def _read(self, w: _Worker) -> None:
        """One worker's messages, until its channel closes."""
        ledger = self.ledger
        while True:
            try:
                message, fds = w.channel.recv()
            except (ChannelClosed, ValueError):
                break
            for fd in fds:
                os.close(fd)
            kind = message[0]
            if kind == "settled":
                ledger.settled(message[1])
            elif kind == "closed":
                ledger.closed(message[1])
            elif kind == "slot?":
                granted = ledger.take_slot(message[1])
                try:
                    w.channel.send(("slot", message[1], granted))
                except ChannelClosed:
                    break
            elif kind == "release_slot":
                ledger.release_slot(message[1])
            elif kind == "metrics":
                metrics.replay(message[1])
            elif kind == "ready":
                w.pid = int(message[1])
                w.ready.set()

    def dispatch(self, conn_id: int, sock: socket.socket, address: Any) -> None:
        """Hand *sock* to the worker with the fewest open connections (another one if that fails).

        Runs on the accept thread only.
        """
        with self._lock:
            workers = [w for w in self._workers.values() if w.proc.poll() is None]
        load = self.ledger.by_worker([w.index for w in workers])
        # ties go round: one sender after another spreads over the workers too
        self._turn = (self._turn + 1) % self.size
        turn = self._turn
        for w in sorted(workers, key=lambda w: (not w.ready.is_set(), load[w.index], (w.index - turn) % self.size)):
            self.ledger.assign(conn_id, w.index)
            try:
                w.channel.send(("conn", conn_id, tuple(address)), fds=(sock.fileno(),))
                return
            except ChannelClosed:
                continue
        self.ledger.closed(conn_id)
        log.error("connection_refused", peer=str(address[0]), reason="no receive worker is running")

    def _watch(self) -> None:
        """Replace workers that exit while the node runs."""
        while not self._stopping.wait(0.2):
            with self._lock:
                dead = [w for w in self._workers.values() if w.proc.poll() is not None]
            for w in dead:
                if self._stopping.is_set():
                    return
                lost = self.ledger.worker_gone(w.index)
                w.channel.close()
                code = w.proc.returncode
                quick = time.monotonic() - w.started < CRASH_LOOP_SECONDS
                self._restarts[w.index] = self._restarts.get(w.index, 0) + 1 if quick else 0
                delay = min(2.0 ** self._restarts[w.index] - 1.0, MAX_RESTART_DELAY_SECONDS)
                log.error("receive_worker_exited", worker=w.index, pid=w.pid or w.proc.pid, returncode=code,
                          connections_lost=lost, restart_in_seconds=delay,
                          note="instances it acknowledged are in the spool; senders resend the rest")
                if delay and self._stopping.wait(delay):
                    return
                try:
                    new = self._spawn(w.index)
                except (OSError, ChannelClosed) as exc:  # e.g. no process could be started: next pass
                    log.error("receive_worker_start_failed", worker=w.index, error=f"{type(exc).__name__}: {exc}")
                    continue
                if new.ready.wait(READY_TIMEOUT_SECONDS):
                    log.info("receive_worker_replaced", worker=w.index, pid=new.pid)

    def _kill_all(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            w.proc.kill()
            w.proc.wait()
            w.channel.close()
