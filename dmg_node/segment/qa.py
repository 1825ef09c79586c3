"""Contour QA: do a study's contours agree across sequences, and is each one plausible?

A model can contour the wrong structure with full confidence: on an independent brain the T1C
model put 1-5 ml in front of the pons (Dice 0) while T2 and FLAIR were on the lesion. Nothing in
one contour tells that apart from a good one; the other sequences of the same study do.

Checks (thresholds in ``[qa]`` of node.toml, :class:`~dmg_node.config.QaSettings`):

* **consistency** (``discordant``): for each contour of a study, against the other non-empty
  contours that share its Frame of Reference (PS3.3 C.7.4.1: the same patient coordinates):
  the fraction of its volume inside the union of the others, and its Dice with each of them.
  Flagged when that fraction is below ``min_inside_others`` or its best Dice is below
  ``min_dice``; an empty contour is flagged when another sequence found a tumour.
* **plausibility** (``outside_head``, ``implausible_volume``, ``too_many_components``): the
  fraction of the contour outside the head region, its volume against ``[min_ml, max_ml]`` and
  its number of connected components (26-connectivity) against ``max_components``. The head
  region (:func:`head_region`) is not a brain mask: the head found by Otsu's threshold on a
  coarse LPS grid, less ``head_margin_mm`` from its surface. On thick-slice T2 the dark skull
  base lies within 10 mm of a pontine tumour, so the margin must stay small; it catches
  contours in air, not contours on the wrong structure inside the head (consistency does).

Masks on different grids (2D and 3D series, oblique stacks) are compared in patient coordinates:
the voxel centres of one mask are mapped into the other's index space with the two affines and
looked up there (nearest voxel). The consensus ROI samples every contour at the voxel centres of
one series' grid and keeps those covered by at least two. Pure functions on arrays: no I/O, no
clock, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dmg_node.config import QaSettings
from dmg_node.errors import SeriesError
from dmg_node.segment.preprocess import antialias, canonical_grid, head_mask, resample
from dmg_node.volume import Volume

BoolArray = npt.NDArray[np.bool_]
Affine = npt.NDArray[np.float64]

# The head is found on this grid: fine enough for a margin of several mm, small enough to be cheap.
HEAD_GRID_MM = 3.0
# Voxels of that grid this close to the edge of what the series imaged are not known to be outside.
EDGE_VOXELS = 3
# Every note starts so; the TPS shows it in the ROI Description (LO, 64 characters, PS3.5 6.2).
NOTE_PREFIX = "QA FLAG: "


class FlagCode(StrEnum):
    """Why a contour was flagged."""

    DISCORDANT = "discordant"
    OUTSIDE_HEAD = "outside_head"
    IMPLAUSIBLE_VOLUME = "implausible_volume"
    TOO_MANY_COMPONENTS = "too_many_components"


@dataclass(frozen=True)
class Region:
    """A boolean mask with its grid: ``mask[k, j, i]`` is the voxel at ``affine @ (i, j, k, 1)`` (LPS mm)."""

    mask: BoolArray
    affine: Affine

    @classmethod
    def on(cls, volume: Volume, mask: BoolArray) -> Region:
        """*mask* on *volume*'s grid."""
        if mask.shape != volume.array.shape:
            raise ValueError(f"mask must have the volume's shape {volume.array.shape}; found {mask.shape}")
        return cls(np.asarray(mask, dtype=bool), volume.affine)

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in ml."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def centres(self) -> npt.NDArray[np.float64]:
        """Patient coordinates (n, 3) of the centres of the mask's voxels."""
        kji = np.argwhere(self.mask).astype(np.float64)
        out: npt.NDArray[np.float64] = kji[:, ::-1] @ self.affine[:3, :3].T + self.affine[:3, 3]
        return out

    def contains(self, xyz: npt.NDArray[np.float64]) -> BoolArray:
        """Whether each patient point (n, 3) falls in a voxel of the mask (nearest voxel)."""
        inv = np.linalg.inv(self.affine)
        ijk = np.rint(xyz @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        kji = ijk[:, ::-1]
        shape = np.asarray(self.mask.shape)
        inside: BoolArray = np.all((kji >= 0) & (kji < shape), axis=1)
        out = np.zeros(len(xyz), dtype=bool)
        idx = kji[inside]
        out[inside] = self.mask[idx[:, 0], idx[:, 1], idx[:, 2]]
        return out


@dataclass(frozen=True)
class QaInput:
    """One segmented series as the QA sees it.

    Attributes
    ----------
    sequence
        ``t1c``, ``t2`` or ``flair``.
    contour
        The model's mask on the series' grid.
    frame_of_reference_uid
        Contours are compared only within one Frame of Reference (0020,0052).
    head
        Where a tumour may lie (see :func:`head_region`); ``None`` skips that check.
    """

    sequence: str
    contour: Region
    frame_of_reference_uid: str
    head: Region | None = None


@dataclass(frozen=True)
class Flag:
    """One failed check: a code, a short text for the planner and the figures behind it."""

    code: FlagCode
    text: str
    figures: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ContourQa:
    """The figures and flags of one contour.

    ``inside_others`` is the fraction of its volume inside the union of the other sequences'
    contours and ``dice`` its Dice with each of them (both absent without another contour in
    its Frame of Reference); ``outside_head`` is absent when no head region was given.
    """

    sequence: str
    volume_ml: float
    components: int
    outside_head: float | None = None
    inside_others: float | None = None
    dice: Mapping[str, float] = field(default_factory=dict)
    flags: tuple[Flag, ...] = ()

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def note(self, max_chars: int = 1024) -> str:
        """``"QA FLAG: ..."`` with every flag's text, or only their codes where that is too long; empty when not flagged."""
        if not self.flags:
            return ""
        full = NOTE_PREFIX + "; ".join(f.text for f in self.flags)
        if len(full) <= max_chars:
            return full
        return (NOTE_PREFIX + ", ".join(f.code.value for f in self.flags))[:max_chars]

    def figures(self) -> dict[str, object]:
        """The figures as log fields."""
        out: dict[str, object] = {"volume_ml": round(self.volume_ml, 2), "components": self.components}
        if self.outside_head is not None:
            out["outside_head"] = round(self.outside_head, 3)
        if self.inside_others is not None:
            out["inside_others"] = round(self.inside_others, 3)
        out.update({f"dice_{seq}": round(d, 3) for seq, d in self.dice.items()})
        return out


def head_region(volume: Volume, margin_mm: float) -> Region | None:
    """Where a tumour may lie: the head of *volume* less *margin_mm*, on a coarse LPS grid.

    The head is :func:`~dmg_node.segment.preprocess.head_mask` (Otsu's threshold, largest
    component, holes filled) on a :data:`HEAD_GRID_MM` grid; a voxel is kept unless it lies within
    *margin_mm* of a voxel known to be outside the head (imaged, at least :data:`EDGE_VOXELS`
    from the edge of the imaged slab, and not head). ``None`` for a blank image.
    """
    shape, affine = canonical_grid(volume, HEAD_GRID_MM)
    image = resample(antialias(volume, HEAD_GRID_MM), volume.affine, shape, affine)
    try:
        head = head_mask(image)
    except SeriesError:
        return None
    # Only what the series saw, away from its edges, is known to be outside the head: the LPS
    # box of an oblique slab has corners it never imaged, a partial slab's edges cut through the
    # head, and the head mask's closing erodes it where it touches the edge of the grid.
    seen = resample(np.ones(volume.array.shape, dtype=np.float32), volume.affine, shape, affine, order=0) > 0.5
    inner = ndimage.binary_erosion(seen, iterations=EDGE_VOXELS, border_value=0)
    outside = inner & ~head
    if not outside.any():
        return Region(np.ones(shape, dtype=bool), affine)
    depth = ndimage.distance_transform_edt(~outside, sampling=HEAD_GRID_MM)
    region: BoolArray = depth > margin_mm
    return Region(region, affine)


def check_study(inputs: Sequence[QaInput], settings: QaSettings) -> dict[str, ContourQa]:
    """Consistency and plausibility figures and flags for each contour of one study, by sequence.

    Raises
    ------
    ValueError
        If two inputs name the same sequence.
    """
    names = [i.sequence for i in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"one contour per sequence; found {names}")
    centres = {i.sequence: i.contour.centres() for i in inputs}
    results = {}
    for item in inputs:
        others = [o for o in inputs if o.sequence != item.sequence
                  and o.frame_of_reference_uid == item.frame_of_reference_uid and o.contour.mask.any()]
        flags: list[Flag] = []
        volume_ml = len(centres[item.sequence]) * item.contour.voxel_ml
        components = count_components(item.contour.mask)
        inside: float | None = None
        dice: dict[str, float] = {}
        if others and volume_ml > 0:
            inside, dice = _consistency(item, centres, others)
            best = max(dice.values())
            if inside < settings.min_inside_others or best < settings.min_dice:
                flags.append(Flag(FlagCode.DISCORDANT,
                                  f"{_upper(item.sequence)} disagrees with {_joined(others)}: "
                                  f"{inside:.0%} inside them, Dice {best:.2f}",
                                  {"inside_others": inside, **{f"dice_{k}": v for k, v in dice.items()}}))
        elif others:
            found = {o.sequence: len(centres[o.sequence]) * o.contour.voxel_ml for o in others}
            flags.append(Flag(FlagCode.DISCORDANT,
                              f"{_upper(item.sequence)} empty; "
                              + ", ".join(f"{_upper(seq)} found {ml:.1f} ml" for seq, ml in found.items()),
                              {f"ml_{seq}": ml for seq, ml in found.items()}))
        outside = None
        if volume_ml > 0:
            if item.head is not None:
                outside = 1.0 - float(item.head.contains(centres[item.sequence]).mean())
                if outside > settings.max_outside_head:
                    flags.append(Flag(FlagCode.OUTSIDE_HEAD, f"{outside:.0%} outside the head",
                                      {"outside_head": outside}))
            if not settings.min_ml <= volume_ml <= settings.max_ml:
                flags.append(Flag(FlagCode.IMPLAUSIBLE_VOLUME,
                                  f"{volume_ml:.1f} ml outside {settings.min_ml:g}-{settings.max_ml:g} ml",
                                  {"volume_ml": volume_ml}))
            if components > settings.max_components:
                flags.append(Flag(FlagCode.TOO_MANY_COMPONENTS,
                                  f"{components} parts (max {settings.max_components})",
                                  {"components": float(components)}))
        results[item.sequence] = ContourQa(item.sequence, volume_ml, components, outside, inside, dice,
                                           tuple(flags))
    return results


def consensus(target: QaInput, inputs: Sequence[QaInput], min_votes: int = 2) -> BoolArray:
    """Voxels of *target*'s grid covered by at least *min_votes* of the contours in its Frame of Reference.

    Each contour (*target*'s own included) is sampled at the target's voxel centres (nearest voxel).
    """
    shape = target.contour.mask.shape
    votes = np.zeros(shape, dtype=np.uint8)
    for item in inputs:
        if item.frame_of_reference_uid != target.frame_of_reference_uid or not item.contour.mask.any():
            continue
        if item is target:
            votes += target.contour.mask
        else:
            sampled = resample(item.contour.mask, item.contour.affine, shape, target.contour.affine, order=0)
            votes += sampled > 0.5
    out: BoolArray = votes >= min_votes
    return out


def count_components(mask: BoolArray) -> int:
    """Number of 26-connected components of *mask*."""
    if not mask.any():
        return 0
    (box,) = ndimage.find_objects(mask.astype(np.uint8))
    _, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    return int(n)


def _consistency(item: QaInput, centres: Mapping[str, npt.NDArray[np.float64]],
                 others: Sequence[QaInput]) -> tuple[float, dict[str, float]]:
    """Fraction of *item*'s contour inside the union of *others*, and its Dice with each of them.

    The overlap volume of two contours is the mean of the two estimates (one's voxels found in
    the other, counted in its own voxel volume), so it does not depend on which grid is finer.
    """
    own = centres[item.sequence]
    own_ml = len(own) * item.contour.voxel_ml
    union = np.zeros(len(own), dtype=bool)
    dice = {}
    for other in others:
        theirs = centres[other.sequence]
        in_other = other.contour.contains(own)
        union |= in_other
        overlap = (float(in_other.sum()) * item.contour.voxel_ml
                   + float(item.contour.contains(theirs).sum()) * other.contour.voxel_ml) / 2
        dice[other.sequence] = 2 * overlap / (own_ml + len(theirs) * other.contour.voxel_ml)
    return float(union.mean()), dice


def _upper(sequence: str) -> str:
    return sequence.upper()


def _joined(inputs: Sequence[QaInput]) -> str:
    return "/".join(_upper(i.sequence) for i in inputs)
