"""The File Format header the SCP writes equals pynetdicom's, byte for byte (PS3.10 7.1), and the
header read of a received data set finds the indexed attributes in every encoding."""

from __future__ import annotations

import io
import zlib

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dmg_node.net.part10 import PREAMBLE, file_header, header_dataset, header_values
from tests.support import mr_dataset


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1", ImplicitVRLittleEndian),  # odd lengths
        ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.826.0.1.3680043.8.498.12", ExplicitVRLittleEndian),  # even
        ("1.2.840.10008.5.1.4.1.1.7", "2.25.123456789012345678901234567890123456789", JPEGLSLossless),
    ],
)
def test_file_header_matches_pynetdicom(sop_class: str, sop_instance: str, syntax: str) -> None:
    """Preamble, prefix and meta group are the bytes pynetdicom's encoded_dataset() would write."""
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    assert file_header(sop_class, sop_instance, syntax) == PREAMBLE + encode_file_meta(meta)


def test_file_header_reads_back_with_pydicom() -> None:
    """A header plus an (empty) data set is a Part 10 file pydicom reads with the same meta values."""
    raw = file_header("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5", ExplicitVRLittleEndian)
    ds = dcmread(io.BytesIO(raw))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.FileMetaInformationGroupLength == len(raw) - 132 - 12


def test_file_header_refuses_non_ascii() -> None:
    """A UID that is not ASCII cannot be written into the header (the SCP answers 0xC000)."""
    with pytest.raises(UnicodeEncodeError):
        file_header("1.2.840.10008.5.1.4.1.1.4", "1.2.3\u00e9", ExplicitVRLittleEndian)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian])
def test_header_dataset_reads_the_indexed_attributes_in_every_encoding(syntax: str) -> None:
    """The SOP, study and series attributes come back in each encoding the SCP accepts; pixels do not."""
    ds = mr_dataset("1.2.3", "1.2.3.4", 5, description="T2 TSE AX")
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = syntax != ExplicitVRBigEndian, syntax == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    raw = buf.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = packer.compress(raw) + packer.flush()
    header = header_dataset(raw, syntax)
    assert (header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID) == (
        "1.2.3", "1.2.3.4", ds.SOPInstanceUID)
    assert "PixelData" not in header and "ImagePositionPatient" not in header
    assert header_values(raw, syntax) == {
        "SOPClassUID": ds.SOPClassUID, "SOPInstanceUID": ds.SOPInstanceUID, "Modality": "MR",
        "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "SeriesNumber": str(ds.SeriesNumber),
        "SeriesDescription": "T2 TSE AX",
    }


def test_header_values_refuse_an_unknown_vr_and_keep_what_is_missing_out() -> None:
    """A UID with a VR that does not exist raises (the SCP answers 0xC000); absent attributes are absent."""
    with pytest.raises(ValueError, match="unknown VR 'XX' in \\(0008,0016\\)"):
        header_values(b"\x08\x00\x16\x00XX\x04\x001.23", ExplicitVRLittleEndian)
    assert header_values(b"\x08\x00\x18\x00UI\x04\x001.2\x00", ExplicitVRLittleEndian) == {
        "SOPInstanceUID": "1.2", "SeriesDescription": ""}
