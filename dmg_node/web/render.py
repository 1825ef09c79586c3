"""An RTSTRUCT's contours drawn on a few slices of its series, as one PNG (the status page's preview).

Pure apart from :func:`overlay_png_from_files`: the images come from the series' volume
(:func:`dmg_node.volume.build_volume`), the regions from :func:`dmg_node.rtstruct.read_roi_mask`,
and the PNG is written here with zlib (PNG specification, ISO/IEC 15948: signature, IHDR, IDAT,
IEND chunks) so the node needs no imaging library. A preview for a quick look, not a review tool:
the TPS shows the contour at full resolution.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset

from dmg_node.dicomfiles import read_datasets
from dmg_node.errors import RtStructError
from dmg_node.rtstruct import read_roi_mask
from dmg_node.volume import Volume, build_volume

PANEL_PX = 256  # each slice is scaled up (nearest neighbour) to at least this many pixels across
GAP_PX = 4
DEFAULT_COLOR = (255, 0, 0)


def png_rgb(image: npt.NDArray[np.uint8]) -> bytes:
    """Encode an ``(height, width, 3)`` uint8 array as an 8-bit RGB PNG (colour type 2, no interlace)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"png_rgb needs a (height, width, 3) uint8 array; found {image.shape} {image.dtype}")
    height, width = image.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # Each scanline starts with filter type 0 (None).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
            + chunk(b"IEND", b""))


def pick_slices(mask: npt.NDArray[np.bool_], n: int = 3) -> list[int]:
    """Up to *n* slice indices through the region: the largest cross-section and evenly spread others.

    Returns the middle slice of the volume when the mask is empty (so an empty RTSTRUCT still
    shows its series).
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(areas)
    if present.size == 0:
        return [mask.shape[0] // 2]
    spread = {int(present[round(i)]) for i in np.linspace(0, present.size - 1, n)}
    spread.add(int(np.argmax(areas)))
    ordered = sorted(spread)
    while len(ordered) > n:  # drop the spread slice nearest the largest one, keep the largest
        biggest = int(np.argmax(areas))
        ordered.remove(min((k for k in ordered if k != biggest), key=lambda k: abs(k - biggest)))
    return ordered


def _grey(slice_: npt.NDArray[np.float32], low: float, high: float) -> npt.NDArray[np.uint8]:
    scaled = np.clip((slice_ - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    return np.asarray(np.rint(scaled), dtype=np.uint8)


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Pixels of *mask* with a 4-neighbour outside it (a one-pixel edge)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge: npt.NDArray[np.bool_] = mask & ~inner
    return edge


def overlay(volume: Volume, mask: npt.NDArray[np.bool_], slices: Sequence[int],
            color: tuple[int, int, int] = DEFAULT_COLOR) -> npt.NDArray[np.uint8]:
    """The chosen slices side by side, greyscale (1st-99th percentile window), the region's edge in *color*.

    Slices are shown as stored (row 0 at the top, PS3.3 C.7.6.2.1.1), scaled up by a whole
    factor; the edge is drawn two pixels wide on the scaled image so it stays thin.
    """
    array = volume.array
    # every 4th pixel in-plane is plenty for a display window and 16 times quicker to sort
    low, high = (float(v) for v in np.percentile(array[:, ::4, ::4], [1.0, 99.0]))
    rows, cols = array.shape[1:]
    factor = max(1, -(-PANEL_PX // max(rows, cols)))
    panels = []
    for k in slices:
        grey = np.kron(_grey(array[k], low, high), np.ones((factor, factor), np.uint8))
        big = np.kron(mask[k].astype(np.uint8), np.ones((factor, factor), np.uint8)).astype(bool)
        edge = _outline(big)
        edge |= _outline(big & ~edge)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        rgb[edge] = color
        panels.append(rgb)
    gap = np.full((rows * factor, GAP_PX, 3), 255, np.uint8)
    parts: list[npt.NDArray[np.uint8]] = []
    for i, panel in enumerate(panels):
        parts.extend([gap, panel] if i else [panel])
    return np.concatenate(parts, axis=1)


def roi_masks(rtstruct: Dataset, volume: Volume) -> tuple[npt.NDArray[np.bool_], tuple[int, int, int]]:
    """The union of the RTSTRUCT's ROIs on *volume*'s grid and the first ROI's display colour.

    Raises
    ------
    RtStructError
        The RTSTRUCT has no ROI, or a contour does not lie in one slice plane.
    """
    names = [str(item.get("ROIName", "")) for item in rtstruct.get("StructureSetROISequence", [])]
    if not names:
        raise RtStructError("RTSTRUCT has no StructureSetROISequence item (PS3.3 C.8.8.5)")
    mask = np.zeros(volume.array.shape, dtype=bool)
    for name in dict.fromkeys(names):
        mask |= read_roi_mask(rtstruct, volume, name)
    color = DEFAULT_COLOR
    contours = rtstruct.get("ROIContourSequence", [])
    if contours and len(contours[0].get("ROIDisplayColor", [])) == 3:
        r, g, b = (int(v) for v in contours[0].ROIDisplayColor)
        color = (r, g, b)
    return mask, color


def overlay_png_from_files(rtstruct_path: Path, series_paths: Sequence[Path], n_slices: int = 3) -> tuple[bytes, list[int]]:
    """Read an RTSTRUCT and its source series and return the overlay PNG and the slices shown (0-based).

    Raises
    ------
    SeriesError
        The series does not make one volume.
    RtStructError
        The RTSTRUCT cannot be rasterised on it.
    OSError
        A file cannot be read.
    """
    rtstruct = dcmread(rtstruct_path)
    volume = build_volume(read_datasets(series_paths))
    mask, color = roi_masks(rtstruct, volume)
    slices = pick_slices(mask, n_slices)
    return png_rgb(overlay(volume, mask, slices, color)), slices
