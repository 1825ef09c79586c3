"""The only module that wires the stages: receive -> spool -> assemble -> classify -> segment ->
rtstruct -> send. Start-up, the background workers and a graceful stop live here.

Receiving never waits on the model: the SCP runs in pynetdicom's threads, while one job worker
processes complete studies and one outbox worker per destination sends the results.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dmg_node import __version__
from dmg_node import dropfolder, logs
from dmg_node.assemble import LatePolicy, due_studies
from dmg_node.classify import Choice, Label, classify, choose, compile_rules, header_from_dataset
from dmg_node import config as config_mod
from dmg_node.config import RtStructSettings, Settings
from dmg_node.dicomfiles import read_datasets
from dmg_node.errors import ConfigError, DmgNodeError, ModelError, RtStructError, SeriesError
from dmg_node.fsutil import atomic_write
from dmg_node.receive import Receiver
from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct
from dmg_node.segment.routing import ModelSet, Routable
from dmg_node.send import OutboxWorker
from dmg_node.spool import Job, JobState, Spool
from dmg_node.volume import Volume, build_volume
from dmg_node.watch import Watcher

log = structlog.get_logger(__name__)

STATUS_FILE = "node-status.json"


@dataclass(frozen=True)
class SeriesOutput:
    """One RTSTRUCT produced for one segmented series."""

    label: Label
    series_instance_uid: str
    sop_instance_uid: str
    voxels: int


ROUTED = (Label.T1C, Label.T2, Label.FLAIR)
SETTLE_SECONDS = 2.0
FALLBACK_POLL_SECONDS = 30.0
RETENTION_EVERY_SECONDS = 3600.0


def model_dirs(settings: Settings, label: Label) -> list[Path]:
    """The model folders configured for one sequence, in order of preference."""
    return [settings.models.dir / name for name in getattr(settings.models, label.value)]


def folder_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of a folder's files: changes whenever a model is being replaced."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


def load_segmenter(settings: Settings, label: Label, folder: Path) -> Routable | None:
    """Load the model in one folder; a missing or invalid one is logged and None returned."""
    from dmg_node.segment.infer import PostprocessConfig, Segmenter  # torch import is slow: only when serving

    try:
        model: Routable = Segmenter.load(
            folder, device=settings.models.device, sequence=label.value,
            postprocess=PostprocessConfig(min_volume_mm3=settings.rtstruct.min_volume_mm3))
    except ModelError as exc:
        log.error("model_unavailable", sequence=label.value, model_dir=str(folder), error=str(exc))
        return None
    return model  # Segmenter.load logs model_loaded (with backend and threads)


def load_model(settings: Settings, label: Label) -> ModelSet | None:
    """The models configured for one sequence that load; None (logged) when none does."""
    members = [m for folder in model_dirs(settings, label) if (m := load_segmenter(settings, label, folder)) is not None]
    return ModelSet(members) if members else None


class Pipeline:
    """Processes one complete study: classify, choose, segment, build RTSTRUCTs, queue them."""

    def __init__(self, settings: Settings, spool: Spool, models: dict[Label, ModelSet]) -> None:
        self.settings, self.spool, self.models = settings, spool, models
        self.rules = compile_rules(settings.classify.overrides())

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


class Node:
    """The running node. ``start()`` then ``wait()``; ``request_stop()`` from a signal handler."""

    def __init__(self, settings: Settings, *, models: dict[Label, ModelSet] | None = None) -> None:
        self.settings = settings
        self.spool = Spool(settings.storage.root, fsync=settings.storage.fsync)
        self.receiver = Receiver(settings, self.spool)
        self._stop = threading.Event()
        self._job_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outbox: dict[str, tuple[OutboxWorker, threading.Event]] = {}
        self._fixed_models = models is not None
        self._models: dict[Label, ModelSet] = dict(models or {})
        # (sequence, model folder) -> the model last loaded from it for that sequence, and the
        # folder's signature then: a folder listed under two sequences is loaded (and checked) for each
        self._loaded: dict[tuple[Label, Path], Routable] = {}
        self._model_sigs: dict[tuple[Label, Path], tuple[tuple[str, int, int], ...]] = {}
        self._sets_stale = False
        self._config_text = self._read_config_text()
        self._watcher: Watcher | None = None
        self.started = time.time()

    def start(self) -> None:
        self.spool.claim_ownership()
        counts = self.spool.reconcile()
        log.info("spool_reconciled", root=str(self.spool.root), **counts)
        if not self._fixed_models:
            for label, folder in self._configured_folders():
                self._load_folder(label, folder, folder_signature(folder))
            self._rebuild_model_sets()
        self.pipeline = Pipeline(self.settings, self.spool, self._models)
        self.receiver.start()
        self._start_watcher()
        for target, name in ((self._assemble_loop, "assembler"), (self._job_loop, "jobs"),
                             (self._maintain_loop, "maintenance")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._sync_outbox_workers()
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
        if self._watcher is not None:
            self._watcher.stop()
        workers = [w for w, _ in self._outbox.values()]
        for _w, stop in self._outbox.values():
            stop.set()
        for t in [*self._threads, *workers]:
            t.join(timeout=grace_seconds)
        busy = [t.name for t in (*self._threads, *workers) if t.is_alive()]
        if not busy:  # a worker still inside the index must not find it closed
            self.spool.close()
        log.info("node_stopped", unfinished_workers=busy)

    # -- workers -------------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        while not self._stop.is_set():
            a = self.settings.assembly
            try:
                for d in due_studies(self.spool.studies(), time.time(), a.quiet_seconds, LatePolicy(a.late_policy)):
                    job_id = self.spool.enqueue(d.study_instance_uid, d.covered_until, time.time())
                    log.info("study_complete", study_uid=d.study_instance_uid, job_id=job_id, reprocess=d.late,
                             quiet_seconds=a.quiet_seconds)
                    self._job_wake.set()
            except (DmgNodeError, OSError) as exc:
                # e.g. the index cannot be written (disk full): keep the thread, try again next poll
                log.error("worker_error", worker="assembler", error=f"{type(exc).__name__}: {exc}")
            self._stop.wait(a.poll_seconds)

    def _job_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.spool.claim_job(time.time())
            except (DmgNodeError, OSError) as exc:
                log.error("worker_error", worker="jobs", error=f"{type(exc).__name__}: {exc}")
                job = None
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
            try:
                outputs = self.pipeline.run(job)
            except Exception as exc:  # noqa: BLE001 - whatever one study does, the worker must live
                # RuntimeError covers torch failures (including CUDA OOM, a RuntimeError subclass);
                # anything else (a library choking on a malformed series) fails this job, not the node.
                failed = job.attempts >= self.settings.assembly.max_attempts
                error = f"{type(exc).__name__}: {exc}"
                self._finish(job, JobState.FAILED if failed else JobState.PENDING, error)
                log.error("job_failed", error=error, attempt=job.attempts, final=failed)
            else:
                self._finish(job, JobState.DONE, None)
                log.info("job_done", rtstructs=len(outputs), duration_ms=round((time.perf_counter() - t0) * 1000))
                for w, _stop in self._outbox.values():
                    w.wake.set()
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "study_uid")

    def _finish(self, job: Job, state: JobState, error: str | None) -> None:
        """Record the job's end; while the index cannot be written (a full disk), retry each poll.

        Giving up would leave the job "running" until a restart; the job worker has nothing more
        useful to do meanwhile (the next job would hit the same full index).
        """
        while True:
            try:
                self.spool.finish_job(job.id, state, time.time(), error)
                return
            except (DmgNodeError, OSError) as exc:
                log.error("worker_error", worker="jobs", error=f"{type(exc).__name__}: {exc}")
                if self._stop.wait(self.settings.assembly.poll_seconds):
                    return  # stopping: the job stays "running" and is requeued at the next start

    # -- live changes: models, config, drop folder, retention ------------------------------------

    def _start_watcher(self) -> None:
        targets = [("models", self.settings.models.dir)]
        if self.settings.source is not None:
            targets.append(("config", self.settings.source))
        drop = self.settings.import_.path
        if drop is not None:
            drop.mkdir(parents=True, exist_ok=True)
            targets.append(("import", drop))
        self._watcher = Watcher(targets)
        self._watcher.start()

    def _maintain_loop(self) -> None:
        last_poll = last_import = last_retention = 0.0
        while not self._stop.is_set():
            assert self._watcher is not None  # started before this thread
            self._watcher.wake.wait(1.0)
            changed = self._watcher.take()
            now = time.time()
            if now - last_poll >= FALLBACK_POLL_SECONDS:
                changed |= {"models", "config"}
                last_poll = now
            try:
                if "config" in changed:
                    self._maybe_reload_config()
                if not self._fixed_models:
                    self._maybe_reload_models()
                drop = self.settings.import_
                if drop.path is not None and ("import" in changed or now - last_import >= drop.poll_seconds):
                    dropfolder.scan(drop.path, self.spool, settle_seconds=drop.settle_seconds,
                                    keep_first=self.settings.storage.duplicate_policy == "keep_first")
                    last_import = now
                days = self.settings.storage.retention_days
                if days > 0 and now - last_retention >= RETENTION_EVERY_SECONDS:
                    self._apply_retention(now, days)
                    last_retention = now
            except (DmgNodeError, OSError) as exc:
                log.error("maintenance_failed", error=f"{type(exc).__name__}: {exc}")

    def _maybe_reload_models(self) -> None:
        """Load a new or replaced model once its folder is stable; the old one serves until then."""
        changed = False
        for label, folder in self._configured_folders():
            sig = folder_signature(folder)
            if sig == self._model_sigs.get((label, folder)) or not sig:
                continue
            newest = max(mtime for _name, _size, mtime in sig) / 1e9
            if time.time() - newest < SETTLE_SECONDS:
                continue  # still being copied: the next wake-up (or the fallback poll) looks again
            old = self._loaded.get((label, folder))
            model = self._load_folder(label, folder, sig)
            if model is None:
                log.warning("model_reload_failed", sequence=label.value, model_dir=str(folder),
                            kept=getattr(old, "version", None))
                continue
            changed = True
            log.info("model_reloaded", sequence=label.value, model=model.name, version=model.version)
        if changed or self._sets_stale:
            self._rebuild_model_sets()

    def _configured_folders(self) -> list[tuple[Label, Path]]:
        return [(label, folder) for label in ROUTED for folder in model_dirs(self.settings, label)]

    def _load_folder(self, label: Label, folder: Path, sig: tuple[tuple[str, int, int], ...]) -> Routable | None:
        """Load one configured folder for one sequence (recording the signature it had); None if it fails."""
        self._model_sigs[(label, folder)] = sig
        model = load_segmenter(self.settings, label, folder)
        if model is not None:
            self._loaded[(label, folder)] = model
        return model

    def _rebuild_model_sets(self) -> None:
        """Each sequence's models, in the configured order, from the folders that loaded."""
        self._sets_stale = False
        for label in ROUTED:
            members = [self._loaded[(label, f)] for f in model_dirs(self.settings, label) if (label, f) in self._loaded]
            if members:
                self._models[label] = ModelSet(members)
            else:
                self._models.pop(label, None)

    def _read_config_text(self) -> str | None:
        src = self.settings.source
        try:
            return src.read_text(encoding="utf-8") if src is not None else None
        except OSError:
            return None

    def _maybe_reload_config(self) -> None:
        text = self._read_config_text()
        if text is None or text == self._config_text:
            return
        self._config_text = text
        try:
            new = config_mod.load(self.settings.source)
        except ConfigError as exc:
            log.error("config_reload_failed", error=str(exc), kept="previous settings")
            return
        self.apply_settings(new)

    def apply_settings(self, new: Settings) -> None:
        """Apply what can change live; log what needs a restart (and keep its old value)."""
        old = self.settings
        restart = [f"node.{k}" for k, v in vars(new.node).items() if getattr(old.node, k) != v]
        restart += [f"storage.{k}" for k in ("root", "fsync") if getattr(old.storage, k) != getattr(new.storage, k)]
        new = dataclasses.replace(new, node=old.node, storage=dataclasses.replace(
            new.storage, root=old.storage.root, fsync=old.storage.fsync))
        live = [f.name for f in dataclasses.fields(Settings) if getattr(old, f.name) != getattr(new, f.name)]
        self.settings = new
        self.receiver.apply(new)
        self.pipeline.settings = new
        self.pipeline.rules = compile_rules(new.classify.overrides())
        if old.logging != new.logging:
            logs.configure(new.logging.level, new.logging.format, new.logging.include_phi)
        if old.destinations != new.destinations or old.outbox != new.outbox:
            self._sync_outbox_workers(restart_all=old.outbox != new.outbox)
        if old.models != new.models and not self._fixed_models:
            self._model_sigs.clear()  # reload every configured folder (the folders or the device may differ)
            self._sets_stale = True  # and regroup them as configured now
        if restart:
            log.warning("config_change_needs_restart", keys=restart)
        if live:
            log.info("config_reloaded", changed=live)

    def _sync_outbox_workers(self, restart_all: bool = False) -> None:
        wanted = {d.name: d for d in self.settings.destinations}
        for name, (worker, stop) in list(self._outbox.items()):
            if restart_all or wanted.get(name) != worker.dest:
                stop.set()
                worker.wake.set()
                del self._outbox[name]
        for name, dest in wanted.items():
            if name not in self._outbox:
                stop = threading.Event()
                w = OutboxWorker(self.spool, dest, self.settings.node.ae_title, self.settings.outbox, stop)
                w.start()
                self._outbox[name] = (w, stop)

    def _apply_retention(self, now: float, days: float) -> None:
        for study_uid in self.spool.expired_studies(now, days):
            removed = self.spool.delete_study(study_uid)
            log.info("study_deleted_by_retention", study_uid=study_uid, files=removed, retention_days=days)

    def _write_status(self) -> None:
        """Publish live state for ``dmg-node status`` (a separate process reads it)."""
        models = self._models or {}
        state = {
            "pid": os.getpid(), "version": __version__, "started_at": self.started, "updated_at": time.time(),
            "ae_title": self.settings.node.ae_title, "port": self.receiver.port,
            "associations": self.receiver.active_associations(),
            "models": {k.value: {"name": m.name, "version": m.version, "device": str(m.device), "members": m.describe()}
                       for k, m in models.items()},
        }
        try:
            atomic_write(self.spool.root / STATUS_FILE, json.dumps(state).encode(), sync=False)
        except OSError as exc:
            log.warning("status_write_failed", error=str(exc))
