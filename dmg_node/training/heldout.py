"""Held-out evaluation sets the models cannot be tuned on, and their measurement per shift.

Each set (:data:`~dmg_node.phantoms.randomize.SHIFTS`, written by ``dmg-node phantom
--randomized --set <shift> --grid acquired``) is a distribution with its own block of the
reserved test seeds (:data:`~dmg_node.phantoms.randomize.TEST_SEEDS`), which training and
model selection refuse (:func:`~dmg_node.phantoms.randomize.draw_params` raises). Besides the
in-distribution set, each shifted set moves one thing outside the training distribution:
a contrast family (grey/white matter inverted), the slice thickness (5-6 mm), the SNR (2.5-6)
and the tumour site (thalamus). Cases are written on their acquisition grid (2D series of thick
slices stay thick), so a sequence's models are routed as the node routes them
(:mod:`dmg_node.segment.routing`), and scored against the truth on each series' grid.
Phantom figures: they say nothing about clinical accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import structlog

from dmg_node.classify import Label
from dmg_node.config import Settings
from dmg_node.errors import ModelError
from dmg_node.fsutil import atomic_write, ensure_dir
from dmg_node.phantoms.randomize import SEQUENCES, SHIFTS
from dmg_node.training.data import find_cases
from dmg_node.training.evaluate import dice, hd95

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class ShiftCase:
    """One series of a held-out set scored against its truth on its own grid."""

    shift: str
    sequence: str
    case_id: str
    model: str
    spacing_mm: tuple[float, float, float]
    dice: float
    hd95_mm: float
    reference_ml: float
    predicted_ml: float
    volume_error_pct: float


def evaluate_sets(settings: Settings, data_root: Path, report_dir: Path,
                  shifts: tuple[str, ...] = tuple(SHIFTS)) -> list[ShiftCase]:
    """Segment every series under ``data_root/<shift>/<seq>/`` with the configured models, routed as the node does.

    Writes ``report_dir/shifts.md`` (one row per shift and sequence: median and IQR of Dice,
    median HD95 and volume error) and ``report_dir/shifts.json`` (every case).

    Raises
    ------
    ModelError
        If a sequence has no loadable model.
    """
    from dmg_node.segment.registry import load_model  # torch: only when measuring

    results: list[ShiftCase] = []
    for seq in SEQUENCES:
        models = load_model(settings, Label(seq))
        if models is None:
            raise ModelError(f"sequence {seq!r} must have a loadable model in {settings.models.dir}; found none")
        for shift in shifts:
            folder = data_root / shift / seq
            if not folder.is_dir():
                continue
            for source in find_cases(folder, seq):
                case = source.load()
                model = models.for_volume(case.image)
                pred = model.predict(case.image)
                spacing = case.image.spacing
                voxel_ml = float(np.prod(case.image.spacing)) / 1000.0
                ref_ml, pred_ml = float(case.label.sum()) * voxel_ml, float(pred.sum()) * voxel_ml
                result = ShiftCase(
                    shift=shift, sequence=seq, case_id=case.case_id, model=model.name,
                    spacing_mm=(round(float(spacing[0]), 2), round(float(spacing[1]), 2), round(float(spacing[2]), 2)),
                    dice=dice(pred, case.label), hd95_mm=hd95(pred, case.label, case.image.spacing[::-1]),
                    reference_ml=ref_ml, predicted_ml=pred_ml,
                    volume_error_pct=100.0 * (pred_ml - ref_ml) / ref_ml if ref_ml else math.nan,
                )
                results.append(result)
                log.info("shift_case_evaluated", **asdict(result))
    ensure_dir(report_dir)
    atomic_write(report_dir / "shifts.json", json.dumps([asdict(r) for r in results], indent=1).encode(), sync=False)
    atomic_write(report_dir / "shifts.md", shift_table(results, shifts).encode(), sync=False)
    return results


def _median(values: list[float]) -> tuple[float, float, float]:
    finite = np.array([v for v in values if math.isfinite(v)])
    if not finite.size:
        return math.nan, math.nan, math.nan
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    return float(median), float(q1), float(q3)


def shift_table(results: list[ShiftCase], shifts: tuple[str, ...] = tuple(SHIFTS)) -> str:
    """Markdown table: per shift and sequence, n, models used, Dice median (IQR), HD95 and |volume error| medians."""
    lines = ["| set | sequence | n | models | Dice median (IQR) | HD95 median (mm) | abs. volume error median (%) |",
             "|---|---|---|---|---|---|---|"]
    for shift in shifts:
        for seq in SEQUENCES:
            rows = [r for r in results if r.shift == shift and r.sequence == seq]
            if not rows:
                continue
            d, q1, q3 = _median([r.dice for r in rows])
            h = _median([r.hd95_mm for r in rows])[0]
            v = _median([abs(r.volume_error_pct) for r in rows])[0]
            models = ", ".join(sorted({r.model for r in rows}))
            lines.append(f"| {shift} | {seq} | {len(rows)} | {models} | {d:.3f} ({q1:.3f}-{q3:.3f}) | "
                         f"{h:.1f} | {v:.0f} |")
    return "\n".join(lines) + "\n"
