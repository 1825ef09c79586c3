"""The waking acceptor reactor keeps pynetdicom's behaviour: serve, release, abort, idle timeout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from structlog.testing import capture_logs

from dmg_node.net import reactor
from tests.support import LOCALHOST, running_receiver, write_series

pytestmark = pytest.mark.network


def _scu() -> AE:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def test_associations_run_the_waking_reactor(tmp_path: Path) -> None:
    """Each accepted association runs waking_reactor; C-ECHO and C-STORE are answered, release is clean."""
    [path] = write_series(tmp_path / "in", 1)
    with running_receiver(tmp_path / "spool", min_free_mb=0) as rx, capture_logs() as logs:
        assoc = _scu().associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        assert assoc.is_established
        [server_side] = [a for a in rx.ae.active_associations if a.is_acceptor]
        assert server_side._run_reactor.__func__ is reactor.waking_reactor
        assert server_side.dul._read_pdu_data.__qualname__ == "install.<locals>.read_pdu_data"  # pdu_reader
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
        assert assoc.is_released
        deadline = time.monotonic() + 5
        while rx.active_associations() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.active_associations() == 0
    assert any(e["event"] == "association_released" and e["stored"] == 1 for e in logs)


def test_peer_abort_ends_the_association(tmp_path: Path) -> None:
    """An A-ABORT from the peer ends the acceptor thread and is logged as association_aborted."""
    with running_receiver(tmp_path / "spool", min_free_mb=0) as rx, capture_logs() as logs:
        assoc = _scu().associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        assert assoc.is_established
        assoc.abort()
        deadline = time.monotonic() + 5
        while rx.active_associations() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.active_associations() == 0
    assert any(e["event"] == "association_aborted" for e in logs)


def test_idle_association_is_ended_after_network_timeout(tmp_path: Path) -> None:
    """A peer that goes silent is dropped once node.network_timeout has passed, not before."""
    with running_receiver(tmp_path / "spool", min_free_mb=0, node={"network_timeout": 0.5}) as rx:
        # from before the request: the node's idle timer starts when it receives the A-ASSOCIATE-RQ,
        # which a loaded machine can do well before associate() returns here
        t0 = time.monotonic()
        assoc = _scu().associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        assert assoc.is_established
        while assoc.is_established and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        waited = time.monotonic() - t0
    assert not assoc.is_established and 0.4 <= waited < 5, waited


@pytest.mark.perf
def test_an_idle_association_does_not_spin(tmp_path: Path) -> None:
    """With the DUL waiting in select instead of sleeping 0 s, an open, idle association costs
    little CPU (pynetdicom's own loop wakes every millisecond; so does this one)."""
    with running_receiver(tmp_path / "spool", min_free_mb=0) as rx:
        assoc = _scu().associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        assert assoc.is_established
        [server_side] = [a for a in rx.ae.active_associations if a.is_acceptor]
        assert server_side.dul._run_loop_delay == 0.0
        time.sleep(0.2)
        # The acceptor's DUL thread's own CPU clock: threads other tests left behind in this
        # process (and the client side) must not count.
        clock = time.pthread_getcpuclockid(server_side.dul.ident)
        cpu0, wall0 = time.clock_gettime(clock), time.monotonic()
        time.sleep(1.0)
        share = (time.clock_gettime(clock) - cpu0) / (time.monotonic() - wall0)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert share < 0.15, f"{share:.0%} of a core while idle"  # 6 % measured; a spinning DUL thread would use most of a core


def test_c_store_is_served_on_the_dul_thread_when_the_association_is_idle(tmp_path: Path) -> None:
    """InlineStoreQueue: an idle association's C-STORE runs on the DUL thread (no hand-off), and
    C-ECHO and C-STORE still alternate correctly on one association."""
    paths = write_series(tmp_path / "in", 3)
    with running_receiver(tmp_path / "spool", min_free_mb=0) as rx:
        threads: list[threading.Thread] = []
        store = rx.spool.store

        def spy(*args: object, **kwargs: object) -> object:
            threads.append(threading.current_thread())
            return store(*args, **kwargs)

        rx.spool.store = spy
        assoc = _scu().associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        [server_side] = [a for a in rx.ae.active_associations if a.is_acceptor]
        assert isinstance(server_side.dimse.msg_queue, reactor.InlineStoreQueue)
        for path in paths:
            assert assoc.send_c_echo().Status == 0x0000
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
        assert rx.spool.instance_count() == 3
    assert threads == [server_side.dul] * 3


def test_a_slow_store_is_not_cut_off_by_the_network_timeout(tmp_path: Path) -> None:
    """A handler slower than node.network_timeout (a disk stall) is waited for, as pynetdicom does,
    and the peer gets its Success; the timeout counts the peer's silence only."""
    [path] = write_series(tmp_path / "in", 1)
    with running_receiver(tmp_path / "spool", min_free_mb=0, node={"network_timeout": 0.5}) as rx:
        store = rx.spool.store

        def slow(*args: object, **kwargs: object) -> object:
            time.sleep(1.2)
            return store(*args, **kwargs)

        rx.spool.store = slow
        assoc = _scu().associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assert assoc.is_established
        assoc.release()
        assert rx.spool.instance_count() == 1
