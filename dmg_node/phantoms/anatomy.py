"""Template-space head anatomy of the phantom (:mod:`dmg_node.phantoms.phantom`) and its deformation.

The anatomy is the ICBM152 2009a (symmetric) 1 mm T1 template with its grey/white-matter
probability maps, shipped in nilearn's wheel (read offline). CSF is what the intracranial volume
(the template's brain mask, closed and smoothed) holds beyond GM and WM. The template is
skull-stripped, so skull, scalp, face, orbits, sinuses and neck are added as simple shapes so
that a model has to find the tumour, not the brain. A case samples these maps through a pose,
scale and smooth elastic field (with mass effect around the tumour) and turns them into tissue
fractions. The names keep their leading underscore: they are the phantom's internals.

Geometry follows :mod:`dmg_node.volume`: arrays are (slices, rows, columns) and affines map
(column i, row j, slice k) to LPS mm.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# RAS (NIfTI, MNI) <-> LPS (DICOM): negate x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Non-brain shapes (MNI RAS mm): (centre, semi-axes). Crude, but they put plausible structure
# around the posterior fossa, where axial slices through the pons also cut the orbits and sinuses.
_Ellipsoid = tuple[tuple[float, float, float], tuple[float, float, float]]
_FACE: tuple[_Ellipsoid, ...] = (
    ((0.0, 30.0, -60.0), (64.0, 62.0, 50.0)),  # face and jaw
    ((0.0, 82.0, -55.0), (12.0, 20.0, 22.0)),  # nose
    ((0.0, -25.0, -115.0), (55.0, 65.0, 95.0)),  # neck
)
_GLOBES: tuple[_Ellipsoid, ...] = (((32.0, 60.0, -40.0), (12.0, 12.0, 12.0)), ((-32.0, 60.0, -40.0), (12.0, 12.0, 12.0)))
_ORBIT_FAT: tuple[_Ellipsoid, ...] = (((28.0, 42.0, -40.0), (13.0, 20.0, 12.0)), ((-28.0, 42.0, -40.0), (13.0, 20.0, 12.0)))
_AIR: tuple[_Ellipsoid, ...] = (
    ((24.0, 42.0, -62.0), (12.0, 16.0, 15.0)),  # maxillary sinuses
    ((-24.0, 42.0, -62.0), (12.0, 16.0, 15.0)),
    ((0.0, 62.0, -60.0), (6.0, 20.0, 16.0)),  # nasal cavity
    ((0.0, 40.0, -38.0), (7.0, 14.0, 8.0)),  # ethmoid cells
    ((0.0, 14.0, -42.0), (10.0, 9.0, 8.0)),  # sphenoid sinus
    ((0.0, 8.0, -95.0), (10.0, 8.0, 30.0)),  # pharynx
)
_PAD_BELOW_MM = 40.0  # the template stops at the medulla; the cord and neck continue below
_PAD_FRONT_MM = 14.0  # room for the nose
_HEAD_SHELL_MM = 14.0  # extra-axial space, skull and scalp around the intracranial volume
_SHAPE_GRID_MM = 2.0  # smooth shape maps need no finer grid


@dataclass(frozen=True)
class _Anatomy:
    """Template-space maps on axis-aligned LPS grids in array order (z, y, x), like a Volume.

    ``tissue`` (GM, WM probabilities) is on the requested grid; ``shapes`` (signed depths in mm,
    > 0 inside: intracranial volume, head, globes, orbital fat, air spaces) are smooth, so they
    live on a grid of ``shape_spacing`` mm that shares voxel (0, 0, 0) with it.
    """

    tissue: dict[str, F32]
    shapes: dict[str, F32]
    origin: F64  # LPS of voxel (0, 0, 0)
    spacing: float
    shape_spacing: float
    brain_centre: F64  # LPS
    head_box: tuple[F64, F64]  # LPS corners
    face_box: tuple[F64, F64]  # LPS corners of the globes, orbits and air spaces


@functools.lru_cache(maxsize=1)
def templates() -> tuple[F32, F32, F32, F64]:
    """ICBM152 T1, GM and WM as (z, y, x) arrays on an LPS grid, plus that grid's LPS origin."""
    from nilearn import datasets  # slow import (~1.5 s), only when a phantom is made

    arrays = []
    origin = np.zeros(3)
    for load in (datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template):
        img = nib.as_closest_canonical(load(resolution=1))  # type: ignore[no-untyped-call]  # RAS+, 1 mm
        data = np.asarray(img.get_fdata(dtype=np.float32))
        # (x, y, z) RAS -> (z, y, x) with x and y reversed: index order of an axial LPS volume.
        arrays.append(np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1]))
        far = img.affine @ np.array([data.shape[0] - 1, data.shape[1] - 1, 0, 1.0])
        origin = np.array([-far[0], -far[1], img.affine[2, 3]])
    return arrays[0], arrays[1], arrays[2], origin


@functools.lru_cache(maxsize=3)
def _anatomy(spacing: float) -> _Anatomy:
    """Build (once per spacing) the template-space maps every case is sampled from."""
    t1, gm, wm, origin_1mm = templates()
    below, front = round(_PAD_BELOW_MM), round(_PAD_FRONT_MM)
    gm, wm, brain = (_pad(a, below, front) for a in (gm, wm, (t1 > 0).astype(np.float32)))
    origin = origin_1mm - np.array([0.0, front, below])
    brain = np.maximum(brain, np.minimum(gm + wm, 1.0))
    if spacing != 1.0:
        gm, wm = _downsample(gm, spacing), _downsample(wm, spacing)
    coarse = max(spacing, _SHAPE_GRID_MM)
    inside = _downsample(brain, coarse) > 0.5
    # Intracranial volume: the brain with its sulci and cisterns closed (smooth envelope).
    icv = (ndimage.gaussian_filter(inside.astype(np.float32), 3.0 / coarse) > 0.3) | inside
    shapes = {"icv": _signed_depth(icv, coarse)}
    for name, parts in (("face", _FACE), ("globe", _GLOBES), ("orbit", _ORBIT_FAT), ("air", _AIR)):
        shapes[name] = np.full(icv.shape, -10.0, np.float32)
        _ellipsoid_depth(shapes[name], origin, coarse, parts)
    head = (shapes["icv"] > -_HEAD_SHELL_MM) | (shapes.pop("face") > 0) | (shapes["globe"] > -2.0)
    head = ndimage.binary_fill_holes(head)
    shapes["head"] = _signed_depth(head, coarse)
    where = np.argwhere(head)
    zyx = origin[::-1]
    face = np.array([_ellipsoid_box(e) for e in _GLOBES + _ORBIT_FAT + _AIR])
    return _Anatomy(
        tissue={"gm": gm, "wm": wm}, shapes=shapes, origin=origin, spacing=spacing, shape_spacing=coarse,
        brain_centre=(zyx + np.argwhere(inside).mean(axis=0) * coarse)[::-1],
        head_box=((zyx + where.min(axis=0) * coarse)[::-1], (zyx + where.max(axis=0) * coarse)[::-1]),
        face_box=(face[:, 0].min(axis=0), face[:, 1].max(axis=0)),
    )


def _pad(a: F32, below: int, front: int) -> F32:
    """Extend a template map below (edge values: the cord goes on) and in front (zeros)."""
    a = np.pad(a, ((below, 0), (0, 0), (0, 0)), mode="edge")
    return np.pad(a, ((0, 0), (front, 0), (0, 0)))


def _downsample(a: F32, spacing: float) -> F32:
    """Anti-alias and resample a 1 mm array onto a grid of *spacing* mm sharing voxel (0, 0, 0)."""
    smooth = ndimage.gaussian_filter(a, 0.42 * spacing)
    shape = tuple(int((n - 1) // spacing) + 1 for n in a.shape)
    out: F32 = ndimage.affine_transform(smooth, np.full(3, spacing), output_shape=shape, order=1,
                                        output=np.float32, prefilter=False)
    return out


def _signed_depth(mask: npt.NDArray[np.bool_], spacing: float) -> F32:
    """Signed distance in mm, > 0 inside *mask*; zero half-way between voxel centres."""
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    out: F32 = ((inside - outside) * spacing).astype(np.float32)
    return out


def _ellipsoid_box(e: _Ellipsoid) -> tuple[F64, F64]:
    """LPS corners of an MNI ellipsoid's bounding box, plus a 3 mm margin."""
    corners = RAS_TO_LPS[:3, :3] @ np.array([np.subtract(e[0], e[1]), np.add(e[0], e[1])]).T
    return corners.min(axis=1) - 3.0, corners.max(axis=1) + 3.0


def _ellipsoid_depth(out: F32, origin: F64, spacing: float, shapes: Iterable[_Ellipsoid]) -> None:
    """Max-combine approximate signed depths (mm, > 0 inside) of MNI ellipsoids into *out*."""
    zyx = origin[::-1]
    for centre_ras, semi in shapes:
        c = (RAS_TO_LPS[:3, :3] @ np.array(centre_ras))[::-1]
        s = np.array(semi)[::-1]
        lo = np.maximum(np.floor((c - s - 3.0 - zyx) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((c + s + 3.0 - zyx) / spacing).astype(int) + 1, out.shape)
        if np.any(hi <= lo):
            continue
        axes = [(zyx[a] + spacing * np.arange(lo[a], hi[a]) - c[a]) / s[a] for a in range(3)]
        r = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
        box = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(box, ((1.0 - r) * s.min()).astype(np.float32), out=box)


def _rotation(rx: float, ry: float, rz: float) -> F64:
    """Rotation matrix for angles in degrees about x, then y, then z."""
    a, b, c = np.radians([rx, ry, rz])
    mx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    my = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    mz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    out: F64 = mz @ my @ mx
    return out


def _template_box(anat: _Anatomy) -> tuple[F64, F64]:
    """LPS corners of the whole template grid."""
    shape = np.array(anat.tissue["gm"].shape[::-1])
    return anat.origin, anat.origin + (shape - 1) * anat.spacing


def _forward_box(box: tuple[F64, F64], pose: F64, c0: F64, margin: float) -> tuple[F64, F64]:
    """LPS box of a template box after the pose (plus *margin* mm for the elastic field)."""
    lo, hi = box
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    mapped = (corners - c0) @ pose.T + c0
    return mapped.min(axis=0) - margin, mapped.max(axis=0) + margin


def _index_box(box: tuple[F64, F64], origin: F64, r: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Array slices (z, y, x) of the voxels of a grid that lie in an LPS box."""
    lo = np.clip(np.floor((box[0] - origin)[::-1] / r).astype(int), 0, shape)
    hi = np.clip(np.ceil((box[1] - origin)[::-1] / r).astype(int) + 1, 0, shape)
    return tuple(slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))


def _interpolator(n_out: int, n_in: int, step: float) -> F32:
    """(n_out, n_in) matrix of linear interpolation from a grid every *step* output samples."""
    x = np.arange(n_out) / step
    i0 = np.minimum(np.floor(x).astype(int), n_in - 2)
    w = (x - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1.0 - w
    m[np.arange(n_out), i0 + 1] = w
    return m


def _upsample(coarse: F32, shape: tuple[int, ...], steps: Sequence[float]) -> F32:
    """Trilinear interpolation of a coarse (z, y, x) grid onto *shape* (separable, via matmul)."""
    mz, my, mx = (_interpolator(shape[a], coarse.shape[a], steps[a]) for a in range(3))
    out: F32 = np.tensordot(mz, my @ (coarse @ mx.T), axes=(1, 0))
    return out


def _sampling_coords(rng: np.random.Generator, anat: _Anatomy, shape: tuple[int, ...], lo: F64, r: float,
                     c0: F64, inverse_pose: F64) -> tuple[F32, F32, float]:
    """Template index (z, y, x) sampled by each case voxel: pose, scale and a smooth elastic field.

    The map is built on a coarse grid (every ``step`` case voxels) and interpolated; the coarse
    map is returned too, for the mass effect to re-sample it at displaced points.
    """
    spacing = 8.0
    step = spacing / r
    cshape = tuple(int(math.ceil((n - 1) / step)) + 2 for n in shape)
    axes = [lo[::-1][a] + spacing * np.arange(cshape[a]) for a in range(3)]  # z, y, x in mm
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    points = np.stack([xx, yy, zz], axis=-1)
    q = (points - c0) @ inverse_pose.T + c0
    amplitude = rng.uniform(1.5, 3.5)
    for c in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal(cshape), 1.5)
        q[..., c] += amplitude * field / max(float(field.std()), 1e-6)
    coarse = ((q - anat.origin) / anat.spacing)[..., ::-1].transpose(3, 0, 1, 2).astype(np.float32)
    coords = np.stack([_upsample(coarse[c], shape, (step,) * 3) for c in range(3)])
    return coords, coarse, step


def _locate(anat: _Anatomy, target: F64, coarse: F32, step: float, pose: F64, lo: F64, r: float) -> F64:
    """Case index (z, y, x) that samples template point *target* (LPS) despite the elastic field.

    Starts from the pose alone and takes Newton-like steps with the pose as the Jacobian.
    """
    c0 = anat.brain_centre
    wanted = ((target - anat.origin) / anat.spacing)[::-1]  # template index (z, y, x)
    index = (c0 + pose @ (target - c0) - lo)[::-1] / r
    for _ in range(4):
        got = np.array([ndimage.map_coordinates(coarse[c], (index / step)[:, None], order=1, mode="nearest")[0]
                        for c in range(3)])
        index = index + (pose @ (wanted - got)[::-1] * anat.spacing / r)[::-1]
    return index


def mass_effect(coords: F32, coarse: F32, step: float, centre: F64, r: float, push_mm: float) -> None:
    """Push anatomy away from *centre* as if a sphere of *push_mm* had been inserted (in place).

    Incompressible radial model: a point first at radius r0 ends at (r0^3 + R^3)^(1/3); we
    sample the inverse. Tapered to nothing at four push radii.
    """
    reach = 4.0 * push_mm
    lo = np.maximum(np.floor(centre - reach / r).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach / r).astype(int) + 1, coords.shape[1:])
    if np.any(hi <= lo):
        return
    grid = np.meshgrid(*[np.arange(lo[a], hi[a], dtype=np.float64) for a in range(3)], indexing="ij")
    offset = np.stack([g - centre[a] for a, g in enumerate(grid)])
    radius = np.sqrt((offset**2).sum(axis=0)) * r
    source = np.cbrt(np.maximum(radius**3 - push_mm**3, 0.0))
    ratio = np.where(radius > 0, source / np.maximum(radius, 1e-9), 0.0)
    taper = np.clip((reach - radius) / (reach - 3.0 * push_mm), 0.0, 1.0)
    ratio = 1.0 - taper * (1.0 - ratio)
    displaced = (centre[:, None, None, None] + offset * ratio) / step
    box = tuple(slice(lo[a], hi[a]) for a in range(3))
    for c in range(3):
        coords[c][box] = ndimage.map_coordinates(coarse[c], displaced, order=1, mode="nearest")


def _sample(anat: _Anatomy, coords: F32, face: tuple[slice, ...]) -> dict[str, F32]:
    """Sample the anatomy maps at *coords* (template fine-grid indices; scaled in place).

    The globe, orbit and air maps are sampled in the *face* box only (their arrays have its shape).
    """
    out = {name: ndimage.map_coordinates(m, coords, order=1, mode="nearest", output=np.float32)
           for name, m in anat.tissue.items()}
    coords *= anat.spacing / anat.shape_spacing
    for name in ("icv", "head"):
        out[name] = ndimage.map_coordinates(anat.shapes[name], coords, order=1, mode="nearest", output=np.float32)
    for name in ("globe", "orbit", "air"):
        out[name] = ndimage.map_coordinates(anat.shapes[name], coords[(slice(None), *face)], order=1,
                                            mode="nearest", output=np.float32)
    return out


def _ramp(x: F32, width: float) -> F32:
    """Soft step from 0 to 1 over *width* mm centred on x = 0."""
    y = x * np.float32(1.0 / width)
    y += np.float32(0.5)
    out: F32 = np.clip(y, 0.0, 1.0, out=y)
    return out


_Part = tuple[tuple[slice, ...], str, F32]  # (box, tissue, fraction in that box)
_EVERYWHERE = (slice(None), slice(None), slice(None))


def _tissues(m: dict[str, F32], rng: np.random.Generator, w: float,
             face: tuple[slice, ...]) -> tuple[list[_Part], dict[str, F32]]:
    """Tissue fractions (summing to 1 inside the head) from the sampled maps.

    Returns the parts to render and the intracranial fractions (``icv``, ``gm``, ``wm``, ``csf``).
    """
    inner, outer = rng.uniform(1.5, 2.2), rng.uniform(1.5, 2.2)
    skull = rng.uniform(4.5, 7.5)
    fat_mm, mucosa_mm = rng.uniform(2.0, 6.0), rng.uniform(1.0, 3.0)
    d, e = -m["icv"], m["head"]  # distance outside the intracranial volume; depth inside the head
    head = _ramp(e, w)
    icv = _ramp(m["icv"], w)
    s0 = (1.0 - icv) * head
    s1, s2, s3 = (_ramp(d - t, w) * head for t in (inner, skull - outer, skull))
    deep, below_fat = _ramp(e - 1.5, w), _ramp(e - 1.5 - fat_mm, w)
    gm = np.clip(m["gm"], 0.0, 1.0) * icv
    wm = np.clip(m["wm"], 0.0, 1.0) * icv
    brain = {"icv": icv, "gm": gm, "wm": wm, "csf": np.clip(icv - gm - wm, 0.0, 1.0)}
    body = {"bone": s0 - s1 + s2 - s3, "marrow": s1 - s2, "muscle": s3 * (1.0 - deep + below_fat),
            "fat": s3 * (deep - below_fat)}
    # Near the face, globes, orbital fat and air spaces (lined by mucosa) displace the rest.
    globe = _ramp(m["globe"], w)
    orbit = _ramp(m["orbit"], w) * (1.0 - globe)
    air = _ramp(m["air"], w)
    mucosa = _ramp(m["air"] + mucosa_mm, w) - air
    keep = np.clip(1.0 - globe - orbit - air - mucosa, 0.0, 1.0)
    for fraction in body.values():
        fraction[face] *= keep
    outside = s0[face]
    parts: list[_Part] = [(_EVERYWHERE, name, f) for name, f in brain.items() if name != "icv"]
    parts += [(_EVERYWHERE, name, f) for name, f in body.items()]
    parts += [(face, "fluid", globe * outside), (face, "fat", orbit * outside), (face, "mucosa", mucosa * outside)]
    return parts, brain
