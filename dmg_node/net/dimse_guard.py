"""Bounds on one DIMSE message, and a status for every C-STORE request (PS3.7 9.3.1, PS3.8 E.2).

pynetdicom assembles a message from P-DATA fragments until one carries the last-fragment bit,
with no limit: fragments that never end grew the node by gigabytes. And a C-STORE-RQ whose
command cannot become a request (Affected SOP Instance UID ``\\``, which pydicom reads as two empty
values) was dropped with a log line and no response, so the sender waited for its DIMSE timeout.

:func:`install` wraps an acceptor's ``DIMSEServiceProvider.receive_primitive``:

- a data set larger than ``max_instance_bytes`` is not kept: its fragments are counted and
  dropped, and when its last fragment arrives the request is answered 0xA700 (out of resources)
  on the same association, which goes on serving;
- a command set over :data:`MAX_COMMAND_BYTES` aborts the association (no SCU sends one);
- a C-STORE-RQ whose Affected SOP Class or Instance UID is not one value (empty, a backslash,
  control characters, non-ASCII) is answered 0xC000 at once, without its UIDs.

The per-P-DATA cost is one pass over its PDVs (usually one) adding lengths.

With a *spill_to* folder, a C-STORE data set that passes ``spill_bytes``
(``node.spool_in_memory_mb``) goes on in a temp file there instead of memory
(:mod:`dmg_node.net.streamed`); :func:`discard_partial` removes the file of a message the
association did not finish.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import structlog
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE

from dmg_node.net import pdu_reader, streamed
from dmg_node.net.status import StoreStatus
from dmg_node.net.store_rsp import response_command, send_command

log = structlog.get_logger(__name__)

#: A command set is a few hundred bytes (PS3.7 9.3); this is generous.
MAX_COMMAND_BYTES = 1 << 16
_C_STORE_RQ = 0x0001
# Liberal on purpose: a UID outside PS3.5 9.1 (letters, "../") was always stored, under a hashed
# name (docs/reliability.md); what cannot be one value (a backslash, nothing, control characters,
# non-ASCII) is refused.
_UID_RE = re.compile(rb"[\x21-\x5b\x5d-\x7e]{1,256}")
_TAG_SOP_CLASS = 0x0000_0002
_TAG_SOP_INSTANCE = 0x0000_1000
_TAG_COMMAND_FIELD = 0x0000_0100
_TAG_MESSAGE_ID = 0x0000_0110


@dataclass
class _Message:
    """What has arrived of the message being assembled."""

    command_bytes: int = 0
    data_bytes: int = 0
    dropping: bool = False
    #: the temp file of the data set being received, once it passed ``spill_bytes``
    spilled: streamed.StreamedDataSet | None = None
    #: the data set stays in memory (no header could be built, or the file could not be made)
    in_memory: bool = False

    def discard(self) -> None:
        if self.spilled is not None:
            self.spilled.discard()
            self.spilled = None


def install(assoc: Any, max_instance_bytes: int, spill_bytes: int = 0, spill_to: Path | None = None) -> None:
    """Bound *assoc*'s incoming DIMSE messages (an acceptor, before it starts); see the module."""
    dimse = assoc.dimse
    pynetdicom_receive = dimse.receive_primitive
    state = _Message()
    assoc.dmg_dimse_state = state

    def receive_primitive(primitive: Any) -> None:
        if dimse.message is None:
            message = DIMSEMessage()
            message.message_to_primitive = _checked_conversion(assoc, message, state, max_instance_bytes)  # type: ignore[method-assign]
            dimse.message = message
            state.command_bytes = state.data_bytes = 0
            state.dropping = state.in_memory = False
            state.spilled = None  # a finished message's file belongs to its request now
        pdvs = primitive.presentation_data_value_list
        for _cx, data in pdvs:
            if data[0] & 1:
                state.command_bytes += len(data) - 1
            else:
                state.data_bytes += len(data) - 1
        if state.command_bytes > MAX_COMMAND_BYTES:
            log.warning("command_set_too_large", peer=_peer(assoc), received_bytes=state.command_bytes,
                        limit_bytes=MAX_COMMAND_BYTES, action="A-ABORT and close")
            dimse.message = None
            state.discard()
            pdu_reader.abort(assoc)
            return
        if state.data_bytes > max_instance_bytes:
            if not state.dropping:
                state.dropping = True
                dimse.message.data_set = BytesIO()
                if state.spilled is not None:
                    dimse.message._data_set_file = dimse.message._data_set_path = None
                    state.discard()
            # keep the command fragments and the last-fragment bit; drop the data
            pdvs[:] = [[cx, data if data[0] & 1 else data[:1]] for cx, data in pdvs if data[0] & 3]
        elif (spill_to is not None and state.data_bytes > spill_bytes and state.spilled is None
              and not state.in_memory):
            _spill(assoc, dimse.message, state, spill_to)
        pynetdicom_receive(primitive)
        if dimse.message is None:
            state.spilled = None  # handed to the request (or discarded by the conversion)

    dimse.receive_primitive = receive_primitive


def _spill(assoc: Any, message: Any, state: _Message, folder: Path) -> None:
    """Go on writing *message*'s data set to a temp file in *folder*, once its command set is known."""
    if not isinstance(message, C_STORE_RQ) or message.context_id is None:
        state.in_memory = not isinstance(message, C_STORE_RQ) and message.context_id is not None
        return
    command = message.command_set
    header = streamed.header_for(assoc, message, _uid(command, _TAG_SOP_CLASS), _uid(command, _TAG_SOP_INSTANCE))
    if header is None:
        state.in_memory = True  # refused at its end anyway (the UIDs), as before
        return
    try:
        state.spilled = streamed.spill(message, folder, header)
    except OSError as exc:
        state.in_memory = True
        log.warning("data_set_kept_in_memory", peer=_peer(assoc), error=str(exc)[:300])


def discard_partial(assoc: Any) -> None:
    """Remove the temp file of a data set *assoc* was receiving when it ended (if any)."""
    state = getattr(assoc, "dmg_dimse_state", None)
    if isinstance(state, _Message):
        state.discard()


def _checked_conversion(assoc: Any, message: Any, state: _Message, max_instance_bytes: int) -> Any:
    """``message.message_to_primitive`` answering a refused C-STORE-RQ itself (see the module)."""

    def message_to_primitive() -> Any:
        command = message.command_set
        if _value(command, _TAG_COMMAND_FIELD) != _C_STORE_RQ:
            return type(message).message_to_primitive(message)
        message_id = _value(command, _TAG_MESSAGE_ID)
        class_uid = _uid(command, _TAG_SOP_CLASS)
        instance_uid = _uid(command, _TAG_SOP_INSTANCE)
        if class_uid is None or instance_uid is None:
            status, reason = StoreStatus.CANNOT_UNDERSTAND, "Affected SOP Class/Instance UID is not one UID value"
        elif state.dropping:
            status = StoreStatus.OUT_OF_RESOURCES
            reason = f"data set of {state.data_bytes} bytes is over node.max_instance_mb ({max_instance_bytes} bytes)"
        else:
            return type(message).message_to_primitive(message)
        state.discard()
        log.warning("store_rejected", status=f"0x{status:04X}", reason=reason, peer=_peer(assoc),
                    calling_aet=assoc.requestor.ae_title, sop_uid=instance_uid or "")
        if isinstance(message_id, int):
            send_command(assoc.dul, message.context_id,
                         response_command(message_id, status, class_uid, instance_uid))
        # An empty request: pynetdicom drops it ("unexpected C-STORE service message").
        return C_STORE()

    return message_to_primitive


def _value(command: Any, tag: int) -> int | None:
    """An US element of the command set, read raw or already converted by pynetdicom."""
    elem = command.get_item(tag)
    value = elem.value if elem is not None else None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes) and len(value) >= 2:
        return int.from_bytes(value[:2], "little")
    return None


def _uid(command: Any, tag: int) -> str | None:
    """The UID at *tag* when it is one printable ASCII value (see ``_UID_RE``), else None."""
    elem = command.get_item(tag)
    value = elem.value if elem is not None else None
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes):
        return None
    raw = value.rstrip(b"\x00 ")
    return raw.decode("ascii") if _UID_RE.fullmatch(raw) else None


def _peer(assoc: Any) -> str:
    info = assoc.requestor
    return f"{info.address}:{info.port}"
