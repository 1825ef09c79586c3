"""Event-driven waits for the two polling loops of pynetdicom's acceptor associations.

Acceptor reactor: wake when a DIMSE message arrives instead of every millisecond.

pynetdicom's acceptor reactor (``Association._run_reactor``, pynetdicom 3.x) sleeps 1 ms, then
looks for a decoded DIMSE message without blocking. With one synchronous C-STORE after another
the next request waits on average half of that sleep (and often a whole one) before its handler
runs, a sixth of an image's time here. :func:`waking_reactor` is the same loop, step for step,
except that it waits on the DIMSE message queue for up to the same millisecond, so a request is
served as soon as the DUL thread has decoded it. Release, abort and DUL-death checks run on every
pass exactly as before (at least once a millisecond); the idle-timeout check too, except while a
request is being served (see below and :func:`waking_reactor`).

DUL reactor: pynetdicom's DUL thread looks at its socket and at its outgoing queue without
blocking and sleeps ``_run_loop_delay`` when both were idle, so each PDU that arrives and each
response that leaves waits for that sleep to end (0.2 ms even when shortened as
:data:`dmg_node.net.tuning.DUL_POLL_SECONDS`). :func:`install` sets the sleep to 0 and makes the
idle check block in ``select`` on the socket and on an eventfd that ``send_pdu`` signals, for up
to the same millisecond; the loop itself stays pynetdicom's. +16 % images/s on tmpfs, where the
disk does not hide it (docs/benchmarks.md).

Socket reads: :mod:`dmg_node.net.pdu_reader` (installed first, on every supported version) reads
each PDU with large ``recv_into`` calls, bounded in size and time.

C-STOREs served on the DUL thread: a request decoded by the DUL thread is normally queued for the
association's thread, which runs the handler and queues the response back: two thread hand-offs
per image, each a wake-up of a sleeping thread. When the association thread is idle (nothing
queued, not serving, not paused by a request of ours) :class:`InlineStoreQueue` serves a C-STORE
request right away on the DUL thread instead; the response then leaves on the DUL loop's next
pass. A lock keeps one request served at a time, whichever thread serves it. Everything else
(C-ECHO, release, abort, anything while a request is being served) takes pynetdicom's path.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
import types
import weakref
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

LOGGER = logging.getLogger("pynetdicom.assoc")

#: The most the loop waits for a DIMSE message before its other checks (pynetdicom's sleep).
WAIT_SECONDS = 0.001


def install(assoc: Any) -> None:
    """Make *assoc* (an acceptor, before it starts) and its DUL wait on events instead of sleeping."""
    assoc._run_reactor = types.MethodType(waking_reactor, assoc)
    assoc.dimse.msg_queue = InlineStoreQueue(assoc)
    _wake_dul_on_events(assoc.dul)


class InlineStoreQueue(queue.Queue):  # type: ignore[type-arg]
    """The DIMSE message queue of an acceptor; a C-STORE request put while idle is served at once.

    ``put`` runs on the DUL thread (pynetdicom's ``DIMSEServiceProvider.receive_primitive``).
    ``serving`` is held while any request is served, on either thread (see :func:`waking_reactor`).
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self.assoc = assoc
        self.serving = threading.Lock()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, msg = item
        assoc = self.assoc
        if (
            isinstance(msg, C_STORE) and msg.is_valid_request and assoc.is_established
            and assoc._reactor_checkpoint.is_set() and self.empty() and self.serving.acquire(blocking=False)
        ):
            try:
                assoc._serve_request(msg, context_id)
            finally:
                self.serving.release()
                assoc.dul._idle_timer.restart()  # the handler's time is not the peer's silence
            return
        super().put(item, block, timeout)


def _wake_dul_on_events(dul: Any) -> None:
    """Replace the DUL loop's idle sleep by a ``select`` on its socket and an eventfd."""
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    weakref.finalize(dul, os.close, wake)
    pynetdicom_check = dul._is_transport_event
    pynetdicom_send_pdu = dul.send_pdu

    def send_pdu(primitive: Any) -> None:
        pynetdicom_send_pdu(primitive)
        os.eventfd_write(wake, 1)

    def is_transport_event() -> bool:
        if pynetdicom_check():
            return True
        sock = getattr(dul.socket, "socket", None)
        if dul.to_provider_queue.qsize() or not dul.event_queue.empty():
            return False  # something to do: straight back to the loop
        if sock is None:
            # closed, the thread not yet stopped: pace the loop as pynetdicom's sleep would
            time.sleep(WAIT_SECONDS)
            return False
        try:
            ready, _, _ = select.select([sock, wake], [], [], WAIT_SECONDS)
        except (OSError, ValueError):
            return False  # the socket went away: pynetdicom's own check reports it next pass
        if wake in ready:
            os.eventfd_read(wake)
        return False

    dul.send_pdu = send_pdu
    dul._is_transport_event = is_transport_event
    dul._run_loop_delay = 0.0


def waking_reactor(self: Any) -> None:
    """pynetdicom's acceptor reactor with a blocking wait on the DIMSE queue instead of a sleep.

    A request it serves holds the queue's ``serving`` lock (so the DUL thread serves none
    meanwhile), and the network timeout is not checked while a request is being served on
    either thread: as in pynetdicom, where the loop is busy in the handler, a slow handler (a
    disk stall) is waited for.
    """

    self._is_paused = False
    while not self._kill:
        # The reactor may be paused by send_*() on the acceptor (see pynetdicom): wait until it
        # is released before touching the DIMSE queue.
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = self.dimse.msg_queue.get(timeout=WAIT_SECONDS)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            with self.dimse.msg_queue.serving:
                self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired() and not self.dimse.msg_queue.serving.locked():
            LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return
