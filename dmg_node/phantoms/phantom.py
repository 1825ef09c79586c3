"""Synthetic MR studies of a diffuse midline glioma (DMG) on real brain anatomy (phantoms).

Each case (one integer seed) deforms the ICBM152 template anatomy, with skull, face and neck
added (pose, scale, smooth elastic field; :mod:`dmg_node.phantoms.anatomy`), grows an irregular
tumour in the pons, medulla or a thalamus with mass effect, renders T2, FLAIR and
post-contrast T1 from tissue fractions (:mod:`dmg_node.phantoms.tumour`) and adds a bias field,
Rician noise and 12-bit values.

Writers give (1) classic MR Image Storage series (PS3.3 A.4) on varied acquisition grids
(2D axial, possibly oblique, thick slices; 3D 1 mm sagittal), with the true mask on each grid
and optionally a reference RTSTRUCT, and (2) NIfTI image/label pairs in the folder layout of
public paediatric brain tumour challenge data. Seeds fully determine every output, UIDs
included. These are test and training data only; nothing here is clinically validated.

Geometry follows :mod:`dmg_node.volume`: arrays are (slices, rows, columns) and affines map
(column i, row j, slice k) to LPS mm. NIfTI affines are RAS: x and y negated.

One module because a case and its two writers (DICOM series on acquisition grids, NIfTI pairs)
share the seed-to-UID rules and the grid conventions; anatomy, tumour and the randomized
generator live in their own modules.
"""

from __future__ import annotations

import datetime
import json
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

import dmg_node
from dmg_node.phantoms.anatomy import (
    _EVERYWHERE,
    F32,
    F64,
    _anatomy,
    _forward_box,
    _index_box,
    _locate,
    _rotation,
    _sample,
    _sampling_coords,
    _template_box,
    _tissues,
    _upsample,
    mass_effect,
)
from dmg_node.phantoms.anatomy import (
    RAS_TO_LPS as RAS_TO_LPS,  # re-exported: part of this module's API
)
from dmg_node.phantoms.tumour import (
    SEQUENCES as SEQUENCES,  # re-exported: part of this module's API
)
from dmg_node.phantoms.tumour import _draw_site, _render, _tumour, draw_signals
from dmg_node.training.data import LABEL_SUFFIX, NIFTI_SUFFIX

log = structlog.get_logger(__name__)

Geometry = Literal["clinical", "small"]

FORMATS = frozenset({"dicom", "nifti"})
MANUFACTURER = "dmg-node phantom"
MAX_STORED = 4095  # BitsStored 12
# Name-based UUIDs under 2.25 (PS3.5 B.2): deterministic, and no organisation root is needed.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dmg-node:phantom")


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case on its own grid (see the module docstring for conventions).

    Attributes
    ----------
    case_id
        ``PH-DMG-<seed>``, also the NIfTI folder name.
    seed
        The seed that made it.
    images
        ``"t1c"``, ``"t2"``, ``"flair"``: float32 (slices, rows, columns) holding 12-bit values
        (0..4095) after bias field and Rician noise.
    noise_free
        The same images in relative units before bias field and noise (the DICOM writer
        resamples these and adds its own per-series bias field and noise).
    label
        uint8, 1 = tumour.
    affine
        4x4, (i, j, k) -> LPS mm.
    tumour_site
        ``"pons"``, ``"medulla"``, ``"thalamus_left"`` or ``"thalamus_right"``.
    enhancement
        ``"none"``, ``"patchy"`` or ``"ring"``.
    """

    case_id: str
    seed: int
    images: dict[str, F32]
    noise_free: dict[str, F32]
    label: npt.NDArray[np.uint8]
    affine: F64
    tumour_site: str
    enhancement: str

    @property
    def tumour_volume_ml(self) -> float:
        """Tumour volume on the case grid in cm3."""
        return float(self.label.sum()) * abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


@dataclass(frozen=True)
class SeriesManifest:
    """One written series: where it is, its UID and its true tumour mask on its own grid."""

    sequence: str
    folder: str
    series_instance_uid: str
    series_description: str
    n_instances: int
    truth: str
    tumour_volume_ml: float
    rtstruct: str | None


@dataclass(frozen=True)
class StudyManifest:
    """One written DICOM study (also saved as ``manifest.json`` in *study_dir*)."""

    study_dir: Path
    case_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    series: tuple[SeriesManifest, ...]


# -------------------------------------------------------------------------------------- case


def make_case(seed: int, *, resolution_mm: float = 1.0, crop: bool = True) -> PhantomCase:
    """Make one synthetic DMG case on an axial LPS grid of *resolution_mm*.

    Parameters
    ----------
    seed
        Non-negative; fully determines the case.
    resolution_mm
        Voxel size of the case grid (0.5 to 4 mm); the anatomy is downsampled to it.
    crop
        Limit the grid to the head (plus a margin) rather than the whole template box.

    Returns
    -------
    PhantomCase

    Raises
    ------
    ValueError
        If *seed* is negative or *resolution_mm* is out of range.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative; found {seed}")
    if not 0.5 <= resolution_mm <= 4.0:
        raise ValueError(f"resolution_mm must be within 0.5..4; found {resolution_mm}")
    started = time.perf_counter()
    r = float(resolution_mm)
    anat = _anatomy(r)
    rng = np.random.default_rng([seed, 1])
    # Case point p shows template point c0 + inv(pose) (p - c0), then elastic and mass effect.
    scale = rng.uniform(0.84, 1.0) * rng.uniform(0.96, 1.04, 3)
    pose = _rotation(rng.uniform(-8.0, 8.0), rng.uniform(-4.0, 4.0), rng.uniform(-4.0, 4.0)) @ np.diag(scale)
    c0 = anat.brain_centre
    site, site_tpl, volume_ml = _draw_site(rng)

    lo, hi = _forward_box(anat.head_box if crop else _template_box(anat), pose, c0, 5.0)
    lo, hi = np.floor(lo / r) * r, np.ceil(hi / r) * r
    shape = tuple(int(n) for n in np.round((hi - lo)[::-1] / r) + 1)
    affine = np.diag([r, r, r, 1.0])
    affine[:3, 3] = lo

    coords, coarse, step = _sampling_coords(rng, anat, shape, lo, r, c0, np.linalg.inv(pose).astype(np.float64))
    centre_idx = _locate(anat, site_tpl, coarse, step, pose, lo, r)
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    mass_effect(coords, coarse, step, centre_idx, r, rng.uniform(0.5, 0.8) * radius)
    face = _index_box(_forward_box(anat.face_box, pose, c0, 8.0), lo, r, shape)
    sampled = _sample(anat, coords, face)
    del coords
    parts, brain = _tissues(sampled, rng, max(r, 1.0), face)
    del sampled
    tumour = _tumour(rng, brain["icv"], centre_idx, r, radius, volume_ml)
    noise_free = _render(parts, brain, tumour, draw_signals(rng))
    label = np.zeros(shape, np.uint8)
    label[tumour.box] = tumour.label
    images = {seq: _acquire(noise_free[seq], affine, np.random.default_rng([seed, 2, n]))
              for n, seq in enumerate(SEQUENCES)}
    case = PhantomCase(case_id=f"PH-DMG-{seed:05d}", seed=seed, images=images, noise_free=noise_free,
                       label=label, affine=affine, tumour_site=site, enhancement=tumour.enhancement)
    log.info("phantom_case_made", case_id=case.case_id, site=site, enhancement=tumour.enhancement,
             volume_ml=round(case.tumour_volume_ml, 2), shape=shape, seconds=round(time.perf_counter() - started, 2))
    return case


def _acquire(clean: F32, affine: F64, rng: np.random.Generator) -> F32:
    """Scanner-like 12-bit image: smooth multiplicative bias field, Rician noise, 0..4095 integers.

    *affine* maps (i, j, k) to LPS mm; the bias field is a random quadratic in patient
    coordinates (about the grid centre), computed every ~16 mm and interpolated.
    """
    gain = rng.uniform(1500.0, 2800.0)
    sigma = rng.uniform(0.012, 0.03) * gain
    linear = rng.normal(0.0, 0.12, 3)
    quadratic = rng.normal(0.0, 0.06, 6)
    voxel = np.linalg.norm(affine[:3, :3], axis=0)[::-1]  # mm along (k, j, i)
    steps = np.maximum(np.floor(16.0 / voxel), 1.0)
    cshape = tuple(int(math.ceil((n - 1) / s)) + 2 for n, s in zip(clean.shape, steps))
    kji = np.stack(np.meshgrid(*[np.arange(c) * s for c, s in zip(cshape, steps)], indexing="ij"), axis=-1)
    centre = (np.array(clean.shape) - 1) / 2.0
    xyz = ((kji - centre)[..., ::-1] @ affine[:3, :3].T) / 100.0  # dm from the grid centre
    pairs = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
    bias = xyz @ linear + sum(q * xyz[..., a] * xyz[..., b] for q, (a, b) in zip(quadratic, pairs))
    field = np.exp(np.clip(bias, -0.3, 0.3)).astype(np.float32) * np.float32(gain)
    signal = clean * _upsample(field, clean.shape, steps)
    noise = rng.standard_normal((2, *clean.shape), dtype=np.float32)
    noise *= np.float32(sigma)
    signal += noise[0]
    out: F32 = np.hypot(signal, noise[1], out=signal)
    np.clip(out, 0, MAX_STORED, out=out)
    return np.round(out, out=out)


# ------------------------------------------------------------------------------------- NIfTI


def write_nifti_case(case: PhantomCase, out_dir: Path) -> Path:
    """Write *case* as ``<out_dir>/<case_id>/<case_id>-{t1c,t2w,t2f,seg}.nii.gz``.

    The layout of public paediatric brain tumour challenge data: int16 images, uint8 label
    (1 = tumour), the case grid with its RAS affine (LPS with x and y negated) in both the qform
    and the sform.

    Returns
    -------
    Path
        The case folder.
    """
    folder = out_dir / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    ras = RAS_TO_LPS @ case.affine
    for seq in SEQUENCES:
        _save_nifti(case.images[seq].astype(np.int16), ras, folder / f"{case.case_id}-{NIFTI_SUFFIX[seq]}.nii.gz")
    _save_nifti(case.label, ras, folder / f"{case.case_id}-{LABEL_SUFFIX}.nii.gz")
    log.info("phantom_nifti_written", case_id=case.case_id, folder=str(folder))
    return folder


def _save_nifti(array: npt.NDArray[np.generic], ras: F64, path: Path) -> None:
    """Save a (k, j, i) array as NIfTI-1, whose data is (i, j, k), with *ras* as qform and sform."""
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), ras)  # type: ignore[no-untyped-call]
    img.set_qform(ras, code=1)  # type: ignore[no-untyped-call]
    img.set_sform(ras, code=1)  # type: ignore[no-untyped-call]
    img.header.set_xyzt_units("mm", "sec")  # type: ignore[no-untyped-call]
    nib.save(img, path)


# ------------------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class _Acquisition:
    """One acquisition grid; the affine maps (i, j, k) to LPS as in :mod:`dmg_node.volume`."""

    sequence: str
    description: str
    three_d: bool
    shape: tuple[int, int, int]  # slices, rows, columns
    pixel_mm: float
    thickness_mm: float
    spacing_mm: float  # between slice centres
    axes: F64  # columns: row direction (i), column direction (j), slice normal (k); LPS unit vectors
    origin: F64  # LPS centre of the first pixel of the first slice

    @property
    def affine(self) -> F64:
        out = np.eye(4)
        out[:3, :3] = self.axes * np.array([self.pixel_mm, self.pixel_mm, self.spacing_mm])
        out[:3, 3] = self.origin
        return out


@dataclass(frozen=True)
class _Study:
    """Study-level identity drawn from the seed (all synthetic)."""

    seed: int
    study_uid: str
    frame_uid: str
    when: datetime.datetime
    birth_date: datetime.date
    sex: str
    weight_kg: float
    field_t: float
    t2_timing: tuple[float, float]  # TR, TE in ms


# Per sequence: DICOM MR physics (PS3.3 C.8.3.1) in the form sequence classifiers look for.
_PHYSICS: dict[str, dict[str, object]] = {
    "t2": {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "ScanOptions": "",
           "RepetitionTime": 5000.0, "EchoTime": 100.0, "EchoTrainLength": 15, "FlipAngle": 150.0,
           "SequenceName": "*tse2d1_15"},
    "flair": {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR",
              "RepetitionTime": 9000.0, "EchoTime": 120.0, "InversionTime": 2500.0, "EchoTrainLength": 16,
              "FlipAngle": 150.0, "SequenceName": "*tir2d1_16"},
    "t1c": {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR",
            "RepetitionTime": 2000.0, "EchoTime": 3.0, "InversionTime": 900.0, "EchoTrainLength": 1,
            "FlipAngle": 9.0, "SequenceName": "*tfl3d1_16ns"},
}


def write_dicom_study(case: PhantomCase, out_dir: Path, *, seed: int, geometry: Geometry = "clinical",
                      reference_rtstruct: bool = False) -> StudyManifest:
    """Write *case* as one MR study of three classic MR Image Storage series (PS3.3 A.4).

    Layout under *out_dir* (the study folder): ``dicom/S<nn>_<SEQ>/IM<nnnn>.dcm`` (send this
    folder), ``truth/S<nn>_<SEQ>.npy`` (uint8 true mask on the series grid, (slices, rows,
    columns) as :mod:`dmg_node.volume` orders them), ``reference/S<nn>_<SEQ>_RS.dcm`` (with
    *reference_rtstruct*) and ``manifest.json``.

    Parameters
    ----------
    case
        From :func:`make_case`.
    seed
        Determines geometry, noise, dates and every UID (2.25 name-based UUIDs, PS3.5 B.2): the
        same seed gives the same files, so do not send two studies made with one seed to one PACS.
    geometry
        ``"clinical"``: T2 (and often FLAIR) axial 2D 256x256, 4-5 mm slices, usually oblique;
        T1C (and sometimes FLAIR) 3D sagittal 1 mm. ``"small"``: the same kinds of grid, coarse
        (128x128 x 24 axial slices; 2.2 mm 3D) for tests.
    reference_rtstruct
        Also write an RTSTRUCT of the true mask per series (:mod:`dmg_node.rtstruct`).

    Returns
    -------
    StudyManifest
    """
    if geometry not in ("clinical", "small"):
        raise ValueError(f"geometry must be 'clinical' or 'small'; found {geometry!r}")
    rng = np.random.default_rng([seed, 3])
    study = _draw_study(seed, rng)
    acquisitions = _plan(case, rng, geometry)
    series = []
    for number, acq in enumerate(acquisitions, start=1):
        name = f"S{number:02d}_{acq.sequence.upper()}"
        clean = _resample(case.noise_free[acq.sequence], case.affine, acq)
        box = _label_box(case.label, case.affine, acq)
        truth = (_resample(case.label.astype(np.float32), case.affine, acq, box) >= 0.5).astype(np.uint8)
        pixels = _acquire(clean, acq.affine, np.random.default_rng([seed, 4, number])).astype(np.uint16)
        series_uid = _uid(seed, "series", str(number))
        datasets = _datasets(study, acq, number, series_uid, pixels)
        folder = out_dir / "dicom" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, ds in enumerate(datasets):
            dcmwrite(folder / f"IM{k + 1:04d}.dcm", ds, enforce_file_format=True)
        (out_dir / "truth").mkdir(exist_ok=True)
        np.save(out_dir / "truth" / f"{name}.npy", truth)
        rtstruct = None
        if reference_rtstruct:
            rtstruct = f"reference/{name}_RS.dcm"
            _write_reference(datasets, truth, study, number, out_dir / rtstruct)
        volume_ml = float(truth.sum()) * acq.pixel_mm**2 * acq.spacing_mm / 1000.0
        series.append(SeriesManifest(sequence=acq.sequence, folder=f"dicom/{name}", series_instance_uid=series_uid,
                                     series_description=acq.description, n_instances=len(datasets),
                                     truth=f"truth/{name}.npy", tumour_volume_ml=round(volume_ml, 3),
                                     rtstruct=rtstruct))
    manifest = StudyManifest(study_dir=out_dir, case_id=case.case_id, study_instance_uid=study.study_uid,
                             frame_of_reference_uid=study.frame_uid, series=tuple(series))
    body = {"case_id": case.case_id, "seed": seed, "tumour_site": case.tumour_site,
            "enhancement": case.enhancement, "study_instance_uid": study.study_uid,
            "frame_of_reference_uid": study.frame_uid,
            "series": [s.__dict__ for s in series]}
    (out_dir / "manifest.json").write_text(json.dumps(body, indent=2) + "\n")
    log.info("phantom_study_written", case_id=case.case_id, study_dir=str(out_dir), n_series=len(series))
    return manifest


def _uid(seed: int, *parts: str) -> str:
    """Deterministic UID: ``2.25.`` + a name-based (SHA-1) UUID of the seed and *parts* (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join((str(seed), *parts))).int}"


def _draw_study(seed: int, rng: np.random.Generator) -> _Study:
    """Dates, patient details and scanner of a study (a child of 4 to 14 years)."""
    when = datetime.datetime(2023, 1, 2, 8, 0) + datetime.timedelta(days=int(rng.integers(0, 730)),
                                                                     minutes=int(rng.integers(0, 600)))
    age_days = int(rng.integers(4 * 365, 14 * 365))
    return _Study(seed=seed, study_uid=_uid(seed, "study"), frame_uid=_uid(seed, "frame-of-reference"), when=when,
                  birth_date=when.date() - datetime.timedelta(days=age_days), sex=str(rng.choice(["F", "M"])),
                  weight_kg=round(float(rng.uniform(16.0, 50.0)), 1), field_t=float(rng.choice([1.5, 3.0])),
                  t2_timing=(float(rng.integers(40, 61)) * 100.0, float(rng.integers(90, 111))))


def _plan(case: PhantomCase, rng: np.random.Generator, geometry: Geometry) -> list[_Acquisition]:
    """Acquisition grids: T2 axial 2D; FLAIR axial 2D (often T2's planning) or 3D sagittal; T1C 3D sagittal."""
    idx = np.argwhere(case.noise_free["t2"] > 0.05)[:, ::-1]
    head = idx.mean(axis=0) @ case.affine[:3, :3].T + case.affine[:3, 3]
    tumour = np.argwhere(case.label)[:, ::-1] @ case.affine[:3, :3].T + case.affine[:3, 3]
    t2 = axial_grid(rng, "t2", "T2 TSE AX", geometry, head, tumour)
    choice = rng.uniform()
    if choice < 0.4:
        flair = sagittal_grid(rng, "flair", "T2 SPACE FLAIR SAG 3D", geometry, head, tumour)
    elif choice < 0.7:
        flair = _Acquisition("flair", "T2 FLAIR AX", False, t2.shape, t2.pixel_mm, t2.thickness_mm, t2.spacing_mm,
                             t2.axes, t2.origin)
    else:
        flair = axial_grid(rng, "flair", "T2 FLAIR AX", geometry, head, tumour)
    return [t2, flair, sagittal_grid(rng, "t1c", "T1 MPRAGE SAG +C", geometry, head, tumour)]


def axial_grid(rng: np.random.Generator, sequence: str, description: str, geometry: Geometry, head: F64,
           tumour: F64) -> _Acquisition:
    """A 2D axial stack, tilted 5-20 degrees about left-right three times in four (AC-PC style)."""
    size = 256 if geometry == "clinical" else 128
    pixel = rng.uniform(220.0, 240.0) / size
    thickness = float(rng.choice([4.0, 5.0]))
    spacing = thickness + float(rng.choice([0.0, 0.1, 0.2])) * thickness
    n = int(round(rng.uniform(140.0, 160.0) / spacing)) if geometry == "clinical" else 24
    tilt = np.zeros(3)
    if rng.uniform() < 0.75:
        tilt = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 20.0), *rng.uniform(-3.0, 3.0, 2)])
    axes = _rotation(*tilt)  # columns: R e_x (rows run right to left), R e_y (anterior to posterior), R e_z
    return _place(rng, sequence, description, False, (n, size, size), pixel, thickness, spacing, axes, head, tumour)


def sagittal_grid(rng: np.random.Generator, sequence: str, description: str, geometry: Geometry, head: F64,
              tumour: F64) -> _Acquisition:
    """A 3D sagittal slab (rows anterior to posterior, columns superior to inferior), tilted < 6 degrees."""
    n, size, pixel = (176, 256, 1.0) if geometry == "clinical" else (80, 112, 2.2)
    base = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: +y, -z, -x
    axes = _rotation(*rng.uniform(-6.0, 6.0, 3)) @ base
    return _place(rng, sequence, description, True, (n, size, size), pixel, pixel, pixel, axes, head, tumour)


def _place(rng: np.random.Generator, sequence: str, description: str, three_d: bool, shape: tuple[int, int, int],
           pixel: float, thickness: float, spacing: float, axes: F64, head: F64, tumour: F64) -> _Acquisition:
    """Centre the grid on the head (with jitter), shifted as needed to hold the whole tumour."""
    extent = np.array([(shape[2] - 1) * pixel, (shape[1] - 1) * pixel, (shape[0] - 1) * spacing + thickness])
    centre = np.zeros(3)
    for a in range(3):
        along = tumour @ axes[:, a]
        half = extent[a] / 2.0 - 6.0  # keep 6 mm around the tumour
        wanted = float(head @ axes[:, a] + rng.normal(0.0, 4.0))
        low, high = float(along.max()) - half, float(along.min()) + half
        centre[a] = float(np.clip(wanted, low, high)) if low <= high else float(along.mean())
    middle = axes @ centre
    origin = middle - axes @ (np.array([shape[2] - 1, shape[1] - 1, shape[0] - 1]) / 2.0
                              * np.array([pixel, pixel, spacing]))
    return _Acquisition(sequence, description, three_d, shape, pixel, thickness, spacing, axes, origin)


def _resample(volume: F32, affine: F64, acq: _Acquisition, box: tuple[slice, ...] | None = None) -> F32:
    """Linear resampling of a case array onto *acq*'s grid (zero outside *box*, when given).

    Thick slices average samples across the slice, about one per 2 case voxels.
    """
    sub = max(1, math.ceil(acq.thickness_mm / (2.0 * float(np.linalg.norm(affine[:3, 0])))))
    to_case = np.linalg.inv(affine) @ acq.affine  # acquisition (i, j, k) -> case (i, j, k)
    matrix = to_case[:3, :3][::-1, ::-1]  # both in array order (k, j, i)
    box = box or _EVERYWHERE
    start = np.array([sl.indices(n)[0] for sl, n in zip(box, acq.shape)], dtype=np.float64)
    shape = tuple(len(range(*sl.indices(n))) for sl, n in zip(box, acq.shape))
    offset = to_case[:3, 3][::-1] + matrix @ start
    out = np.zeros(acq.shape, np.float32)
    part = out[box]
    for s in range(sub):
        dk = ((s + 0.5) / sub - 0.5) * acq.thickness_mm / acq.spacing_mm
        part += ndimage.affine_transform(volume, matrix, offset + matrix[:, 0] * dk, output_shape=shape,
                                         order=1, output=np.float32, cval=0.0, prefilter=False)
    part /= np.float32(sub)
    return out


def _label_box(label: npt.NDArray[np.uint8], affine: F64, acq: _Acquisition) -> tuple[slice, ...]:
    """Slices of *acq*'s grid (array order) that can see the label, with a 2-voxel margin."""
    where = np.argwhere(label)
    lo, hi = where.min(axis=0)[::-1] - 1.0, where.max(axis=0)[::-1] + 1.0  # (i, j, k), voxel edges
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(acq.affine) @ affine @ corners.T)[:3][::-1]  # (k, j, i)
    margin = np.array([acq.thickness_mm / acq.spacing_mm + 2.0, 2.0, 2.0])
    first = np.clip(np.floor(ijk.min(axis=1) - margin).astype(int), 0, acq.shape)
    last = np.clip(np.ceil(ijk.max(axis=1) + margin).astype(int) + 1, 0, acq.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(first, last))


def _datasets(study: _Study, acq: _Acquisition, number: int, series_uid: str,
              pixels: npt.NDArray[np.uint16]) -> list[Dataset]:
    """One MR Image Storage dataset per slice, in slice order (InstanceNumber 1 first)."""
    date, clock = study.when.strftime("%Y%m%d"), study.when.strftime("%H%M%S")
    acquired = study.when + datetime.timedelta(minutes=4 * number)
    shared = Dataset()
    shared.SpecificCharacterSet = "ISO_IR 100"
    shared.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
    shared.SOPClassUID = MRImageStorage
    shared.StudyDate = shared.SeriesDate = shared.ContentDate = shared.AcquisitionDate = date
    shared.StudyTime = clock
    shared.SeriesTime = shared.ContentTime = shared.AcquisitionTime = acquired.strftime("%H%M%S")
    shared.AccessionNumber = f"PHA{study.seed}"[:16]
    shared.Modality = "MR"
    shared.Manufacturer = MANUFACTURER
    shared.InstitutionName = "dmg-node phantom"
    shared.ReferringPhysicianName = "REFERRER^PHANTOM"
    shared.StudyDescription = "MR BRAIN PHANTOM"
    shared.SeriesDescription = shared.ProtocolName = acq.description
    shared.ManufacturerModelName = "ICBM152 DMG phantom"
    shared.PatientName = f"PHANTOM^DMG^{study.seed}"
    shared.PatientID = f"PH{study.seed}"
    shared.PatientBirthDate = study.birth_date.strftime("%Y%m%d")
    shared.PatientSex = study.sex
    shared.PatientAge = f"{(study.when.date() - study.birth_date).days // 365:03d}Y"
    shared.PatientWeight = format_number_as_ds(study.weight_kg)
    shared.BodyPartExamined = "HEAD"
    for keyword, value in _PHYSICS[acq.sequence].items():
        setattr(shared, keyword, value)
    if acq.sequence == "t2":
        shared.RepetitionTime, shared.EchoTime = study.t2_timing
    shared.MRAcquisitionType = "3D" if acq.three_d else "2D"
    shared.SliceThickness = format_number_as_ds(round(acq.thickness_mm, 6))
    shared.SpacingBetweenSlices = format_number_as_ds(round(acq.spacing_mm, 6))
    shared.NumberOfAverages = 1
    shared.ImagingFrequency = format_number_as_ds(round(42.577478 * study.field_t, 6))
    shared.ImagedNucleus = "1H"
    shared.MagneticFieldStrength = format_number_as_ds(study.field_t)
    shared.EchoNumbers = 1
    shared.PercentSampling = 100
    shared.PercentPhaseFieldOfView = 100
    shared.PixelBandwidth = 200
    shared.SoftwareVersions = dmg_node.__version__
    shared.AcquisitionMatrix = [0, acq.shape[2], acq.shape[1], 0]
    shared.InPlanePhaseEncodingDirection = "COL"
    shared.PatientPosition = "HFS"
    if acq.sequence == "t1c":
        shared.ContrastBolusAgent = "Gadobutrol"
        shared.ContrastBolusRoute = "IV"
        shared.ContrastBolusVolume = format_number_as_ds(round(0.1 * study.weight_kg, 1))
        shared.ContrastBolusIngredient = "GADOLINIUM"
    shared.StudyInstanceUID = study.study_uid
    shared.SeriesInstanceUID = series_uid
    shared.StudyID = f"PH{study.seed}"[:16]
    shared.SeriesNumber = number
    shared.AcquisitionNumber = 1
    shared.FrameOfReferenceUID = study.frame_uid
    shared.PositionReferenceIndicator = ""
    shared.ImageOrientationPatient = [format_number_as_ds(round(float(v), 8)) for v in acq.axes[:, :2].T.ravel()]
    shared.SamplesPerPixel = 1
    shared.PhotometricInterpretation = "MONOCHROME2"
    shared.Rows, shared.Columns = acq.shape[1], acq.shape[2]
    shared.PixelSpacing = [format_number_as_ds(round(acq.pixel_mm, 8))] * 2
    shared.BitsAllocated = 16
    shared.BitsStored = 12
    shared.HighBit = 11
    shared.PixelRepresentation = 0
    low, high = np.percentile(pixels[pixels > 0.1 * pixels.max()], [1.0, 99.5])
    shared.WindowCenter = format_number_as_ds(round(float(low + high) / 2.0, 1))
    shared.WindowWidth = format_number_as_ds(round(float(high - low), 1))
    out = []
    for k in range(acq.shape[0]):
        ds = Dataset()
        ds.update(shared)
        sop_uid = _uid(study.seed, "instance", str(number), str(k))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        position = acq.origin + k * acq.spacing_mm * acq.axes[:, 2]
        ds.ImagePositionPatient = [format_number_as_ds(round(float(v), 6)) for v in position]
        ds.SliceLocation = format_number_as_ds(round(float(position @ acq.axes[:, 2]), 6))
        ds.PixelData = pixels[k].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _write_reference(datasets: list[Dataset], truth: npt.NDArray[np.uint8], study: _Study, number: int,
                     path: Path) -> None:
    """RTSTRUCT of the true mask on one series, built like the node's own output."""
    # Imported here: the phantom is test data, not a pipeline stage, and needs this only on request.
    from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct, save_rtstruct
    from dmg_node.volume import build_volume

    volume = build_volume(datasets)
    roi = RoiSpec(name="DMG_TRUTH", color=(0, 255, 0), generation_description="dmg-node phantom ground truth")
    meta = RtStructMeta(sop_instance_uid=_uid(study.seed, "rtstruct", str(number)),
                        series_instance_uid=_uid(study.seed, "rtstruct-series", str(number)),
                        created=study.when + datetime.timedelta(hours=1), manufacturer=MANUFACTURER,
                        series_description="Phantom reference DMG contour (ground truth)",
                        structure_set_label="DMG_TRUTH")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rtstruct(build_rtstruct(datasets, volume, truth.astype(bool), roi, meta), path)


# ---------------------------------------------------------------------------------- generate


def generate(out_dir: Path, n_cases: int, seed: int, formats: Iterable[str], *, resolution_mm: float = 1.0,
             geometry: Geometry = "clinical", reference_rtstruct: bool = False) -> list[Path]:
    """Write *n_cases* phantom cases (seeds ``seed`` .. ``seed + n_cases - 1``).

    NIfTI cases go to ``<out_dir>/nifti/<case_id>/`` and DICOM studies to
    ``<out_dir>/dicom/<case_id>/`` (see :func:`write_nifti_case`, :func:`write_dicom_study`).
    Case *n* is ``make_case(seed + n)`` whatever the run, so keep seed ranges of training,
    validation and test sets apart.

    Returns
    -------
    list[Path]
        The case folders written, in order.

    Raises
    ------
    ValueError
        If *formats* is empty or names a format other than ``dicom`` and ``nifti``, or
        *n_cases* is below 1.
    """
    wanted = set(formats)
    if not wanted or not wanted <= FORMATS:
        raise ValueError(f"formats must be a non-empty subset of {sorted(FORMATS)}; found {sorted(wanted)}")
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1; found {n_cases}")
    written: list[Path] = []
    for index in range(n_cases):
        case = make_case(seed + index, resolution_mm=resolution_mm)
        if "nifti" in wanted:
            written.append(write_nifti_case(case, out_dir / "nifti"))
        if "dicom" in wanted:
            study = write_dicom_study(case, out_dir / "dicom" / case.case_id, seed=seed + index, geometry=geometry,
                                      reference_rtstruct=reference_rtstruct)
            written.append(study.study_dir)
    return written
