"""Evaluate what the node sent: its RTSTRUCTs against reference contours on the same series.

:mod:`dmg_node.training.evaluate` measures a model folder on labelled cases; this measures the
node's actual output (routing, post-processing, the contours written and read back), per
sequence, with the same metrics (Dice, HD95, volume error). Each node RTSTRUCT is matched to its
reference through the Series Instance UID it references (PS3.3 C.8.8.5); the mask of both is
taken on that series' own grid, built from its DICOM files (found under the reference folder or
the spool). A reference is, in this order of preference:

1. an RTSTRUCT under the reference folder referencing the same series (its ROIs whose name
   matches ``roi_pattern``, united);
2. a phantom's truth mask: ``manifest.json`` written by ``dmg-node phantom`` lists each series'
   ``truth`` array, on the series grid (so the README's phantom study needs no ``--rtstruct``);
3. a NIfTI mask on the series grid: ``<SeriesInstanceUID>.nii[.gz]``, else the first NIfTI file
   (by path) under the reference folder whose grid (shape and affine) is the series'.

Phantom or research figures only: they say nothing about clinical accuracy.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog
from pydicom import Dataset

from dmg_node.dicomfiles import find_series, read_datasets
from dmg_node.errors import DmgNodeError, SeriesError
from dmg_node.rtstruct import read_roi_mask
from dmg_node.storage.spool import INDEX_FILE
from dmg_node.training.data import DEFAULT_ROI_PATTERN, _referenced_series_uid, read_nifti
from dmg_node.training.evaluate import CaseResult, dice, hd95, summarise
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)

BoolArray = npt.NDArray[np.bool_]
# A NIfTI mask is on a series' grid when its affine agrees with the series' within this (mm).
GRID_TOLERANCE_MM = 1e-2


@dataclass(frozen=True)
class OutputCase:
    """One node RTSTRUCT compared with its reference."""

    sequence: str
    series_instance_uid: str
    reference: str
    result: CaseResult


@dataclass(frozen=True)
class OutputEvaluation:
    """All compared RTSTRUCTs; per sequence, each metric's median and quartiles; what could not be compared."""

    cases: tuple[OutputCase, ...]
    summary: dict[str, dict[str, dict[str, float]]]
    unmatched: tuple[str, ...]


def node_rtstruct_files(path: Path) -> list[Path]:
    """The RTSTRUCT files under *path*: a folder of received RTSTRUCTs, or a spool (its ``outbox/``).

    Raises
    ------
    FileNotFoundError
        If *path* does not exist.
    """
    where = path / "outbox" if (path / INDEX_FILE).is_file() else path
    return [p for files in find_series(where).values() for p in files if _modality(p) == "RTSTRUCT"]


def evaluate_output(rtstructs: Path, reference: Path, roi_names: dict[str, str],
                    roi_pattern: str = DEFAULT_ROI_PATTERN) -> OutputEvaluation:
    """Compare every node RTSTRUCT under *rtstructs* with its reference under *reference*.

    Parameters
    ----------
    rtstructs
        Folder of RTSTRUCTs the node sent (e.g. a TPS import folder), or the node's spool.
    reference
        Folder with the referenced series' DICOM files and the references (see the module doc).
    roi_names
        ROI name -> sequence (``rtstruct.roi_name_*`` of the node's config): names each row.
    roi_pattern
        Which ROIs of a reference RTSTRUCT are the tumour (``re.search``).

    Returns
    -------
    OutputEvaluation
        One case per node RTSTRUCT that has a reference, in sequence then series order.

    Raises
    ------
    SeriesError
        If *rtstructs* holds no RTSTRUCT, or none of them could be compared.
    """
    node_files = node_rtstruct_files(rtstructs)
    if not node_files:
        raise SeriesError(f"{rtstructs} must hold the node's RTSTRUCTs (a folder, or a spool's outbox/); found none")
    series = find_series(reference)
    spool_studies = rtstructs / "studies"
    if (rtstructs / INDEX_FILE).is_file() and spool_studies.is_dir():
        series = {**find_series(spool_studies), **series}
    truths = _phantom_truths(reference)
    niftis = sorted(p for p in reference.rglob("*") if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    node_uids = {str(ds.SOPInstanceUID) for ds in read_datasets(node_files)}
    ref_rtstructs = _reference_rtstructs(series, roi_pattern, exclude=node_uids)
    cases: list[OutputCase] = []
    unmatched: list[str] = []
    for path in node_files:
        (rt,) = read_datasets([path])
        try:
            uid = _referenced_series_uid(rt)
            roi = str(rt.StructureSetROISequence[0].ROIName)
        except (SeriesError, AttributeError, IndexError):
            unmatched.append(f"{path.name}: references no image series or has no ROI")
            continue
        sequence = roi_names.get(roi, roi)
        if uid not in series:
            unmatched.append(f"{path.name} ({sequence}): its series {uid} is not under {reference} (nor the spool)")
            continue
        try:
            volume = build_volume(read_datasets(series[uid]))
            predicted = read_roi_mask(rt, volume, roi)
            found = _reference_mask(uid, volume, ref_rtstructs, truths, niftis, roi_pattern)
        except DmgNodeError as exc:
            unmatched.append(f"{path.name} ({sequence}): {exc}")
            continue
        if found is None:
            unmatched.append(f"{path.name} ({sequence}): no reference RTSTRUCT, phantom truth or NIfTI mask for "
                             f"series {uid}")
            continue
        name, truth = found
        cases.append(OutputCase(sequence, uid, name, _metrics(f"{sequence} {uid[-16:]}", predicted, truth, volume)))
    if not cases:
        raise SeriesError(f"no RTSTRUCT under {rtstructs} could be compared with a reference under {reference}: "
                          + "; ".join(unmatched))
    cases.sort(key=lambda c: (c.sequence, c.series_instance_uid))
    summary = {seq: summarise([c.result for c in cases if c.sequence == seq])
               for seq in dict.fromkeys(c.sequence for c in cases)}
    log.info("output_evaluation_finished", cases=len(cases), unmatched=len(unmatched))
    return OutputEvaluation(tuple(cases), summary, tuple(unmatched))


def _metrics(case_id: str, predicted: BoolArray, truth: BoolArray, volume: Volume) -> CaseResult:
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    ref_ml, pred_ml = float(truth.sum()) * voxel_ml, float(predicted.sum()) * voxel_ml
    return CaseResult(case_id=case_id, dice=dice(predicted, truth), hd95_mm=hd95(predicted, truth, volume.spacing[::-1]),
                      reference_ml=ref_ml, predicted_ml=pred_ml,
                      volume_error_pct=100.0 * (pred_ml - ref_ml) / ref_ml if ref_ml else math.nan, seconds=math.nan)


def _modality(path: Path) -> str:
    (ds,) = read_datasets([path])
    return str(ds.get("Modality", ""))


def _reference_rtstructs(series: dict[str, list[Path]], roi_pattern: str, exclude: set[str]) -> dict[str, list[Dataset]]:
    """Referenced Series Instance UID -> the reference RTSTRUCTs drawn on it that have a matching ROI.

    The node's own RTSTRUCTs (*exclude*, by SOP Instance UID) are never their own reference.
    """
    out: dict[str, list[Dataset]] = {}
    for files in series.values():
        if _modality(files[0]) != "RTSTRUCT":
            continue
        for ds in read_datasets(files):
            if str(ds.get("SOPInstanceUID", "")) in exclude:
                continue
            names = [str(r.ROIName) for r in ds.get("StructureSetROISequence", [])]
            try:
                uid = _referenced_series_uid(ds)
            except SeriesError:
                continue
            if any(re.search(roi_pattern, n) for n in names):
                out.setdefault(uid, []).append(ds)
    return out


def _phantom_truths(reference: Path) -> dict[str, Path]:
    """Series Instance UID -> truth mask (``.npy`` on the series grid) from phantom ``manifest.json`` files."""
    out: dict[str, Path] = {}
    for manifest in reference.rglob("manifest.json"):
        try:
            data = json.loads(manifest.read_text())
            for s in data.get("series", []):
                out[str(s["series_instance_uid"])] = manifest.parent / str(s["truth"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # another tool's manifest.json (a model folder, say): not a phantom study
    return out


def _reference_mask(uid: str, volume: Volume, rtstructs: dict[str, list[Dataset]], truths: dict[str, Path],
                    niftis: Iterable[Path], roi_pattern: str) -> tuple[str, BoolArray] | None:
    """(what the reference is, its mask on *volume*'s grid), or None when there is none."""
    if uid in rtstructs:
        mask = np.zeros(volume.array.shape, dtype=bool)
        for ds in rtstructs[uid]:
            for roi in (str(r.ROIName) for r in ds.StructureSetROISequence):
                if re.search(roi_pattern, roi):
                    mask |= read_roi_mask(ds, volume, roi)
        return "rtstruct", mask
    if uid in truths:
        truth = np.load(truths[uid]).astype(bool)
        if truth.shape != volume.array.shape:
            raise SeriesError(f"phantom truth {truths[uid]} has shape {truth.shape}, not the series' {volume.array.shape}")
        return "phantom truth", truth
    niftis = list(niftis)
    named = [p for p in niftis if p.name in (f"{uid}.nii", f"{uid}.nii.gz")]
    for path in named or niftis:
        image = read_nifti(path)
        if image.array.shape == volume.array.shape and np.allclose(image.affine, volume.affine, atol=GRID_TOLERANCE_MM):
            return f"nifti {path.name}", image.array > 0
        if named:
            raise SeriesError(f"NIfTI mask {path} is not on the grid of series {uid}")
    return None
