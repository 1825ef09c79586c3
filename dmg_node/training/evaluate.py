"""Evaluate a model folder on labelled cases: Dice, HD95, volume error, a report and overlays.

Every case is segmented exactly as the node does it (:meth:`Segmenter.predict`, on the source
grid), then compared with its reference mask on that grid. ``report.md`` holds one row per case
and the summary (median and inter-quartile range); ``overlays/<case>.png`` shows, on the slice
with the largest reference area, the reference contour in green and the model's in red, so a
physicist can look at what the numbers mean. Phantom figures say nothing about clinical accuracy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import structlog
from scipy import ndimage

from dmg_node.classify import Rules
from dmg_node.fsutil import atomic_write, ensure_dir
from dmg_node.segment.infer import Segmenter
from dmg_node.training.data import DEFAULT_ROI_PATTERN, find_cases

log = structlog.get_logger(__name__)

METRICS = ("dice", "hd95_mm", "volume_error_pct")
_GREEN, _RED = (0, 200, 0), (0, 0, 255)  # OpenCV colours are BGR


@dataclass(frozen=True)
class CaseResult:
    """Metrics of one case (HD95 is NaN when either mask is empty)."""

    case_id: str
    dice: float
    hd95_mm: float
    reference_ml: float
    predicted_ml: float
    volume_error_pct: float
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    """All case results plus, per metric, the median and quartiles over cases."""

    model: str
    sequence: str
    cases: tuple[CaseResult, ...]
    summary: dict[str, dict[str, float]]


def dice(pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_]) -> float:
    """Dice coefficient; 1.0 when both masks are empty."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def hd95(pred: npt.NDArray[np.bool_], ref: npt.NDArray[np.bool_], spacing: tuple[float, float, float]) -> float:
    """95th-percentile Hausdorff distance in mm between two masks' surfaces.

    As MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed
    95th percentiles of surface-to-surface distances. ``spacing`` is per array axis. NaN when
    either mask is empty.
    """
    if not pred.any() or not ref.any():
        return math.nan
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
    p, r = pred[box], ref[box]
    surface_p = p & ~ndimage.binary_erosion(p)
    surface_r = r & ~ndimage.binary_erosion(r)
    to_r = ndimage.distance_transform_edt(~surface_r, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~surface_p, sampling=spacing)
    return float(max(np.percentile(to_r[surface_p], 95), np.percentile(to_p[surface_r], 95)))


def summarise(results: list[CaseResult]) -> dict[str, dict[str, float]]:
    """Median, first and third quartile of each metric (NaNs left out)."""
    out = {}
    for name in METRICS:
        values = np.array([getattr(r, name) for r in results], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            out[name] = {"median": float(median), "q1": float(q1), "q3": float(q3), "n": float(values.size)}
    return out


def overlay(image: npt.NDArray[np.float32], ref: npt.NDArray[np.bool_], pred: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """A BGR picture of the slice with the largest reference area, contours drawn on it."""
    k = int(np.argmax(ref.sum(axis=(1, 2)))) if ref.any() else int(np.argmax(pred.sum(axis=(1, 2))))
    plane = image[k]
    lo, hi = np.percentile(plane, [1, 99])
    grey = np.clip((plane - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    scale = max(1, 512 // max(grey.shape))
    picture = cv2.cvtColor(cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2BGR)
    for mask, colour in ((ref[k], _GREEN), (pred[k], _RED)):
        big = cv2.resize(mask.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, colour, 1)
    out: npt.NDArray[np.uint8] = np.asarray(picture, dtype=np.uint8)
    return out


def _describe(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:g}" for name, value in values.items())


def _fmt(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def report_markdown(evaluation: Evaluation, data_dir: Path, overlays: list[str], notes: tuple[str, ...] = ()) -> str:
    """The evaluation as a Markdown report (one table row per case, then the summary)."""
    lines = [
        f"# Evaluation of {evaluation.model} ({evaluation.sequence})",
        "",
        f"Data: `{data_dir}`, {len(evaluation.cases)} cases. Masks are compared on each case's source grid.",
        *notes,
        "Phantom or research figures only; they say nothing about clinical accuracy.",
        "",
        "| case | Dice | HD95 (mm) | reference (ml) | model (ml) | volume error (%) | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in evaluation.cases:
        lines.append(
            f"| {r.case_id} | {_fmt(r.dice, 3)} | {_fmt(r.hd95_mm, 1)} | {_fmt(r.reference_ml, 1)} | "
            f"{_fmt(r.predicted_ml, 1)} | {_fmt(r.volume_error_pct, 1)} | {_fmt(r.seconds, 1)} |"
        )
    lines += ["", "| metric | median | IQR (q1-q3) | n |", "|---|---|---|---|"]
    for name, s in evaluation.summary.items():
        lines.append(f"| {name} | {s['median']:.3f} | {s['q1']:.3f}-{s['q3']:.3f} | {int(s['n'])} |")
    if overlays:
        lines += ["", "Overlays (reference green, model red; slice with the largest reference area):", ""]
        lines += [f"![{name}](overlays/{name})" for name in overlays]
    return "\n".join(lines) + "\n"


def evaluate(
    model_dir: Path,
    data_dir: Path,
    report_dir: Path,
    *,
    device: str = "auto",
    n_overlays: int = 4,
    roi_pattern: str = DEFAULT_ROI_PATTERN,
    grow: bool = True,
    rules: Rules | None = None,
) -> Evaluation:
    """Segment every labelled case in ``data_dir`` and write ``report_dir/report.md``.

    Parameters
    ----------
    model_dir
        Model folder (manifest + weights).
    data_dir
        Labelled cases for the model's sequence (NIfTI layout or DICOM + RTSTRUCT).
    report_dir
        Receives ``report.md``, ``metrics.json`` and ``overlays/*.png``.
    device
        As :meth:`Segmenter.load`.
    n_overlays
        How many cases (the first ones) get an overlay picture.
    roi_pattern
        ROI name pattern for DICOM references (``re.search``).
    grow
        Apply the manifest's intensity-guided growth when it has one (as the node does);
        False measures the model without it.
    rules
        Classification rules for DICOM references (``None``: the default config's, as the node).

    Returns
    -------
    Evaluation
        Per-case results and the summary.

    Raises
    ------
    ModelError
        If the model cannot be loaded.
    SeriesError
        If the data folder holds no usable case.
    """
    segmenter = Segmenter.load(model_dir, device, grow=grow)
    ensure_dir(report_dir / "overlays")
    results: list[CaseResult] = []
    pictures: list[str] = []
    for source in find_cases(data_dir, segmenter.sequence, roi_pattern, rules):
        case = source.load()
        start = time.perf_counter()
        pred = segmenter.predict(case.image)
        seconds = time.perf_counter() - start
        voxel_ml = float(np.prod(case.image.spacing)) / 1000.0
        ref_ml, pred_ml = float(case.label.sum()) * voxel_ml, float(pred.sum()) * voxel_ml
        result = CaseResult(
            case_id=case.case_id,
            dice=dice(pred, case.label),
            hd95_mm=hd95(pred, case.label, case.image.spacing[::-1]),
            reference_ml=ref_ml,
            predicted_ml=pred_ml,
            volume_error_pct=100.0 * (pred_ml - ref_ml) / ref_ml if ref_ml else math.nan,
            seconds=seconds,
        )
        results.append(result)
        log.info("case_evaluated", **asdict(result))
        if len(pictures) < n_overlays:
            name = f"{case.case_id}.png"
            ok, png = cv2.imencode(".png", overlay(case.image.array, case.label, pred))
            if ok:
                atomic_write(report_dir / "overlays" / name, png.tobytes(), sync=False)
                pictures.append(name)
    evaluation = Evaluation(segmenter.name, segmenter.sequence, tuple(results), summarise(results))
    if segmenter.grow is not None:
        notes: tuple[str, ...] = (f"Post-processing includes the manifest's intensity-guided growth ({_describe(segmenter.grow.to_dict())}).",)
    elif segmenter.manifest.grow is not None:
        notes = ("The manifest's intensity-guided growth was turned off for this evaluation.",)
    else:
        notes = ()
    atomic_write(report_dir / "report.md", report_markdown(evaluation, data_dir, pictures, notes).encode(), sync=False)
    atomic_write(
        report_dir / "metrics.json",
        json.dumps({"cases": [asdict(r) for r in results], "summary": evaluation.summary}, indent=2).encode(),
        sync=False,
    )
    log.info("evaluation_finished", model=segmenter.name, cases=len(results), summary=evaluation.summary)
    return evaluation
