"""DICOM files on disk -> series: the reader behind the classify/segment commands and training.

The network path reads its instances from the spool instead; both end in
:func:`dmg_node.volume.build_volume`, which takes datasets and never touches disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from dmg_node.errors import SeriesError

log = structlog.get_logger(__name__)

# Header elements find_series needs; the rest of each header is skipped while parsing.
_HEADER_TAGS = ["SeriesInstanceUID"]


def find_series(path: Path) -> dict[str, list[Path]]:
    """Group the DICOM files under *path* by Series Instance UID (0020,000E).

    Reads each file's header only, in the DICOM File Format (PS3.10 7.1: preamble, ``DICM``
    prefix, File Meta Information). Files that are not DICOM and DICOMDIR files (Media Storage
    Directory, PS3.10 8) are skipped with a debug event; DICOM files without a Series Instance
    UID are skipped with a warning.

    Parameters
    ----------
    path
        One file, or a folder searched recursively (symbolic links to folders are not followed).

    Returns
    -------
    dict[str, list[Path]]
        Series Instance UID -> its files sorted by path; series in the order first found.

    Raises
    ------
    FileNotFoundError
        If *path* does not exist.
    """
    if not path.exists():
        raise FileNotFoundError(path)
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    series: dict[str, list[Path]] = {}
    for file in candidates:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=False)
        except InvalidDicomError:
            log.debug("non_dicom_skipped", path=str(file))
            continue
        except (OSError, EOFError, ValueError) as exc:
            log.warning("unreadable_file_skipped", path=str(file), error=type(exc).__name__)
            continue
        try:
            if header.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
                log.debug("dicomdir_skipped", path=str(file))
                continue
            uid = str(header.get("SeriesInstanceUID") or "")
        except (NotImplementedError, ValueError, KeyError, TypeError) as exc:
            # pydicom decodes values on first access: a VR that does not exist raises only now
            log.warning("unreadable_file_skipped", path=str(file), error=type(exc).__name__)
            continue
        if not uid:
            log.warning("series_uid_missing", path=str(file))
            continue
        series.setdefault(uid, []).append(file)
    log.debug("series_found", root=str(path), n_files=len(candidates), n_series=len(series))
    return series


def read_datasets(paths: Sequence[Path]) -> list[Dataset]:
    """Read DICOM files in full, pixel data included (PS3.10 File Format only).

    Parameters
    ----------
    paths
        Files to read, e.g. one list from :func:`find_series`.

    Returns
    -------
    list[Dataset]
        One dataset per path, in the same order.

    Raises
    ------
    SeriesError
        If a file is missing, unreadable or not DICOM; the message names the file.
    """
    datasets: list[Dataset] = []
    for file in paths:
        try:
            datasets.append(pydicom.dcmread(file, force=False))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise SeriesError(f"cannot read DICOM file {file}: {type(exc).__name__}: {exc}") from exc
    return datasets
