"""Bad-input helpers for tests/system/test_reliability.py: encode, mutate and send raw C-STORE data sets.

A broken or hostile sender can truncate a data set, lie in a length field, send a wrong or unknown
VR, leave out UIDs, put path tricks into UIDs, or send a SOP Class other than the presentation
context's. :func:`send_raw` puts such bytes on the wire as they are: with pynetdicom's
``STORE_SEND_CHUNKED_DATASET`` on, a Part 10 file's data set is streamed without being decoded.
"""

from __future__ import annotations

import os
import re
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config

from tests.support import LOCALHOST

# Explicit VR Little Endian elements whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# What dmg_node.storage.spool.safe_component may produce: a DICOM UID or "x" + 40 hex digits.
SAFE_NAME = re.compile(r"[0-9]+(\.[0-9]+)*|x[0-9a-f]{40}")
SPOOL_TOP_LEVEL = {"index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm", "node-status.json", "node.lock", "studies",
                   "outbox", "incoming"}
MUTATIONS = ("truncate", "flip", "length", "vr", "delete", "insert")


def encode(ds: Dataset) -> bytes:
    """The data set (no preamble, no meta) in Explicit VR Little Endian."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def dataset_bytes(part10: bytes) -> bytes:
    """The bytes of a Part 10 file after its preamble and File Meta group (PS3.10 7.1)."""
    if part10[128:132] != b"DICM":
        raise ValueError("not a Part 10 file")
    group_length = struct.unpack_from("<I", part10, 132 + 8)[0]  # (0002,0000) UL, explicit VR LE
    return part10[132 + 12 + group_length:]


def send_raw(port: int, body: bytes, sop_uid: str, folder: Path, *, sop_class: str = MRImageStorage,
             aet: str = "FUZZER") -> int | None:
    """C-STORE *body* as the data set of a *sop_class* instance; the status, or None if none came."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "raw.dcm"
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta)  # type: ignore[arg-type]
        f.write(body)
    ae = AE(ae_title=aet)
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(LOCALHOST, port, ae_title="DMG_NODE")
    if not assoc.is_established:
        raise RuntimeError(f"association to port {port} not established")
    old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        if assoc.is_established:
            assoc.release()
    status = getattr(rsp, "Status", None)
    return None if status is None else int(status)


def element_offsets(body: bytes) -> list[tuple[int, int]]:
    """(offset, header length) of each top-level element of an Explicit VR LE data set."""
    out, pos = [], 0
    while pos + 8 <= len(body):
        vr = body[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            header, length = 12, struct.unpack_from("<I", body, pos + 8)[0]
        else:
            header, length = 8, struct.unpack_from("<H", body, pos + 6)[0]
        out.append((pos, header))
        if length == 0xFFFFFFFF:
            break  # undefined length: no sequences in the test data sets, so stop here
        pos += header + length
    return out


@dataclass(frozen=True)
class Mutation:
    """One change to a valid data set; *where* picks the element or byte (modulo the size)."""

    kind: str
    where: int
    payload: bytes

    def apply(self, body: bytes) -> bytes:
        elements = element_offsets(body)
        index = self.where % len(elements)
        pos, header = elements[index]
        if self.kind == "truncate":
            return body[: self.where % len(body)]
        if self.kind == "flip":
            i = self.where % len(body)
            flipped = bytes(b ^ (p or 0xFF) for b, p in zip(body[i:i + len(self.payload)], self.payload))
            return body[:i] + flipped + body[i + len(flipped):]
        if self.kind == "length":  # the length field lies (too long, too short, or "undefined")
            size = 4 if header == 12 else 2
            start = pos + (8 if header == 12 else 6)
            return body[:start] + self.payload.ljust(size, b"\xff")[:size] + body[start + size:]
        if self.kind == "vr":  # another VR, valid or not, in place of the element's own
            return body[:pos + 4] + self.payload.ljust(2, b"Q")[:2] + body[pos + 6:]
        if self.kind == "delete":
            end = elements[index + 1][0] if index + 1 < len(elements) else len(body)
            return body[:pos] + body[end:]
        if self.kind == "insert":
            return body[:pos] + self.payload + body[pos:]
        raise ValueError(f"unknown mutation {self.kind!r}")


def mutations() -> st.SearchStrategy[Mutation]:
    """Hypothesis strategy over :class:`Mutation`."""
    return st.builds(Mutation, kind=st.sampled_from(MUTATIONS), where=st.integers(0, 2**20),
                     payload=st.binary(min_size=1, max_size=12))


def indexed_paths(spool_root: Path) -> dict[str, str]:
    """SOP Instance UID -> path (relative to the spool) from the index, read-only."""
    db = sqlite3.connect(f"file:{spool_root / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    finally:
        db.close()


def unsafe_spool_entries(spool_root: Path) -> list[str]:
    """Anything in the spool that is not index, status, or studies/<uid>/<uid>/<uid>.dcm
    (a file left in incoming/ is a data set whose temp file was not removed)."""
    bad = [p.name for p in spool_root.iterdir() if p.name not in SPOOL_TOP_LEVEL]
    if (spool_root / "incoming").is_dir():
        bad += [f"incoming/{p.name}" for p in (spool_root / "incoming").iterdir()]
    studies = spool_root / "studies"
    for dirpath, dirs, files in os.walk(studies):
        rel = Path(dirpath).relative_to(studies).parts
        for d in dirs:
            if len(rel) >= 2 or not SAFE_NAME.fullmatch(d) or (Path(dirpath) / d).is_symlink():
                bad.append(str(Path(dirpath, d).relative_to(spool_root)))
        for f in files:
            if len(rel) != 2 or not f.endswith(".dcm") or not SAFE_NAME.fullmatch(f[:-4]):
                bad.append(str(Path(dirpath, f).relative_to(spool_root)))
    return bad


def tree_outside(workdir: Path, *inside: Path) -> dict[str, tuple[int, int]]:
    """Every file under *workdir* except those under *inside*: relative path -> (size, mtime_ns)."""
    skip = [p.resolve() for p in inside]
    out = {}
    for p in workdir.rglob("*"):
        r = p.resolve()
        if any(r == s or s in r.parents for s in skip) or not p.is_file():
            continue
        st_ = p.stat()
        out[str(p.relative_to(workdir))] = (st_.st_size, st_.st_mtime_ns)
    return out


def make_tiny_model(models_dir: Path, sequence: str = "t2") -> Path:
    """A randomly initialised tiny model as ``models_dir/demo-<sequence>`` (seconds to make, fast to run)."""
    import torch

    from dmg_node.training.export import save_model
    from dmg_node.segment.manifest import DEMO_USE
    from dmg_node.segment.network import Generator, GeneratorConfig
    from dmg_node.segment.preprocess import PreprocessConfig

    torch.manual_seed(0)
    folder = models_dir / f"demo-{sequence}"
    save_model(folder, Generator(GeneratorConfig(channels=(4, 8, 8, 8, 8), aspp_dilations=(1, 2))).eval(),
               sequence=sequence, preprocess=PreprocessConfig(), patch_size=(32, 32, 32), version="0.0.1",
               intended_use=DEMO_USE)
    return folder
