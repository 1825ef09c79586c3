"""One study, one series at a time: classify -> choose -> volume -> segment -> RTSTRUCT -> outbox.

The node's job worker, the offline ``segment`` command and the demo all run series through
:func:`contour_series`; :class:`Pipeline` adds what the node needs around it (the spool's files,
the classification results in the index, the outbox).
"""

from __future__ import annotations

import datetime
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dmg_node import __version__
from dmg_node.classify import Choice, Label, choose, classify, header_from_dataset
from dmg_node.config import RtStructSettings, Settings
from dmg_node.dicomfiles import read_datasets
from dmg_node.errors import RtStructError, SeriesError
from dmg_node.records import Job
from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct
from dmg_node.segment.routing import ModelSet, Routable
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SeriesOutput:
    """One RTSTRUCT produced for one segmented series."""

    label: Label
    series_instance_uid: str
    sop_instance_uid: str
    voxels: int


class Pipeline:
    """Processes one complete study: classify, choose, segment, build RTSTRUCTs, queue them."""

    def __init__(self, settings: Settings, spool: Spool, models: dict[Label, ModelSet]) -> None:
        self.settings, self.spool, self.models = settings, spool, models
        self.rules = settings.rules

    def configure(self, settings: Settings) -> None:
        """Use new settings (live reload) from the next series on."""
        self.settings = settings
        self.rules = settings.rules

    def run(self, job: Job) -> list[SeriesOutput]:
        files = self.spool.series_files(job.study_instance_uid)
        candidates = []
        for series_uid, paths in files.items():
            try:
                ds = dcmread(paths[0], stop_before_pixels=True)
                header = header_from_dataset(ds, n_instances=len(paths))
            except Exception as exc:  # noqa: BLE001 - untrusted header: one bad series must not fail the study
                reason = f"unreadable header: {type(exc).__name__}: {exc}"[:300]
                self.spool.set_series_result(series_uid, "none", reason)
                log.warning("series_unreadable", series_uid=series_uid, reason=reason)
                continue
            result = classify(header, self.rules)
            self.spool.set_series_result(series_uid, result.label.value, result.reason)
            log.info("series_classified", series_uid=series_uid, label=result.label.value, reason=result.reason,
                     instances=len(paths))
            candidates.append((header, result))
        outputs = []
        for label, choice in choose(candidates).items():
            log.info("series_chosen", label=label.value, series_uid=choice.series_instance_uid, reason=choice.reason)
            out = self._segment(job, label, choice, files[choice.series_instance_uid])
            if out is not None:
                outputs.append(out)
        return outputs

    def _segment(self, job: Job, label: Label, choice: Choice, paths: list[Path]) -> SeriesOutput | None:
        series_uid = choice.series_instance_uid
        if series_uid in self.spool.contoured_series(job.id):  # an earlier try of this job got this far
            log.info("series_already_contoured", label=label.value, series_uid=series_uid)
            return None
        model = self.models.get(label)
        if model is None:
            log.warning("sequence_skipped_no_model", label=label.value, series_uid=series_uid)
            return None
        try:
            datasets = read_datasets(paths)
            result = contour_series(datasets, label, model, self.settings.rtstruct)
        except SeriesError as exc:
            self.spool.set_series_result(series_uid, label.value, f"rejected: {exc}")
            log.warning("series_rejected", label=label.value, series_uid=series_uid, reason=str(exc))
            return None
        if result.dataset is None:
            return None
        buf = io.BytesIO()
        result.dataset.save_as(buf, enforce_file_format=True)
        dests = [d.name for d in self.settings.destinations]
        sop_uid = str(result.dataset.SOPInstanceUID)
        path = self.spool.add_outbox(job.id, job.study_instance_uid, series_uid, sop_uid, buf.getvalue(), dests,
                                     time.time())
        log.info("rtstruct_written", label=label.value, series_uid=series_uid, sop_uid=sop_uid, path=str(path),
                 destinations=dests)
        return SeriesOutput(label, series_uid, sop_uid, result.voxels)


@dataclass(frozen=True)
class Contour:
    """The outcome of segmenting one series: the RTSTRUCT (None when nothing is to be sent)."""

    dataset: Dataset | None
    voxels: int
    volume: Volume
    mask: np.ndarray[Any, Any]
    model: Routable


def contour_series(datasets: list[Dataset], label: Label, models: ModelSet, rt: RtStructSettings) -> Contour:
    """Series datasets -> volume -> model mask -> RTSTRUCT (the segment and rtstruct stages).

    The series goes to the first of the sequence's models meant for its voxel spacing.

    Raises
    ------
    SeriesError
        The datasets do not make one volume, or no configured model is meant for its spacing.
    RtStructError
        The RTSTRUCT cannot be built.
    """
    volume = build_volume(datasets)
    series_uid = volume.series_instance_uid
    model = models.for_volume(volume)
    t0 = time.perf_counter()
    mask = model.predict(volume).astype(bool)
    voxels = int(np.count_nonzero(mask))
    log.info("series_segmented", label=label.value, series_uid=series_uid, model=model.name,
             model_version=model.version, voxels=voxels, duration_ms=round((time.perf_counter() - t0) * 1000))
    if voxels == 0:
        log.info("no_tumour_found", label=label.value, series_uid=series_uid, send_empty=rt.send_empty)
        if not rt.send_empty:
            return Contour(None, 0, volume, mask, model)
    meta = RtStructMeta(sop_instance_uid=generate_uid(prefix=None), series_instance_uid=generate_uid(prefix=None),
                        created=datetime.datetime.now().astimezone())
    roi = RoiSpec(name=rt.roi_name(label.value), color=(rt.color[0], rt.color[1], rt.color[2]),
                  generation_description=f"{model.name} {model.version} (dmg-node {__version__})"[:64])
    try:
        ds = build_rtstruct(datasets, volume, mask, roi, meta, allow_empty=rt.send_empty)
    except RtStructError as exc:
        log.error("rtstruct_failed", label=label.value, series_uid=series_uid, error=str(exc))
        raise
    return Contour(ds, voxels, volume, mask, model)
