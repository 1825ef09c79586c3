"""Intensity-guided growth of a predicted mask (an optional, per-model post-processing step).

A network can stop short of the tumour's true border where the tumour looks like a normal
structure in its usual place: demo-t2-3d, for one, leaves out the part of a pontine tumour that
fills the prepontine cistern, where the normal T2 image is bright CSF (see docs/model.md). When
the model's manifest asks for it, :func:`grow_mask` adds the voxels next to the mask whose
intensity lies within the range of the mask's own core, up to a set distance:

1. the core is the mask shrunk by ``core_erosion_mm``; its ``low_quantile`` intensity and the
   lower of its ``high_quantile`` intensity and its median plus ``high_mads`` robust standard
   deviations (1.4826 x MAD) bound the candidates (so voxels darker than the tumour, and voxels
   brighter than it such as CSF, are never added, even when the mask already holds some CSF);
2. candidates lie within ``max_mm`` of the mask, and a morphological opening with a ball of
   ``opening_mm`` removes thin candidate strands (partial volume along CSF borders);
3. candidate regions that touch the mask (face connectivity) join it, and holes are filled.

The mask only grows; nothing is removed. Pure functions on arrays, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dmg_node.errors import ModelError

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class GrowConfig:
    """Parameters of :func:`grow_mask` (stored in the model manifest under ``grow``).

    Attributes
    ----------
    max_mm
        Added voxels lie at most this far (mm, Euclidean) from the predicted mask.
    low_quantile, high_quantile
        Intensity quantiles of the mask's core that bound the voxels that may be added.
    core_erosion_mm
        The core is the mask minus this margin (the whole mask if that leaves too little).
    opening_mm
        Radius of the ball that opens the candidate region (0 = no opening).
    high_mads
        The upper bound is at most the core's median plus this many robust standard deviations
        (1.4826 x median absolute deviation); 0 = the ``high_quantile`` alone.
    """

    max_mm: float = 9.0
    low_quantile: float = 0.02
    high_quantile: float = 0.95
    core_erosion_mm: float = 1.0
    opening_mm: float = 2.0
    high_mads: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_mm) and self.max_mm > 0):
            raise ModelError(f"grow max_mm must be a positive number of mm; found {self.max_mm!r}")
        if not 0.0 <= self.low_quantile < self.high_quantile <= 1.0:
            raise ModelError(
                "grow quantiles must satisfy 0 <= low_quantile < high_quantile <= 1; "
                f"found {self.low_quantile!r}, {self.high_quantile!r}"
            )
        for name, unit in (("core_erosion_mm", " of mm"), ("opening_mm", " of mm"), ("high_mads", "")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ModelError(f"grow {name} must be a number{unit} >= 0; found {value!r}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GrowConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"grow has unknown keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) for k, v in data.items()})


MIN_CORE_VOXELS = 50


def ball(radius_mm: float, spacing: tuple[float, float, float]) -> Mask:
    """Boolean ball of ``radius_mm`` on a grid of ``spacing`` (mm per axis)."""
    half = [math.floor(radius_mm / s) for s in spacing]
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing)]
    grid = np.meshgrid(*axes, indexing="ij")
    out: Mask = sum(g**2 for g in grid) <= radius_mm**2 + 1e-9
    return out


def grow_mask(
    image: npt.NDArray[Any], mask: Mask, spacing: tuple[float, float, float], config: GrowConfig
) -> Mask:
    """``mask`` plus the adjacent voxels of ``image`` that look like its core (see module doc).

    Parameters
    ----------
    image
        Source intensities, same shape as ``mask``.
    mask
        The post-processed prediction.
    spacing
        Voxel size in mm per array axis.
    config
        Growth parameters.

    Returns
    -------
    numpy.ndarray
        A boolean mask that contains ``mask``.
    """
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} must equal mask shape {mask.shape}")
    if not mask.any():
        return mask.copy()
    pad = [math.ceil(config.max_mm / s) + 2 for s in spacing]
    (found,) = ndimage.find_objects(mask.astype(np.uint8))
    box = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(found, pad, mask.shape))
    sub = mask[box]
    values = np.asarray(image[box], dtype=np.float32)
    core = ndimage.distance_transform_edt(sub, sampling=spacing) > config.core_erosion_mm
    if int(core.sum()) < MIN_CORE_VOXELS:
        core = sub
    reference = values[core]
    low, high = np.quantile(reference, [config.low_quantile, config.high_quantile])
    if config.high_mads > 0:
        median = float(np.median(reference))
        spread = 1.4826 * float(np.median(np.abs(reference - median)))
        high = min(float(high), median + config.high_mads * spread)
    near = ndimage.distance_transform_edt(~sub, sampling=spacing) <= config.max_mm
    candidate = (values >= low) & (values <= high) & near & ~sub
    if config.opening_mm > 0:
        candidate = ndimage.binary_opening(candidate, structure=ball(config.opening_mm, spacing))
    joined = sub | candidate
    labels, _ = ndimage.label(joined)
    touching = np.unique(labels[sub])
    grown = ndimage.binary_fill_holes(np.isin(labels, touching[touching > 0]))
    out = mask.copy()
    out[box] = grown  # contains sub: every voxel of sub is in a component touching sub
    return out
