"""Render a domain-randomized case (:class:`~dmg_node.phantoms.randomize.SynthParams`) into images.

The anatomy pipeline of the phantom (:mod:`dmg_node.phantoms.anatomy`: ICBM152 2009a tissue
maps, skull, face and neck) is sampled through the drawn pose, paediatric scaling and a strong
smooth deformation on top of the phantom's own elastic field; a tumour of the drawn shape is
grown (:mod:`dmg_node.phantoms.lesion`) with or without mass effect. Each sequence is then
rendered from partial-volume tissue fractions times its drawn per-class signals (T1C, and weakly
the others, modulated by the template's own T1 texture), put through a gamma, a smooth
multiplicative bias field, the slice profile of its acquisition (Gaussian or boxcar across the
slab, integrated, not point-sampled; anisotropic in-plane blur), slice sampling and Gaussian or
Rician noise at the drawn SNR.

Two output grids: ``"case"`` (every sequence interpolated back onto the isotropic case grid,
with the true label: training, as in SynthSeg) or ``"acquired"`` (each sequence on its own
slice grid with the label slab-averaged onto it: evaluation, as a series arrives). Arrays are
(slices, rows, columns) and affines map (i, j, k) to LPS mm, as in :mod:`dmg_node.volume`.
Research data only: nothing here is clinically validated.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog
from scipy import ndimage

from dmg_node.phantoms.anatomy import (
    _PAD_BELOW_MM,
    _PAD_FRONT_MM,
    F32,
    F64,
    RAS_TO_LPS,
    _anatomy,
    _downsample,
    _forward_box,
    _index_box,
    _locate,
    _pad,
    _rotation,
    _sample,
    _sampling_coords,
    _tissues,
    _upsample,
    mass_effect,
    templates,
)
from dmg_node.phantoms.lesion import COMPONENTS, Lesion, make_lesion
from dmg_node.phantoms.phantom import _save_nifti
from dmg_node.phantoms.randomize import (
    PLANES,
    SEQUENCES,
    SETS,
    AcquisitionParams,
    SynthParams,
    draw_params,
)
from dmg_node.training.data import LABEL_SUFFIX, NIFTI_SUFFIX

log = structlog.get_logger(__name__)

Grid = Literal["case", "acquired"]
_BRAIN = ("gm", "wm", "csf")
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class SynthCase:
    """One rendered case: per sequence an image, its label and its affine (grids may differ)."""

    case_id: str
    params: SynthParams
    images: dict[str, F32]
    labels: dict[str, npt.NDArray[np.uint8]]
    affines: dict[str, F64]

    def tumour_volume_ml(self, sequence: str) -> float:
        """Tumour volume of *sequence*'s label in cm3."""
        voxel = abs(float(np.linalg.det(self.affines[sequence][:3, :3])))
        return float(self.labels[sequence].sum()) * voxel / 1000.0


def case_id(params: SynthParams) -> str:
    """``SY-<distribution>-<seed>``: also the NIfTI folder name."""
    return f"SY-{params.distribution}-{params.seed:07d}"


def render(params: SynthParams, *, resolution_mm: float = 2.0, grid: Grid = "case") -> SynthCase:
    """Render *params* on an isotropic case grid of *resolution_mm* (1 to 3 mm).

    Parameters
    ----------
    params
        From :func:`dmg_node.phantoms.randomize.draw_params`; with the resolution, it fully
        determines the output.
    resolution_mm
        Case grid; slices thinner than it are not resolved (3D acquisitions stay on it).
    grid
        ``"case"`` (training) or ``"acquired"`` (evaluation), see the module docstring.

    Returns
    -------
    SynthCase

    Raises
    ------
    ValueError
        If *resolution_mm* or *grid* is out of range.
    """
    if not 1.0 <= resolution_mm <= 3.0:
        raise ValueError(f"resolution_mm must be within 1..3; found {resolution_mm}")
    if grid not in ("case", "acquired"):
        raise ValueError(f"grid must be 'case' or 'acquired'; found {grid!r}")
    started = time.perf_counter()
    r = float(resolution_mm)
    anat = _anatomy(r)
    rng = np.random.default_rng([params.seed, 21])
    c0 = anat.brain_centre
    pose = _rotation(*params.rotation_deg) @ np.diag(params.head_scale * np.array(params.axis_scale))
    lo, hi = _forward_box(anat.head_box, pose, c0, 5.0 + params.deformation_mm)
    lo, hi = np.floor(lo / r) * r, np.ceil(hi / r) * r
    shape = tuple(int(n) for n in np.round((hi - lo)[::-1] / r) + 1)
    affine = np.diag([r, r, r, 1.0])
    affine[:3, 3] = lo

    coords, coarse, step = _sampling_coords(rng, anat, shape, lo, r, c0, np.linalg.inv(pose).astype(np.float64))
    _deform(rng, coords, coarse, step, params, anat.spacing)
    tumour = params.tumour
    centre = _locate(anat, RAS_TO_LPS[:3, :3] @ np.array(tumour.centre_ras), coarse, step, pose, lo, r)
    radius = (3.0 * tumour.volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    if tumour.mass_effect > 0:
        mass_effect(coords, coarse, step, centre, r, tumour.mass_effect * radius)
    t1 = ndimage.map_coordinates(_t1_template(r), coords, order=1, mode="nearest", output=np.float32)
    face = _index_box(_forward_box(anat.face_box, pose, c0, 8.0), lo, r, shape)
    sampled = _sample(anat, coords, face)  # scales coords in place: the T1 is sampled first
    del coords
    parts, brain = _tissues(sampled, rng, max(r, 1.0), face)
    del sampled
    lesion = make_lesion(rng, tumour, brain["icv"], centre, r)
    label = np.zeros(shape, np.uint8)
    label[lesion.box] = lesion.label
    ratio = _t1_ratio(t1, brain)
    images, labels, affines = {}, {}, {}
    for n, seq in enumerate(SEQUENCES):
        acq = params.acquisitions[seq]
        clean = _contrast(parts, brain, lesion, acq, ratio)
        images[seq], labels[seq], affines[seq] = _acquire(clean, label, affine, brain["icv"], acq, r, grid,
                                                          np.random.default_rng([params.seed, 22, n]))
        images[seq], labels[seq], affines[seq] = _flip(images[seq], labels[seq], affines[seq], params.flips)
    case = SynthCase(case_id(params), params, images, labels, affines)
    log.info("synth_case_made", case_id=case.case_id, site=tumour.site, shape=tumour.shape,
             enhancement=tumour.enhancement, family=params.family, volume_ml=round(float(label.sum()) * r**3 / 1e3, 2),
             grid=grid, seconds=round(time.perf_counter() - started, 2))
    return case


def _deform(rng: np.random.Generator, coords: F32, coarse: F32, step: float, params: SynthParams,
            spacing: float) -> None:
    """Add a strong smooth displacement (template voxels) to the coarse map and the sampling coordinates."""
    if params.deformation_mm <= 0:
        return
    sigma = params.deformation_scale_mm / 8.0 / 2.0  # the coarse map is every 8 mm
    for c in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal(coarse.shape[1:]), sigma)
        field *= params.deformation_mm / spacing / max(float(field.std()), 1e-6)
        coarse[c] += field.astype(np.float32)
        coords[c] += _upsample(field.astype(np.float32), coords.shape[1:], (step,) * 3)


@functools.lru_cache(maxsize=2)
def _t1_template(spacing: float) -> F32:
    """The ICBM152 T1 on the anatomy grid of *spacing* (padded as :func:`anatomy._anatomy` pads)."""
    t1 = _pad(templates()[0], round(_PAD_BELOW_MM), round(_PAD_FRONT_MM))
    return t1 if spacing == 1.0 else _downsample(t1, spacing)


def _t1_ratio(t1: F32, brain: dict[str, F32]) -> F32:
    """The template's T1 over its least-squares fit by the tissue fractions: texture around 1."""
    inside = brain["icv"] > 0.9
    design = np.stack([brain[name][inside][::7] for name in _BRAIN], axis=1)
    coef, *_ = np.linalg.lstsq(design, t1[inside][::7], rcond=None)
    fit = sum(brain[name] * np.float32(c) for name, c in zip(_BRAIN, coef))
    scale = float(np.percentile(t1[inside], 90)) if inside.any() else 1.0
    ratio = np.where(inside, t1 / np.maximum(fit, 0.2 * scale), 1.0).astype(np.float32)
    out: F32 = np.clip(ratio, 0.6, 1.4)
    return out


def _contrast(parts: list[tuple[tuple[slice, ...], str, F32]], brain: dict[str, F32], lesion: Lesion,
              acq: AcquisitionParams, ratio: F32) -> F32:
    """Relative-signal image of one sequence: tissue fractions times signals, the tumour replacing brain."""
    s = acq.signal
    normal = sum(brain[name] * np.float32(s[name]) for name in _BRAIN)
    normal = normal * (1.0 + np.float32(acq.t1_texture) * (ratio - 1.0))
    image = np.array(normal, np.float32)
    for where, name, fraction in parts:
        if name not in _BRAIN:
            image[where] += fraction * np.float32(s[name])
    box = lesion.box
    inside = sum(lesion.parts[k] * np.float32(s[k]) * (lesion.texture if k == "tumour" else 1.0) for k in COMPONENTS)
    image[box] += inside - lesion.fraction * normal[box]
    out: F32 = np.clip(image, 0.0, None, out=image)
    return out


def slab_filter(image: F32, axis: int, thickness_vox: float, profile: str) -> F32:
    """Integrate *image* across a slab of *thickness_vox* voxels (the FWHM) along *axis*.

    ``boxcar``: the mean over the slab (fractional edge voxels weighted by overlap);
    ``gaussian``: a Gaussian profile whose FWHM is the thickness (less the voxel's own width).
    """
    if thickness_vox <= 1.0:
        return image
    if profile == "gaussian":
        sigma = math.sqrt(thickness_vox**2 - 1.0) / _FWHM
        out: F32 = ndimage.gaussian_filter1d(image, sigma, axis=axis, mode="nearest")
        return out
    half = thickness_vox / 2.0
    k = int(math.ceil(half - 0.5))
    offsets = np.arange(-k, k + 1, dtype=np.float64)
    weights = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0.0, None)
    boxed: F32 = ndimage.correlate1d(image, weights / weights.sum(), axis=axis, mode="nearest")
    return boxed


def slice_positions(n: int, spacing_vox: float, phase: float) -> npt.NDArray[np.float64]:
    """Slice centres (case voxels along the slice axis) every *spacing_vox* from *phase*."""
    return np.arange(phase, n - 1 + 1e-6, spacing_vox)


def sample_slices(image: F32, axis: int, positions: npt.NDArray[np.float64]) -> F32:
    """Linear interpolation of *image* at fractional *positions* along *axis*."""
    n = image.shape[axis]
    lo = np.clip(np.floor(positions).astype(int), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1, 1, 1]
    shape[axis] = len(positions)
    f = (positions - lo).astype(np.float32).reshape(shape)
    out: F32 = np.take(image, lo, axis=axis) * (1 - f) + np.take(image, hi, axis=axis) * f
    return out


def _bias(rng: np.random.Generator, shape: tuple[int, ...], r: float, sd: float) -> F32:
    """A smooth multiplicative field exp(N(0, sd)) varying over ~60 mm."""
    step = max(30.0 / r, 1.0)
    cshape = tuple(int(math.ceil((n - 1) / step)) + 2 for n in shape)
    coarse = ndimage.gaussian_filter(rng.standard_normal(cshape), 1.0).astype(np.float32)
    coarse *= np.float32(sd / max(float(coarse.std()), 1e-6))
    out: F32 = np.exp(_upsample(coarse, shape, (step,) * 3))
    return out


def _acquire(clean: F32, label: npt.NDArray[np.uint8], affine: F64, icv: F32, acq: AcquisitionParams, r: float,
             grid: Grid, rng: np.random.Generator) -> tuple[F32, npt.NDArray[np.uint8], F64]:
    """Gamma, bias, slice profile, in-plane blur, slice sampling and noise for one series."""
    ref = max(float(np.percentile(clean[icv > 0.5], 99.0)), 1e-3)
    image = (np.power(clean / np.float32(ref), np.float32(acq.gamma)) * np.float32(ref)).astype(np.float32)
    image *= _bias(rng, image.shape, r, acq.bias_sd)
    axis = PLANES.index(acq.plane)  # axial slices are along z (array axis 0), coronal y, sagittal x
    inplane = math.sqrt(max(acq.inplane_mm**2 - r**2, 0.0)) / _FWHM / r
    sigmas = [inplane] * 3
    sigmas[axis] = 0.0
    image = ndimage.gaussian_filter(image, sigmas, mode="nearest")
    thickness = acq.thickness_mm / r
    if thickness > 1.05:
        spacing = thickness * (1.0 + acq.gap)
        positions = slice_positions(image.shape[axis], spacing, float(rng.uniform(0.0, min(spacing, 2.0))))
    else:
        spacing, positions = 1.0, np.arange(image.shape[axis], dtype=np.float64)
    stack = sample_slices(slab_filter(image, axis, thickness, acq.profile), axis, positions)
    sigma = float(np.mean(clean[icv > 0.5])) / acq.snr
    noise = rng.standard_normal((2, *stack.shape), dtype=np.float32) * np.float32(sigma)
    stack = np.hypot(stack + noise[0], noise[1]) if acq.noise == "rician" else stack + noise[0]
    stack = (stack * np.float32(rng.uniform(800.0, 3000.0) / ref)).astype(np.float32)
    if grid == "case":
        back = np.interp(np.arange(image.shape[axis]), positions, np.arange(len(positions)))
        return sample_slices(stack, axis, back), label, affine
    truth = sample_slices(slab_filter(label.astype(np.float32), axis, thickness, acq.profile), axis, positions)
    out_affine = affine.copy()
    column = 2 - axis
    out_affine[:3, 3] += affine[:3, column] * positions[0]
    out_affine[:3, column] *= spacing
    return stack, (truth >= 0.5).astype(np.uint8), out_affine


def _flip(image: F32, label: npt.NDArray[np.uint8], affine: F64,
          flips: tuple[bool, bool, bool]) -> tuple[F32, npt.NDArray[np.uint8], F64]:
    """Reverse array axes (the field of view's orientation) keeping the same patient geometry."""
    out = affine.copy()
    for axis, flip in enumerate(flips):
        if flip:
            column = 2 - axis
            out[:3, 3] += out[:3, column] * (image.shape[axis] - 1)
            out[:3, column] *= -1.0
            image, label = np.flip(image, axis), np.flip(label, axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), out


def write_synth_case(case: SynthCase, out_dir: Path, grid: Grid) -> list[Path]:
    """Write *case* as NIfTI in the challenge layout read by :func:`dmg_node.training.data.find_cases`.

    ``grid="case"``: ``<out_dir>/<case_id>/<case_id>-{t1c,t2w,t2f,seg}.nii.gz`` (one shared grid).
    ``grid="acquired"``: ``<out_dir>/<seq>/<case_id>/<case_id>-{<suffix>,seg}.nii.gz`` per sequence.
    Each folder also gets ``<case_id>-params.json`` (the :class:`SynthParams` record).

    Returns
    -------
    list[Path]
        The case folders written.
    """
    targets = {seq: out_dir / case.case_id if grid == "case" else out_dir / seq / case.case_id for seq in SEQUENCES}
    for seq, folder in targets.items():
        folder.mkdir(parents=True, exist_ok=True)
        ras = RAS_TO_LPS @ case.affines[seq]
        image = np.clip(np.round(case.images[seq]), 0, 32767).astype(np.int16)
        _save_nifti(image, ras, folder / f"{case.case_id}-{NIFTI_SUFFIX[seq]}.nii.gz")
        _save_nifti(case.labels[seq], ras, folder / f"{case.case_id}-{LABEL_SUFFIX}.nii.gz")
        (folder / f"{case.case_id}-params.json").write_text(json.dumps(json.loads(case.params.to_json()), indent=1))
    folders = sorted(set(targets.values()))
    log.info("synth_nifti_written", case_id=case.case_id, folders=[str(f) for f in folders])
    return folders



def generate(out_dir: Path, set_name: str, n_cases: int, *, first: int = 0, resolution_mm: float = 2.0,
             grid: Grid = "case") -> list[Path]:
    """Render and write cases ``first .. first + n_cases - 1`` of the named set (:data:`randomize.SETS`).

    Case *i* of a set has seed ``start + i``, where ``start`` opens the set's reserved seed range,
    so ``train``, ``validation`` and every held-out set never share a case.

    Raises
    ------
    ValueError
        If *set_name* is unknown, *n_cases* is below 1 or the seeds leave the set's range.
    """
    if set_name not in SETS:
        raise ValueError(f"set must be one of {sorted(SETS)}; found {set_name!r}")
    if n_cases < 1 or first < 0:
        raise ValueError(f"n_cases must be at least 1 and first non-negative; found {n_cases}, {first}")
    distribution = SETS[set_name]
    written: list[Path] = []
    for index in range(first, first + n_cases):
        params = draw_params(distribution.seeds[0] + index, distribution)
        written += write_synth_case(render(params, resolution_mm=resolution_mm, grid=grid), out_dir, grid)
    return written
