"""Is a series complete? Header and geometry evidence that instances are still missing. Pure.

A series is *incomplete* (and must not be contoured) when its own headers show instances are
missing, whatever the quiet period decided (a sender stopped mid-study, a node restart):

* **Declared count**: fewer images than the acquisition declares: Images in Acquisition
  (0020,1002) (PS3.3 C.7.6.1), GE Locations in Acquisition (0021,xx4F, ``GEMS_RELA_01``) or
  Philips Number of Slices MR (2001,xx18, ``Philips Imaging DD 001``) times Number of Temporal
  Positions (0020,0105).
* **Missing slice positions**: along the slice normal (from Image Orientation (Patient),
  PS3.3 C.7.6.2.1.1) a gap between distinct positions is at least :data:`GAP_FACTOR` times the
  median gap.
* **Partial 3D acquisition**: a 3D acquisition (MR Acquisition Type 3D, PS3.3 C.8.3.1) whose
  slices span less than :data:`MIN_3D_EXTENT_FRACTION` of its in-plane field of view. A 3D
  brain acquisition is near-isotropic in extent (a 1 mm sagittal T1 spans ~176 of 256 mm, 0.69;
  the test phantoms 0.71); a send cut after 22 of 176 slices spans 0.09.

Untrusted input: an unreadable value is treated as absent, never raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

GAP_FACTOR = 1.5
MIN_3D_EXTENT_FRACTION = 0.4
_DISTINCT_MM = 0.01
# (group, private creator, element offset) of vendor "slices in this acquisition" counts.
_PRIVATE_SLICE_COUNTS = ((0x0021, "GEMS_RELA_01", 0x4F), (0x2001, "Philips Imaging DD 001", 0x18))


def incompleteness(datasets: Sequence[Dataset]) -> str | None:
    """Why the series looks incomplete, or ``None`` when nothing says so.

    Parameters
    ----------
    datasets
        Every instance of one series (headers are enough).

    Returns
    -------
    str or None
        One line naming the rule and the values found, e.g.
        ``"22 of 176 images (Images in Acquisition (0020,1002))"``.
    """
    if not datasets:
        return "no instances"
    first = datasets[0]
    frames = _frames(datasets)
    n_images = len(frames)
    declared = _declared(first)
    if declared is not None and n_images < declared[0]:
        return f"{n_images} of {declared[0]} images ({declared[1]})"
    normal = _normal(first)
    positions = [p for _item, p in frames if p is not None]
    if normal is None or len(positions) < 2 or len(positions) != n_images:
        return None
    distance = np.unique(np.round(np.array(positions) @ normal / _DISTINCT_MM).astype(np.int64)) * _DISTINCT_MM
    if len(distance) < 2:
        return None
    gaps = np.diff(distance)
    median = float(np.median(gaps))
    missing = gaps >= GAP_FACTOR * median
    if np.any(missing):
        return (f"missing slice positions: {int(missing.sum())} gap(s) up to {float(gaps.max()):.3g} mm "
                f"where slices are {median:.3g} mm apart")
    if _text(first.get("MRAcquisitionType")) == "3D":
        fov = _field_of_view(first)
        extent = float(distance[-1] - distance[0]) + median
        if fov is not None and extent < MIN_3D_EXTENT_FRACTION * fov:
            return (f"3D acquisition covers {extent:.3g} mm ({len(distance)} slices) of its {fov:.3g} mm field "
                    f"of view (less than {MIN_3D_EXTENT_FRACTION:.0%})")
    return None


def _frames(datasets: Sequence[Dataset]) -> list[tuple[Any, np.ndarray[Any, Any] | None]]:
    """(item, ImagePositionPatient) per image: per-frame Plane Position for Enhanced MR."""
    out: list[tuple[Any, np.ndarray[Any, Any] | None]] = []
    for ds in datasets:
        per_frame = _items(ds, "PerFrameFunctionalGroupsSequence")
        if not per_frame:
            out.append((ds, _vector(ds, "ImagePositionPatient", 3)))
            continue
        for fg in per_frame:
            plane = _items(fg, "PlanePositionSequence")
            out.append((fg, _vector(plane[0], "ImagePositionPatient", 3) if plane else None))
    return out


def _declared(ds: Dataset) -> tuple[int, str] | None:
    n = _int(_get(ds, "ImagesInAcquisition"))
    if n is not None and n > 1:
        return n, "Images in Acquisition (0020,1002)"
    temporal = _int(_get(ds, "NumberOfTemporalPositions")) or 1
    for group, creator, offset in _PRIVATE_SLICE_COUNTS:
        try:
            slices = _int(ds.private_block(group, creator)[offset].value)
        except Exception:  # noqa: BLE001 - absent or undecodable private element: no evidence
            continue
        if slices is not None and slices > 1:
            return slices * temporal, f"{creator} ({group:04X},xx{offset:02X}) x {temporal} temporal position(s)"
    return None


def _normal(ds: Dataset) -> np.ndarray[Any, Any] | None:
    cosines = _vector(ds, "ImageOrientationPatient", 6)
    if cosines is None:
        for group in _items(ds, "SharedFunctionalGroupsSequence") + _items(ds, "PerFrameFunctionalGroupsSequence")[:1]:
            for item in _items(group, "PlaneOrientationSequence"):
                cosines = cosines if cosines is not None else _vector(item, "ImageOrientationPatient", 6)
    if cosines is None:
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0.5 else None


def _field_of_view(ds: Dataset) -> float | None:
    spacing = _vector(ds, "PixelSpacing", 2)
    if spacing is None:
        for group in _items(ds, "SharedFunctionalGroupsSequence"):
            for item in _items(group, "PixelMeasuresSequence"):
                spacing = _vector(item, "PixelSpacing", 2)
    rows, cols = _int(_get(ds, "Rows")), _int(_get(ds, "Columns"))
    if spacing is None or not rows or not cols:
        return None
    return float(min(rows * spacing[0], cols * spacing[1]))


def _get(ds: Any, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - untrusted header (e.g. NotImplementedError for VR 'XX'): no evidence
        return None


def _items(ds: Any, keyword: str) -> list[Any]:
    value = _get(ds, keyword)
    try:
        return list(value) if value is not None and not isinstance(value, (str, bytes)) else []
    except TypeError:
        return []


def _vector(ds: Any, keyword: str, count: int) -> np.ndarray[Any, Any] | None:
    value = _get(ds, keyword)
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    return array if array.shape == (count,) and np.all(np.isfinite(array)) else None


def _int(value: Any) -> int | None:
    try:
        number = float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return int(number) if np.isfinite(number) and number.is_integer() else None


def _text(value: Any) -> str:
    return str(value).strip().upper() if value is not None else ""
