"""Tests for dmg_node.net.ledger (global counts over receive workers) and dmg_node.net.control."""

from __future__ import annotations

import os
import socket

import pytest

from dmg_node import metrics
from dmg_node.net.control import Channel, ChannelClosed, pair
from dmg_node.net.ledger import Ledger


def test_pending_connections_are_capped_in_total_and_per_peer() -> None:
    ledger = Ledger(max_pending=3, max_pending_per_peer=2, max_associations=10)
    a, _ = ledger.admit("10.0.0.1")
    b, _ = ledger.admit("10.0.0.1")
    refused, reason = ledger.admit("10.0.0.1")
    assert a and b and refused is None and "max_pending_per_peer" in str(reason)
    c, _ = ledger.admit("10.0.0.2")
    refused, reason = ledger.admit("10.0.0.3")
    assert c and refused is None and "max_pending_connections" in str(reason)
    ledger.settled(a)  # associated: no longer pending
    d, _ = ledger.admit("10.0.0.3")
    assert d is not None and ledger.pending() == 3


def test_association_slots_go_to_the_first_comers_and_come_back() -> None:
    ledger = Ledger(max_pending=10, max_pending_per_peer=10, max_associations=2)
    ids = [ledger.admit("h")[0] for _ in range(3)]
    for i, w in zip(ids, (0, 1, 0)):
        assert i is not None
        ledger.assign(i, w)
    assert [ledger.take_slot(i) for i in ids if i] == [True, True, False]
    assert ledger.take_slot(ids[0] or 0)  # asking again keeps the slot, takes no second one
    ledger.release_slot(ids[1] or 0)  # refused for another reason
    assert ledger.take_slot(ids[2] or 0) and ledger.associations() == 2
    ledger.closed(ids[0] or 0)
    assert ledger.associations() == 1


def test_a_dead_worker_leaks_nothing() -> None:
    ledger = Ledger(max_pending=2, max_pending_per_peer=2, max_associations=1)
    a, _ = ledger.admit("h")
    b, _ = ledger.admit("h")
    assert a and b
    ledger.assign(a, 0)
    ledger.assign(b, 1)
    assert ledger.take_slot(a)
    assert ledger.by_worker([0, 1]) == {0: 1, 1: 1}
    assert ledger.worker_gone(0) == 1
    assert ledger.associations() == 0 and ledger.pending() == 1
    assert ledger.take_slot(b)


def test_control_channel_carries_messages_and_descriptors() -> None:
    ours, theirs = pair()
    left, right = Channel(ours), Channel(theirs)
    r, w = os.pipe()
    try:
        left.send(("conn", 7, ("127.0.0.1", 4242)), fds=(w,))
        message, fds = right.recv()
        assert message == ("conn", 7, ("127.0.0.1", 4242)) and len(fds) == 1
        os.write(fds[0], b"x")  # the duplicated descriptor is the same pipe
        os.close(fds[0])
        assert os.read(r, 1) == b"x"
        right.send(("ready", 1))
        assert left.recv() == (("ready", 1), [])
    finally:
        os.close(r)
        os.close(w)
    left.close()
    with pytest.raises(ChannelClosed):
        right.recv()
    with pytest.raises(ChannelClosed):
        right.send(("closed", 1))
    theirs.close()


def test_a_malformed_control_message_is_refused() -> None:
    ours, theirs = pair()
    ours.sendall(b"\x80\x05N.")  # pickled None: not a message tuple
    with pytest.raises(ValueError, match="malformed"):
        Channel(theirs).recv()
    ours.close()
    theirs.close()


def test_forwarded_receive_events_count_in_the_supervisor() -> None:
    sink: list[tuple[object, ...]] = []
    before = metrics.RECEIVED_BYTES._value.get()
    metrics.forward_to(sink.append)
    try:
        metrics.stored(100, 0.001)
        metrics.store_failed("out_of_resources")
        metrics.association("accepted")
    finally:
        metrics.forward_to(None)
    assert metrics.RECEIVED_BYTES._value.get() == before  # not counted in the worker
    assert [e[0] for e in sink] == ["stored", "store_failed", "association"]
    metrics.replay(sink)
    assert metrics.RECEIVED_BYTES._value.get() == before + 100


def test_auto_workers_follow_the_core_count() -> None:
    from dmg_node import config

    node = config.from_dict({}).node
    assert node.workers == 0
    assert node.receive_workers(cpus=1) == 1 and node.receive_workers(cpus=2) == 2
    assert node.receive_workers(cpus=64) == config.MAX_AUTO_WORKERS
    assert config.from_dict({"node": {"workers": 3}}).node.receive_workers(cpus=64) == 3
    with pytest.raises(config.ConfigError):
        config.from_dict({"node": {"workers": -1}})


def test_socketpair_is_seqpacket() -> None:
    ours, theirs = pair()
    assert ours.type == socket.SOCK_SEQPACKET and theirs.get_inheritable()
    ours.close()
    theirs.close()
