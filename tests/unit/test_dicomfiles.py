"""Tests for dmg_node.dicomfiles: finding series on disk and reading them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MediaStorageDirectoryStorage
from structlog.testing import capture_logs

from dmg_node.dicomfiles import find_series, read_datasets
from dmg_node.errors import SeriesError
from tests.support import mr_dataset, write_series

STUDY = "1.2.826.0.1.3680043.8.498.998.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.998.2"
SERIES_B = "1.2.826.0.1.3680043.8.498.998.3"


def _write_dicomdir(path: Path) -> None:
    """A minimal Media Storage Directory file (it has no Series Instance UID of its own)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.998.9")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = "TEST"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def study_folder(tmp_path: Path) -> Path:
    """Two series in nested folders plus a text file, a DICOMDIR, a raw dataset and a UID-less file."""
    write_series(tmp_path / "study" / "s1", 3, study_uid=STUDY, series_uid=SERIES_A)
    write_series(tmp_path / "study" / "deeper" / "s2", 2, study_uid=STUDY, series_uid=SERIES_B)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM\n")
    _write_dicomdir(tmp_path / "study" / "DICOMDIR")
    raw = mr_dataset(STUDY, SERIES_A, 7)
    raw.save_as(tmp_path / "study" / "raw.dcm", enforce_file_format=False)  # no preamble: not a Part 10 file
    no_uid = mr_dataset(STUDY, SERIES_A, 8)
    del no_uid.SeriesInstanceUID
    no_uid.save_as(tmp_path / "study" / "s1" / "no_uid.dcm", enforce_file_format=True)
    return tmp_path / "study"


def test_find_series_groups_files_by_series_uid(study_folder: Path) -> None:
    """Files in nested folders are grouped by Series Instance UID, each list sorted by path."""
    series = find_series(study_folder)
    assert set(series) == {SERIES_A, SERIES_B}
    assert [p.relative_to(study_folder).as_posix() for p in series[SERIES_A]] == [
        "s1/0000.dcm",
        "s1/0001.dcm",
        "s1/0002.dcm",
    ]
    assert [p.name for p in series[SERIES_B]] == ["0000.dcm", "0001.dcm"]


def test_find_series_skips_and_logs_without_phi(study_folder: Path) -> None:
    """Non-DICOM files and the DICOMDIR are skipped at debug level, a UID-less file with a warning, no PHI logged."""
    with capture_logs() as logs:
        find_series(study_folder)
    skipped = {(e["event"], Path(e["path"]).name, e["log_level"]) for e in logs if "path" in e}
    assert skipped == {
        ("non_dicom_skipped", "notes.txt", "debug"),
        ("non_dicom_skipped", "raw.dcm", "debug"),
        ("dicomdir_skipped", "DICOMDIR", "debug"),
        ("series_uid_missing", "no_uid.dcm", "warning"),
    }
    text = repr(logs)
    assert "DOE^JANE" not in text and "PID-SECRET-123" not in text


def test_find_series_accepts_a_single_file(study_folder: Path) -> None:
    """A file path gives that one file as its series."""
    file = study_folder / "s1" / "0001.dcm"
    assert find_series(file) == {SERIES_A: [file]}


def test_find_series_of_a_folder_without_dicom_is_empty(tmp_path: Path) -> None:
    """A folder with no DICOM files gives no series."""
    (tmp_path / "readme.md").write_text("# nothing\n")
    assert find_series(tmp_path) == {}


def test_find_series_missing_path_raises(tmp_path: Path) -> None:
    """A path that does not exist is an error, not an empty result."""
    with pytest.raises(FileNotFoundError):
        find_series(tmp_path / "absent")


def test_read_datasets_reads_full_datasets_in_order(study_folder: Path) -> None:
    """read_datasets returns one dataset per path, in order, with pixel data."""
    paths = list(reversed(find_series(study_folder)[SERIES_A]))
    datasets = read_datasets(paths)
    assert [int(ds.InstanceNumber) for ds in datasets] == [3, 2, 1]
    assert datasets[0].pixel_array.shape == (64, 64)


@pytest.mark.parametrize("name", ["notes.txt", "missing.dcm", "raw.dcm"])
def test_read_datasets_names_the_unreadable_file(study_folder: Path, name: str) -> None:
    """A non-DICOM, missing or non-Part-10 file raises SeriesError naming that file."""
    paths = [study_folder / "s1" / "0000.dcm", study_folder / name]
    with pytest.raises(SeriesError, match=name):
        read_datasets(paths)


def test_find_series_skips_a_file_whose_series_uid_cannot_be_decoded(tmp_path: Path) -> None:
    """A Series Instance UID with a VR that does not exist makes that file skipped, not the search fail."""
    good = write_series(tmp_path / "in", 2)
    raw = good[1].read_bytes()
    at = raw.find(b"\x20\x00\x0e\x00UI")
    good[1].write_bytes(raw[:at + 4] + b"XX" + raw[at + 6:])
    found = find_series(tmp_path / "in")
    assert [len(v) for v in found.values()] == [1]
