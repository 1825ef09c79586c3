"""Reading one PDU from an unauthenticated peer: bounded in size, in memory and in time (PS3.8 9.3).

pynetdicom's DUL reads a PDU's 6-byte header, then asks its socket for as many bytes as the header
declares: nothing limits the length (``struct.pack(">BBI", 1, 0, 0xFFFFFFFF)`` declared 4 GiB,
which a pre-allocating reader zeroed at once), and the accepted socket has no timeout, so a peer
that sends half a PDU holds the DUL and association threads, and its association slot, for as
long as it likes (the network timeout only measures the silence *between* PDUs).

:func:`recv_pdu` instead

- refuses a PDU whose declared length is over the limit for its type (an A-ASSOCIATE-RQ over
  :data:`MAX_ASSOCIATE_RQ`, a P-DATA-TF over the maximum length we announced, a release or abort
  PDU over a few bytes) before reading its body;
- never holds more than twice what has arrived, or :data:`FIRST_CHUNK` if that is more;
- gives the whole PDU, header included, ``deadline_seconds`` from its first byte.

:func:`install` makes it an association's reader: a refused PDU is answered with an A-ABORT
(service provider, invalid PDU parameter value: PS3.8 9.3.8) and the connection is closed; a PDU
that does not arrive in time closes the connection. Either way an acceptor still waiting for its
A-ASSOCIATE-RQ is woken at once (it would otherwise wait ``acse_timeout``). It also notes control
characters in the calling AE title (PS3.5 6.2 forbids them; pynetdicom strips them away when it
decodes the title, so ``"\\tSCANNER"`` passed an allow-list naming ``SCANNER``).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_HEADER = struct.Struct(">BBL")
#: The largest A-ASSOCIATE-RQ accepted: 128 presentation contexts of a dozen transfer syntaxes
#: each take about 80 KiB; user identity items (a SAML assertion, a JWT) a few KiB more.
MAX_ASSOCIATE_RQ = 1 << 20
#: What a P-DATA-TF may declare when we announced no maximum (``node.maximum_pdu_size = 0``)
#: beyond the largest instance accepted: the PDV item headers.
P_DATA_OVERHEAD = 1 << 16
#: Release and abort PDUs are 4 bytes long after the header (PS3.8 9.3.6-9.3.8).
_SHORT_PDU = 64
#: The largest buffer allocated for a PDU before its bytes arrive; beyond, it doubles as they do.
FIRST_CHUNK = 1 << 20
#: The longest one read waits before the PDU's deadline is checked again.
WAKE_SECONDS = 0.5
#: PS3.8 Table 9-26: A-ABORT source 2 (service provider), reason 6 (invalid PDU parameter value).
ABORT_INVALID_PARAMETER = bytes((0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x06))
#: Offsets of the called and calling AE titles in an A-ASSOCIATE-RQ PDU (PS3.8 Table 9-11).
_CALLED_AE = slice(10, 26)
_CALLING_AE = slice(26, 42)


class PduType(IntEnum):
    """PDU types (PS3.8 9.3.1)."""

    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class PduRefused(Exception):
    """The PDU header announces a type we do not know or a length over its limit."""

    def __init__(self, pdu_type: int, length: int, limit: int) -> None:
        super().__init__(f"PDU type 0x{pdu_type:02X} declares {length} bytes; the limit is {limit}")
        self.pdu_type, self.length, self.limit = pdu_type, length, limit


class PduIncomplete(Exception):
    """The peer closed the connection, or missed the deadline, in the middle of a PDU."""

    def __init__(self, received: int, expected: int, timed_out: bool) -> None:
        what = "did not arrive in time" if timed_out else "was cut short by the peer"
        super().__init__(f"PDU {what}: {received} of {expected} bytes")
        self.received, self.expected, self.timed_out = received, expected, timed_out


@dataclass(frozen=True)
class PduLimits:
    """What one PDU from the peer may be.

    Attributes
    ----------
    deadline_seconds
        The whole PDU, from its first byte (``node.pdu_timeout``).
    max_p_data
        The largest P-DATA-TF length field: the Maximum Length we announced (PS3.8 D.1), or the
        largest instance plus :data:`P_DATA_OVERHEAD` when we announced none.
    """

    deadline_seconds: float
    max_p_data: int

    def __post_init__(self) -> None:
        # a plain dict: this is looked up once per PDU on the receive path
        by_type = {PduType.P_DATA_TF.value: self.max_p_data, PduType.ASSOCIATE_RQ.value: MAX_ASSOCIATE_RQ,
                   PduType.ASSOCIATE_AC.value: MAX_ASSOCIATE_RQ}
        by_type.update(dict.fromkeys((PduType.ASSOCIATE_RJ.value, PduType.RELEASE_RQ.value,
                                      PduType.RELEASE_RP.value, PduType.ABORT.value), _SHORT_PDU))
        object.__setattr__(self, "_by_type", by_type)

    def max_length(self, pdu_type: int) -> int | None:
        """The largest length *pdu_type* may declare; None for a type that does not exist."""
        limit: int | None = self._by_type.get(pdu_type)  # type: ignore[attr-defined]
        return limit


def limits_for(deadline_seconds: float, maximum_pdu_size: int, max_instance_bytes: int) -> PduLimits:
    """:class:`PduLimits` from the node's settings (see :class:`PduLimits`)."""
    max_p_data = maximum_pdu_size if maximum_pdu_size > 0 else max_instance_bytes + P_DATA_OVERHEAD
    return PduLimits(deadline_seconds, max_p_data)


def prepare(sock: socket.socket, limits: PduLimits) -> None:
    """Give *sock* the read timeout :func:`recv_pdu` relies on (once per connection).

    A fixed timeout, never changed per read: each ``recv_into`` waits at most
    :data:`WAKE_SECONDS` for data, and :func:`recv_pdu` checks its deadline between reads.
    """
    sock.settimeout(min(limits.deadline_seconds, WAKE_SECONDS))


def recv_pdu(sock: socket.socket, limits: PduLimits, clock: Callable[[], float] = time.monotonic) -> bytearray:
    """Read one whole PDU (header included) from *sock* (set up by :func:`prepare`).

    Raises
    ------
    PduRefused
        The header declares an unknown type or a length over :meth:`PduLimits.max_length`; the
        body has not been read.
    PduIncomplete
        The peer closed the connection, or the PDU was not complete ``deadline_seconds`` after
        its first byte (give or take :data:`WAKE_SECONDS`).
    OSError
        The connection broke.
    """
    deadline = clock() + limits.deadline_seconds
    header = bytearray(6)
    _fill(sock, header, 0, deadline, clock, 6)
    pdu_type, _, length = _HEADER.unpack(header)
    limit = limits.max_length(pdu_type)
    if limit is None or length > limit:
        raise PduRefused(pdu_type, length, limit or 0)
    total = 6 + length
    # one buffer of the PDU's size up to FIRST_CHUNK; beyond, it grows with what arrives (at most
    # doubling), never to what the peer merely declared
    buffer = bytearray(min(total, FIRST_CHUNK))
    buffer[:6] = header
    filled = _fill(sock, buffer, 6, deadline, clock, total)
    while filled < total:
        buffer.extend(bytes(min(total - filled, filled)))
        filled = _fill(sock, buffer, filled, deadline, clock, total)
    return buffer


def _fill(sock: socket.socket, buffer: bytearray, filled: int, deadline: float,
          clock: Callable[[], float], expected: int) -> int:
    """Fill *buffer* from *filled* to its end before *deadline*; return its length."""
    view = memoryview(buffer)
    end = len(buffer)
    try:
        while filled < end:
            try:
                n = sock.recv_into(view[filled:])
            except TimeoutError:
                n = -1
            if n == 0:
                raise PduIncomplete(filled, expected, timed_out=False)
            if n > 0:
                filled += n
            if filled < end and clock() >= deadline:
                raise PduIncomplete(filled, expected, timed_out=True)
    finally:
        view.release()
    return filled


def has_control_characters(title: bytes) -> bool:
    """Whether an AE title field holds a control character or a backslash (PS3.5 6.2)."""
    return any(b < 0x20 or b == 0x7F or b == 0x5C for b in title)


def install(assoc: Any, limits: PduLimits, on_dropped: Callable[[Any], None] | None = None) -> None:
    """Make *assoc*'s DUL read PDUs through :func:`recv_pdu` (an acceptor, before it starts).

    Parameters
    ----------
    assoc
        A pynetdicom ``Association`` (acceptor).
    limits
        What a PDU may be.
    on_dropped
        Called with *assoc* when the connection is closed for a refused or incomplete PDU.

    Notes
    -----
    Replaces ``DULServiceProvider._read_pdu_data`` (pynetdicom 3.0), keeping its contract: the
    decoded PDU goes on ``_recv_pdu`` and its event (Evt3-Evt16) on the event queue; Evt17 when
    the transport closes, Evt19 when the PDU cannot be decoded (PS3.8 9.2).
    """
    dul = assoc.dul
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        prepare(sock, limits)

    def read_pdu_data() -> None:
        transport = dul.socket
        sock = getattr(transport, "socket", None)
        if sock is None:
            dul.event_queue.put("Evt17")
            return
        try:
            data = recv_pdu(sock, limits)
        except PduRefused as exc:
            log.warning("pdu_refused", peer=_peer(assoc), pdu_type=f"0x{exc.pdu_type:02X}",
                        declared_bytes=exc.length, limit_bytes=exc.limit, action="A-ABORT and close")
            abort(assoc, on_dropped)
            return
        except PduIncomplete as exc:
            if exc.timed_out or exc.received:
                log.warning("pdu_incomplete", peer=_peer(assoc), received_bytes=exc.received,
                            expected_bytes=exc.expected, timed_out=exc.timed_out,
                            deadline_seconds=limits.deadline_seconds)
            _drop(assoc, on_dropped)
            return
        except OSError:
            _drop(assoc, on_dropped)
            return
        if data[0] == PduType.ASSOCIATE_RQ and len(data) >= _CALLING_AE.stop:
            assoc.dmg_bad_ae_title = (has_control_characters(bytes(data[_CALLING_AE]))
                                      or has_control_characters(bytes(data[_CALLED_AE])))
        try:
            pdu, event = dul._decode_pdu(data)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            log.warning("pdu_undecodable", peer=_peer(assoc), pdu_type=f"0x{data[0]:02X}",
                        error=f"{type(exc).__name__}: {exc}"[:300])
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    dul._read_pdu_data = read_pdu_data


def abort(assoc: Any, on_dropped: Callable[[Any], None] | None = None) -> None:
    """Send an A-ABORT (service provider, invalid PDU parameter value) and close the connection.

    For the DUL thread itself: pynetdicom's ``Association.abort`` waits for that thread to stop.
    """
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        _send_quietly(sock, ABORT_INVALID_PARAMETER)
    _drop(assoc, on_dropped)


def _drop(assoc: Any, on_dropped: Callable[[Any], None] | None) -> None:
    """Close the transport (Evt17) and wake an acceptor still waiting for its A-ASSOCIATE-RQ."""
    dul = assoc.dul
    # Sta1: the DUL is reading the first PDU before it processed the connection (Evt5)
    waiting_for_request = dul.state_machine.current_state in ("Sta1", "Sta2")
    transport = dul.socket
    if transport is not None and transport.socket is not None and transport._is_connected:
        transport.close()  # puts Evt17 on the event queue
    else:
        dul.event_queue.put("Evt17")
    if waiting_for_request:
        # pynetdicom's acceptor treats None as "no A-ASSOCIATE-RQ within acse_timeout": it stops
        # the DUL and ends the thread now instead of in acse_timeout seconds.
        dul.to_user_queue.put(None)
    if on_dropped is not None:
        on_dropped(assoc)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass  # the peer is gone or not reading: closing is what matters


def _peer(assoc: Any) -> str:
    info = assoc.requestor
    return f"{info.address}:{info.port}"
