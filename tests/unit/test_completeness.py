"""Tests for dmg_node.completeness: header and geometry evidence that a series is missing instances."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dmg_node.completeness import incompleteness
from dmg_node.phantoms.phantom import make_case, write_dicom_study
from dmg_node.dicomfiles import read_datasets
from tests.support import mr_dataset


def _series(n: int, **extra: object) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = mr_dataset(study, series, i, rows=16, cols=16)
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


def test_complete_series_passes() -> None:
    """Evenly spaced slices with no declared count are complete."""
    assert incompleteness(_series(20)) is None


def test_fewer_images_than_images_in_acquisition() -> None:
    """22 images where Images in Acquisition says 176: incomplete, naming both numbers and the tag."""
    why = incompleteness(_series(22, ImagesInAcquisition=176))
    assert why == "22 of 176 images (Images in Acquisition (0020,1002))"
    assert incompleteness(_series(22, ImagesInAcquisition=22)) is None


def test_philips_slice_count_times_temporal_positions() -> None:
    """Philips (2001,xx18) slices x NumberOfTemporalPositions declares the image count."""
    series = _series(10, NumberOfTemporalPositions=1)
    for ds in series:
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x18, "SL", 12)
    why = incompleteness(series)
    assert why is not None and why.startswith("10 of 12 images (Philips Imaging DD 001")


def test_missing_slice_positions() -> None:
    """A hole in the slice positions (slices 5-7 of 20 never arrived) is incomplete."""
    series = [ds for i, ds in enumerate(_series(20)) if i not in (5, 6, 7)]
    why = incompleteness(series)
    assert why == "missing slice positions: 1 gap(s) up to 16 mm where slices are 4 mm apart"


def test_partial_3d_acquisition() -> None:
    """A 3D acquisition whose slices span a fraction of its field of view is incomplete; a full one is not."""
    def three_d(n: int) -> list[Dataset]:
        out = _series(n, MRAcquisitionType="3D", PixelSpacing=[16.0, 16.0])  # 16 x 16 px: 256 mm FOV
        for i, ds in enumerate(out):
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]  # 1 mm slices
        return out

    why = incompleteness(three_d(22))
    assert why is not None and why.startswith("3D acquisition covers 22 mm (22 slices) of its 256 mm field of view")
    assert incompleteness(three_d(176)) is None


def test_enhanced_mr_frames_counted() -> None:
    """Enhanced MR: per-frame Plane Positions are the slices; a missing middle frame is a gap."""
    ds = Dataset()
    ds.ImagesInAcquisition = 5
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for z in (0.0, 2.0, 4.0, 8.0, 10.0):
        fg, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, z]
        fg.PlanePositionSequence = DicomSequence([pos])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    assert (incompleteness([ds]) or "").startswith("missing slice positions: 1 gap(s) up to 4 mm")


def test_garbage_headers_never_raise() -> None:
    """Missing or malformed geometry is treated as no evidence, not an exception."""
    ds = Dataset()
    ds.ImagePositionPatient = ["1", "2"]
    ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    ds.ImagesInAcquisition = ""
    assert incompleteness([ds, Dataset()]) is None
    assert incompleteness([]) == "no instances"


def test_phantom_series_are_complete(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every series the phantom generator writes (2D axial and 3D sagittal, small geometry) is complete."""
    study = write_dicom_study(make_case(3, resolution_mm=2.0), tmp_path / "s", seed=3, geometry="small")
    for s in study.series:
        paths = sorted((study.study_dir / s.folder).glob("*.dcm"))
        assert incompleteness(read_datasets(paths)) is None, s.sequence
        assert incompleteness(read_datasets(paths[: len(paths) // 8])) is not None or s.sequence != "t1c"


def test_unknown_vr_is_no_evidence_not_an_exception() -> None:
    """An Image Orientation (Patient) with a VR that does not exist ('XX') is skipped, never raised."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    series = _series(3)
    value = b"1\\0\\0\\0\\1\\0"
    series[0][0x00200037] = RawDataElement(Tag(0x00200037), "XX", len(value), value, 0, False, True)
    assert incompleteness(series) is None
