"""The tumour of a phantom case and the MR signal of its tissues (part of :mod:`dmg_node.phantoms.phantom`).

A DMG grows in the pons, medulla or a thalamus (site and target volume drawn per case) as a
union of rotated ellipsoids with a noisy, soft margin and no, patchy or ring enhancement. T2,
FLAIR and post-contrast T1 images are tissue fractions times per-case jittered relative
signals, the tumour replacing brain. Arrays are (slices, rows, columns) as in
:mod:`dmg_node.volume`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dmg_node.phantoms.anatomy import F32, F64, RAS_TO_LPS, _Part, _ramp, _rotation

SEQUENCES = ("t1c", "t2", "flair")  # also the order of each tissue's signal triple


@dataclass(frozen=True)
class _Site:
    """Where a DMG of one kind grows and how big it is drawn."""

    centre_ras: tuple[float, float, float]  # MNI mm
    jitter_mm: tuple[float, float, float]  # uniform +- per axis
    volume_ml: tuple[float, float]  # log-uniform range
    weight: float  # DMG is mostly pontine


SITES = {
    "pons": _Site((0.0, -25.0, -32.0), (2.0, 3.0, 4.0), (8.0, 40.0), 0.6),
    "medulla": _Site((0.0, -38.0, -50.0), (1.5, 2.0, 3.0), (5.0, 12.0), 0.15),
    "thalamus": _Site((10.0, -18.0, 6.0), (2.0, 3.0, 2.0), (5.0, 30.0), 0.25),  # x sign drawn per case
}

# Relative signal of each tissue in (t1c, t2, flair); per-case jitter is applied on top.
_SIGNAL: dict[str, tuple[float, float, float]] = {
    "wm": (0.78, 0.30, 0.42),
    "gm": (0.55, 0.45, 0.58),
    "csf": (0.10, 1.00, 0.06),
    "tumour": (0.38, 0.80, 0.85),
    "necrosis": (0.15, 0.95, 0.45),
    "enhancing": (0.95, 0.80, 0.85),
    "bone": (0.03, 0.03, 0.03),
    "marrow": (0.70, 0.45, 0.40),
    "fat": (0.92, 0.70, 0.60),
    "muscle": (0.42, 0.22, 0.30),
    "fluid": (0.12, 1.00, 0.08),
    "mucosa": (0.75, 0.85, 0.70),
}


def _draw_site(rng: np.random.Generator) -> tuple[str, F64, float]:
    """Tumour site name, its template centre (LPS mm) and a target volume (cm3)."""
    names = list(SITES)
    weights = np.array([SITES[n].weight for n in names])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    site = SITES[name]
    ras = np.array(site.centre_ras) + rng.uniform(-1.0, 1.0, 3) * np.array(site.jitter_mm)
    if name == "thalamus":
        side = rng.choice([-1.0, 1.0])
        ras[0] *= side
        name = "thalamus_right" if side > 0 else "thalamus_left"  # RAS +x is the patient's right
    volume = float(np.exp(rng.uniform(*np.log(site.volume_ml))))
    return name, RAS_TO_LPS[:3, :3] @ ras, volume


@dataclass(frozen=True)
class _Tumour:
    box: tuple[slice, slice, slice]
    label: npt.NDArray[np.uint8]
    fraction: F32  # soft tumour fraction (label = its 0.5 level inside the intracranial volume)
    necrosis: F32
    enhancing: F32
    texture: F32  # multiplicative heterogeneity of T2/FLAIR signal
    enhancement: str


def _tumour(rng: np.random.Generator, icv: F32, centre: F64, r: float, radius: float, volume_ml: float) -> _Tumour:
    """An irregular tumour: union of rotated ellipsoids with a noisy, soft margin, of a set volume."""
    half = (2.6 * radius + 6.0) / r
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, icv.shape)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    shape = tuple(int(h - l) for l, h in zip(lo, hi))
    grid = np.stack(np.meshgrid(*[(np.arange(lo[a], hi[a]) - centre[a]) * r for a in range(3)], indexing="ij"),
                    axis=-1)
    phi = np.full(shape, -1e3, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        middle = rng.normal(0.0, 0.35 * radius, 3)
        semi = radius * rng.uniform(0.45, 0.85, 3)
        rot = _rotation(*rng.uniform(0.0, 360.0, 3))
        u = ((grid - middle) @ rot) / semi
        np.maximum(phi, ((1.0 - np.sqrt((u**2).sum(axis=-1))) * semi.min()).astype(np.float32), out=phi)
    phi += rng.uniform(1.0, 3.0) * _smooth_noise(rng, shape, 2.5 / r)
    phi = ndimage.gaussian_filter(phi, 1.0 / r)
    allowed = icv[box] > 0.5
    inside = phi[allowed]
    n_vox = min(max(int(round(volume_ml * 1000.0 / r**3)), 1), inside.size)
    level = float(np.partition(inside, inside.size - n_vox)[inside.size - n_vox])
    label = ((phi >= level) & allowed).astype(np.uint8)
    margin = rng.uniform(1.5, 3.0)
    fraction = _ramp(phi - level, margin) * icv[box]
    necrosis = np.zeros(shape, np.float32)
    enhancing = np.zeros(shape, np.float32)
    kind = str(rng.choice(["none", "patchy", "ring"], p=[0.45, 0.35, 0.2]))
    depth = phi[label > 0]
    if kind == "ring":
        core = rng.uniform(0.1, 0.3)
        core_level, rim_level = np.quantile(depth, [1.0 - core, 1.0 - core - rng.uniform(0.15, 0.3)])
        necrosis = _ramp(phi - core_level, 1.0)
        enhancing = _ramp(phi - rim_level, 1.0) - necrosis
    elif kind == "patchy":
        blobs = _smooth_noise(rng, shape, rng.uniform(1.5, 3.0) / r)
        cut = np.quantile(blobs[label > 0], 1.0 - rng.uniform(0.1, 0.35))
        enhancing = _ramp(blobs - cut, 0.3)
    texture = 1.0 + 0.07 * _smooth_noise(rng, shape, 3.0 / r)
    return _Tumour(box, label, fraction, necrosis * fraction, enhancing * fraction, texture, kind)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> F32:
    """Gaussian-smoothed white noise scaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    out: F32 = (field / max(float(field.std()), 1e-6)).astype(np.float32)
    return out


def draw_signals(rng: np.random.Generator) -> dict[str, F32]:
    """Per-case relative signal of each tissue in (t1c, t2, flair), jittered around :data:`_SIGNAL`."""
    out = {k: (np.array(v) * np.exp(rng.normal(0.0, 0.05, 3))).astype(np.float32) for k, v in _SIGNAL.items()}
    # Keep what defines the task: tumour below CSF on T2, far above it on FLAIR, dark on T1C.
    out["tumour"] = np.array([rng.uniform(0.30, 0.45), rng.uniform(0.70, 0.88), rng.uniform(0.75, 0.95)], np.float32)
    out["enhancing"] = np.array([rng.uniform(0.85, 1.05), *out["tumour"][1:]], np.float32)
    return out


def _render(parts: list[_Part], brain: dict[str, F32], tumour: _Tumour, signal: dict[str, F32]) -> dict[str, F32]:
    """Relative-signal images: tissue fractions times signals, the tumour replacing brain."""
    out: dict[str, F32] = {}
    f, box = tumour.fraction, tumour.box
    solid = f - tumour.necrosis - tumour.enhancing
    for n, seq in enumerate(SEQUENCES):
        image = np.zeros(brain["icv"].shape, np.float32)
        for where, name, fraction in parts:
            image[where] += fraction * signal[name][n]
        normal = sum(brain[name][box] * signal[name][n] for name in ("gm", "wm", "csf"))
        lesion = (solid * signal["tumour"][n] + tumour.enhancing * signal["enhancing"][n]) * (
            tumour.texture if seq != "t1c" else 1.0) + tumour.necrosis * signal["necrosis"][n]
        image[box] += lesion - f * normal
        out[seq] = np.clip(image, 0.0, None, out=image)
    return out
