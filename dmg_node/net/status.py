"""Named DIMSE statuses this node answers with (PS3.4 Table B.2-1, PS3.7 C)."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses this SCP returns (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    MISSING_UID = 0xC001


class EchoStatus(IntEnum):
    """C-ECHO response statuses (PS3.7 9.3.5.2)."""

    SUCCESS = 0x0000
