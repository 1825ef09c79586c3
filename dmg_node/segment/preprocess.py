"""Source volume <-> model grid: the one preprocessing shared by training and inference.

Steps (all in patient coordinates, so oblique series need no special case):

1. Define a *canonical* grid: axes along patient L, P, S (DICOM LPS, PS3.3 C.7.6.2.1.1) at the
   model's isotropic spacing, covering the source field of view. In the Volume convention its
   array is (S, P, L) and its affine is diagonal.
2. Smooth the source along each axis finer than the model spacing (Gaussian anti-aliasing, so
   a 0.5 mm and a 1 mm acquisition look alike on the model grid), then resample it with
   trilinear interpolation (``scipy.ndimage.affine_transform`` composes source and target
   affines, so no coordinate arrays are built).
3. Find the head with an Otsu threshold (largest component, holes filled), crop to its bounding
   box plus a margin and pad each axis to a multiple of the network's divisor.
4. z-score with the mean and standard deviation inside the head, then clip.

:func:`to_source` takes a probability map on the model grid back onto the exact source grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dmg_node.errors import SeriesError
from dmg_node.volume import Volume

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
Affine = npt.NDArray[np.float64]

# (i, j, k) in the affine <-> (k, j, i) in the array.
_REVERSE = np.eye(3)[::-1]


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters (stored in the model manifest; training and inference share them).

    Attributes
    ----------
    spacing_mm
        Isotropic voxel size of the model grid.
    divisor
        Each axis of the model input is padded to a multiple of this (the generator's divisor).
    margin_mm
        Margin kept around the head's bounding box.
    clip
        z-scored intensities are clipped to ``[-clip, clip]``.
    """

    spacing_mm: float = 2.0
    divisor: int = 16
    margin_mm: float = 8.0
    clip: float = 5.0

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            spacing_mm=float(data["spacing_mm"]),
            divisor=int(data["divisor"]),
            margin_mm=float(data["margin_mm"]),
            clip=float(data["clip"]),
        )


@dataclass(frozen=True)
class Prepared:
    """A source volume on the model grid.

    Attributes
    ----------
    image
        z-scored image, shape (S, P, L), each a multiple of the divisor.
    affine
        Model-grid voxel (i, j, k) -> LPS mm (Volume convention).
    label
        The label on the same grid, when one was given, as the tumour fraction of each voxel
        (0..1: anti-aliased and interpolated like the image, so partial volume at the border is
        kept; a network trained on it gives probabilities that threshold back at 0.5 onto a
        finer source grid with little loss).
    """

    image: FloatArray
    affine: Affine
    label: FloatArray | None = None


def resample(
    array: npt.NDArray[Any],
    src_affine: Affine,
    dst_shape: tuple[int, int, int],
    dst_affine: Affine,
    *,
    order: int = 1,
    cval: float = 0.0,
) -> FloatArray:
    """Sample ``array`` (on ``src_affine``) at the voxel centres of another grid.

    Both grids follow the Volume convention: arrays are (k, j, i), affines map (i, j, k, 1) to
    LPS mm. Points outside the source get ``cval``.
    """
    m = np.linalg.inv(src_affine) @ dst_affine
    matrix = _REVERSE @ m[:3, :3] @ _REVERSE
    offset = _REVERSE @ m[:3, 3]
    out: FloatArray = ndimage.affine_transform(
        np.asarray(array, dtype=np.float32),
        matrix,
        offset=offset,
        output_shape=dst_shape,
        order=order,
        mode="constant",
        cval=cval,
        prefilter=False,
    )
    return out


def canonical_grid(volume: Volume, spacing_mm: float) -> tuple[tuple[int, int, int], Affine]:
    """Shape and affine of the LPS-aligned grid at ``spacing_mm`` that covers ``volume``."""
    lps = volume.index_to_patient(_corners((0, 0, 0), np.array(volume.array.shape) - 1))
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    size = np.floor((hi - lo) / spacing_mm + 1e-6).astype(int) + 1
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = lo
    return (int(size[2]), int(size[1]), int(size[0])), affine


def antialias(volume: Volume, spacing_mm: float) -> FloatArray:
    """Gaussian-smooth ``volume`` before downsampling to ``spacing_mm``.

    Per array axis, sigma = (factor - 1) / 2 voxels where factor = spacing_mm / voxel size
    (as ``skimage.transform.resize`` does); axes already coarser than the model grid are left.
    """
    factors = np.array(volume.spacing[::-1]) ** -1 * spacing_mm
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    if not sigma.any():
        return volume.array
    out: FloatArray = ndimage.gaussian_filter(volume.array, sigma=tuple(sigma), mode="nearest", truncate=3.0)
    return out


def otsu_threshold(values: npt.NDArray[np.floating], bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (maximises the between-class variance of a histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def head_mask(image: FloatArray) -> BoolArray:
    """The head: voxels above Otsu's threshold, largest connected component, holes filled.

    Raises
    ------
    SeriesError
        If the image is constant (nothing to threshold).
    """
    if not np.ptp(image) > 0:
        raise SeriesError("head mask needs a non-constant image; found all voxels equal")
    fg = image > otsu_threshold(image)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(np.argmax(sizes))
    filled: BoolArray = ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=2))
    return filled


def _bbox(mask: BoolArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Inclusive lowest and highest array index of the True voxels of ``mask``, per axis."""
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0)


def _corners(lo: npt.ArrayLike, hi: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The 8 corners (i, j, k) of the box between array indices ``lo`` and ``hi`` (k, j, i)."""
    (k0, j0, i0), (k1, j1, i1) = np.asarray(lo), np.asarray(hi)
    return np.array([[i, j, k] for i in (i0, i1) for j in (j0, j1) for k in (k0, k1)], dtype=np.float64)


def _crop_bounds(mask: BoolArray, margin: int, divisor: int) -> list[tuple[int, int]]:
    """Per-axis [start, stop) around ``mask`` plus ``margin``, widened to a multiple of ``divisor``.

    Bounds may fall outside the array; the caller pads there.
    """
    bounds = []
    for lo, hi in zip(*_bbox(mask)):
        start, stop = int(lo) - margin, int(hi) + 1 + margin
        size = -(-(stop - start) // divisor) * divisor
        start -= (size - (stop - start)) // 2
        bounds.append((start, start + size))
    return bounds


def _extract(array: FloatArray, bounds: list[tuple[int, int]], cval: float) -> FloatArray:
    """``array[bounds]`` where out-of-range parts are filled with ``cval``."""
    pads = [(max(0, -a), max(0, b - n)) for (a, b), n in zip(bounds, array.shape)]
    padded = np.pad(array, pads, mode="constant", constant_values=cval)
    sl = tuple(slice(a + p[0], b + p[0]) for (a, b), p in zip(bounds, pads))
    out: FloatArray = padded[sl]
    return out


def prepare(
    volume: Volume, config: PreprocessConfig, label: npt.NDArray[Any] | None = None
) -> Prepared:
    """Put ``volume`` (and optionally its label, on the same grid) onto the model grid.

    Parameters
    ----------
    volume
        Source image in the Volume convention.
    config
        Preprocessing parameters from the model manifest.
    label
        Optional mask with ``volume.array``'s shape (non-zero = tumour).

    Returns
    -------
    Prepared
        The normalised image, its affine and the resampled label (tumour fraction).

    Raises
    ------
    SeriesError
        If the label's shape differs from the volume's, or the image is constant.
    """
    if label is not None and label.shape != volume.array.shape:
        raise SeriesError(f"label shape must equal the image shape {volume.array.shape}; found {label.shape}")
    shape, affine = canonical_grid(volume, config.spacing_mm)
    image = resample(antialias(volume, config.spacing_mm), volume.affine, shape, affine)
    head = head_mask(image)
    margin = int(round(config.margin_mm / config.spacing_mm))
    bounds = _crop_bounds(head, margin, config.divisor)
    origin_ijk = np.array([bounds[2][0], bounds[1][0], bounds[0][0]], dtype=np.float64)
    affine = affine.copy()
    affine[:3, 3] = affine[:3, :3] @ origin_ijk + affine[:3, 3]
    inside = image[head]
    mean, std = float(inside.mean()), float(inside.std())
    cropped = _extract(image, bounds, 0.0)
    normed = np.clip((cropped - mean) / max(std, 1e-6), -config.clip, config.clip).astype(np.float32)
    resampled_label = None
    if label is not None:
        fraction = antialias(volume.with_array(label > 0), config.spacing_mm)
        resampled_label = np.clip(resample(fraction, volume.affine, normed.shape, affine), 0.0, 1.0)
    return Prepared(image=normed, affine=affine, label=resampled_label)


def to_source(probability: FloatArray, affine: Affine, volume: Volume, threshold: float = 0.5) -> FloatArray:
    """Take a model-grid probability map back onto ``volume``'s exact grid (trilinear).

    Only the source block that can reach ``threshold`` is interpolated: a trilinear value can
    exceed it only next to a model voxel that does, so the block is the bounding box of those
    voxels grown by one voxel. Elsewhere the result is 0.

    Returns
    -------
    numpy.ndarray
        float32 probabilities with ``volume.array``'s shape.
    """
    out = np.zeros(volume.array.shape, dtype=np.float32)
    hot = probability > threshold
    if not hot.any():
        return out
    lo, hi = _bbox(hot)
    src_ijk = volume.patient_to_index(_corners(lo - 1, hi + 1) @ affine[:3, :3].T + affine[:3, 3])
    shape = np.array(volume.array.shape)
    start = np.maximum(np.floor(src_ijk.min(axis=0)).astype(int)[::-1], 0)
    stop = np.minimum(np.ceil(src_ijk.max(axis=0)).astype(int)[::-1] + 1, shape)
    if np.any(stop <= start):
        return out
    block_affine = volume.affine.copy()
    block_affine[:3, 3] = volume.index_to_patient(start[::-1])
    block = (int(stop[0] - start[0]), int(stop[1] - start[1]), int(stop[2] - start[2]))
    out[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = resample(probability, affine, block, block_affine)
    return out
