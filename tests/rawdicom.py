"""A raw-socket DICOM association requestor for hostile-input tests (PS3.8 9.3, PS3.7 9.3.1).

Everything is built byte by byte so a test can send what no well-behaved SCU would: lengths that
lie, fragments that never end, control characters in AE titles, backslashes in UIDs. Loopback
only; every socket has a timeout.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Self

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

LOCALHOST = "127.0.0.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(payload)) + payload


def _ae(title: bytes) -> bytes:
    return title.ljust(16, b" ")[:16]


def associate_rq(calling: bytes = b"HOSTILE", called: bytes = b"DMG_NODE",
                 abstract: str = str(MRImageStorage), transfer: str = str(ExplicitVRLittleEndian),
                 max_pdu: int = 16384, extra_contexts: int = 0) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing *abstract* (context 1) and Verification (context 3)."""
    contexts = b""
    for i, uid in enumerate([abstract, VERIFICATION] + [abstract] * extra_contexts):
        sub = _item(0x30, uid.encode()) + _item(0x40, transfer.encode())
        contexts += _item(0x20, bytes((2 * i + 1, 0, 0, 0)) + sub)
    user = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT) + contexts + user)
    return pdu(0x01, body)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("latin-1")
    return raw + b"\x00" if len(raw) % 2 else raw


def command(fields: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_element(e, v) for e, v in fields)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    return command([(0x0002, _uid(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
                    (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 0)),
                    (0x0800, struct.pack("<H", 0x0000)), (0x1000, _uid(sop_instance))])


def c_echo_rq(message_id: int) -> bytes:
    return command([(0x0002, _uid(VERIFICATION)), (0x0100, struct.pack("<H", 0x0030)),
                    (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101))])


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (control: bit 0 command, bit 1 last fragment)."""
    return pdu(0x04, struct.pack(">IBB", len(data) + 2, context_id, control) + data)


class RawAssociation:
    """One TCP connection to the node, with helpers to read whole PDUs back."""

    def __init__(self, port: int, timeout: float = 10.0, source: str = LOCALHOST) -> None:
        self.sock = socket.create_connection((LOCALHOST, port), timeout=timeout, source_address=(source, 0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes]:
        """The next PDU's type and body; (0, b"") when the node closed the connection."""
        header = self._exactly(6)
        if len(header) < 6:
            return 0, b""
        pdu_type, _, length = struct.unpack(">BBI", header)
        return pdu_type, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def associate(self, **kw: Any) -> int:
        """Send an A-ASSOCIATE-RQ; return the answer's PDU type (2 accepted, 3 rejected, 7 aborted)."""
        self.send(associate_rq(**kw))
        return self.read_pdu()[0]

    def response_status(self) -> int | None:
        """The Status (0000,0900) of the next command received, or None if the node closed/aborted."""
        command_bytes = b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type != 0x04:
                return None
            offset = 0
            last = False
            while offset < len(body):
                length, _cx, control = struct.unpack(">IBB", body[offset:offset + 6])
                command_bytes += body[offset + 6:offset + 4 + length]
                last = bool(control & 2)
                offset += 4 + length
            if last:
                break
        offset = 0
        while offset < len(command_bytes):
            _group, element, length = struct.unpack("<HHI", command_bytes[offset:offset + 8])
            if element == 0x0900:
                return int(struct.unpack("<H", command_bytes[offset + 8:offset + 10])[0])
            offset += 8 + length
        return None
