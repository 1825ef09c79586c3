"""Spilled data sets (dmg_node.net.streamed): the temp file, the header read from it, the spool's rename."""

from __future__ import annotations

import errno
import gc
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dmg_node.net import streamed
from dmg_node.net.part10 import file_header, header_values, inflate_head
from dmg_node.records import instance_record
from dmg_node.storage.spool import Spool
from tests.support import mr_dataset


def _encoded(big: int = 0) -> tuple[str, str, bytes]:
    ds = mr_dataset("1.2.826.0.1.3680043.8.498.9", "1.2.826.0.1.3680043.8.498.9.1", 1)
    if big:
        block = ds.private_block(0x0009, "DMG STREAM TEST", create=True)
        block.add_new(0x00, "OB", b"\x01" * big)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), bytes(buf.getvalue())


def test_the_header_is_read_from_a_file_past_a_large_private_element(tmp_path: Path) -> None:
    _, _, data = _encoded(big=8 << 20)
    path = tmp_path / "ds"
    path.write_bytes(data)
    with open(path, "rb") as fp:
        from_file = header_values(fp, str(ExplicitVRLittleEndian))
    assert from_file == header_values(data, str(ExplicitVRLittleEndian))
    assert from_file["StudyInstanceUID"] == "1.2.826.0.1.3680043.8.498.9"


def test_a_deflated_data_set_is_inflated_from_a_file_in_chunks() -> None:
    raw = bytes(range(256)) * 100_000
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = packer.compress(raw) + packer.flush()
    assert inflate_head(BytesIO(deflated), None, keep=1000) == inflate_head(deflated, None, keep=1000) == raw[:1000]
    assert inflate_head(BytesIO(deflated), None) == inflate_head(deflated, None) == raw[:16 << 20]
    _, _, data = _encoded()
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    values = header_values(BytesIO(packer.compress(data) + packer.flush()), str(DeflatedExplicitVRLittleEndian))
    assert values == header_values(data, str(ExplicitVRLittleEndian))


def test_a_streamed_file_is_renamed_into_the_spool_and_indexed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    try:
        sop_class, sop_uid, data = _encoded()
        syntax = str(ExplicitVRLittleEndian)
        header = file_header(sop_class, sop_uid, syntax)
        part = streamed.StreamedDataSet(spool.incoming, header)
        part.write(data[:100])
        part.write(memoryview(data)[100:])
        part.close()
        rec = instance_record(header_values(data, syntax), transfer_syntax_uid=syntax, calling_aet="T",
                              received_at=1.0)
        outcome = spool.store_file(part.path, part.size, rec)
        part.discard()
        assert outcome.stored and outcome.path.read_bytes() == header + data
        assert list(spool.incoming.iterdir()) == []
        assert spool._query("SELECT size FROM instances")[0][0] == len(header + data)
    finally:
        spool.close()


def test_a_discarded_or_forgotten_file_goes_away(tmp_path: Path) -> None:
    part = streamed.StreamedDataSet(tmp_path, b"header")
    path = part.path
    assert path.read_bytes() == b"header" and part.name == str(path)
    part.discard()
    assert not path.exists()
    forgotten = streamed.StreamedDataSet(tmp_path, b"header")
    path = forgotten.path
    forgotten.close()
    del forgotten
    gc.collect()
    assert not path.exists()


def test_reconcile_clears_data_sets_cut_off_by_a_stop(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    try:
        (spool.incoming / f"abc{streamed.SUFFIX}").write_bytes(b"half")
        assert spool.reconcile()["temp_removed"] == 1
        assert list(spool.incoming.iterdir()) == []
    finally:
        spool.close()


def test_a_write_error_is_kept_and_the_file_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = streamed.StreamedDataSet(tmp_path, b"header")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streamed.os, "write", full)
    assert part.write(b"fragment") == 8 and part.write(b"more") == 4
    assert isinstance(part.error, OSError) and part.error.errno == errno.ENOSPC
    assert not part.path.exists()
