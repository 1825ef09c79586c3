"""Contours sent before their study was complete, compared with the contours made since.

With series-level completion (``assembly.completion = "series"``) a sequence's RTSTRUCT is sent as
soon as its series is complete, so the contour QA across sequences (:mod:`dmg_node.segment.qa`)
first sees only what exists by then; a study reprocessed for a late series is the same case. When
a later job makes a new contour, the contours already sent are read back from their RTSTRUCTs onto
their series and compared with it: the new contour carries any discordance in its own RTSTRUCT, and
a discordance of a contour already sent, which cannot be unsent, is logged and recorded in its
series' reason (shown by ``dmg-node status``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from dmg_node.classify import Label
from dmg_node.config import QaSettings, Settings
from dmg_node.dicomfiles import read_datasets
from dmg_node.errors import RtStructError, SeriesError
from dmg_node.rtstruct.read import read_roi_mask
from dmg_node.segment.qa import ContourQa, FlagCode, QaInput, Region, head_region
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)

REASON_MAX_CHARS = 300


@dataclass(frozen=True)
class Earlier:
    """A contour sent before (its RTSTRUCT read back) that a job's new contours are compared with."""

    label: Label
    series_instance_uid: str
    sop_instance_uid: str  # of its RTSTRUCT
    qa_input: QaInput


def region_input(label: Label, volume: Volume, mask: np.ndarray[Any, Any], qa: QaSettings) -> QaInput:
    """What the contour QA needs of a mask on a series' grid (the head region only for a non-empty mask)."""
    mask = mask.astype(bool)
    head = head_region(volume, qa.head_margin_mm) if mask.any() else None
    return QaInput(label.value, Region.on(volume, mask), volume.frame_of_reference_uid, head)


def read_earlier(spool: Spool, label: Label, series_uid: str, paths: list[Path], settings: Settings,
                 fingerprint: Callable[[list[Dataset]], str]) -> Earlier | None:
    """The newest RTSTRUCT made from exactly the series' instances, read back onto its grid (PS3.3 C.8.8.6).

    Returns
    -------
    Earlier or None
        None when no RTSTRUCT was made from these instances, or it cannot be read back
        (``earlier_contour_unreadable``: the new contours are then not compared with it).
    """
    try:
        datasets = read_datasets(paths)
        made = spool.rtstructs_for(series_uid, fingerprint(datasets))
        if not made:
            return None
        volume = build_volume(datasets)
        mask = read_roi_mask(dcmread(made[-1].path), volume, settings.rtstruct.roi_name(label.value))
    except (SeriesError, RtStructError, InvalidDicomError, OSError) as exc:
        log.warning("earlier_contour_unreadable", label=label.value, series_uid=series_uid,
                    error=f"{type(exc).__name__}: {exc}"[:300])
        return None
    return Earlier(label, series_uid, made[-1].sop_instance_uid, region_input(label, volume, mask, settings.qa))


def late_qa(spool: Spool, earlier: Earlier, check: ContourQa, reason: str) -> None:
    """Record a discordance found only now for a contour already sent (``contour_discordant_late``).

    Its RTSTRUCT and QA note cannot be changed any more; the series' reason says so. Its
    plausibility (volume, parts, inside the head) was checked when it was made.
    """
    discordant = [f for f in check.flags if f.code is FlagCode.DISCORDANT]
    if not discordant:
        return
    note = "; ".join(f.text for f in discordant)
    log.warning("contour_discordant_late", label=earlier.label.value, series_uid=earlier.series_instance_uid,
                sop_uid=earlier.sop_instance_uid, note=note, **check.figures())
    spool.set_series_result(earlier.series_instance_uid, earlier.label.value,
                            f"sent before the QA across sequences, which flags it: QA FLAG: {note}; {reason}"
                            [:REASON_MAX_CHARS])
