"""Per-case random draws of the domain-randomized generator (:mod:`dmg_node.phantoms.synth`).

Domain randomization as in SynthSeg (Billot et al., Medical Image Analysis 2023) and
synthetic-tumour training (Hu et al., CVPR 2023): a case is one frozen, seeded, serialisable
:class:`SynthParams` record (anatomy pose and deformation, tumour, and per sequence the
contrast and acquisition). :func:`draw_params` makes it from a seed and a :class:`Distribution`;
:func:`dmg_node.phantoms.synth.render` turns it into images and a label. Separating the draw
from the rendering keeps the distributions testable without rendering anything.

Seed ranges are reserved (:data:`TRAIN_SEEDS`, :data:`VALIDATION_SEEDS`, :data:`TEST_SEEDS`) so
that the held-out sets of :mod:`dmg_node.training.heldout` never feed training or model
selection: drawing a training case from a test seed raises. The training distribution also
leaves out whole regions of the parameter space (:data:`TRAINING`): a contrast family (grey and
white matter inverted, as in the unmyelinated infant brain), slices of 5-6 mm, a low SNR and
the thalamus. The anatomy is the ICBM152 2009a template (nilearn) only: the one brain template
that installs offline from our registries apart from the one kept back, unused, for an
independent check (docs/model.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

SEQUENCES = ("t1c", "t2", "flair")
SHAPES = ("lobulated", "infiltrative", "exophytic", "multifocal")
SITES = ("pons", "medulla", "midbrain", "thalamus", "peduncle")
ENHANCEMENTS = ("none", "patchy", "ring", "solid")
FAMILIES = ("plausible", "random", "inverted_gm_wm")
PROFILES = ("gaussian", "boxcar")
PLANES = ("axial", "coronal", "sagittal")
NOISE = ("rician", "gaussian")
# Tissue classes with an intensity per sequence: anatomy (dmg_node.phantoms.anatomy._tissues) and lesion parts.
CLASSES = ("gm", "wm", "csf", "bone", "marrow", "muscle", "fat", "fluid", "mucosa",
           "tumour", "enhancing", "necrosis", "cyst", "haemorrhage")

# Reserved seed ranges [start, stop): training, validation (model selection) and held-out tests.
TRAIN_SEEDS = (0, 1_000_000)
VALIDATION_SEEDS = (1_000_000, 2_000_000)
TEST_SEEDS = (9_000_000, 10_000_000)

# Site centres (MNI RAS mm; x mirrored per case for the paired sites) and tumour volume range (ml).
SITE_CENTRES: dict[str, tuple[float, float, float]] = {
    "pons": (0.0, -25.0, -32.0),
    "medulla": (0.0, -38.0, -50.0),
    "midbrain": (0.0, -24.0, -12.0),
    "thalamus": (10.0, -18.0, 6.0),
    "peduncle": (17.0, -42.0, -30.0),  # middle cerebellar peduncle
}
SITE_VOLUMES_ML: dict[str, tuple[float, float]] = {
    "pons": (4.0, 60.0), "medulla": (1.0, 15.0), "midbrain": (2.0, 25.0), "thalamus": (3.0, 40.0),
    "peduncle": (2.0, 20.0),
}
# Relative signal of each class in (t1c, t2, flair) for the plausible family, before jitter.
BASE_SIGNAL: dict[str, tuple[float, float, float]] = {
    "gm": (0.55, 0.45, 0.58), "wm": (0.78, 0.30, 0.42), "csf": (0.10, 1.00, 0.06),
    "bone": (0.03, 0.03, 0.03), "marrow": (0.70, 0.45, 0.40), "muscle": (0.42, 0.22, 0.30),
    "fat": (0.92, 0.70, 0.60), "fluid": (0.12, 1.00, 0.08), "mucosa": (0.75, 0.85, 0.70),
    "tumour": (0.38, 0.80, 0.85), "enhancing": (0.95, 0.80, 0.85), "necrosis": (0.15, 0.95, 0.45),
    "cyst": (0.12, 1.00, 0.30), "haemorrhage": (0.85, 0.25, 0.60),
}
# Orderings that define each sequence for the plausible family (brightest first).
ORDERINGS: dict[str, tuple[str, ...]] = {
    "t1c": ("wm", "gm", "tumour", "csf"),
    "t2": ("csf", "tumour", "gm", "wm"),
    "flair": ("tumour", "gm", "wm", "csf"),
}
MIN_TUMOUR_CONTRAST = 0.08  # |tumour - gm| and |tumour - wm| at least this (relative signal)


@dataclass(frozen=True)
class Distribution:
    """What :func:`draw_params` may draw: the training distribution or a held-out shift of it."""

    name: str = "train"
    families: tuple[str, ...] = ("plausible", "random")
    family_weights: tuple[float, ...] = (0.5, 0.5)
    sites: tuple[str, ...] = ("pons", "medulla", "midbrain", "peduncle")
    site_weights: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
    thickness_mm: tuple[float, float] = (1.0, 4.8)
    thick_share: float = 0.6  # share of 2D series of thick slices (the rest 3D, 1-1.5 mm)
    snr: tuple[float, float] = (8.0, 60.0)  # mean brain signal / noise sigma, log-uniform
    seeds: tuple[int, int] = TRAIN_SEEDS


TRAINING = Distribution()


@dataclass(frozen=True)
class TumourParams:
    """One tumour: site, size, shape, margin, mass effect, enhancement, cyst and haemorrhage."""

    site: str
    side: float  # +1 patient's right (RAS +x), -1 left; 1 for midline sites
    centre_ras: tuple[float, float, float]
    volume_ml: float
    shape: str
    n_lobes: int
    margin_mm: float  # soft margin width; wide for infiltrative tumours
    roughness_mm: float  # amplitude of the smooth noise on the level set
    mass_effect: float  # push radius / tumour radius; 0 = no mass effect
    enhancement: str
    cyst: bool
    haemorrhage: bool


@dataclass(frozen=True)
class AcquisitionParams:
    """One series' acquisition: contrast, gamma, bias, noise, resolution and slice profile."""

    signal: dict[str, float]  # class -> relative signal
    gamma: float
    bias_sd: float  # standard deviation of the log bias field
    noise: str
    snr: float
    plane: str  # slice axis
    thickness_mm: float  # slice thickness (FWHM of the profile); <= case grid: no slab
    gap: float  # spacing between slice centres = thickness * (1 + gap)
    profile: str
    inplane_mm: float  # in-plane resolution simulated by blur (>= case grid)
    t1_texture: float  # weight of the template's own T1 texture in brain tissue (T1C)


@dataclass(frozen=True)
class SynthParams:
    """Everything that makes one domain-randomized case (JSON round-trips via :meth:`to_json`)."""

    seed: int
    distribution: str
    family: str
    head_scale: float
    axis_scale: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    flips: tuple[bool, bool, bool]  # flip the array (field of view) along (z, y, x)
    deformation_mm: float
    deformation_scale_mm: float
    tumour: TumourParams
    acquisitions: dict[str, AcquisitionParams] = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as JSON (keys sorted)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SynthParams:
        """Read a record written by :meth:`to_json`."""
        raw: dict[str, Any] = json.loads(text)
        tumour: dict[str, Any] = raw["tumour"]
        tumour["centre_ras"] = tuple(tumour["centre_ras"])
        raw["tumour"] = TumourParams(**tumour)
        raw["acquisitions"] = {k: AcquisitionParams(**v) for k, v in raw["acquisitions"].items()}
        for key in ("axis_scale", "rotation_deg", "flips"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


def draw_params(seed: int, distribution: Distribution = TRAINING) -> SynthParams:
    """Draw one case's parameters from *distribution* (fully determined by *seed*).

    Raises
    ------
    ValueError
        If *seed* lies outside the distribution's reserved seed range.
    """
    lo, hi = distribution.seeds
    if not lo <= seed < hi:
        raise ValueError(f"seed of distribution {distribution.name!r} must be in [{lo}, {hi}); found {seed}")
    rng = np.random.default_rng([seed, 20])
    family = str(rng.choice(distribution.families, p=_normalised(distribution.family_weights)))
    tumour = _draw_tumour(rng, distribution)
    acquisitions = {seq: _draw_acquisition(rng, distribution, family, n, tumour) for n, seq in enumerate(SEQUENCES)}
    return SynthParams(
        seed=seed, distribution=distribution.name, family=family,
        head_scale=float(rng.uniform(0.8, 1.0)),
        axis_scale=_floats(rng.uniform(0.92, 1.08, 3)),
        rotation_deg=_floats(rng.uniform(-1.0, 1.0, 3) * np.array([15.0, 10.0, 10.0])),
        flips=(bool(rng.random() < 0.2), bool(rng.random() < 0.3), bool(rng.random() < 0.3)),
        deformation_mm=float(rng.uniform(0.0, 6.0)),
        deformation_scale_mm=float(rng.uniform(16.0, 32.0)),
        tumour=tumour, acquisitions=acquisitions,
    )


def _normalised(weights: tuple[float, ...]) -> np.ndarray[Any, np.dtype[np.float64]]:
    w: np.ndarray[Any, np.dtype[np.float64]] = np.asarray(weights, dtype=np.float64)
    return w / float(w.sum())


def _floats(values: np.ndarray[Any, Any]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _draw_tumour(rng: np.random.Generator, distribution: Distribution) -> TumourParams:
    site = str(rng.choice(distribution.sites, p=_normalised(distribution.site_weights)))
    side = float(rng.choice([-1.0, 1.0])) if site in ("thalamus", "peduncle") else 1.0
    centre = np.array(SITE_CENTRES[site]) + rng.uniform(-2.0, 2.0, 3)
    centre[0] *= side
    volume = float(np.exp(rng.uniform(*np.log(SITE_VOLUMES_ML[site]))))
    shape = str(rng.choice(SHAPES, p=[0.35, 0.3, 0.2, 0.15]))
    infiltrative = shape == "infiltrative"
    return TumourParams(
        site=site, side=side, centre_ras=_floats(centre), volume_ml=volume, shape=shape,
        n_lobes=int(rng.integers(2, 4)) if shape == "multifocal" else int(rng.integers(1, 6)),
        margin_mm=float(rng.uniform(3.0, 6.0) if infiltrative else rng.uniform(0.8, 2.5)),
        roughness_mm=float(rng.uniform(2.0, 4.0) if infiltrative else rng.uniform(0.5, 2.5)),
        mass_effect=float(0.0 if rng.random() < 0.3 else rng.uniform(0.3, 0.8)),
        enhancement=str(rng.choice(ENHANCEMENTS, p=[0.4, 0.25, 0.2, 0.15])),
        cyst=bool(rng.random() < 0.25), haemorrhage=bool(rng.random() < 0.15),
    )


def _draw_acquisition(rng: np.random.Generator, distribution: Distribution, family: str, index: int,
                      tumour: TumourParams) -> AcquisitionParams:
    seq = SEQUENCES[index]
    signal = _draw_signal(rng, family, index, tumour)
    thick = rng.random() < distribution.thick_share  # else a 3D acquisition near the case grid
    low, high = distribution.thickness_mm
    thickness = float(rng.uniform(low, high)) if thick else float(rng.uniform(1.0, min(1.5, high)))
    return AcquisitionParams(
        signal=signal, gamma=float(np.exp(rng.normal(0.0, 0.25))), bias_sd=float(rng.uniform(0.0, 0.3)),
        noise=str(rng.choice(NOISE)), snr=float(np.exp(rng.uniform(*np.log(distribution.snr)))),
        plane=str(rng.choice(PLANES, p=[0.6, 0.2, 0.2])), thickness_mm=thickness,
        gap=float(rng.choice([0.0, 0.1, 0.2])), profile=str(rng.choice(PROFILES)),
        inplane_mm=float(rng.uniform(0.5, 1.6)),
        t1_texture=float(rng.uniform(0.5, 1.0)) if seq == "t1c" else float(rng.uniform(0.0, 0.3)),
    )


def _draw_signal(rng: np.random.Generator, family: str, index: int, tumour: TumourParams) -> dict[str, float]:
    """Relative signal per class for one sequence (see the families in the module docstring)."""
    seq = SEQUENCES[index]
    if family == "random":
        out = {name: float(rng.uniform(0.02, 1.0)) for name in CLASSES}
        # Keep the adult grey/white ordering (the held-out family inverts it) ...
        g, w = sorted((out["gm"], out["wm"]))
        out["gm"], out["wm"] = (g, w) if seq == "t1c" else (w, g)
    else:
        out = {name: float(v[index] * math.exp(rng.normal(0.0, 0.15))) for name, v in BASE_SIGNAL.items()}
        values = sorted((out[name] for name in ORDERINGS[seq]), reverse=True)
        out.update(zip(ORDERINGS[seq], values))
        if family == "inverted_gm_wm":
            out["gm"], out["wm"] = out["wm"], out["gm"]
    # ... and whatever the family, a tumour that differs from the brain it replaces.
    for _ in range(100):
        if min(abs(out["tumour"] - out["gm"]), abs(out["tumour"] - out["wm"])) >= MIN_TUMOUR_CONTRAST:
            break
        out["tumour"] = float(rng.uniform(0.02, 1.0))
    if tumour.enhancement != "none" and seq == "t1c" and abs(out["enhancing"] - out["tumour"]) < 0.1:
        out["enhancing"] = min(out["tumour"] + 0.3, 1.2)
    if seq != "t1c":  # contrast enhancement shows on T1C only
        out["enhancing"] = out["tumour"]
    return out


SET_SEEDS = 10_000  # seeds per held-out set: consecutive blocks from TEST_SEEDS[0]


def _test_block(index: int) -> tuple[int, int]:
    start = TEST_SEEDS[0] + index * SET_SEEDS
    return start, start + SET_SEEDS


# Held-out sets (dmg_node.training.heldout), each moving one thing out of TRAINING; set i draws
# seeds [9_000_000 + 10_000 i, 9_000_000 + 10_000 (i + 1)).
SHIFTS: dict[str, Distribution] = {
    "in_distribution": replace(TRAINING, name="in_distribution", seeds=_test_block(0)),
    "contrast_inverted_gm_wm": replace(TRAINING, name="contrast_inverted_gm_wm", families=("inverted_gm_wm",),
                                       family_weights=(1.0,), seeds=_test_block(1)),
    "thick_5_6mm": replace(TRAINING, name="thick_5_6mm", thickness_mm=(5.0, 6.0), thick_share=1.0,
                           seeds=_test_block(2)),
    "low_snr": replace(TRAINING, name="low_snr", snr=(2.5, 6.0), seeds=_test_block(3)),
    "site_thalamus": replace(TRAINING, name="site_thalamus", sites=("thalamus",), site_weights=(1.0,),
                             seeds=_test_block(4)),
}
# Every named set: training, validation (model selection) and the held-out shifts.
SETS: dict[str, Distribution] = {"train": TRAINING,
                                 "validation": replace(TRAINING, name="validation", seeds=VALIDATION_SEEDS), **SHIFTS}
