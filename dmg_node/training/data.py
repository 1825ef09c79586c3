"""Training and evaluation data: labelled cases as (Volume, mask) pairs, the cache, patches.

Two layouts are read:

* **NIfTI, challenge layout** (BraTS-style, also what :mod:`dmg_node.phantoms.phantom` writes)::

      DATA/<CASE>/<CASE>-t1c.nii.gz   T1 post-contrast
      DATA/<CASE>/<CASE>-t2w.nii.gz   T2
      DATA/<CASE>/<CASE>-t2f.nii.gz   T2-FLAIR
      DATA/<CASE>/<CASE>-seg.nii.gz   label, > 0 = tumour

  NIfTI affines map (i, j, k) to RAS; the Volume convention is LPS with the array in
  (k, j, i) order, so the array is transposed and the first two affine rows negated.
* **DICOM with a reference RTSTRUCT**: any folder tree of image series and RTSTRUCTs (PS3.3
  A.19) that reference them; each RTSTRUCT makes one case from the series it references when
  :mod:`dmg_node.classify` labels that series with the wanted sequence, and the ROIs whose name
  matches a pattern (``re.search``) are unioned.

For training, cases are put on the model grid once and cached (:func:`load_prepared`), and
:class:`PatchSampler` draws augmented patches from them.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
import structlog
import torch
from pydicom.dataset import Dataset
from scipy import ndimage
from tqdm import tqdm

from dmg_node import config
from dmg_node.classify import Rules, classify, header_from_dataset
from dmg_node.dicomfiles import find_series, read_datasets
from dmg_node.errors import SeriesError
from dmg_node.fsutil import atomic_write, ensure_dir
from dmg_node.rtstruct import read_roi_mask
from dmg_node.segment.preprocess import PreprocessConfig, prepare
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)

NIFTI_SUFFIX = {"t1c": "t1c", "t2": "t2w", "flair": "t2f"}
LABEL_SUFFIX = "seg"
DEFAULT_ROI_PATTERN = r"(?i)gtv|tumou?r|dmg"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Case:
    """One labelled image: the source volume and its tumour mask on the same grid."""

    case_id: str
    image: Volume
    label: npt.NDArray[np.bool_]


class CaseSource(Protocol):
    """Something that can load one :class:`Case` (lazily, so lists of cases stay cheap)."""

    @property
    def case_id(self) -> str:
        """Case identifier (folder name or RTSTRUCT file stem)."""

    def load(self) -> Case:
        """Read the image and its label from disk."""


def array_volume(array: npt.ArrayLike, affine: npt.ArrayLike, name: str = "") -> Volume:
    """A :class:`Volume` for an array that did not come from DICOM (UIDs are placeholders)."""
    arr = np.asarray(array, dtype=np.float32)
    return Volume(
        array=arr,
        affine=np.asarray(affine, dtype=np.float64),
        series_instance_uid=name,
        frame_of_reference_uid="",
        sop_instance_uids=("",) * arr.shape[0],
        sop_class_uid="",
    )


def read_nifti(path: Path) -> Volume:
    """Read a NIfTI image into the Volume convention (array (k, j, i), affine to LPS).

    Raises
    ------
    SeriesError
        If the file cannot be read or is not 3D.
    """
    try:
        img = cast(nib.spatialimages.SpatialImage, nib.load(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise SeriesError(f"NIfTI file {path} cannot be read: {exc}") from exc
    if data.ndim != 3:
        raise SeriesError(f"NIfTI image {path} must be 3D; found shape {data.shape}")
    return array_volume(np.ascontiguousarray(data.transpose(2, 1, 0)), _RAS_TO_LPS @ affine, path.name)


@dataclass(frozen=True)
class NiftiCase:
    """A case in the NIfTI challenge layout."""

    case_id: str
    image_path: Path
    label_path: Path

    def load(self) -> Case:
        """Read image and label; the label must be on the image's grid.

        Raises
        ------
        SeriesError
            If either file is unreadable or the grids differ.
        """
        image = read_nifti(self.image_path)
        label = read_nifti(self.label_path)
        if label.array.shape != image.array.shape or not np.allclose(label.affine, image.affine, atol=1e-3):
            raise SeriesError(f"label {self.label_path} must share the image grid of {self.image_path}")
        return Case(self.case_id, image, label.array > 0)


def nifti_cases(data_dir: Path, sequence: str) -> list[NiftiCase]:
    """Cases under ``data_dir`` that have both the ``sequence`` image and a label, sorted by name."""
    suffix = NIFTI_SUFFIX[sequence]
    cases = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        image = folder / f"{folder.name}-{suffix}.nii.gz"
        label = folder / f"{folder.name}-{LABEL_SUFFIX}.nii.gz"
        if image.is_file() and label.is_file():
            cases.append(NiftiCase(folder.name, image, label))
    return cases


def _referenced_series_uid(rtstruct: Dataset) -> str:
    """Series Instance UID of the image series an RTSTRUCT's contours lie on (PS3.3 C.8.8.5)."""
    try:
        frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
        series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        return str(series.SeriesInstanceUID)
    except (AttributeError, IndexError) as exc:
        raise SeriesError("RTSTRUCT must reference an image series (C.8.8.5); found none") from exc


@dataclass(frozen=True)
class DicomCase:
    """An image series plus the RTSTRUCT that contours it."""

    case_id: str
    image_paths: tuple[Path, ...]
    rtstruct_path: Path
    roi_pattern: str

    def load(self) -> Case:
        """Build the volume and union the matching ROIs into one mask.

        Raises
        ------
        SeriesError
            If the series is not a volume, or no ROI name matches ``roi_pattern``.
        """
        volume = build_volume(read_datasets(self.image_paths))
        (rtstruct,) = read_datasets([self.rtstruct_path])
        names = [str(roi.ROIName) for roi in getattr(rtstruct, "StructureSetROISequence", [])]
        chosen = [n for n in names if re.search(self.roi_pattern, n)]
        if not chosen:
            raise SeriesError(f"RTSTRUCT {self.rtstruct_path} has no ROI matching {self.roi_pattern!r}; found {names}")
        mask = np.zeros(volume.array.shape, dtype=bool)
        for roi in chosen:
            mask |= np.asarray(read_roi_mask(rtstruct, volume, roi), dtype=bool)
        log.debug("rtstruct_rois_chosen", case=self.case_id, rois=chosen)
        return Case(self.case_id, volume, mask)


def dicom_cases(data_dir: Path, sequence: str, roi_pattern: str = DEFAULT_ROI_PATTERN,
                rules: Rules | None = None) -> list[DicomCase]:
    """One case per RTSTRUCT under ``data_dir`` whose referenced series is there and is ``sequence``.

    The sequence is the node's own classification of the referenced series, with *rules* (the
    settings' compiled rules; ``None``: those of the default config/node.toml, as the node uses).
    """
    series = find_series(data_dir)
    if rules is None:
        rules = config.load().rules
    cases = []
    for files in series.values():
        (first,) = read_datasets(files[:1])
        if getattr(first, "Modality", "") != "RTSTRUCT":
            continue
        for path in files:
            (rtstruct,) = read_datasets([path])
            ref = _referenced_series_uid(rtstruct)
            if ref not in series:
                log.warning("rtstruct_series_missing", rtstruct=str(path), series_uid=ref)
                continue
            (image,) = read_datasets(series[ref][:1])
            label = classify(header_from_dataset(image, len(series[ref])), rules).label
            if label != sequence:
                log.debug("rtstruct_series_other_sequence", rtstruct=str(path), label=str(label), wanted=sequence)
                continue
            cases.append(DicomCase(path.stem, tuple(series[ref]), path, roi_pattern))
    return sorted(cases, key=lambda c: c.case_id)


def find_cases(data_dir: Path, sequence: str, roi_pattern: str = DEFAULT_ROI_PATTERN,
               rules: Rules | None = None) -> Sequence[CaseSource]:
    """All labelled cases under ``data_dir``: the NIfTI layout if present, DICOM otherwise.

    Raises
    ------
    SeriesError
        If ``data_dir`` is not a folder or holds no labelled case for ``sequence``.
    """
    if not data_dir.is_dir():
        raise SeriesError(f"training data must be a folder; found {data_dir}")
    cases: Sequence[CaseSource] = nifti_cases(data_dir, sequence)
    if not cases:
        cases = dicom_cases(data_dir, sequence, roi_pattern, rules)
    if not cases:
        raise SeriesError(
            f"{data_dir} must hold labelled cases for {sequence!r} (NIfTI <CASE>/<CASE>-"
            f"{NIFTI_SUFFIX[sequence]}.nii.gz + -seg.nii.gz, or DICOM series with an RTSTRUCT); found none"
        )
    return cases


@dataclass(frozen=True)
class PreparedCase:
    """A case on the model grid, as cached: z-scored image and tumour fraction (0..1)."""

    case_id: str
    image: FloatArray
    label: FloatArray


def load_prepared(cases: list[CaseSource], config: PreprocessConfig, cache_dir: Path) -> list[PreparedCase]:
    """Preprocess each case onto the model grid, reusing ``cache_dir/<case>.npz`` when present.

    The cache folder name should carry a hash of ``config`` (see :func:`train`), so changed
    preprocessing never reads stale files.
    """
    ensure_dir(cache_dir)
    out = []
    for source in tqdm(cases, desc="preprocess", disable=not sys.stderr.isatty(), leave=False):
        path = cache_dir / f"{source.case_id}.npz"
        if path.is_file():
            with np.load(path) as npz:
                image, label = npz["image"].astype(np.float32), npz["label"].astype(np.float32) / 255
        else:
            case = source.load()
            prepared = prepare(case.image, config, case.label)
            assert prepared.label is not None
            image, label = prepared.image, prepared.label
            buffer = io.BytesIO()
            np.savez(buffer, image=image.astype(np.float16), label=np.round(label * 255).astype(np.uint8))
            atomic_write(path, buffer.getvalue(), sync=False)
        out.append(PreparedCase(source.case_id, image, label))
    return out


def thick_slices(image: FloatArray, thickness_vox: float, phase: float, inplane_sigma: float = 0.0) -> FloatArray:
    """*image* as a 2D axial acquisition of thick slices would show it once resampled back.

    Each slice averages ``thickness_vox`` voxels along axis 0 (S on the model grid), slices are
    ``thickness_vox`` apart starting at ``phase``, and the stack is linearly interpolated back onto
    every voxel (what :func:`dmg_node.segment.preprocess.prepare` does to a 4-5 mm axial series).
    ``inplane_sigma`` (voxels) blurs rows and columns as coarser pixels would. Shape and dtype kept.
    """
    n = image.shape[0]
    blurred = ndimage.uniform_filter1d(image, size=max(1, round(thickness_vox)), axis=0, mode="nearest")
    if inplane_sigma > 0:
        blurred = ndimage.gaussian_filter(blurred, (0.0, inplane_sigma, inplane_sigma), mode="nearest")
    pos = np.arange(phase, n - 1 + 1e-6, thickness_vox)
    if len(pos) < 2:
        flat: FloatArray = blurred.astype(image.dtype)
        return flat
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    f = (pos - lo).astype(image.dtype)[:, None, None]
    samples = blurred[lo] * (1 - f) + blurred[hi] * f
    x = np.arange(n)
    j = np.clip(np.searchsorted(pos, x, side="right") - 1, 0, len(pos) - 2)
    g = np.clip((x - pos[j]) / (pos[j + 1] - pos[j]), 0.0, 1.0).astype(image.dtype)[:, None, None]
    out: FloatArray = (samples[j] * (1 - g) + samples[j + 1] * g).astype(image.dtype)
    return out


class PatchSampler:
    """Random training patches with augmentation, reproducible from its numpy Generator.

    ``thick_fraction`` of the patches are seen as through a 2D axial series of 3-6 mm slices
    (:func:`thick_slices`, ``spacing_mm`` being the model grid's), which is how T2 and FLAIR
    usually arrive; the label stays the true one.
    """

    def __init__(self, cases: list[PreparedCase], patch: tuple[int, int, int], pos_fraction: float, seed: int,
                 thick_fraction: float = 0.0, spacing_mm: float = 2.0) -> None:
        self.cases = cases
        self.patch = np.array(patch)
        self.pos_fraction = pos_fraction
        self.thick_fraction = thick_fraction
        self.spacing_mm = spacing_mm
        self.rng = np.random.default_rng(seed)
        self.tumour = [np.argwhere(c.label > 0.5) for c in cases]

    def _one(self) -> tuple[FloatArray, FloatArray]:
        index = int(self.rng.integers(len(self.cases)))
        case, tumour = self.cases[index], self.tumour[index]
        shape = np.array(case.image.shape)
        if len(tumour) and self.rng.random() < self.pos_fraction:
            centre = tumour[int(self.rng.integers(len(tumour)))]
        else:
            # Half of the other patches anywhere (air included), half inside the head, where
            # the look-alikes of tumour are.
            floor = float(case.image.min()) + 0.5 if self.rng.random() < 0.5 else -np.inf
            for _ in range(20):
                centre = np.array([self.rng.integers(n) for n in shape])
                if case.image[tuple(centre)] > floor:
                    break
        start = np.clip(centre - self.patch // 2, 0, np.maximum(shape - self.patch, 0))
        sl = tuple(slice(int(a), int(a + p)) for a, p in zip(start, self.patch))
        pads = [(0, int(max(0, p - n))) for p, n in zip(self.patch, shape)]
        image = np.pad(case.image[sl], pads, constant_values=float(case.image.min()))
        label = np.pad(case.label[sl], pads)
        if self.rng.random() < 0.5:  # left-right mirror: the last axis of the canonical grid is L
            image, label = image[..., ::-1], label[..., ::-1]
        if self.thick_fraction and self.rng.random() < self.thick_fraction:
            thickness = self.rng.uniform(3.0, 6.0) / self.spacing_mm
            image = thick_slices(np.ascontiguousarray(image), thickness, self.rng.uniform(0.0, thickness),
                                 self.rng.uniform(0.0, 0.6))
        image = image * np.float32(self.rng.uniform(0.85, 1.15)) + np.float32(self.rng.uniform(-0.15, 0.15))
        if self.rng.random() < 0.3:
            image = image + self.rng.normal(0.0, self.rng.uniform(0.0, 0.1), image.shape).astype(np.float32)
        return image.astype(np.float32), np.ascontiguousarray(label)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` patches as (N, 1, S, P, L) image and label tensors."""
        pairs = [self._one() for _ in range(size)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        return images, labels
