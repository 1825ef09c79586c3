"""Tests for dmg_node.rtstruct: mask -> RTSTRUCT, checked by dciodvfy and a plastimatch round trip."""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)
from structlog.testing import capture_logs

from dmg_node import __version__
from dmg_node.errors import RtStructError
from dmg_node.rtstruct import (
    RoiSpec,
    RtStructMeta,
    build_rtstruct,
    read_roi_mask,
    save_rtstruct,
)
from dmg_node.volume import Volume, build_volume
from tests.support import require_tool

ROOT = "1.2.826.0.1.3680043.8.498.777"
STUDY_UID, SERIES_UID, FOR_UID = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"
ROI = RoiSpec(name="GTV_DMG_AI_T2", color=(255, 0, 128), generation_description="dmg-t2 unet 1.0.0")
META = RtStructMeta(
    sop_instance_uid=f"{ROOT}.9.1",
    series_instance_uid=f"{ROOT}.9.2",
    created=datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
)


def _tilted(deg: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Axial cosines tilted by *deg* about the patient's left-right axis, then 10 deg about z."""
    a, b = np.radians(deg), np.radians(10.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    r = rz @ rx
    return tuple(float(v) for v in r[:, 0]), tuple(float(v) for v in r[:, 1])


@dataclass(frozen=True)
class Geometry:
    """A synthetic series' grid: PixelSpacing is (row spacing, column spacing) as in DICOM."""

    orientation: tuple[Sequence[float], Sequence[float]] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    origin: tuple[float, float, float] = (-31.5, -40.25, 12.0)
    step: float = 3.0
    rows: int = 64
    columns: int = 64
    n_slices: int = 12
    jitter: tuple[float, ...] = ()  # extra offset (mm) along the normal per slice


GEOMETRIES = {
    "axial": Geometry(),
    "non_square": Geometry(pixel_spacing=(0.9, 1.1), rows=60, columns=70),
    "oblique": Geometry(orientation=_tilted(20.0), pixel_spacing=(0.8, 1.2)),
    "negated": Geometry(orientation=((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)), pixel_spacing=(0.9, 1.1)),
    "sagittal": Geometry(orientation=((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)), pixel_spacing=(1.1, 0.9), step=2.5),
    "coronal": Geometry(orientation=((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)), step=4.0),
}


def make_series(geo: Geometry, **attrs: object) -> list[Dataset]:
    """Classic MR Image Storage slices on *geo*'s grid (in reverse slice order), with *attrs* set on each."""
    row_cos, col_cos = np.asarray(geo.orientation[0]), np.asarray(geo.orientation[1])
    normal = np.cross(row_cos, col_cos)
    jitter = geo.jitter or (0.0,) * geo.n_slices
    datasets = []
    for s in reversed(range(geo.n_slices)):
        uid = f"{ROOT}.10.{s}"
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, uid, "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, SERIES_UID, FOR_UID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "DOE^JANE", "PID-1", "20100101", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "S1", "ACC1"
        ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "WHO^DR", ""
        ds.SeriesNumber, ds.InstanceNumber = 5, s + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        position = np.asarray(geo.origin) + normal * (geo.step * s + jitter[s])
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.PixelSpacing = list(geo.pixel_spacing)
        ds.SliceThickness = geo.step
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = geo.rows, geo.columns, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.full((geo.rows, geo.columns), 100 + s, dtype=np.uint16).tobytes()
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        datasets.append(ds)
    return datasets


def tumour(shape: tuple[int, int, int], hole: bool = False) -> npt.NDArray[np.bool_]:
    """An off-centre ellipsoid with a bump (optionally a ring around a hole holding an island)."""
    k, j, i = np.indices(shape, dtype=np.float64)
    n, rows, cols = shape
    r = ((k - n * 0.45) / (n * 0.35)) ** 2 + ((j - rows * 0.45) / (rows * 0.3)) ** 2
    r += ((i - cols * 0.55) / (cols * 0.25)) ** 2
    mask: npt.NDArray[np.bool_] = (r <= 1.0) | ((np.abs(k - n / 2) < 2) & (np.abs(j - rows * 0.2) < 3) & (np.abs(i - cols * 0.3) < 4))
    if hole:
        centre = (np.abs(j - rows * 0.45) < rows * 0.12) & (np.abs(i - cols * 0.55) < cols * 0.1)
        island = (np.abs(j - rows * 0.45) < 2) & (np.abs(i - cols * 0.55) < 2)
        mask &= ~centre | island
    return mask


def build(geo: Geometry, mask: npt.NDArray[np.bool_] | None = None, **attrs: object
          ) -> tuple[list[Dataset], Volume, npt.NDArray[np.bool_], Dataset]:
    """Series, volume, mask and RTSTRUCT for *geo* (the default mask is :func:`tumour`)."""
    series = make_series(geo, **attrs)
    volume = build_volume(series)
    mask = tumour(volume.array.shape) if mask is None else mask
    return series, volume, mask, build_rtstruct(series, volume, mask, ROI, META)


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy on *path*; assert no error; return its warnings."""
    proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, timeout=60)
    lines = (proc.stdout + proc.stderr).decode(errors="replace").splitlines()
    errors = [line for line in lines if "Error" in line]
    assert proc.returncode == 0 and not errors, "\n".join(lines)
    return [line for line in lines if "Warning" in line]


def write_checked(rt: Dataset, tmp_path: Path, name: str = "rt.dcm") -> Dataset:
    """Save *rt* as a file, assert dciodvfy finds no error in it, and return it as read back."""
    path = tmp_path / name
    save_rtstruct(rt, path)
    dciodvfy(path)
    return pydicom.dcmread(path)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_own_reader_gives_the_mask_back_exactly(name: str) -> None:
    """read_roi_mask rasterises the written contours to exactly the mask, holes and islands included."""
    geo = GEOMETRIES[name]
    mask = tumour((geo.n_slices, geo.rows, geo.columns), hole=True)
    _, volume, mask, rt = build(geo, mask)
    assert np.array_equal(read_roi_mask(rt, volume, ROI.name), mask)


def test_random_masks_round_trip_exactly() -> None:
    """Random speckle (diagonal contacts, nested holes, edge-touching voxels) survives write and read exactly."""
    geo = Geometry(rows=24, columns=20, n_slices=6, orientation=_tilted(20.0), pixel_spacing=(0.9, 1.1))
    rng = np.random.default_rng(7)
    series = make_series(geo)
    volume = build_volume(series)
    for density in (0.2, 0.5, 0.8):
        mask = rng.random(volume.array.shape) < density
        rt = build_rtstruct(series, volume, mask, ROI, META)
        assert np.array_equal(read_roi_mask(rt, volume, ROI.name), mask)


def test_single_voxel_is_a_four_point_square() -> None:
    """One voxel gives one CLOSED_PLANAR contour of 4 points on its boundary, a pixel spacing apart."""
    geo = Geometry(pixel_spacing=(0.9, 1.1), rows=8, columns=8, n_slices=3)
    mask = np.zeros((3, 8, 8), dtype=bool)
    mask[1, 2, 5] = True
    _, volume, _, rt = build(geo, mask)
    (contour,) = rt.ROIContourSequence[0].ContourSequence
    assert contour.ContourGeometricType == "CLOSED_PLANAR" and contour.NumberOfContourPoints == 4
    points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
    centre = volume.index_to_patient([5, 2, 1])
    assert np.allclose(points.mean(axis=0), centre, atol=1e-3)
    sides = sorted(np.round(np.linalg.norm(np.diff(points, axis=0, append=points[:1]), axis=1), 3))
    assert sides == [0.9, 0.9, 1.1, 1.1]




def test_contour_too_long_for_explicit_vr_is_logged() -> None:
    """A contour over 64 KiB (a checkerboard joined at its corners) is written and logged, not refused."""
    mask = np.zeros((3, 128, 128), dtype=bool)
    j, i = np.indices((128, 128))
    mask[1] = ((j + i) % 2 == 0) & (np.abs(j - 64) < 40) & (np.abs(i - 64) < 40)
    with capture_logs() as logs:
        _, volume, _, rt = build(replace(GEOMETRIES["axial"], rows=128, columns=128, n_slices=3), mask)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["contour_too_long_for_explicit_vr"]
    assert len(rt.ROIContourSequence[0].ContourSequence) == 1
    assert np.array_equal(read_roi_mask(rt, volume, ROI.name), mask)


def test_required_content() -> None:
    """The dataset names the ROI, its generation, approval, equipment, series and source as the brief requires."""
    series, volume, _, rt = build(GEOMETRIES["axial"])
    assert rt.Modality == "RTSTRUCT" and rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert rt.SOPInstanceUID == META.sop_instance_uid == rt.file_meta.MediaStorageSOPInstanceUID
    assert rt.SeriesInstanceUID == META.series_instance_uid
    assert (rt.StructureSetDate, rt.StructureSetTime, rt.InstanceCreationDate) == ("20260304", "050607", "20260304")
    assert rt.TimezoneOffsetFromUTC == "+0100"
    assert rt.StructureSetLabel == "DMG_AI" and rt.ApprovalStatus == "UNAPPROVED"
    assert rt.SeriesDescription == "AI-generated DMG contour - UNAPPROVED, review required"
    assert rt.Manufacturer == "dmg-node" and rt.SoftwareVersions == __version__
    (ssroi,) = rt.StructureSetROISequence
    assert (ssroi.ROINumber, ssroi.ROIName, ssroi.ROIGenerationAlgorithm) == (1, ROI.name, "AUTOMATIC")
    assert ssroi.ROIGenerationDescription == ROI.generation_description
    assert ssroi.ReferencedFrameOfReferenceUID == FOR_UID == rt.FrameOfReferenceUID
    (obs,) = rt.RTROIObservationsSequence
    assert obs.RTROIInterpretedType == "GTV" and obs.ReferencedROINumber == 1
    assert list(rt.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 128]
    for keyword, value in (("PatientName", "DOE^JANE"), ("PatientID", "PID-1"), ("PatientBirthDate", "20100101"),
                           ("PatientSex", "F"), ("StudyInstanceUID", STUDY_UID), ("StudyDate", "20260101"),
                           ("StudyTime", "120000"), ("StudyID", "S1"), ("AccessionNumber", "ACC1"),
                           ("ReferringPhysicianName", "WHO^DR")):
        assert str(rt[keyword].value) == value, keyword
    (frame_ref,) = rt.ReferencedFrameOfReferenceSequence
    assert frame_ref.FrameOfReferenceUID == FOR_UID
    (ref_series,) = frame_ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == SERIES_UID
    listed = [item.ReferencedSOPInstanceUID for item in ref_series.ContourImageSequence]
    assert listed == list(volume.sop_instance_uids) and len(listed) == len(series)


def test_each_contour_references_the_slice_it_lies_on() -> None:
    """Each contour's Contour Image Sequence names the instance whose plane holds all its points."""
    series, _, _, rt = build(GEOMETRIES["sagittal"])
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    for contour in rt.ROIContourSequence[0].ContourSequence:
        (image,) = contour.ContourImageSequence
        ds = by_uid[image.ReferencedSOPInstanceUID]
        assert image.ReferencedSOPClassUID == MRImageStorage
        normal = np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert np.allclose((points - np.asarray(ds.ImagePositionPatient, dtype=float)) @ normal, 0.0, atol=2e-3)


def test_contours_use_each_slice_position_not_the_mean_spacing() -> None:
    """With irregular slice gaps (within build_volume's 5 %) every contour lies in its own slice's plane."""
    jitter = (0.0, 0.07, 0.14, 0.21, 0.28, 0.35, 0.28, 0.21, 0.14, 0.07, 0.0, 0.07)  # gaps 3 +- 0.07 mm
    series, volume, _, rt = build(replace(GEOMETRIES["oblique"], jitter=jitter))
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    normal = np.cross(volume.affine[:3, 0], volume.affine[:3, 1])
    normal /= np.linalg.norm(normal)
    worst_grid = 0.0
    for contour in rt.ROIContourSequence[0].ContourSequence:
        ds = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert np.allclose((points - np.asarray(ds.ImagePositionPatient, dtype=float)) @ normal, 0.0, atol=2e-3)
        k = volume.sop_instance_uids.index(ds.SOPInstanceUID)
        worst_grid = max(worst_grid, abs(float((points[0] - volume.index_to_patient([0, 0, k])) @ normal)))
    assert worst_grid > 0.25  # the mean-spacing grid would have put some contour off its slice


def test_type2_attributes_are_present_when_the_source_lacks_them(tmp_path: Path) -> None:
    """A source lacking StudyDate/Time/ID, accession, referrer, birth date or sex still gives a valid file."""
    series = make_series(GEOMETRIES["axial"])
    missing = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
               "PatientBirthDate", "PatientSex", "PositionReferenceIndicator")
    for ds in series:
        for keyword in missing:
            delattr(ds, keyword)
    volume = build_volume(series)
    rt = build_rtstruct(series, volume, tumour(volume.array.shape), ROI, META)
    back = write_checked(rt, tmp_path)
    for keyword in missing:
        assert keyword in back and not back[keyword].value, keyword


@pytest.mark.parametrize(
    ("source_charset", "name", "expected"),
    [("ISO_IR 192", "张三^李四", "ISO_IR 192"), (None, "张三", "ISO_IR 192"), ("GB18030", "张三", "GB18030"),
     ("ISO_IR 100", "Müller^Zoë", "ISO_IR 100"), (None, "DOE^JANE", None)],
)
def test_patient_name_survives_in_a_fitting_character_set(
    source_charset: str | None, name: str, expected: str | None, tmp_path: Path
) -> None:
    """Non-Latin and accented names come back unchanged; the source's character set is kept when it fits.

    With a character set the source is written and read back, so names are decoded from bytes as
    the node sees them; without one, the non-ASCII name is set in memory (bytes could not hold it).
    """
    attrs: dict[str, object] = {"PatientName": name}
    if source_charset:
        attrs["SpecificCharacterSet"] = source_charset
    series = make_series(GEOMETRIES["axial"], **attrs)
    if source_charset:
        for n, ds in enumerate(series):
            ds.save_as(tmp_path / f"{n}.dcm", enforce_file_format=True)
        series = [pydicom.dcmread(tmp_path / f"{n}.dcm") for n in range(len(series))]
    volume = build_volume(series)
    rt = build_rtstruct(series, volume, tumour(volume.array.shape), ROI, META)
    back = write_checked(rt, tmp_path)
    assert str(back.PatientName) == name
    assert back.get("SpecificCharacterSet") == expected


def test_long_labels_are_cut_to_their_value_representation() -> None:
    """Structure Set Label (SH 16), ROI name and generation description (LO 64) are truncated, not rejected."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    roi = replace(ROI, name="N" * 80, generation_description="D" * 100)
    meta = replace(META, structure_set_label="L" * 40, series_description="S" * 90)
    rt = build_rtstruct(series, volume, tumour(volume.array.shape), roi, meta)
    assert rt.StructureSetLabel == "L" * 16 and rt.StructureSetName == "L" * 40
    assert rt.SeriesDescription == "S" * 64 and rt.StructureSetDescription == "S" * 90
    assert rt.StructureSetROISequence[0].ROIName == "N" * 64
    assert rt.StructureSetROISequence[0].ROIGenerationDescription == "D" * 64
    assert np.array_equal(read_roi_mask(rt, volume, "N" * 64), tumour(volume.array.shape))


def test_empty_mask_raises() -> None:
    """An empty mask is an RtStructError; the caller decides whether that is a result."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    with pytest.raises(RtStructError, match="mask is empty"):
        build_rtstruct(series, volume, np.zeros(volume.array.shape, dtype=bool), ROI, META)




def test_mask_of_wrong_shape_or_type_raises() -> None:
    """A mask that is not bool on the volume's grid is refused with the shape found."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    with pytest.raises(RtStructError, match="mask must be bool"):
        build_rtstruct(series, volume, np.ones((2, 3, 4), dtype=bool), ROI, META)
    with pytest.raises(RtStructError, match="mask must be bool"):
        build_rtstruct(series, volume, np.ones(volume.array.shape, dtype=np.uint8), ROI, META)


def test_source_must_be_the_volumes_series() -> None:
    """A missing slice, an extra instance or another series' datasets are refused."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    mask = tumour(volume.array.shape)
    with pytest.raises(RtStructError, match="instance"):
        build_rtstruct(series[1:], volume, mask, ROI, META)
    other = make_series(GEOMETRIES["axial"])[0]
    other.SOPInstanceUID = f"{ROOT}.99"
    with pytest.raises(RtStructError, match="instance"):
        build_rtstruct([*series, other], volume, mask, ROI, META)
    for ds in series:
        ds.SeriesInstanceUID = f"{ROOT}.98"
    with pytest.raises(RtStructError, match="SeriesInstanceUID"):
        build_rtstruct(series, volume, mask, ROI, META)


def _replace_contours(rt: Dataset, volume: Volume, slices: list[tuple[float, list[tuple[float, float]]]]) -> None:
    """Swap in hand-made contours: (slice index k, [(i, j) index points]) each."""
    template = rt.ROIContourSequence[0].ContourSequence[0]
    contours = []
    for k, ij in slices:
        contour = Dataset()
        contour.ContourGeometricType = template.ContourGeometricType
        points = volume.index_to_patient([(i, j, k) for i, j in ij])
        contour.NumberOfContourPoints = len(points)
        contour.ContourData = [round(float(v), 4) for v in points.ravel()]
        contours.append(contour)
    rt.ROIContourSequence[0].ContourSequence = DicomSequence(contours)


def test_read_roi_mask_treats_nested_contours_as_holes() -> None:
    """Another TPS's outer and inner contour on a slice read back as a ring (XOR); one beyond the volume is skipped."""
    _, volume, _, rt = build(GEOMETRIES["oblique"])
    outer = [(9.5, 9.5), (30.5, 9.5), (30.5, 30.5), (9.5, 30.5)]
    inner = [(14.5, 14.5), (20.5, 14.5), (20.5, 20.5), (14.5, 20.5)]
    _replace_contours(rt, volume, [(4, outer), (4, inner), (40, outer)])
    expected = np.zeros(volume.array.shape, dtype=bool)
    expected[4, 10:31, 10:31] = True
    expected[4, 15:21, 15:21] = False
    assert np.array_equal(read_roi_mask(rt, volume, ROI.name), expected)


def test_read_roi_mask_rejects_a_contour_across_slices() -> None:
    """A contour whose points lie on different slices is an RtStructError, not a guess."""
    _, volume, _, rt = build(GEOMETRIES["axial"])
    _replace_contours(rt, volume, [(4, [(1.5, 1.5), (5.5, 1.5), (5.5, 5.5)])])
    contour = rt.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
    points[2] = volume.index_to_patient([5.5, 5.5, 5.0])
    contour.ContourData = [round(float(v), 4) for v in points.ravel()]
    with pytest.raises(RtStructError, match="one slice plane"):
        read_roi_mask(rt, volume, ROI.name)


def test_read_roi_mask_rejects_unknown_roi() -> None:
    """Asking for an ROI the RTSTRUCT does not hold is an RtStructError naming it."""
    _, volume, _, rt = build(GEOMETRIES["axial"])
    with pytest.raises(RtStructError, match="'nope'"):
        read_roi_mask(rt, volume, "nope")


def make_enhanced(geo: Geometry) -> Dataset:
    """One Enhanced MR object on *geo*'s grid, frames stored in reverse slice order."""
    row_cos, col_cos = np.asarray(geo.orientation[0]), np.asarray(geo.orientation[1])
    normal = np.cross(row_cos, col_cos)
    (classic,) = make_series(replace(geo, n_slices=1))
    ds = Dataset()
    ds.file_meta = classic.file_meta
    for elem in classic:
        if elem.keyword not in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            ds.add(elem)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{ROOT}.20")
    ds.NumberOfFrames = geo.n_slices
    shared, plane, measures = Dataset(), Dataset(), Dataset()
    plane.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
    measures.PixelSpacing, measures.SliceThickness = list(geo.pixel_spacing), geo.step
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = DicomSequence([plane]), DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for s in reversed(range(geo.n_slices)):
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in np.asarray(geo.origin) + normal * geo.step * s]
        group.PlanePositionSequence = DicomSequence([position])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.zeros((geo.n_slices, geo.rows, geo.columns), dtype=np.uint16).tobytes()
    return ds


def test_enhanced_mr_contours_reference_their_frames(tmp_path: Path) -> None:
    """For a multi-frame source each contour names the instance and its frame; the instance is listed once."""
    geo = GEOMETRIES["oblique"]
    source = make_enhanced(geo)
    volume = build_volume([source])
    mask = tumour(volume.array.shape, hole=True)
    rt = build_rtstruct([source], volume, mask, ROI, META)
    write_checked(rt, tmp_path)
    ref_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert [item.ReferencedSOPInstanceUID for item in ref_series.ContourImageSequence] == [f"{ROOT}.20"]
    normal = np.cross(geo.orientation[0], geo.orientation[1])
    for contour in rt.ROIContourSequence[0].ContourSequence:
        (image,) = contour.ContourImageSequence
        assert image.ReferencedSOPClassUID == EnhancedMRImageStorage
        frame = source.PerFrameFunctionalGroupsSequence[image.ReferencedFrameNumber - 1]
        origin = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert np.allclose((points - origin) @ normal, 0.0, atol=2e-3)
    assert np.array_equal(read_roi_mask(rt, volume, ROI.name), mask)
