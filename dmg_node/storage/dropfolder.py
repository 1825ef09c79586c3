"""The drop folder: DICOM files copied in by hand or from removable media join the same spool as
the SCP's instances.

Each file is imported once it has not changed for ``import.settle_seconds`` (a file still being
copied is left alone), then moved to ``done/`` or, with a ``.reason.txt`` beside it, to
``failed/``, keeping its relative path. A crash between the spool write and the move re-imports
the file at the next scan; the spool treats that as a duplicate, so nothing is imported twice
and nothing is lost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import structlog
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from dmg_node.errors import SpoolError
from dmg_node.fsutil import TMP_SUFFIX, atomic_write, ensure_dir
from dmg_node.records import instance_record
from dmg_node.storage.spool import Spool

log = structlog.get_logger(__name__)

DONE, FAILED = "done", "failed"
IMPORT_AET = "(import)"


@dataclass(frozen=True)
class ScanResult:
    imported: int
    failed: int
    waiting: int  # files still settling


def scan(folder: Path, spool: Spool, *, settle_seconds: float, keep_first: bool = False,
         now: float | None = None) -> ScanResult:
    """Import every settled file under *folder* (outside ``done/`` and ``failed/``)."""
    now = time.time() if now is None else now
    imported = failed = waiting = 0
    for path in sorted(_candidates(folder)):
        try:
            if now - path.stat().st_mtime < settle_seconds:
                waiting += 1
                continue
        except FileNotFoundError:
            continue  # moved away meanwhile
        rel = path.relative_to(folder)
        try:
            reason = _import_one(path, spool, keep_first)
        except (OSError, SpoolError) as exc:
            # The spool cannot take it now (disk full, say): leave the file where it is and retry.
            log.warning("import_deferred", file=str(rel), error=str(exc))
            break
        if reason is None:
            _move(path, folder / DONE / rel)
            imported += 1
        else:
            target = _move(path, folder / FAILED / rel)
            atomic_write(target.with_name(target.name + ".reason.txt"), (reason + "\n").encode())
            log.warning("import_failed", file=str(rel), reason=reason)
            failed += 1
    if imported or failed:
        log.info("import_scan", folder=str(folder), imported=imported, failed=failed, waiting=waiting)
    return ScanResult(imported, failed, waiting)


def _candidates(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirs, files in os.walk(folder):
        if Path(dirpath) == folder:
            dirs[:] = [d for d in dirs if d not in (DONE, FAILED)]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(dirpath) / f for f in files if not f.startswith(".") and not f.endswith(TMP_SUFFIX)]
    return out


def _import_one(path: Path, spool: Spool, keep_first: bool) -> str | None:
    """Store one file in the spool; return None on success, else why the file itself was refused.

    Raises
    ------
    OSError, SpoolError
        The spool could not store it (a condition of the node, not of the file).
    """
    try:
        # force: files from old media may lack the Part 10 preamble; the UID checks below still apply
        ds = dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"not a readable DICOM Part 10 file: {type(exc).__name__}: {exc}"[:500]
    if "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (media index), not an instance"
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
    try:
        rec = instance_record(ds, transfer_syntax_uid=syntax or str(ExplicitVRLittleEndian), calling_aet=IMPORT_AET,
                              received_at=time.time())
    except SpoolError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - untrusted file: any decode failure is a refusal, not a crash
        return f"cannot be decoded: {type(exc).__name__}: {exc}"[:500]
    data = path.read_bytes() if syntax else _as_part10(ds)
    outcome = spool.store(data, rec, keep_first=keep_first)  # OSError/SpoolError: the caller retries later
    log.info("instance_imported", study_uid=rec.study_instance_uid, series_uid=rec.series_instance_uid,
             sop_uid=rec.sop_instance_uid, duplicate=outcome.duplicate, late=outcome.reopened)
    return None


def _as_part10(ds: Dataset) -> bytes:
    """Re-encode a file that had no file meta (old media) as Part 10, explicit VR little endian."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _move(src: Path, dst: Path) -> Path:
    """Move *src* to *dst* (a free name beside it if taken), durably."""
    ensure_dir(dst.parent)
    target, n = dst, 1
    while target.exists():
        target = dst.with_name(f"{dst.stem}.{n}{dst.suffix}")
        n += 1
    os.replace(src, target)
    return target
