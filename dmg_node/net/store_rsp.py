"""Success C-STORE responses encoded without pydicom on the SCP's hot path (PS3.7 9.3.1.2).

pynetdicom builds every response through a pydicom command-set ``Dataset`` and encodes it with
``write_dataset``: 0.25 ms per C-STORE here, a fifth of what the SCP spends on an image once the
file is written. A Success response has seven fixed elements, so :func:`success_command` encodes
them directly (implicit VR little endian, as every command set is: PS3.7 6.3.1) and
:func:`install` sends it as one P-DATA. Anything else (a failure status with its comment, a
peer with a PDU too small for one fragment, a handler bound to ``EVT_DIMSE_SENT``) takes
pynetdicom's own path. tests/test_store_rsp.py checks the bytes against pynetdicom's.
:func:`response_command` and :func:`send_command` also serve :mod:`dmg_node.net.dimse_guard`, which
answers a refused request itself (on both paths).
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dmg_node.net.part10 import uid_value

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_LAST_COMMAND_FRAGMENT = b"\x03"  # message control header: command, last fragment (PS3.8 E.2)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def success_command(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE-RSP with Status Success (0x0000).

    Parameters
    ----------
    message_id
        Message ID Being Responded To (0000,0120): the request's Message ID.
    sop_class_uid, sop_instance_uid
        Affected SOP Class/Instance UID (0000,0002)/(0000,1000), from the request.

    Raises
    ------
    UnicodeEncodeError, struct.error
        If a UID is not ASCII or the message ID is not an unsigned short.
    """
    return response_command(message_id, 0x0000, sop_class_uid, sop_instance_uid)


def response_command(message_id: int, status: int, sop_class_uid: str | None = None,
                     sop_instance_uid: str | None = None) -> bytes:
    """The command set of a C-STORE-RSP with *status* (PS3.7 9.3.1.2, Table 9.3-2).

    The Affected SOP Class/Instance UIDs of a response are optional (U): pass None to leave out
    one the request carried in a form that cannot be echoed (a backslash, non-ASCII).

    Raises
    ------
    UnicodeEncodeError, struct.error
        If a UID is not ASCII, or the message ID or status is not an unsigned short.
    """
    elements = []
    if sop_class_uid is not None:
        elements.append(_element(0x0002, uid_value(sop_class_uid)))
    elements += [
        _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", status)),
    ]
    if sop_instance_uid is not None:
        elements.append(_element(0x1000, uid_value(sop_instance_uid)))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def send_command(dul: Any, context_id: int, command: bytes) -> None:
    """Queue *command* (a whole command set, no data set) on *dul* as one P-DATA (PS3.8 E.2)."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
    dul.send_pdu(pdata)


def _fast_command(primitive: Any) -> bytes | None:
    """The encoded command set when *primitive* is a plain Success C-STORE response, else None."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status != 0x0000 or primitive.ErrorComment or primitive.OffendingElement:
        return None
    if not primitive.AffectedSOPClassUID or not primitive.AffectedSOPInstanceUID:
        return None
    try:
        return success_command(primitive.MessageIDBeingRespondedTo, primitive.AffectedSOPClassUID,
                               primitive.AffectedSOPInstanceUID)
    except (UnicodeEncodeError, struct.error):
        return None


def install(assoc: Any) -> None:
    """Send *assoc*'s Success C-STORE responses through :func:`success_command`."""
    dimse = assoc.dimse
    pynetdicom_send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        command = _fast_command(primitive)
        max_pdu = dimse.maximum_pdu_size
        if (command is None or (max_pdu and len(command) + 6 > max_pdu)
                or assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            pynetdicom_send(primitive, context_id)
            return
        send_command(dimse.dul, context_id, command)

    dimse.send_msg = send_msg
