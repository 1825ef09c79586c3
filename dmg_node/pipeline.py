"""One study: classify -> choose -> volume -> segment (each series) -> QA (across them) -> RTSTRUCT -> outbox.

The node's job worker, the offline ``segment`` command and the demo all run series through
:func:`contour_series` (or its two halves, :func:`segment_series` and :func:`rtstruct_for`);
:class:`Pipeline` adds what the node needs around it (the spool's files, the classification
results in the index, the contour QA across a study's sequences, the outbox).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dmg_node import __version__, metrics
from dmg_node.classify import Choice, Label, choose, classify, header_from_series
from dmg_node.completeness import incompleteness
from dmg_node.config import (
    OutputFormat,
    QaPolicy,
    QaSettings,
    RtStructSettings,
    Settings,
)
from dmg_node.dicomfiles import read_datasets
from dmg_node.errors import JobInterrupted, RtStructError, SeriesError
from dmg_node.late_qa import REASON_MAX_CHARS, Earlier, late_qa, read_earlier, region_input
from dmg_node.records import Job, RtStructKey, series_fingerprint
from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct
from dmg_node.seg_output import SegTarget, queue_seg, reuse_seg, rtstruct_rois
from dmg_node.segment.qa import (
    ContourQa,
    FlagCode,
    QaInput,
    check_study,
    consensus,
)
from dmg_node.segment.routing import ModelSet, Routable
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)



@dataclass(frozen=True)
class SeriesOutput:
    """One RTSTRUCT produced for one segmented series (``qa_flags``: the codes of the QA's flags)."""

    label: Label
    series_instance_uid: str
    sop_instance_uid: str
    voxels: int
    qa_flags: tuple[str, ...] = ()


class Pipeline:
    """Processes one complete study: classify, choose, segment, build RTSTRUCTs, queue them."""

    def __init__(self, settings: Settings, spool: Spool, models: dict[Label, ModelSet]) -> None:
        self.settings, self.spool, self.models = settings, spool, models
        self.rules = settings.rules
        self.skipped: list[dict[str, str]] = []
        self._earlier: list[tuple[Label, str, list[Path]]] = []  # chosen series contoured before, not now

    def configure(self, settings: Settings) -> None:
        """Use new settings (live reload) from the next series on."""
        self.settings = settings
        self.rules = settings.rules

    def run(self, job: Job, stopping: Callable[[], bool] = lambda: False) -> list[SeriesOutput]:
        """Run one job; *stopping* is asked before each series (a stop abandons the job there).

        Raises
        ------
        JobInterrupted
            *stopping* said yes before a series: the caller requeues the job.
        """
        self.skipped = []  # chosen series that produced no RTSTRUCT, and why
        files = self.spool.series_files(job.study_instance_uid)
        self._earlier = []
        candidates = []
        for series_uid, paths in files.items():
            try:
                # every header: diffusion hides behind a b = 0 first image (issue 19 item 11)
                header = header_from_series([dcmread(p, stop_before_pixels=True) for p in paths])
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
        # Every chosen series is segmented before any RTSTRUCT is built: the QA compares them.
        segmented = []
        for label, choice in choose(candidates).items():
            if job.series_uids and choice.series_instance_uid not in job.series_uids:
                # series-level completion: not found complete yet; its earlier contour (if any) is
                # what this job's new contours are compared with
                self._earlier.append((label, choice.series_instance_uid, files[choice.series_instance_uid]))
                continue
            if stopping():
                raise JobInterrupted(f"node stopping before the {label.value} series")
            log.info("series_chosen", label=label.value, series_uid=choice.series_instance_uid, reason=choice.reason)
            seg = self._segment(job, label, choice, files[choice.series_instance_uid])
            if seg is not None:
                segmented.append(seg)
        reasons = {header.series_instance_uid: result.reason for header, result in candidates}
        earlier = self._earlier_inputs() if segmented else []
        checks, consensus_mask = self._check(segmented, earlier)
        for e in earlier:
            late_qa(self.spool, e, checks[e.label.value], reasons.get(e.series_instance_uid, ""))
        outputs = []
        for seg in segmented:
            out = self._queue(job, seg, checks.get(seg.label.value), consensus_mask,
                              reasons.get(seg.series_instance_uid, ""))
            if out is not None:
                outputs.append(out)
        return outputs

    def _segment(self, job: Job, label: Label, choice: Choice, paths: list[Path]) -> Segmented | None:
        series_uid = choice.series_instance_uid
        model = self.models.get(label)
        if model is None:
            log.warning("sequence_skipped_no_model", label=label.value, series_uid=series_uid)
            self.skipped.append({"label": label.value, "series_uid": series_uid, "reason": "no usable model"})
            return None
        try:
            datasets = read_datasets(paths)
            incomplete = incompleteness(datasets)
            fingerprint = series_fingerprint(datasets)
            done = {} if incomplete else {(r.model, r.model_version): r
                                          for r in self.spool.rtstructs_for(series_uid, fingerprint)}
            prior = next((done[(m.name, m.version)] for m in model.models if (m.name, m.version) in done), None)
            contour = None if incomplete or prior else segment_series(datasets, label, model)
        except SeriesError as exc:
            self.spool.set_series_result(series_uid, label.value, f"rejected: {exc}")
            log.warning("series_rejected", label=label.value, series_uid=series_uid, reason=str(exc))
            self.skipped.append({"label": label.value, "series_uid": series_uid, "reason": f"rejected: {exc}"[:300]})
            return None
        if incomplete is not None:
            # held, not contoured: late instances reopen the study and it is processed again
            self.spool.set_series_result(series_uid, label.value, f"incomplete: {incomplete}")
            log.warning("series_incomplete", label=label.value, series_uid=series_uid, reason=incomplete,
                        instances=len(paths))
            self.skipped.append({"label": label.value, "series_uid": series_uid,
                                 "reason": f"incomplete: {incomplete}"[:300]})
            return None
        if prior is not None:
            # same instances, same model version: the RTSTRUCT made before (a rerun after a crash,
            # or a study reprocessed for another series) is queued again, never made anew. It
            # was checked by the contour QA when it was made; it is not compared again here.
            dests = self._dests(OutputFormat.RTSTRUCT)
            self.spool.requeue_rtstruct(job.id, job.study_instance_uid, series_uid, prior, dests, time.time())
            self._earlier.append((label, series_uid, paths))
            log.info("rtstruct_reused", label=label.value, series_uid=series_uid, sop_uid=prior.sop_instance_uid,
                     model=prior.model, model_version=prior.model_version, destinations=dests)
            if self._dests(OutputFormat.SEG):
                made_by = next(m for m in model.models if (m.name, m.version) == (prior.model, prior.model_version))
                reuse_seg(self.spool, job, label, datasets, fingerprint, prior, made_by,
                          self._seg_target(datasets, label, made_by))
            return None
        assert contour is not None
        return Segmented(label, series_uid, datasets, contour, fingerprint)

    def _earlier_inputs(self) -> list[Earlier]:
        """The contours sent before for the chosen series not segmented now (:mod:`dmg_node.late_qa`)."""
        read = (read_earlier(self.spool, label, uid, paths, self.settings, series_fingerprint)
                for label, uid, paths in self._earlier)
        return [e for e in read if e is not None]

    def _check(self, segmented: Sequence[Segmented], earlier: Sequence[Earlier] = (),
               ) -> tuple[dict[str, ContourQa], tuple[str, np.ndarray[Any, Any]] | None]:
        """Contour QA across the study's segmented series (and *earlier* contours), and the consensus ROI if configured."""
        qa = self.settings.qa
        inputs = [qa_input(seg.label, seg.contour, qa) for seg in segmented] + [e.qa_input for e in earlier]
        checks = check_study(inputs, qa)
        for seg in segmented:
            log_qa(seg.label, seg.series_instance_uid, checks[seg.label.value])
        target = next((i for i in inputs if i.sequence == qa.consensus_on), None)
        if target is None:
            return checks, None
        mask = consensus(target, inputs)
        log.info("consensus_computed", label=target.sequence, voxels=int(np.count_nonzero(mask)),
                 sequences=[i.sequence for i in inputs if i.contour.mask.any()])
        return checks, (target.sequence, mask) if mask.any() else None

    def _queue(self, job: Job, seg: Segmented, check: ContourQa | None,
               consensus_mask: tuple[str, np.ndarray[Any, Any]] | None, reason: str) -> SeriesOutput | None:
        """Build the series' RTSTRUCT with its QA note and queue it, or hold it (``qa.flagged = "hold"``)."""
        label, series_uid = seg.label, seg.series_instance_uid
        flagged = check is not None and check.flagged
        if seg.contour.voxels == 0 and not self.settings.rtstruct.send_empty:
            self.skipped.append({"label": label.value, "series_uid": series_uid,
                                 "reason": "no tumour found (rtstruct.send_empty = false)"})
            if check is not None and flagged:  # nothing to send or hold, but the planner should see why
                self.spool.set_series_result(series_uid, label.value,
                                             f"nothing found, {check.note()}; {reason}"[:REASON_MAX_CHARS])
            return None
        if check is not None and flagged and self.settings.qa.flagged is QaPolicy.HOLD:
            note = check.note()
            self.spool.set_series_result(series_uid, label.value, f"held, {note}; {reason}"[:REASON_MAX_CHARS])
            log.warning("contour_held", label=label.value, series_uid=series_uid,
                        flags=[f.code.value for f in check.flags])
            self.skipped.append({"label": label.value, "series_uid": series_uid,
                                 "reason": f"held by contour QA (qa.flagged = hold): {note}"[:300]})
            return None
        extra = []
        if consensus_mask is not None and consensus_mask[0] == label.value:
            extra.append((consensus_roi(self.settings.rtstruct, self.settings.qa), consensus_mask[1].astype(bool)))
        dataset = rtstruct_for(seg.datasets, label, seg.contour, self.settings.rtstruct, check, extra)
        if dataset is None:
            return None
        buf = io.BytesIO()
        dataset.save_as(buf, enforce_file_format=True)
        dests = self._dests(OutputFormat.RTSTRUCT)  # made even when no one wants it: the exactly-once record
        sop_uid = str(dataset.SOPInstanceUID)
        key = RtStructKey(series_uid, seg.contour.model.name, seg.contour.model.version, seg.fingerprint)
        path = self.spool.add_outbox(job.id, job.study_instance_uid, series_uid, sop_uid, buf.getvalue(), dests,
                                     time.time(), key=key)
        log.info("rtstruct_written", label=label.value, series_uid=series_uid, sop_uid=sop_uid, path=str(path),
                 destinations=dests, qa_flags=[f.code.value for f in check.flags] if check else [])
        if self._dests(OutputFormat.SEG):
            queue_seg(self.spool, job, label, seg.datasets, seg.fingerprint, seg.contour.volume, seg.contour.model,
                      rtstruct_rois(dataset, seg.contour.mask.astype(bool), extra),
                      self._seg_target(seg.datasets, label, seg.contour.model))
        if check is not None and flagged:
            self.spool.set_series_result(series_uid, label.value, f"queued, {check.note()}; {reason}"[:REASON_MAX_CHARS])
        return SeriesOutput(label, series_uid, sop_uid, seg.contour.voxels,
                            tuple(f.code.value for f in check.flags) if check else ())

    def _dests(self, fmt: OutputFormat) -> list[str]:
        """Names of the destinations that are sent *fmt* (``destinations.formats``)."""
        return [d.name for d in self.settings.destinations if d.wants(fmt)]

    def _seg_target(self, datasets: list[Dataset], label: Label, model: Routable) -> SegTarget:
        """The SEG's destinations and the series identity of the RTSTRUCT it goes beside."""
        identity = _series_identity(datasets, label, model, self.settings.rtstruct)
        return SegTarget(self._dests(OutputFormat.SEG), identity, self.settings.node.ae_title)


@dataclass(frozen=True)
class Segmented:
    """A segmented series waiting for the study's QA: its datasets (for the RTSTRUCT) and contour."""

    label: Label
    series_instance_uid: str
    datasets: list[Dataset]
    contour: Contour
    fingerprint: str  # of the instances it was made from (series_fingerprint)


@dataclass(frozen=True)
class Contour:
    """The outcome of segmenting one series: the RTSTRUCT (None when nothing is to be sent) and its QA."""

    dataset: Dataset | None
    voxels: int
    volume: Volume
    mask: np.ndarray[Any, Any]
    model: Routable
    qa: ContourQa | None = None


def contour_series(datasets: list[Dataset], label: Label, models: ModelSet, rt: RtStructSettings,
                   qa: QaSettings | None = None) -> Contour:
    """Series datasets -> volume -> model mask -> (QA) -> RTSTRUCT (the segment and rtstruct stages).

    The series goes to the first of the sequence's models meant for its voxel spacing. With *qa*,
    the plausibility checks run (one series has no other sequence to be compared with) and a
    flagged contour carries its QA note.

    Raises
    ------
    SeriesError
        The datasets do not make one volume, or no configured model is meant for its spacing.
    RtStructError
        The RTSTRUCT cannot be built.
    """
    contour = segment_series(datasets, label, models)
    check = None
    if qa is not None:
        check = check_study([qa_input(label, contour, qa)], qa)[label.value]
        log_qa(label, contour.volume.series_instance_uid, check)
    ds = rtstruct_for(datasets, label, contour, rt, check)
    return dataclasses.replace(contour, dataset=ds, qa=check)


def segment_series(datasets: list[Dataset], label: Label, models: ModelSet) -> Contour:
    """Series datasets -> volume -> model mask (no RTSTRUCT yet: ``dataset`` is None).

    Raises
    ------
    SeriesError
        The datasets do not make one volume, or no configured model is meant for its spacing.
    """
    volume = build_volume(datasets)
    series_uid = volume.series_instance_uid
    model = models.for_volume(volume)
    t0 = time.perf_counter()
    mask = model.predict(volume).astype(bool)
    metrics.SEGMENT_SECONDS.labels(label.value, model.name).observe(time.perf_counter() - t0)
    voxels = int(np.count_nonzero(mask))
    log.info("series_segmented", label=label.value, series_uid=series_uid, model=model.name,
             model_version=model.version, voxels=voxels, duration_ms=round((time.perf_counter() - t0) * 1000))
    if voxels == 0:
        log.info("no_tumour_found", label=label.value, series_uid=series_uid)
    return Contour(None, voxels, volume, mask, model)


def rtstruct_for(datasets: list[Dataset], label: Label, contour: Contour, rt: RtStructSettings,
                 check: ContourQa | None = None,
                 extra_rois: Sequence[tuple[RoiSpec, np.ndarray[Any, Any]]] = ()) -> Dataset | None:
    """The RTSTRUCT of a segmented series, with the QA note of a flagged contour (None: nothing to send).

    A flagged contour's note ("QA FLAG: ...") goes into its ROI Description (LO, 64 characters)
    and the Structure Set Description (ST), and the Series Description says QA FLAG, so the
    planner sees it in the TPS (PS3.3 C.8.8.5).

    Raises
    ------
    RtStructError
        The RTSTRUCT cannot be built.
    """
    if contour.voxels == 0 and not rt.send_empty:
        return None
    meta = RtStructMeta(sop_instance_uid=generate_uid(prefix=None), series_instance_uid=generate_uid(prefix=None),
                        created=datetime.datetime.now().astimezone(),
                        **_series_identity(datasets, label, contour.model, rt))
    roi = RoiSpec(name=rt.roi_name(label.value), color=rt.color(label.value),
                  generation_description=f"{contour.model.name} {contour.model.version} (dmg-node {__version__})"[:64])
    if check is not None and check.flagged:
        roi = dataclasses.replace(roi, description=check.note(64))
        meta = dataclasses.replace(
            meta, series_description=f"{meta.series_description} QA FLAG"[:64],
            structure_set_description=f"{meta.series_description}, review required. {check.note(900)}")
    try:
        return build_rtstruct(datasets, contour.volume, contour.mask.astype(bool), roi, meta,
                              allow_empty=rt.send_empty, extra_rois=extra_rois)
    except RtStructError as exc:
        log.error("rtstruct_failed", label=label.value, series_uid=contour.volume.series_instance_uid, error=str(exc))
        raise


def qa_input(label: Label, contour: Contour, qa: QaSettings) -> QaInput:
    """What the contour QA needs of a segmented series (the head region only for a non-empty contour)."""
    return region_input(label, contour.volume, contour.mask, qa)


def consensus_roi(rt: RtStructSettings, qa: QaSettings) -> RoiSpec:
    """The consensus structure: voxels where at least two sequences' contours agree."""
    return RoiSpec(name=qa.consensus_roi_name, color=rt.color(qa.consensus_on),
                   generation_description=f"consensus of >= 2 sequences (dmg-node {__version__})"[:64],
                   description="voxels inside the AI contours of at least two sequences")


def log_qa(label: Label, series_uid: str, check: ContourQa) -> None:
    """``contour_checked`` with the figures; a warning per kind of flag (discordant, implausible)."""
    figures = check.figures()
    log.info("contour_checked", label=label.value, series_uid=series_uid, flags=[f.code.value for f in check.flags],
             **figures)
    discordant = [f for f in check.flags if f.code is FlagCode.DISCORDANT]
    implausible = [f for f in check.flags if f.code is not FlagCode.DISCORDANT]
    if discordant:
        log.warning("contour_discordant", label=label.value, series_uid=series_uid,
                    note="; ".join(f.text for f in discordant), **figures)
    if implausible:
        log.warning("contour_implausible", label=label.value, series_uid=series_uid,
                    flags=[f.code.value for f in implausible], note="; ".join(f.text for f in implausible), **figures)


def _series_identity(datasets: list[Dataset], label: Label, model: Routable, rt: RtStructSettings) -> dict[str, Any]:
    """Series Number, Structure Set Label and Series Description of one sequence's RTSTRUCT (PS3.3 C.7.3.1, C.8.8.5).

    Each sequence's RTSTRUCT of a study is its own series, named after the sequence and the model,
    so the planner's list shows which is which (issue 21).
    """
    try:
        source_number: int | None = int(datasets[0].get("SeriesNumber"))
    except (TypeError, ValueError):
        source_number = None
    seq = label.value.upper()
    return {"series_number": rt.series_number(label.value, source_number),
            "structure_set_label": f"DMG_AI {seq}",
            "series_description": f"AI DMG contour {seq} {model.name} {model.version} UNAPPROVED"}
