"""Tests for dmg_node.volume: synthetic MR series -> Volume, geometry and rejections."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from structlog.testing import capture_logs

from dmg_node.errors import SeriesError
from dmg_node.volume import Volume, build_volume
from tests.support import require_tool

ROOT = "1.2.826.0.1.3680043.8.498.999"
STUDY_UID = f"{ROOT}.1"
SERIES_UID = f"{ROOT}.2"
FOR_UID = f"{ROOT}.3"

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
PRONE = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0))


def _rotation(ax_deg: float, ay_deg: float) -> npt.NDArray[np.float64]:
    ax, ay = np.radians(ax_deg), np.radians(ay_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rotation: npt.NDArray[np.float64] = rx @ ry
    return rotation


_R = _rotation(17.0, -12.0)
OBLIQUE = (tuple(_R @ [1.0, 0.0, 0.0]), tuple(_R @ [0.0, 1.0, 0.0]))


@dataclass(frozen=True)
class Marker:
    """A bright voxel: stored value at (column i, row j) of acquisition slice s."""

    value: int
    i: int
    j: int
    s: int


MARKERS = (Marker(1000, 3, 5, 1), Marker(500, 15, 12, 3))


def _pixels(
    rows: int, columns: int, s: int, markers: Sequence[Marker], dtype: type = np.uint16
) -> npt.NDArray[np.generic]:
    arr: npt.NDArray[np.generic] = np.full((rows, columns), 10 + s, dtype=dtype)
    for m in markers:
        if m.s == s:
            arr[m.j, m.i] = m.value
    return arr


def _file_meta(sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(syntax)
    return meta


def _image_pixel(ds: Dataset, rows: int, columns: int, signed: bool = False) -> None:
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)


def _common(ds: Dataset, sop_class: str, sop_uid: str) -> None:
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.Modality = "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY_UID, SERIES_UID, FOR_UID


def slice_positions(
    orientation: tuple[Sequence[float], Sequence[float]], origin: Sequence[float], n_slices: int, step: float
) -> list[npt.NDArray[np.float64]]:
    """Image Position (Patient) of each acquisition slice, stepping along row x column cosine."""
    normal = np.cross(orientation[0], orientation[1])
    return [np.asarray(origin, dtype=np.float64) + normal * step * s for s in range(n_slices)]


def make_series(
    orientation: tuple[Sequence[float], Sequence[float]] = AXIAL,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    origin: Sequence[float] = (-10.0, -12.0, 30.0),
    n_slices: int = 5,
    step: float = 2.0,
    rows: int = 16,
    columns: int = 20,
    markers: Sequence[Marker] = MARKERS,
    seed: int = 0,
) -> list[Dataset]:
    """Single-frame MR datasets, returned and numbered in a shuffled order."""
    positions = slice_positions(orientation, origin, n_slices, step)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_slices)
    instance_numbers = rng.permutation(n_slices) + 1
    datasets = []
    for idx, s in enumerate(order):
        ds = Dataset()
        _common(ds, MRImageStorage, f"{ROOT}.10.{s}")
        ds.InstanceNumber = int(instance_numbers[idx])
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [float(v) for v in (*orientation[0], *orientation[1])]
        ds.ImagePositionPatient = [float(v) for v in positions[s]]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 5.0  # deliberately not the spacing: the volume must not use it
        _image_pixel(ds, rows, columns)
        ds.PixelData = _pixels(rows, columns, int(s), markers).tobytes()
        datasets.append(ds)
    return datasets


def marker_point(
    marker: Marker,
    orientation: tuple[Sequence[float], Sequence[float]],
    pixel_spacing: tuple[float, float],
    origin: Sequence[float],
    step: float,
) -> npt.NDArray[np.float64]:
    """The marker's LPS position by the PS3.3 C.7.6.2.1.1 equation, independent of dmg_node."""
    ipp = slice_positions(orientation, origin, marker.s + 1, step)[marker.s]
    row_cos, col_cos = np.asarray(orientation[0]), np.asarray(orientation[1])
    delta_i, delta_j = pixel_spacing[1], pixel_spacing[0]  # column spacing, row spacing
    return ipp + row_cos * delta_i * marker.i + col_cos * delta_j * marker.j


def assert_markers(
    vol: Volume,
    orientation: tuple[Sequence[float], Sequence[float]],
    pixel_spacing: tuple[float, float],
    origin: Sequence[float],
    step: float,
) -> None:
    for marker in MARKERS:
        point = marker_point(marker, orientation, pixel_spacing, origin, step)
        k, j, i = np.argwhere(vol.array == marker.value)[0]
        np.testing.assert_allclose(vol.index_to_patient([i, j, k]), point, atol=1e-6)
        np.testing.assert_allclose(vol.patient_to_index(point), [i, j, k], atol=1e-6)
        ri, rj, rk = np.rint(vol.patient_to_index(point)).astype(int)
        assert vol.array[rk, rj, ri] == marker.value


GEOMETRIES = {
    "axial": (AXIAL, (1.0, 1.0), 2.0),
    "sagittal": (SAGITTAL, (1.0, 1.0), 2.0),
    "coronal": (CORONAL, (1.0, 1.0), 2.0),
    "oblique": (OBLIQUE, (1.0, 1.0), 2.0),
    "negated_cosines": (((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), (1.0, 1.0), 2.0),
    "negated_sagittal": (((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)), (1.0, 1.0), 2.0),
    "prone": (PRONE, (1.0, 1.0), 2.0),
    "non_square": (AXIAL, (0.9, 1.1), 2.0),
    "non_square_oblique": (OBLIQUE, (0.9, 1.1), 2.5),
    "descending_positions": (SAGITTAL, (1.1, 0.9), -1.5),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_known_points_map_to_their_voxels(name: str) -> None:
    """A bright voxel at a known patient point lands at the voxel the affine maps that point to, and back."""
    orientation, spacing, step = GEOMETRIES[name]
    origin = (-10.0, -12.0, 30.0)
    datasets = make_series(orientation, spacing, origin, step=step)
    if name == "prone":
        for ds in datasets:
            ds.PatientPosition = "HFP"
    vol = build_volume(datasets)
    assert vol.array.shape == (5, 16, 20)
    assert vol.array.dtype == np.float32
    assert_markers(vol, orientation, spacing, origin, step)
    normal = np.cross(orientation[0], orientation[1])
    assert vol.affine[:3, 2] @ normal > 0  # slices stacked along +n
    np.testing.assert_allclose(vol.spacing, (spacing[1], spacing[0], abs(step)), atol=1e-9)


def test_non_square_pixels_put_column_spacing_on_the_row_cosine() -> None:
    """PixelSpacing [0.9, 1.1] gives 1.1 mm along the row cosine (i) and 0.9 mm along the column cosine (j)."""
    vol = build_volume(make_series(AXIAL, (0.9, 1.1)))
    np.testing.assert_allclose(vol.affine[:3, 0], [1.1, 0, 0])
    np.testing.assert_allclose(vol.affine[:3, 1], [0, 0.9, 0])
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 2.0])


def test_slices_sorted_by_position_not_instance_number() -> None:
    """Slices and their SOP Instance UIDs follow position along the normal whatever the InstanceNumbers say."""
    datasets = make_series(step=-2.0, seed=3)
    vol = build_volume(datasets)
    # Acquisition slice s sits at origin - 2 s along +z, so the array runs s = 4..0.
    assert vol.sop_instance_uids == tuple(f"{ROOT}.10.{s}" for s in (4, 3, 2, 1, 0))
    np.testing.assert_array_equal(vol.array[:, 0, 0], [14, 13, 12, 11, 10])
    np.testing.assert_allclose(vol.affine[:3, 3], [-10.0, -12.0, 30.0 - 8.0])
    assert vol.frame_numbers is None
    assert vol.series_instance_uid == SERIES_UID
    assert (vol.frame_of_reference_uid, vol.sop_class_uid) == (FOR_UID, MRImageStorage)


def test_step_is_measured_not_slice_thickness() -> None:
    """The slice axis length is the measured position step (here 3 mm) and not SliceThickness (5 mm)."""
    vol = build_volume(make_series(step=3.0))
    assert vol.spacing[2] == pytest.approx(3.0)


def test_rescale_slope_and_intercept_apply_per_slice() -> None:
    """Stored values become slope * value + intercept, with each slice's own slope (as Philips writes)."""
    datasets = make_series()
    for ds in datasets:
        s = int(ds.SOPInstanceUID.rsplit(".", 1)[1])
        ds.RescaleSlope, ds.RescaleIntercept = 2.5 + s, -100.0
    vol = build_volume(datasets)
    expected = [(10 + s) * (2.5 + s) - 100.0 for s in range(5)]
    np.testing.assert_allclose(vol.array[:, 0, 0], expected, rtol=1e-6)


def test_signed_pixels_keep_their_sign() -> None:
    """Signed 16-bit stored values are read as negative numbers before rescaling."""
    datasets = make_series()
    for ds in datasets:
        ds.PixelRepresentation = 1
        ds.PixelData = np.full((16, 20), -7, dtype=np.int16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, 1.0
    vol = build_volume(datasets)
    assert np.all(vol.array == -6.0)


def test_non_image_dataset_is_dropped_and_logged() -> None:
    """A stray SR without Pixel Data in the series is left out and reported as non_image_dropped."""
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID, sr.SeriesInstanceUID = BasicTextSRStorage, f"{ROOT}.99", SERIES_UID
    with capture_logs() as logs:
        vol = build_volume([*make_series(), sr])
    assert vol.array.shape[0] == 5
    dropped = [e for e in logs if e["event"] == "non_image_dropped"]
    assert dropped == [
        {
            "event": "non_image_dropped",
            "log_level": "info",
            "sop_class_uid": BasicTextSRStorage,
            "sop_instance_uid": f"{ROOT}.99",
        }
    ]


def test_with_array_keeps_geometry_and_checks_shape() -> None:
    """with_array returns the same grid with new values and refuses another shape."""
    vol = build_volume(make_series())
    mask = vol.with_array(vol.array > 100)
    assert mask.array.dtype == np.float32 and mask.array.sum() == 2
    assert mask.affine is vol.affine and mask.sop_instance_uids == vol.sop_instance_uids
    with pytest.raises(ValueError, match="shape"):
        vol.with_array(np.zeros((2, 2, 2)))


def _rejects(datasets: list[Dataset], pattern: str, min_slices: int = 3) -> None:
    with pytest.raises(SeriesError, match=pattern):
        build_volume(datasets, min_slices=min_slices)


def test_rejects_mixed_orientations() -> None:
    """One slice tilted by a few milliradians breaks the single-orientation rule."""
    datasets = make_series()
    datasets[2].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.99999, 0.004]
    _rejects(datasets, "mixed orientations")


def test_rejects_three_plane_localizer() -> None:
    """A localizer with one axial, one sagittal and one coronal image is not a volume."""
    datasets = make_series(n_slices=3)
    for ds, (row, col) in zip(datasets, (AXIAL, SAGITTAL, CORONAL)):
        ds.ImageOrientationPatient = [*row, *col]
    _rejects(datasets, "mixed orientations")


@pytest.mark.parametrize("n_images", [1, 2])
def test_rejects_fewer_than_min_slices(n_images: int) -> None:
    """A single image or two slices are fewer than the three a volume needs."""
    _rejects(make_series(n_slices=n_images), f"has {n_images} image")


def test_min_slices_is_configurable() -> None:
    """min_slices raises the bar: five slices are refused when six are required, and below 2 is a usage error."""
    _rejects(make_series(), "at least 6", min_slices=6)
    with pytest.raises(ValueError, match="min_slices"):
        build_volume(make_series(), min_slices=1)


def test_rejects_mixed_image_sizes() -> None:
    """A slice with other Rows/Columns breaks the one-grid rule."""
    datasets = make_series()
    datasets[1].Columns = 22
    datasets[1].PixelData = np.zeros((16, 22), np.uint16).tobytes()
    _rejects(datasets, "mixed image sizes")


def test_rejects_mixed_pixel_spacing() -> None:
    """A slice with another PixelSpacing breaks the one-grid rule."""
    datasets = make_series()
    datasets[3].PixelSpacing = [1.0, 1.01]
    _rejects(datasets, r"mixed PixelSpacing")


def test_rejects_duplicate_positions() -> None:
    """Two images at the same position (e.g. two echoes) are refused."""
    datasets = make_series()
    extra = copy.deepcopy(datasets[0])
    extra.SOPInstanceUID = f"{ROOT}.50"
    _rejects([*datasets, extra], "duplicate slice positions")


def test_rejects_duplicate_instances() -> None:
    """The same instance given twice is named as such."""
    datasets = make_series()
    _rejects([*datasets, copy.deepcopy(datasets[0])], "appear more than once")


def test_rejects_missing_slice() -> None:
    """A gap of twice the spacing is reported as a missing slice."""
    datasets = [ds for ds in make_series(n_slices=6) if ds.SOPInstanceUID != f"{ROOT}.10.3"]
    _rejects(datasets, "missing slice")


def test_rejects_irregular_spacing() -> None:
    """A slice moved by 30 % of the step makes the spacing irregular."""
    datasets = make_series(n_slices=6)
    moved = next(ds for ds in datasets if ds.SOPInstanceUID == f"{ROOT}.10.3")
    moved.ImagePositionPatient[2] += 0.6
    _rejects(datasets, "irregular slice spacing")


def test_accepts_spacing_jitter_within_tolerance() -> None:
    """Positions off by 1 % of the step (DS rounding) still make a volume with the mean step."""
    datasets = make_series(n_slices=6)
    moved = next(ds for ds in datasets if ds.SOPInstanceUID == f"{ROOT}.10.3")
    moved.ImagePositionPatient[2] += 0.02
    assert build_volume(datasets).spacing[2] == pytest.approx(2.0)


def test_rejects_sheared_stack() -> None:
    """Slice origins drifting in-plane (a sheared stack) are refused."""
    datasets = make_series()
    for ds in datasets:
        s = int(ds.SOPInstanceUID.rsplit(".", 1)[1])
        ds.ImagePositionPatient[0] += 0.5 * s
    _rejects(datasets, "in-plane offset")


@pytest.mark.parametrize(
    ("orientation", "pattern"),
    [
        ([1.0, 0.0, 0.0, 0.0, 1.1, 0.0], "not orthonormal"),
        ([1.0, 0.0, 0.0, 0.1, 0.995, 0.0], "not orthonormal"),
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "not orthonormal"),
        ([1.0, 0.0, 0.0, 0.0, 1.0], "expected 6"),
    ],
)
def test_rejects_bad_orientation(orientation: list[float], pattern: str) -> None:
    """Orientation cosines that are not two orthogonal unit vectors are refused."""
    datasets = make_series()
    for ds in datasets:
        ds.ImageOrientationPatient = orientation
    _rejects(datasets, pattern)


@pytest.mark.parametrize("keyword", ["ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"])
def test_rejects_missing_geometry(keyword: str) -> None:
    """An image without orientation, position or pixel spacing cannot be placed."""
    datasets = make_series()
    delattr(datasets[2], keyword)
    _rejects(datasets, f"lacks {keyword}")


def test_rejects_only_non_images() -> None:
    """A series with no Pixel Data at all is refused."""
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, f"{ROOT}.99"
    _rejects([sr], "no image objects")


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "FrameOfReferenceUID"])
def test_rejects_mixed_uids(keyword: str) -> None:
    """Images of another series or frame of reference cannot join the volume."""
    datasets = make_series()
    setattr(datasets[1], keyword, f"{ROOT}.77")
    _rejects(datasets, f"different {keyword}")


def test_rejects_missing_frame_of_reference() -> None:
    """Without a Frame of Reference UID the volume cannot be tied to patient space."""
    datasets = make_series()
    del datasets[0].FrameOfReferenceUID
    _rejects(datasets, "lacks FrameOfReferenceUID")


def test_rejects_colour_images() -> None:
    """An RGB image (e.g. a screenshot) is refused."""
    datasets = make_series()
    datasets[0].SamplesPerPixel = 3
    _rejects(datasets, "only greyscale")


def test_rejects_undecodable_pixel_data() -> None:
    """Truncated Pixel Data is reported as undecodable, naming the image."""
    datasets = make_series()
    datasets[0].PixelData = datasets[0].PixelData[:100]
    _rejects(datasets, "cannot be decoded")


# --- Enhanced MR (multi-frame, functional groups) ------------------------------------------


def make_enhanced(
    orientation: tuple[Sequence[float], Sequence[float]] = OBLIQUE,
    pixel_spacing: tuple[float, float] = (0.9, 1.1),
    origin: Sequence[float] = (-10.0, -12.0, 30.0),
    n_frames: int = 5,
    step: float = 2.0,
    rows: int = 16,
    columns: int = 20,
    measures_per_frame: bool = False,
) -> tuple[Dataset, list[int]]:
    """One Enhanced MR object whose frames are stored in a shuffled position order.

    Returns the dataset and, for each acquisition slice s, its 0-based frame index.
    """
    positions = slice_positions(orientation, origin, n_frames, step)
    slice_of_frame = [int(s) for s in np.random.default_rng(1).permutation(n_frames)]
    ds = Dataset()
    _common(ds, EnhancedMRImageStorage, f"{ROOT}.20")
    ds.NumberOfFrames = n_frames
    _image_pixel(ds, rows, columns)
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = 5.0
    plane = Dataset()
    plane.ImageOrientationPatient = [float(v) for v in (*orientation[0], *orientation[1])]
    shared = Dataset()
    shared.PlaneOrientationSequence = DicomSequence([plane])
    if not measures_per_frame:
        shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for s in slice_of_frame:
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [float(v) for v in positions[s]]
        group.PlanePositionSequence = DicomSequence([position])
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 2.0, float(s), "US"
        group.PixelValueTransformationSequence = DicomSequence([transform])
        if measures_per_frame:
            group.PixelMeasuresSequence = DicomSequence([copy.deepcopy(measures)])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack([_pixels(rows, columns, s, MARKERS) for s in slice_of_frame]).tobytes()
    frame_of_slice = [slice_of_frame.index(s) for s in range(n_frames)]
    return ds, frame_of_slice


@pytest.mark.parametrize("measures_per_frame", [False, True])
def test_enhanced_mr_builds_the_same_geometry(measures_per_frame: bool) -> None:
    """An Enhanced MR object with shuffled frames gives sorted slices, frame numbers and per-frame rescale."""
    ds, frame_of_slice = make_enhanced(measures_per_frame=measures_per_frame)
    vol = build_volume([ds])
    assert vol.frame_numbers == tuple(f + 1 for f in frame_of_slice)
    assert vol.sop_instance_uids == (f"{ROOT}.20",) * 5
    assert vol.sop_class_uid == EnhancedMRImageStorage
    # Pixel Value Transformation: 2 * stored + s on acquisition slice s.
    np.testing.assert_allclose(vol.array[:, 0, 0], [2.0 * (10 + s) + s for s in range(5)])
    for marker in MARKERS:
        point = marker_point(marker, OBLIQUE, (0.9, 1.1), (-10.0, -12.0, 30.0), 2.0)
        i, j, k = np.rint(vol.patient_to_index(point)).astype(int)
        np.testing.assert_allclose(vol.patient_to_index(point), [i, j, k], atol=1e-6)
        assert vol.array[k, j, i] == 2.0 * marker.value + marker.s


def test_enhanced_mr_rejects_missing_plane_position() -> None:
    """A frame without Plane Position cannot be placed."""
    ds, _ = make_enhanced()
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    _rejects([ds], "frame 3 lacks ImagePositionPatient")


def test_enhanced_mr_rejects_repeated_positions() -> None:
    """Frames repeating positions (e.g. several temporal positions) are refused as duplicates."""
    ds, _ = make_enhanced()
    first = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = list(first)
    _rejects([ds], "duplicate slice positions")


def test_enhanced_mr_rejects_frame_count_mismatch() -> None:
    """Per-frame functional groups must match NumberOfFrames."""
    ds, _ = make_enhanced()
    ds.NumberOfFrames = 6
    _rejects([ds], "per-frame functional group items")


def test_multi_frame_mixed_with_single_frames_is_rejected() -> None:
    """A multi-frame object together with single-frame images is not one volume."""
    ds, _ = make_enhanced()
    ds.SOPClassUID = MRImageStorage
    ds.SeriesInstanceUID = SERIES_UID
    _rejects([ds, *make_series()], "must be the only image")


def test_multi_frame_without_functional_groups_is_rejected() -> None:
    """A multi-frame object without functional groups has no per-frame geometry and is refused."""
    ds, _ = make_enhanced()
    del ds.SharedFunctionalGroupsSequence
    del ds.PerFrameFunctionalGroupsSequence
    _rejects([ds], "no functional groups")


# --- Compressed transfer syntaxes ---------------------------------------------------------------

# openjpeg's default six resolution levels need images of at least 32 pixels a side.
C_ROWS, C_COLUMNS = 32, 40


def _signed_series() -> list[Dataset]:
    datasets = make_series(rows=C_ROWS, columns=C_COLUMNS, pixel_spacing=(0.9, 1.1))
    for ds in datasets:
        s = int(ds.SOPInstanceUID.rsplit(".", 1)[1])
        arr = _pixels(C_ROWS, C_COLUMNS, s, MARKERS, dtype=np.int16)
        arr[0, :] = -300  # negative values survive the codec
        ds.PixelRepresentation = 1
        ds.PixelData = arr.tobytes()
    return datasets


def _round_trip(datasets: list[Dataset], tmp_path: Path, syntax: UID) -> list[Dataset]:
    """Encode each dataset in *syntax* (pydicom's encoders or DCMTK), write and read it back."""
    out: list[Dataset] = []
    for n, ds in enumerate(datasets):
        plain, coded = tmp_path / f"{n}.dcm", tmp_path / f"{n}.coded.dcm"
        if syntax in (JPEGLosslessSV1, JPEGLSLossless):
            ds.save_as(plain, enforce_file_format=True)
            # DCMTK: +e1 is JPEG lossless selection value 1; dcmcjpls encodes lossless by default.
            command = ["/usr/bin/dcmcjpeg", "+e1"] if syntax == JPEGLosslessSV1 else ["/usr/bin/dcmcjpls"]
            require_tool(command[0])
            subprocess.run([*command, str(plain), str(coded)], check=True, capture_output=True, timeout=30)
        elif syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(coded, enforce_file_format=True)
        else:
            ds.compress(syntax, generate_instance_uid=False)
            ds.save_as(coded, enforce_file_format=True)
        read = pydicom.dcmread(coded)
        assert read.file_meta.TransferSyntaxUID == syntax
        out.append(read)
    return out


@pytest.mark.parametrize(
    "syntax",
    [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless],
    ids=lambda uid: UID(uid).keyword,
)
def test_compressed_series_decode_losslessly(syntax: UID, tmp_path: Path) -> None:
    """A series stored in a lossless compressed syntax gives exactly the uncompressed volume."""
    reference = build_volume(_signed_series())
    vol = build_volume(_round_trip(_signed_series(), tmp_path, syntax))
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine)
    assert vol.array.min() == -300


def test_compressed_enhanced_mr_decodes(tmp_path: Path) -> None:
    """An RLE-compressed Enhanced MR object decodes frame by frame into the same volume."""
    ds, _ = make_enhanced(rows=C_ROWS, columns=C_COLUMNS)
    reference = build_volume([copy.deepcopy(ds)])
    vol = build_volume(_round_trip([ds], tmp_path, RLELossless))
    np.testing.assert_array_equal(vol.array, reference.array)
    assert vol.frame_numbers == reference.frame_numbers
