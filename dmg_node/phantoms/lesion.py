"""Tumours of many shapes for the domain-randomized generator (:mod:`dmg_node.phantoms.synth`).

A tumour is the upper level set of a smooth field ``phi`` (mm, > 0 inside the shapes) whose
level is chosen so that the label, inside the intracranial volume, has the drawn volume:
lobulated (a union of rotated ellipsoids), infiltrative (one elongated ellipsoid, rough and with
a wide soft margin), exophytic (a lobe pushed out of the main mass, mostly forwards, as into the
prepontine cistern) or multifocal (separate nodules). Within it: no, patchy, ring or solid
enhancement, a cyst and a haemorrhage. Arrays are (slices, rows, columns) as in
:mod:`dmg_node.volume`; the label is the 0.5 level of the soft tumour fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dmg_node.phantoms.anatomy import F32, F64, _ramp, _rotation
from dmg_node.phantoms.randomize import TumourParams
from dmg_node.phantoms.tumour import _smooth_noise

COMPONENTS = ("tumour", "enhancing", "necrosis", "cyst", "haemorrhage")  # classes of randomize.CLASSES


@dataclass(frozen=True)
class Lesion:
    """A tumour in a box of the case grid.

    ``parts`` holds, per component of :data:`COMPONENTS`, its fraction of each voxel; they sum to
    ``fraction`` (the soft tumour fraction) and ``label`` is ``fraction``'s 0.5 level.
    """

    box: tuple[slice, slice, slice]
    label: npt.NDArray[np.uint8]
    fraction: F32
    parts: dict[str, F32]
    texture: F32  # multiplicative heterogeneity of the solid tumour's signal


def make_lesion(rng: np.random.Generator, p: TumourParams, icv: F32, centre: F64, r: float) -> Lesion:
    """Grow the tumour *p* around case index *centre* (z, y, x) on a grid of *r* mm.

    The drawn volume is met exactly (in voxels) inside ``icv > 0.5``, capped by the box.
    """
    radius = (3.0 * p.volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    reach = {"multifocal": 3.2, "exophytic": 2.8}.get(p.shape, 2.2)
    half = (reach * radius + 2.0 * p.margin_mm + 6.0) / r
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, icv.shape)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    shape = tuple(int(h - l) for l, h in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[(np.arange(lo[a], hi[a]) - centre[a]) * r for a in range(3)], indexing="ij"),
                    axis=-1).astype(np.float32)
    phi = np.full(shape, -1e3, np.float32)
    for middle, semi in _blobs(rng, p, radius):
        rot = _rotation(*rng.uniform(0.0, 360.0, 3))
        u = ((grid - middle) @ rot) / semi
        np.maximum(phi, ((1.0 - np.sqrt((u**2).sum(axis=-1))) * semi.min()).astype(np.float32), out=phi)
    phi += np.float32(p.roughness_mm) * _smooth_noise(rng, shape, 2.5 / r)
    phi = ndimage.gaussian_filter(phi, 1.0 / r)
    allowed = icv[box] > 0.5
    inside = phi[allowed]
    n_vox = min(max(int(round(p.volume_ml * 1000.0 / r**3)), 1), inside.size)
    level = float(np.partition(inside, inside.size - n_vox)[inside.size - n_vox])
    depth = phi - np.float32(level)
    fraction = _ramp(depth, p.margin_mm) * icv[box]
    label = (fraction >= 0.5).astype(np.uint8)
    parts = _components(rng, p, depth, label, grid, r)
    texture = (1.0 + 0.08 * _smooth_noise(rng, shape, 3.0 / r)).astype(np.float32)
    return Lesion(box, label, fraction, {k: v * fraction for k, v in parts.items()}, texture)


def _blobs(rng: np.random.Generator, p: TumourParams, radius: float) -> list[tuple[F64, F64]]:
    """(centre offset in mm (z, y, x), semi-axes in mm) of the ellipsoids making the shape."""
    if p.shape == "multifocal":
        nodule = radius / p.n_lobes ** (1.0 / 3.0)
        out = [(np.zeros(3), nodule * rng.uniform(0.7, 1.0, 3))]
        for _ in range(p.n_lobes - 1):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            out.append((direction * nodule * rng.uniform(2.2, 3.2), nodule * rng.uniform(0.6, 1.0, 3)))
        return out
    if p.shape == "infiltrative":
        semi = radius * np.array([rng.uniform(0.9, 1.4), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)])
        return [(rng.normal(0.0, 0.1 * radius, 3), semi)]
    out = [(rng.normal(0.0, 0.35 * radius, 3), radius * rng.uniform(0.45, 0.85, 3)) for _ in range(p.n_lobes)]
    if p.shape == "exophytic":
        direction = np.array([0.0, -1.0, 0.0]) + rng.normal(0.0, 0.5, 3)  # mostly anterior (-y in LPS)
        direction /= np.linalg.norm(direction)
        out.append((direction * radius * rng.uniform(1.0, 1.4), radius * rng.uniform(0.4, 0.7, 3)))
    return out


def _components(rng: np.random.Generator, p: TumourParams, depth: F32, label: npt.NDArray[np.uint8],
                grid: F32, r: float) -> dict[str, F32]:
    """Per-voxel shares of the lesion's components (summing to 1) from the enhancement, cyst, haemorrhage."""
    shape = depth.shape
    zeros = np.zeros(shape, np.float32)
    inner = depth[label > 0] if label.any() else np.zeros(1, np.float32)
    necrosis, enhancing = zeros, zeros
    if p.enhancement == "ring":
        core = rng.uniform(0.1, 0.3)
        core_level, rim_level = np.quantile(inner, [1.0 - core, 1.0 - core - rng.uniform(0.15, 0.3)])
        necrosis = _ramp(depth - np.float32(core_level), 1.0)
        enhancing = _ramp(depth - np.float32(rim_level), 1.0) - necrosis
    elif p.enhancement == "patchy":
        blobs = _smooth_noise(rng, shape, rng.uniform(1.5, 3.0) / r)
        cut = np.quantile(blobs[label > 0], 1.0 - rng.uniform(0.1, 0.35)) if label.any() else 0.0
        enhancing = _ramp(blobs - np.float32(cut), 0.3)
    elif p.enhancement == "solid":
        enhancing = _ramp(depth - np.float32(np.quantile(inner, rng.uniform(0.0, 0.3))), 1.5)
    cyst = _sphere(rng, depth, label, grid, rng.uniform(0.25, 0.45) * _radius(label, r)) if p.cyst else zeros
    haem = _sphere(rng, depth, label, grid, rng.uniform(2.0, 5.0)) if p.haemorrhage else zeros
    haem = haem * (1.0 - cyst)
    necrosis = necrosis * (1.0 - cyst - haem)
    enhancing = np.clip(enhancing * (1.0 - cyst - haem - necrosis), 0.0, 1.0)
    solid = np.clip(1.0 - cyst - haem - necrosis - enhancing, 0.0, 1.0)
    return {"tumour": solid, "enhancing": enhancing, "necrosis": necrosis, "cyst": cyst, "haemorrhage": haem}


def _radius(label: npt.NDArray[np.uint8], r: float) -> float:
    return float((3.0 * max(int(label.sum()), 1) * r**3 / (4.0 * np.pi)) ** (1.0 / 3.0))


def _sphere(rng: np.random.Generator, depth: F32, label: npt.NDArray[np.uint8], grid: F32, radius: float) -> F32:
    """A soft sphere of *radius* mm centred on a deep tumour voxel (a cyst or a haemorrhage)."""
    where = np.argwhere(label > 0)
    if not len(where):
        return np.zeros(depth.shape, np.float32)
    deep = where[depth[tuple(where.T)] >= np.quantile(depth[label > 0], 0.5)]
    centre = grid[tuple(deep[int(rng.integers(len(deep)))])]
    distance = np.sqrt(((grid - centre) ** 2).sum(axis=-1))
    out: F32 = _ramp(np.float32(radius) - distance, 1.0)
    return out
