"""The only module that wires the stages: receive -> spool -> assemble -> classify -> segment ->
rtstruct -> send. Start-up, the background workers and a graceful stop live here.

Receiving never waits on the model: the SCP runs in pynetdicom's threads, while one job worker
processes complete studies and one outbox worker per destination sends the results.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dmg_node import __version__
from dmg_node.assemble import LatePolicy, due_studies
from dmg_node.classify import Choice, Label, classify, choose, compile_rules, header_from_dataset
from dmg_node.config import RtStructSettings, Settings
from dmg_node.dicomfiles import read_datasets
from dmg_node.errors import DmgNodeError, ModelError, RtStructError, SeriesError
from dmg_node.fsutil import atomic_write
from dmg_node.receive import Receiver
from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct
from dmg_node.send import OutboxWorker
from dmg_node.spool import Job, JobState, Spool
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)

STATUS_FILE = "node-status.json"


class SegmenterLike(Protocol):
    name: str
    version: str
    sequence: str
    device: Any

    def predict(self, volume: Volume) -> np.ndarray[Any, Any]: ...


@dataclass(frozen=True)
class SeriesOutput:
    """One RTSTRUCT produced for one segmented series."""

    label: Label
    series_instance_uid: str
    sop_instance_uid: str
    voxels: int


def load_models(settings: Settings) -> dict[Label, SegmenterLike]:
    """Load the model configured for each sequence; a missing or invalid one is logged and skipped."""
    from dmg_node.segment.infer import Segmenter  # torch import is slow: only when serving

    models: dict[Label, SegmenterLike] = {}
    for label in (Label.T1C, Label.T2, Label.FLAIR):
        folder = settings.models.dir / str(getattr(settings.models, label.value))
        try:
            models[label] = Segmenter.load(folder, device=settings.models.device)
        except ModelError as exc:
            log.error("model_unavailable", sequence=label.value, model_dir=str(folder), error=str(exc))
            continue
        m = models[label]
        log.info("model_loaded", sequence=label.value, model=m.name, version=m.version, device=str(m.device))
    return models


class Pipeline:
    """Processes one complete study: classify, choose, segment, build RTSTRUCTs, queue them."""

    def __init__(self, settings: Settings, spool: Spool, models: dict[Label, SegmenterLike]) -> None:
        self.settings, self.spool, self.models = settings, spool, models
        self.rules = compile_rules(settings.classify.overrides())

    def run(self, job: Job) -> list[SeriesOutput]:
        files = self.spool.series_files(job.study_instance_uid)
        candidates = []
        for series_uid, paths in files.items():
            try:
                ds = dcmread(paths[0], stop_before_pixels=True)
            except (OSError, ValueError) as exc:
                self.spool.set_series_result(series_uid, "none", f"unreadable header: {exc}")
                continue
            header = header_from_dataset(ds, n_instances=len(paths))
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


def contour_series(datasets: list[Dataset], label: Label, model: SegmenterLike, rt: RtStructSettings) -> Contour:
    """Series datasets -> volume -> model mask -> RTSTRUCT (the segment and rtstruct stages).

    Raises
    ------
    SeriesError
        The datasets do not make one volume.
    RtStructError
        The RTSTRUCT cannot be built.
    """
    volume = build_volume(datasets)
    series_uid = volume.series_instance_uid
    t0 = time.perf_counter()
    mask = model.predict(volume).astype(bool)
    voxels = int(np.count_nonzero(mask))
    log.info("series_segmented", label=label.value, series_uid=series_uid, model=model.name,
             model_version=model.version, voxels=voxels, duration_ms=round((time.perf_counter() - t0) * 1000))
    if voxels == 0:
        log.info("no_tumour_found", label=label.value, series_uid=series_uid, send_empty=rt.send_empty)
        if not rt.send_empty:
            return Contour(None, 0, volume, mask)
    meta = RtStructMeta(sop_instance_uid=generate_uid(prefix=None), series_instance_uid=generate_uid(prefix=None),
                        created=datetime.datetime.now().astimezone())
    roi = RoiSpec(name=rt.roi_name(label.value), color=(rt.color[0], rt.color[1], rt.color[2]),
                  generation_description=f"{model.name} {model.version} (dmg-node {__version__})"[:64])
    try:
        ds = build_rtstruct(datasets, volume, mask, roi, meta, allow_empty=rt.send_empty)
    except RtStructError as exc:
        log.error("rtstruct_failed", label=label.value, series_uid=series_uid, error=str(exc))
        raise
    return Contour(ds, voxels, volume, mask)


class Node:
    """The running node. ``start()`` then ``wait()``; ``request_stop()`` from a signal handler."""

    def __init__(self, settings: Settings, *, models: dict[Label, SegmenterLike] | None = None) -> None:
        self.settings = settings
        self.spool = Spool(settings.storage.root, fsync=settings.storage.fsync)
        self.receiver = Receiver(settings, self.spool)
        self._stop = threading.Event()
        self._job_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outbox: list[OutboxWorker] = []
        self._models = models
        self.started = time.time()

    def start(self) -> None:
        counts = self.spool.reconcile()
        log.info("spool_reconciled", root=str(self.spool.root), **counts)
        if self._models is None:
            self._models = load_models(self.settings)
        self.pipeline = Pipeline(self.settings, self.spool, self._models)
        self.receiver.start()
        for target, name in ((self._assemble_loop, "assembler"), (self._job_loop, "jobs")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        for dest in self.settings.destinations:
            w = OutboxWorker(self.spool, dest, self.settings.node.ae_title, self.settings.outbox, self._stop)
            w.start()
            self._outbox.append(w)
        self._write_status()
        log.info("node_started", version=__version__, ae_title=self.settings.node.ae_title, port=self.receiver.port,
                 destinations=[d.name for d in self.settings.destinations],
                 models={k.value: m.name for k, m in self._models.items()})

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            self._write_status()

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop receiving (in-flight C-STOREs finish), stop the workers, close the index."""
        log.info("node_stopping")
        self._stop.set()
        self.receiver.stop(grace_seconds)
        self._job_wake.set()
        for t in [*self._threads, *self._outbox]:
            t.join(timeout=grace_seconds)
        busy = [t.name for t in (*self._threads, *self._outbox) if t.is_alive()]
        self.spool.close() if not busy else None
        log.info("node_stopped", unfinished_workers=busy)

    # -- workers -------------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        a = self.settings.assembly
        while not self._stop.is_set():
            for d in due_studies(self.spool.studies(), time.time(), a.quiet_seconds, LatePolicy(a.late_policy)):
                job_id = self.spool.enqueue(d.study_instance_uid, d.covered_until, time.time())
                log.info("study_complete", study_uid=d.study_instance_uid, job_id=job_id, reprocess=d.late,
                         quiet_seconds=a.quiet_seconds)
                self._job_wake.set()
            self._stop.wait(a.poll_seconds)

    def _job_loop(self) -> None:
        while not self._stop.is_set():
            job = self.spool.claim_job(time.time())
            if job is None:
                self._job_wake.wait(self.settings.assembly.poll_seconds)
                self._job_wake.clear()
                continue
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        structlog.contextvars.bind_contextvars(job_id=job.id, study_uid=job.study_instance_uid)
        t0 = time.perf_counter()
        log.info("job_started", attempt=job.attempts)
        try:
            outputs = self.pipeline.run(job)
        except (DmgNodeError, OSError, ValueError, RuntimeError) as exc:
            # RuntimeError covers torch failures (including CUDA OOM, a RuntimeError subclass).
            failed = job.attempts >= self.settings.assembly.max_attempts
            self.spool.finish_job(job.id, JobState.FAILED if failed else JobState.PENDING, time.time(),
                                  f"{type(exc).__name__}: {exc}")
            log.error("job_failed", error=f"{type(exc).__name__}: {exc}", attempt=job.attempts, final=failed)
        else:
            self.spool.finish_job(job.id, JobState.DONE, time.time())
            log.info("job_done", rtstructs=len(outputs), duration_ms=round((time.perf_counter() - t0) * 1000))
            for w in self._outbox:
                w.wake.set()
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "study_uid")

    def _write_status(self) -> None:
        """Publish live state for ``dmg-node status`` (a separate process reads it)."""
        models = self._models or {}
        state = {
            "pid": os.getpid(), "version": __version__, "started_at": self.started, "updated_at": time.time(),
            "ae_title": self.settings.node.ae_title, "port": self.receiver.port,
            "associations": self.receiver.active_associations(),
            "models": {k.value: {"name": m.name, "version": m.version, "device": str(m.device)} for k, m in models.items()},
        }
        try:
            atomic_write(self.spool.root / STATUS_FILE, json.dumps(state).encode(), sync=False)
        except OSError as exc:
            log.warning("status_write_failed", error=str(exc))
