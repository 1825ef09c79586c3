"""recv_pdu reads whole PDUs, refuses lengths over their limit unread, and keeps a deadline."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from dmg_node.net.pdu_reader import (
    MAX_ASSOCIATE_RQ,
    PduIncomplete,
    PduLimits,
    PduRefused,
    has_control_characters,
    limits_for,
    recv_pdu,
)

LIMITS = PduLimits(deadline_seconds=1.0, max_p_data=1 << 20)


def test_a_pdu_sent_in_pieces_comes_back_whole() -> None:
    """All bytes come back in order, however the peer splits them (more than one socket buffer)."""
    payload = bytes(range(256)) * 1024
    data = struct.pack(">BBI", 4, 0, len(payload)) + payload
    ours, peer = socket.socketpair()
    with ours, peer:
        sender = threading.Thread(target=lambda: [peer.sendall(data[i:i + 7000]) or time.sleep(0.0005)
                                                  for i in range(0, len(data), 7000)])
        sender.start()
        got = recv_pdu(ours, LIMITS)
        sender.join()
        assert isinstance(got, bytearray) and got == data


@pytest.mark.parametrize("pdu_type, length", [(1, 0xFFFFFFFF), (4, 0xFFFFFFFF), (1, MAX_ASSOCIATE_RQ + 1),
                                              (4, (1 << 20) + 1), (7, 1000), (9, 4)])
def test_a_length_over_the_limit_is_refused_before_reading(pdu_type: int, length: int) -> None:
    """Six bytes declaring 4 GiB (or an unknown type) are refused at once, without waiting for or holding a body."""
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(struct.pack(">BBI", pdu_type, 0, length))
        t0 = time.monotonic()
        with pytest.raises(PduRefused):
            recv_pdu(ours, LIMITS)
        assert time.monotonic() - t0 < 0.5


def test_a_pdu_trickled_past_its_deadline_times_out() -> None:
    """One byte every 0.1 s never completes a 100-byte PDU within the 1 s deadline from its first byte."""
    ours, peer = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        peer.sendall(struct.pack(">BBI", 4, 0, 100))
        while not stop.wait(0.1):
            try:
                peer.sendall(b"x")
            except OSError:
                return

    with ours, peer:
        sender = threading.Thread(target=trickle)
        sender.start()
        t0 = time.monotonic()
        with pytest.raises(PduIncomplete) as info:
            recv_pdu(ours, LIMITS)
        elapsed = time.monotonic() - t0
        stop.set()
        sender.join()
    assert info.value.timed_out and 0.9 < elapsed < 1.5, elapsed


def test_a_peer_closing_mid_pdu_is_reported() -> None:
    """A connection closed half-way through a PDU raises PduIncomplete (not timed out) at once."""
    ours, peer = socket.socketpair()
    with ours:
        peer.sendall(struct.pack(">BBI", 4, 0, 100) + b"12345")
        peer.close()
        with pytest.raises(PduIncomplete) as info:
            recv_pdu(ours, LIMITS)
    assert not info.value.timed_out and info.value.received == 11


def test_limits_follow_the_announced_maximum() -> None:
    """The P-DATA limit is the maximum PDU we announced, or the largest instance when we announced none."""
    assert limits_for(30, 16384, 1 << 30).max_p_data == 16384
    assert limits_for(30, 0, 1 << 30).max_p_data > 1 << 30


@pytest.mark.parametrize("title, bad", [(b"SCANNER         ", False), (b"\tSCANNER        ", True),
                                        (b"SCAN\nNER        ", True), (b"SCAN\\NER        ", True),
                                        (b"SCANNER\x7f        ", True)])
def test_control_characters_in_ae_titles(title: bytes, bad: bool) -> None:
    """PS3.5 6.2: an AE title has no control characters and no backslash."""
    assert has_control_characters(title) is bad
