"""What the SCP needs of a received instance without decoding all of it (PS3.10 7.1, PS3.5 7).

:func:`header_dataset` reads a received data set only up to the attributes the index keeps.
The SCP writes each instance as the bytes it received behind a preamble and a File Meta
Information group. pynetdicom's ``Event.encoded_dataset()`` builds that group through a pydicom
``FileMetaDataset`` and ``write_file_meta_info``, a fifth of the C-STORE handler's time; the group
has seven fixed elements, so :func:`file_header` encodes them directly. The output is byte for
byte what pynetdicom writes (tests/test_part10.py checks it).
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from collections.abc import Iterator
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pydicom.valuerep import VR
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dmg_node.errors import InstanceTooLarge

PREAMBLE = b"\x00" * 128 + b"DICM"
#: Series Number (0020,0011), the last attribute :func:`dmg_node.storage.spool.instance_record` reads.
LAST_INDEXED_TAG = 0x0020_0011


def _past_indexed(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) > LAST_INDEXED_TAG


#: ASCII-only attributes the index keeps (UI, CS, IS: PS3.5 6.2), read straight from their bytes.
_ASCII_TAGS = {
    "SOPClassUID": 0x0008_0016, "SOPInstanceUID": 0x0008_0018, "Modality": 0x0008_0060,
    "StudyInstanceUID": 0x0020_000D, "SeriesInstanceUID": 0x0020_000E, "SeriesNumber": 0x0020_0011,
}
_KNOWN_VRS = frozenset(VR.__members__)
#: How much of an inflated data set :func:`header_dataset` reads: far more than the attributes up
#: to (0020,0011) take, private groups included.
INFLATED_HEAD = 16 << 20
_INFLATE_CHUNK = 4 << 20
#: A value longer than this is skipped, not read, when the header is read from a file (a large
#: private element before the study attributes stays on disk).
_DEFER_BYTES = 64 << 10


def header_values(raw: bytes | BinaryIO, transfer_syntax_uid: str, max_inflated: int | None = None) -> dict[str, str]:
    """The attributes :func:`dmg_node.storage.spool.instance_record` reads, from a received data set.

    The UIDs, Modality and Series Number are ASCII by definition, so their bytes are decoded
    directly; pydicom's conversion and validation of those seven values took as long as writing
    the file to tmpfs. Series Description (LO) goes through pydicom for its character set.

    Raises
    ------
    ValueError
        An element the index needs has a VR that does not exist (PS3.5 6.2).
    InstanceTooLarge
        A Deflated data set inflates to more than *max_inflated* bytes.
    Exception
        Whatever pydicom or zlib raise on malformed input (see :func:`header_dataset`).
    """
    ds = header_dataset(raw, transfer_syntax_uid, max_inflated)
    values: dict[str, str] = {}
    for keyword, tag in _ASCII_TAGS.items():
        elem = ds.get_item(tag)  # read_dataset leaves every element raw (RawDataElement)
        if elem is None:
            continue
        if elem.VR is not None and elem.VR not in _KNOWN_VRS:
            raise ValueError(f"unknown VR {elem.VR!r} in ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        values[keyword] = (elem.value or b"").decode("ascii", "replace").strip("\x00 ")
    values["SeriesDescription"] = str(ds.get("SeriesDescription", "") or "")
    return values


def header_dataset(raw: bytes | BinaryIO, transfer_syntax_uid: str, max_inflated: int | None = None) -> Dataset:
    """The data set's elements up to (0020,0011), decoded as pynetdicom decodes the whole one.

    Identifying the instance needs only the SOP, study and series attributes at the top of the
    data set; reading past them (pixel data included) was a tenth of the C-STORE handler's
    time. The bytes stored are still all of them, as received.

    Parameters
    ----------
    raw
        The C-STORE data set as received (no File Meta group), or a file positioned at its
        start (:mod:`dmg_node.net.streamed`): then values over 64 KiB are skipped, not read.
    transfer_syntax_uid
        The accepted presentation context's transfer syntax.
    max_inflated
        For a Deflated transfer syntax, the most the data set may inflate to (None: no limit).

    Raises
    ------
    InstanceTooLarge
        A Deflated data set inflates to more than *max_inflated* bytes.
    Exception
        Whatever pydicom or zlib raise on malformed input: the caller answers 0xC000.
    """
    syntax = UID(transfer_syntax_uid)
    if syntax.is_deflated:
        raw = inflate_head(raw, max_inflated)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return read_dataset(BytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_past_indexed)
    return read_dataset(raw, syntax.is_implicit_VR, syntax.is_little_endian, stop_when=_past_indexed,
                        defer_size=_DEFER_BYTES)


def _chunks(source: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
        return
    while chunk := source.read(_INFLATE_CHUNK):
        yield chunk


def inflate_head(deflated: bytes | BinaryIO, max_inflated: int | None, keep: int = INFLATED_HEAD) -> bytes:
    """The first *keep* bytes of a Deflated data set (PS3.5 A.5), checking its whole inflated size.

    A data set of 2 MB inflated to 2 GB in one ``zlib.decompress``; this inflates in chunks,
    keeps only the head the index reads and counts the rest, so memory stays near *keep*.

    Raises
    ------
    InstanceTooLarge
        It inflates to more than *max_inflated* bytes.
    zlib.error
        The stream is not valid raw deflate.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = b""
    total = received = 0
    for chunk in _chunks(deflated):
        received += len(chunk)
        tail = chunk
        while tail:
            out = inflater.decompress(tail, keep - len(head) if len(head) < keep else _INFLATE_CHUNK)
            if len(head) < keep:
                head += out
            total += len(out)
            tail = inflater.unconsumed_tail
            if max_inflated is not None and total > max_inflated:
                raise InstanceTooLarge(f"Deflated data set inflates to more than {max_inflated} bytes "
                                       f"(node.max_inflated_mb); {received} bytes were received")
    rest = inflater.flush()
    if len(head) < keep:
        head += rest[:keep - len(head)]
    total += len(rest)
    if max_inflated is not None and total > max_inflated:
        raise InstanceTooLarge(f"Deflated data set inflates to {total} bytes, over {max_inflated} "
                               f"(node.max_inflated_mb)")
    return head


def _short(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element with a 2-byte length (UI, SH, UL)."""
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def uid_value(value: str) -> bytes:
    """A UI value as encoded: ASCII, padded with one NUL to an even length (PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def file_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION,
) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information group (explicit VR little endian).

    Parameters
    ----------
    sop_class_uid, sop_instance_uid
        Media Storage SOP Class/Instance UID (0002,0002)/(0002,0003): the C-STORE request's
        Affected SOP Class/Instance UID.
    transfer_syntax_uid
        (0002,0010): the accepted presentation context's transfer syntax.
    implementation_uid, implementation_version
        (0002,0012)/(0002,0013), pynetdicom's by default.

    Returns
    -------
    bytes
        Everything that precedes the data set in a Part 10 file.

    Raises
    ------
    UnicodeEncodeError
        If a UID or the version name is not ASCII.
    """
    body = b"".join((
        struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\x00\x00", 2) + b"\x00\x01",
        _short(0x0002, 0x0002, b"UI", uid_value(sop_class_uid)),
        _short(0x0002, 0x0003, b"UI", uid_value(sop_instance_uid)),
        _short(0x0002, 0x0010, b"UI", uid_value(transfer_syntax_uid)),
        _short(0x0002, 0x0012, b"UI", uid_value(implementation_uid)),
        _short(0x0002, 0x0013, b"SH", _text(implementation_version)),
    ))
    return PREAMBLE + _short(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body
