"""Event-driven waits for the two polling loops of pynetdicom's acceptor associations.

Acceptor reactor: wake when a DIMSE message arrives instead of every millisecond.

pynetdicom's acceptor reactor (``Association._run_reactor``, pynetdicom 3.x) sleeps 1 ms, then
looks for a decoded DIMSE message without blocking. With one synchronous C-STORE after another
the next request waits on average half of that sleep (and often a whole one) before its handler
runs, a sixth of an image's time here. :func:`waking_reactor` is the same loop, step for step,
except that it waits on the DIMSE message queue for up to the same millisecond, so a request is
served as soon as the DUL thread has decoded it. Release, abort, DUL-death and idle-timeout
checks run on every pass exactly as before (at least once a millisecond).

DUL reactor: pynetdicom's DUL thread looks at its socket and at its outgoing queue without
blocking and sleeps ``_run_loop_delay`` when both were idle, so each PDU that arrives and each
response that leaves waits for that sleep to end (0.2 ms even when shortened as
:data:`dmg_node.receive.DUL_POLL_SECONDS`). :func:`install` sets the sleep to 0 and makes the
idle check block in ``select`` on the socket and on an eventfd that ``send_pdu`` signals, for up
to the same millisecond; the loop itself stays pynetdicom's. +16 % images/s on tmpfs, where the
disk does not hide it (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import types
import weakref
from typing import Any

from pynetdicom import evt

LOGGER = logging.getLogger("pynetdicom.assoc")

#: The most the loop waits for a DIMSE message before its other checks (pynetdicom's sleep).
WAIT_SECONDS = 0.001


def install(assoc: Any) -> None:
    """Make *assoc* (an acceptor, before it starts) and its DUL wait on events instead of sleeping."""
    assoc._run_reactor = types.MethodType(waking_reactor, assoc)
    _wake_dul_on_events(assoc.dul)


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
        if sock is None or dul.to_provider_queue.qsize() or not dul.event_queue.empty():
            return False  # something to do (or nothing to wait on): straight back to the loop
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
    """pynetdicom's acceptor reactor with a blocking wait on the DIMSE queue instead of a sleep."""

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

        if self.dul.idle_timer_expired():
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
