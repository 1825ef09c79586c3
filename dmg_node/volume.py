"""Series datasets -> one 3D volume with its geometry in patient coordinates (LPS, mm).

Conventions (used by every stage after this one; do not change them locally):

* ``Volume.array`` has shape ``(n_slices, rows, columns)``: the slices stacked in order of
  increasing position along the slice normal ``n = row_cosine x column_cosine``.
* ``Volume.affine`` is a 4x4 matrix mapping a voxel index **(column i, row j, slice k, 1)** to
  DICOM patient coordinates **LPS** in mm (PS3.3 C.7.6.2.1.1)::

      P = affine @ [i, j, k, 1]

  so ``array[k, j, i]`` is the voxel at ``affine @ [i, j, k, 1]``. Note the index order swap
  between the array (k, j, i) and the affine (i, j, k); use :meth:`Volume.patient_to_index`
  and :meth:`Volume.index_to_patient` rather than doing it by hand.
* ``sop_instance_uids[k]`` is the instance that holds slice ``k`` (for an Enhanced MR object,
  the one SOP Instance UID repeated, with ``frame_numbers[k]`` the 1-based frame).

Geometry rules applied by :func:`build_volume` (each failure is a :class:`SeriesError` whose
message names the rule and the value found):

* Datasets without Pixel Data (a presentation state or SR filed in the same series) are dropped
  and logged (``non_image_dropped``); every remaining object must be an image.
* Either single-frame images (one per slice) or exactly one multi-frame object with functional
  groups (Enhanced / Legacy Converted Enhanced MR, PS3.3 C.7.6.16), never a mix.
* All slices share Rows/Columns, Pixel Spacing (within 1e-4 mm), Image Orientation (Patient)
  (within 1e-4 per cosine), Series Instance UID, Frame of Reference UID and SOP Class UID.
* The orientation cosines are unit vectors and orthogonal (within 1e-3).
* Slices are sorted by position along ``n``, never by Instance Number. Positions closer than
  0.01 mm are duplicates. Every gap must be within 5 % of the median gap: a missing slice doubles
  a gap, while DS rounding of positions stays far below 5 %; the slice axis of the affine is
  then ``n`` times the mean gap (Slice Thickness is ignored: it is not the spacing).
* Each slice origin lies on the line through the first one along ``n`` within a tenth of the
  smallest pixel spacing (sheared stacks cannot be written with this affine).

One module because these rules share the frame records they check, and every stage after this
one relies on the conventions above holding together; the decoding of pixel data is the small
rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dmg_node.errors import SeriesError

log = structlog.get_logger(__name__)

ORIENTATION_ATOL = 1e-4
ORTHONORMAL_ATOL = 1e-3
PIXEL_SPACING_ATOL_MM = 1e-4
DUPLICATE_ATOL_MM = 0.01
SPACING_RTOL = 0.05
IN_PLANE_FRACTION = 0.1

# Decoders raise these for corrupt or unsupported pixel data (pydicom.pixels.decoders.base).
_DECODE_ERRORS = (AttributeError, ValueError, RuntimeError, NotImplementedError)


@dataclass(frozen=True)
class Volume:
    """One series as a 3D array plus its geometry (see the module docstring for conventions)."""

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    frame_numbers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (slices, rows, columns); found shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4; found shape {self.affine.shape}")
        if len(self.sop_instance_uids) != self.array.shape[0]:
            raise ValueError(
                f"Volume needs one SOP Instance UID per slice; found {len(self.sop_instance_uids)} "
                f"for {self.array.shape[0]} slices"
            )
        if self.frame_numbers is not None and len(self.frame_numbers) != self.array.shape[0]:
            raise ValueError(
                f"Volume needs one frame number per slice; found {len(self.frame_numbers)} "
                f"for {self.array.shape[0]} slices"
            )

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (column i, row j, slice k)."""
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    def index_to_patient(self, ijk: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (i, j, k) voxel indices (..., 3) to LPS patient coordinates (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_index(self, xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map LPS patient coordinates (..., 3) to fractional (i, j, k) voxel indices (..., 3)."""
        p = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine).astype(np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]

    def with_array(self, array: npt.ArrayLike) -> Volume:
        """Return a copy on the same grid holding *array* (same shape, cast to float32).

        Raises
        ------
        ValueError
            If *array* does not have the shape of :attr:`array`.
        """
        new = np.asarray(array, dtype=np.float32)
        if new.shape != self.array.shape:
            raise ValueError(f"with_array needs shape {self.array.shape}; found {new.shape}")
        return dataclasses.replace(self, array=new)


@dataclass(frozen=True)
class _Frame:
    """One 2D image of the series: where its pixels come from and where it lies."""

    dataset: Dataset
    frame_index: int  # 0-based frame within its dataset (0 for a single-frame image)
    where: str  # names the image in error messages (SOP Instance UID, frame number)
    rows: int
    columns: int
    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: npt.NDArray[np.float64]
    slope: float
    intercept: float


def build_volume(datasets: Sequence[Dataset], min_slices: int = 3) -> Volume:
    """Stack one MR series into a :class:`Volume` after checking its geometry.

    Parameters
    ----------
    datasets
        The series' datasets, in any order: single-frame images (MR Image, PS3.3 A.4) or one
        multi-frame object with functional groups (Enhanced MR Image, PS3.3 A.36.2). Pixel
        data may use any transfer syntax the installed pydicom decoders handle.
    min_slices
        The fewest slices accepted as a volume (at least 2).

    Returns
    -------
    Volume
        Rescaled values (Rescale Slope/Intercept, PS3.3 C.11.1.1.2, or the Pixel Value
        Transformation functional group, C.7.6.16.2.9) as float32, sorted along the slice
        normal, with the affine described in the module docstring.

    Raises
    ------
    SeriesError
        When the datasets do not form one regular volume; the message gives the rule broken
        (see the module docstring) and the value found.
    ValueError
        If *min_slices* is below 2.
    """
    if min_slices < 2:
        raise ValueError(f"min_slices must be at least 2; found {min_slices}")
    try:
        return _build_volume(datasets, min_slices)
    except SeriesError:
        raise
    except (*_DECODE_ERRORS, KeyError, TypeError, IndexError) as exc:
        # pydicom converts element values when they are first read, so a header element that
        # cannot be decoded (a VR that does not exist, a number that is not one) raises here,
        # far from any file: it is this series that is unusable, not the study.
        raise SeriesError(f"a header element cannot be decoded: {type(exc).__name__}: {exc}"[:300]) from exc


def _build_volume(datasets: Sequence[Dataset], min_slices: int) -> Volume:
    images = _drop_non_images(datasets)
    series_uid, frame_of_reference_uid, sop_class_uid = _common_uids(images)
    multi = [ds for ds in images if _has_functional_groups(ds) or int(ds.get("NumberOfFrames") or 1) > 1]
    if multi and len(images) > 1:
        raise SeriesError(
            f"a multi-frame object must be the only image of its series; found {len(images)} image objects"
        )
    frames = _enhanced_frames(images[0]) if multi else [_single_frame(ds) for ds in images]
    if len(frames) < min_slices:
        raise SeriesError(
            f"series has {len(frames)} image(s) but a volume needs at least {min_slices} "
            "(a localizer or a single image is not a volume)"
        )
    _check_consistent(frames)
    row_cos, col_cos, normal = _orthonormal_axes(frames[0].orientation)
    ordered, step = _sort_along_normal(frames, normal)

    affine = np.eye(4)
    affine[:3, 0] = row_cos * ordered[0].pixel_spacing[1]
    affine[:3, 1] = col_cos * ordered[0].pixel_spacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = ordered[0].position
    array = _pixels(ordered, multi_frame=bool(multi))
    volume = Volume(
        array=array,
        affine=affine,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        sop_instance_uids=tuple(str(f.dataset.SOPInstanceUID) for f in ordered),
        sop_class_uid=sop_class_uid,
        frame_numbers=tuple(f.frame_index + 1 for f in ordered) if multi else None,
    )
    log.debug("volume_built", series_instance_uid=series_uid, shape=array.shape, spacing=volume.spacing)
    return volume


def _drop_non_images(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Keep the datasets with Pixel Data (7FE0,0010); log the others."""
    images = []
    for ds in datasets:
        if "PixelData" in ds:
            images.append(ds)
        else:
            log.info(
                "non_image_dropped",
                sop_class_uid=str(ds.get("SOPClassUID", "")),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            )
    if not images:
        raise SeriesError(f"series has no image objects (none of {len(datasets)} dataset(s) has Pixel Data)")
    return images


def _name(keyword: str) -> str:
    """A keyword with its tag for messages, e.g. ``PixelSpacing (0028,0030)``."""
    return f"{keyword} {Tag(keyword)}"


def _common_uids(images: Sequence[Dataset]) -> tuple[str, str, str]:
    """Series, Frame of Reference and SOP Class UID, which every image must share."""
    found = []
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID"):
        values = {str(ds.get(keyword) or "") for ds in images}
        if "" in values:
            raise SeriesError(f"an image lacks {_name(keyword)}")
        if len(values) > 1:
            raise SeriesError(f"images have {len(values)} different {_name(keyword)} values; one series needs one")
        found.append(values.pop())
    uids = [str(ds.get("SOPInstanceUID") or "") for ds in images]
    if "" in uids:
        raise SeriesError(f"an image lacks {_name('SOPInstanceUID')}")
    if len(set(uids)) != len(uids):
        raise SeriesError(f"{len(uids) - len(set(uids))} {_name('SOPInstanceUID')} value(s) appear more than once")
    return found[0], found[1], found[2]


def _has_functional_groups(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _floats(item: Dataset | None, keyword: str, count: int, where: str) -> npt.NDArray[np.float64]:
    """*keyword* of *item* as *count* finite floats, or a SeriesError naming the attribute and image."""
    value = None if item is None else item.get(keyword)
    if value is None:
        raise SeriesError(f"{where} lacks {_name(keyword)}")
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where} has an unreadable {_name(keyword)}: {value!r}") from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{where} has {_name(keyword)} {value!r}; expected {count} finite numbers")
    return arr


def _frame(
    ds: Dataset, frame_index: int, where: str, items: Sequence[Dataset | None], rescale: Dataset | None
) -> _Frame:
    """One frame from the items holding its position, orientation and pixel spacing (in that order)."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise SeriesError(f"{where} has {_name('SamplesPerPixel')} {ds.SamplesPerPixel}; only greyscale is supported")
    if "Rows" not in ds or "Columns" not in ds:
        raise SeriesError(f"{where} lacks {_name('Rows')} or {_name('Columns')}")
    try:
        slope = 1.0 if rescale is None else float(rescale.get("RescaleSlope", 1.0) or 1.0)
        intercept = 0.0 if rescale is None else float(rescale.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where} has an unreadable RescaleSlope or RescaleIntercept") from exc
    return _Frame(
        dataset=ds,
        frame_index=frame_index,
        where=where,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        position=_floats(items[0], "ImagePositionPatient", 3, where),
        orientation=_floats(items[1], "ImageOrientationPatient", 6, where),
        pixel_spacing=_floats(items[2], "PixelSpacing", 2, where),
        slope=slope,
        intercept=intercept,
    )


def _single_frame(ds: Dataset) -> _Frame:
    """Geometry of one single-frame image (Image Plane module, PS3.3 C.7.6.2)."""
    return _frame(ds, 0, f"image {ds.SOPInstanceUID}", (ds, ds, ds), ds)


def _group_item(ds: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """The first item of functional group *keyword* for a frame: per-frame, else shared (C.7.6.16)."""
    groups = [ds.PerFrameFunctionalGroupsSequence[frame_index]] if "PerFrameFunctionalGroupsSequence" in ds else []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        sequence = group.get(keyword)
        if sequence:
            item: Dataset = sequence[0]
            return item
    return None


def _enhanced_frames(ds: Dataset) -> list[_Frame]:
    """Geometry of each frame of a multi-frame object from its functional groups (PS3.3 C.7.6.16).

    Plane Position, Plane Orientation and Pixel Measures may each be shared or per-frame; the
    Pixel Value Transformation group (C.7.6.16.2.9) gives the rescale, else the top level does.
    """
    base = f"multi-frame image {ds.SOPInstanceUID}"
    if not _has_functional_groups(ds):
        raise SeriesError(f"{base} has no functional groups; multi-frame objects without them are not supported")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        raise SeriesError(f"{base} has {len(per_frame)} per-frame functional group items for NumberOfFrames {n_frames}")
    frames = []
    for index in range(n_frames):
        items = [
            _group_item(ds, index, keyword)
            for keyword in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence")
        ]
        transform = _group_item(ds, index, "PixelValueTransformationSequence")
        frames.append(_frame(ds, index, f"{base} frame {index + 1}", items, transform or ds))
    return frames


def _check_consistent(frames: Sequence[_Frame]) -> None:
    """All frames share image size, pixel spacing and orientation."""
    first = frames[0]
    for frame in frames[1:]:
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise SeriesError(
                f"mixed image sizes: {first.rows}x{first.columns} and {frame.rows}x{frame.columns} "
                "(Rows x Columns)"
            )
        if np.max(np.abs(frame.pixel_spacing - first.pixel_spacing)) > PIXEL_SPACING_ATOL_MM:
            raise SeriesError(
                f"mixed PixelSpacing (0028,0030): {first.pixel_spacing.tolist()} and "
                f"{frame.pixel_spacing.tolist()} mm"
            )
        diff = float(np.max(np.abs(frame.orientation - first.orientation)))
        if diff > ORIENTATION_ATOL:
            raise SeriesError(
                f"mixed orientations: ImageOrientationPatient (0020,0037) differs by {diff:.3g} between "
                f"images (tolerance {ORIENTATION_ATOL:g})"
            )
    if np.any(first.pixel_spacing <= 0):
        raise SeriesError(f"PixelSpacing (0028,0030) must be positive; found {first.pixel_spacing.tolist()}")


def _orthonormal_axes(
    orientation: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit row cosine, column cosine and slice normal from Image Orientation (Patient)."""
    row_cos, col_cos = orientation[:3], orientation[3:]
    row_norm, col_norm = float(np.linalg.norm(row_cos)), float(np.linalg.norm(col_cos))
    dot = float(row_cos @ col_cos)
    if abs(row_norm - 1) > ORTHONORMAL_ATOL or abs(col_norm - 1) > ORTHONORMAL_ATOL or abs(dot) > ORTHONORMAL_ATOL:
        raise SeriesError(
            f"ImageOrientationPatient (0020,0037) is not orthonormal: |row|={row_norm:.4g}, "
            f"|column|={col_norm:.4g}, row.column={dot:.3g} (tolerance {ORTHONORMAL_ATOL:g})"
        )
    row_cos, col_cos = row_cos / row_norm, col_cos / col_norm
    normal = np.cross(row_cos, col_cos)
    return row_cos, col_cos, normal / np.linalg.norm(normal)


def _sort_along_normal(frames: Sequence[_Frame], normal: npt.NDArray[np.float64]) -> tuple[list[_Frame], float]:
    """Frames in increasing position along *normal*, and the mean step between them (mm)."""
    ordered = sorted(frames, key=lambda f: float(f.position @ normal))
    distance = np.array([f.position @ normal for f in ordered])
    gaps = np.diff(distance)
    n_duplicates = int(np.sum(gaps < DUPLICATE_ATOL_MM))
    if n_duplicates:
        raise SeriesError(
            f"duplicate slice positions: {n_duplicates} slice(s) share a position along the normal with "
            "another (several echoes, phases or repeats in one series?)"
        )
    median = float(np.median(gaps))
    deviation = np.abs(gaps - median) / median
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_RTOL:
        gap = float(gaps[worst])
        rule = "missing slice(s)" if round(gap / median) >= 2 else "irregular slice spacing"
        raise SeriesError(
            f"{rule}: gap of {gap:.4g} mm between slices {worst} and {worst + 1} where the median gap is "
            f"{median:.4g} mm (tolerance {SPACING_RTOL:.0%})"
        )
    step = float(distance[-1] - distance[0]) / (len(ordered) - 1)
    origin = ordered[0].position
    offsets = np.array([f.position - origin - normal * (d - distance[0]) for f, d in zip(ordered, distance)])
    in_plane = float(np.max(np.linalg.norm(offsets, axis=1)))
    tolerance = IN_PLANE_FRACTION * float(np.min(ordered[0].pixel_spacing))
    if in_plane > tolerance:
        raise SeriesError(
            f"slice positions do not lie on a line along the slice normal: in-plane offset up to "
            f"{in_plane:.3g} mm (tolerance {tolerance:.3g} mm); sheared stacks are not supported"
        )
    return ordered, step


def _pixels(ordered: Sequence[_Frame], *, multi_frame: bool) -> npt.NDArray[np.float32]:
    """Decode and rescale the frames into one (slices, rows, columns) float32 array."""
    first = ordered[0]
    array = np.empty((len(ordered), first.rows, first.columns), dtype=np.float32)
    if multi_frame:
        where = f"multi-frame image {first.dataset.SOPInstanceUID}"
        stored = _decode(first.dataset, where)
        if stored.size != len(ordered) * first.rows * first.columns:
            raise SeriesError(
                f"{where} decodes to shape {stored.shape}; expected {len(ordered)} frames of "
                f"{first.rows}x{first.columns}"
            )
        stored = stored.reshape((len(ordered), first.rows, first.columns))
        for k, frame in enumerate(ordered):
            array[k] = stored[frame.frame_index]
    else:
        for k, frame in enumerate(ordered):
            stored = _decode(frame.dataset, frame.where)
            if stored.shape != (first.rows, first.columns):
                raise SeriesError(
                    f"{frame.where} decodes to shape {stored.shape}; expected {first.rows}x{first.columns}"
                )
            array[k] = stored
    for k, frame in enumerate(ordered):
        if (frame.slope, frame.intercept) != (1.0, 0.0):
            array[k] = array[k] * np.float32(frame.slope) + np.float32(frame.intercept)
    return array


def _decode(ds: Dataset, where: str) -> npt.NDArray[np.generic]:
    """Stored pixel values of *ds*, decompressing as its transfer syntax needs (PS3.5 8.2)."""
    try:
        stored: npt.NDArray[np.generic] = ds.pixel_array
    except _DECODE_ERRORS as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        raise SeriesError(f"{where}: pixel data cannot be decoded (transfer syntax {syntax}): {exc}") from exc
    return stored
