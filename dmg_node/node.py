"""The only module that wires the stages: receive -> spool -> assemble -> classify -> segment ->
rtstruct -> send. Start-up, the background workers and a graceful stop live here.

Receiving never waits on the model: the SCP runs in pynetdicom's threads, while one job worker
processes complete studies and one outbox worker per destination sends the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time

import structlog

from dmg_node import __version__, logs
from dmg_node import config as config_mod
from dmg_node.assemble import due_series, due_studies
from dmg_node.classify import Label
from dmg_node.config import Completion, DuplicatePolicy, Settings
from dmg_node.errors import ConfigError, DmgNodeError, InferenceUnavailable, JobInterrupted
from dmg_node.fsutil import atomic_write
from dmg_node.net.outbox import OutboxWorker
from dmg_node.net.pool import ReceiverPool
from dmg_node.net.scp import Receiver
from dmg_node.pipeline import Pipeline
from dmg_node.records import Job, JobState
from dmg_node.segment.registry import ROUTED, ModelRegistry
from dmg_node.segment.routing import ModelSet
from dmg_node.storage import dropfolder
from dmg_node.storage.spool import Spool
from dmg_node.watch import Watcher
from dmg_node.web import server as web_server

log = structlog.get_logger(__name__)

STATUS_FILE = "node-status.json"
FALLBACK_POLL_SECONDS = 30.0
RETENTION_EVERY_SECONDS = 3600.0
#: A changed config file must read the same twice this far apart before it is applied.
CONFIG_SETTLE_SECONDS = 0.5


class Node:
    """The running node. ``start()`` then ``wait()``; ``request_stop()`` from a signal handler."""

    def __init__(self, settings: Settings, *, models: dict[Label, ModelSet] | None = None) -> None:
        self.settings = settings
        self.spool = Spool(settings.storage.root, fsync=settings.storage.fsync)
        workers = settings.node.receive_workers()
        self.receiver: Receiver | ReceiverPool = (
            ReceiverPool(settings, self.spool, workers) if workers > 1 else Receiver(settings, self.spool))
        self._stop = threading.Event()
        self._job_wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outbox: dict[str, tuple[OutboxWorker, threading.Event]] = {}
        self.models = ModelRegistry(settings, fixed=models)
        self._config_text = self._read_config_text()
        self._watcher: Watcher | None = None
        self._web: web_server.WebServer | None = None
        self.started = time.time()
        self.unfinished: list[str] = []  # worker threads still running after stop()
        self.accepting_since = self.started
        # [inference] backend = "ray": while the Serve application does not answer, jobs wait in
        # the spool and the job worker pauses with backoff (receiving goes on)
        self._inference_failures = 0
        self._inference_retry_at = 0.0
        self._inference_error: str | None = None

    def start(self) -> None:
        self.spool.claim_ownership()
        counts = self.spool.reconcile()
        log.info("spool_reconciled", root=str(self.spool.root), **counts)
        self.models.load_all()
        self.pipeline = Pipeline(self.settings, self.spool, self.models.models)
        self.receiver.start()
        self.accepting_since = time.time()  # the quiet period of every waiting study restarts here
        self._start_watcher()
        for target, name in ((self._assemble_loop, "assembler"), (self._job_loop, "jobs"),
                             (self._maintain_loop, "maintenance")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._sync_outbox_workers()
        self._write_status()
        self._web = web_server.start(self.settings, self.spool, self.spool.root / STATUS_FILE,
                                     lambda: self.settings.logging.include_phi, logs.RECENT_WARNINGS.events)
        missing = self._models_missing()
        for label in missing:  # otherwise the node looks healthy and never sends anything (issue 21)
            log.warning("sequence_without_model", sequence=label, model_dir=str(self.settings.models.dir),
                        configured=list(getattr(self.settings.models, label)),
                        effect="series of this sequence get no contour")
        log.info("node_started", version=__version__, ae_title=self.settings.node.ae_title, port=self.receiver.port,
                 destinations=[d.name for d in self.settings.destinations],
                 models={k.value: m.name for k, m in self.models.models.items()}, models_missing=missing)

    def request_stop(self) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            self._write_status()

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop receiving (in-flight C-STOREs finish), stop the workers, close the index."""
        log.info("node_stopping")
        # one deadline for every worker, inside systemd's TimeoutStopSec=60 with the default grace:
        # the job worker finishes its current series meanwhile (the next one is not started), or
        # is abandoned and cli exits without tearing down a native thread mid-call
        deadline = time.monotonic() + grace_seconds + 20.0
        self._stop.set()
        self.receiver.stop(grace_seconds)
        if self._web is not None:
            self._web.stop()
        self._job_wake.set()
        if self._watcher is not None:
            self._watcher.stop()
        workers = [w for w, _ in self._outbox.values()]
        for _w, stop in self._outbox.values():
            stop.set()
        for t in [*self._threads, *workers]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in (*self._threads, *workers) if t.is_alive()]
        self.unfinished = busy
        try:
            left = self.spool.pending_outbox()
        except (DmgNodeError, OSError):
            left = {}
        if left:
            log.warning("outbox_left", pending=left, note="sent at the next start")
        if not busy:  # a worker still inside the index must not find it closed
            self.spool.close()
        log.info("node_stopped", unfinished_workers=busy)

    # -- workers -------------------------------------------------------------------------------

    def _assemble_loop(self) -> None:
        while not self._stop.is_set():
            a = self.settings.assembly
            try:
                if a.completion is Completion.SERIES:
                    self._enqueue_ready_series()
                # not_before: the quiet period counts from our start too; while the node was down
                # nothing could arrive, so silence then says nothing about completeness (issue 19 item 10)
                for d in due_studies(self.spool.studies(), time.time(), a.quiet_seconds, a.late_policy,
                                     not_before=self.accepting_since):
                    job_id = self.spool.enqueue(d.study_instance_uid, d.covered_until, time.time())
                    log.info("study_complete", study_uid=d.study_instance_uid, job_id=job_id, reprocess=d.late,
                             quiet_seconds=a.quiet_seconds)
                    self._job_wake.set()
            except (DmgNodeError, OSError) as exc:
                # e.g. the index cannot be written (disk full): keep the thread, try again next poll
                log.error("worker_error", worker="assembler", error=f"{type(exc).__name__}: {exc}")
            self._stop.wait(a.poll_seconds)

    def _enqueue_ready_series(self) -> None:
        """Series-level completion: a job per study for its series that are quiet and not yet covered."""
        a = self.settings.assembly
        for d in due_series(self.spool.series_rows(), self.spool.studies(), time.time(), a.series_quiet_seconds,
                            a.late_policy, not_before=self.accepting_since):
            job_id = self.spool.enqueue(d.study_instance_uid, d.covered_until, time.time(), series=d.series)
            log.info("series_complete", study_uid=d.study_instance_uid, job_id=job_id, reprocess=d.late,
                     series_uids=[uid for uid, _ in d.series], series_quiet_seconds=a.series_quiet_seconds)
            self._job_wake.set()

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
            pause = self._inference_retry_at - time.time()
            if pause > 0:
                self._stop.wait(pause)

    def _run_job(self, job: Job) -> None:
        structlog.contextvars.bind_contextvars(job_id=job.id, study_uid=job.study_instance_uid)
        t0 = time.perf_counter()
        log.info("job_started", attempt=job.attempts)
        try:
            try:
                outputs = self.pipeline.run(job, stopping=self._stop.is_set)
            except JobInterrupted as exc:
                self._requeue(job, str(exc))
            except InferenceUnavailable as exc:
                self._defer_job(job, exc)
            except Exception as exc:  # noqa: BLE001 - whatever one study does, the worker must live
                # RuntimeError covers torch failures (including CUDA OOM, a RuntimeError subclass);
                # anything else (a library choking on a malformed series) fails this job, not the node.
                failed = job.attempts >= self.settings.assembly.max_attempts
                error = f"{type(exc).__name__}: {exc}"
                self._finish(job, JobState.FAILED if failed else JobState.PENDING, error)
                log.error("job_failed", error=error, attempt=job.attempts, final=failed)
            else:
                if self._inference_failures:
                    log.info("inference_available", after_failures=self._inference_failures)
                self._inference_failures, self._inference_retry_at, self._inference_error = 0, 0.0, None
                self._finish(job, JobState.DONE, None)
                ms = round((time.perf_counter() - t0) * 1000)
                if self.pipeline.skipped:  # a routed series produced nothing: say which and why
                    log.warning("job_done", rtstructs=len(outputs), duration_ms=ms, not_contoured=self.pipeline.skipped)
                else:
                    log.info("job_done", rtstructs=len(outputs), duration_ms=ms)
                for w, _stop in self._outbox.values():
                    w.wake.set()
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "study_uid")

    def _requeue(self, job: Job, reason: str) -> None:
        """Stopping: the job goes back to pending, its attempt not counted; the next start runs it."""
        try:
            self.spool.requeue_job(job.id, time.time(), reason)
        except (DmgNodeError, OSError) as exc:  # left "running": reconcile requeues it at the next start
            log.error("worker_error", worker="jobs", error=f"{type(exc).__name__}: {exc}")
        log.info("job_requeued", reason=reason)

    def _defer_job(self, job: Job, exc: InferenceUnavailable) -> None:
        """Inference did not answer: the job waits in the spool (no attempt counted) and the worker
        pauses, doubling the pause each time up to ``inference.retry_max_seconds``."""
        inf = self.settings.inference
        self._inference_failures += 1
        delay = min(inf.retry_initial_seconds * 2 ** (self._inference_failures - 1), inf.retry_max_seconds)
        self._inference_retry_at = time.time() + delay
        self._inference_error = str(exc)[:300]
        while True:
            try:
                self.spool.requeue_job(job.id, time.time(), f"waiting for inference: {self._inference_error}")
                break
            except (DmgNodeError, OSError) as err:
                log.error("worker_error", worker="jobs", error=f"{type(err).__name__}: {err}")
                if self._stop.wait(self.settings.assembly.poll_seconds):
                    return
        log.warning("inference_unavailable", error=self._inference_error, retry_in_seconds=round(delay, 1),
                    consecutive_failures=self._inference_failures)

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
                self.models.reload()
                drop = self.settings.import_
                if drop.path is not None and ("import" in changed or now - last_import >= drop.poll_seconds):
                    dropfolder.scan(drop.path, self.spool, settle_seconds=drop.settle_seconds,
                                    keep_first=self.settings.storage.duplicate_policy is DuplicatePolicy.KEEP_FIRST)
                    last_import = now
                days = self.settings.storage.retention_days
                if days > 0 and now - last_retention >= RETENTION_EVERY_SECONDS:
                    self._apply_retention(now, days)
                    last_retention = now
            except (DmgNodeError, OSError) as exc:
                log.error("maintenance_failed", error=f"{type(exc).__name__}: {exc}")

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
        if not text.strip():
            # editors truncate before writing; all-defaults would drop the allow-list and destinations
            log.error("config_reload_refused", reason="the file is empty", kept="previous settings")
            return
        time.sleep(CONFIG_SETTLE_SECONDS)
        if self._read_config_text() != text:
            return  # still being written: the watcher reports the next change
        self._config_text = text
        try:
            new = config_mod.load(self.settings.source)
        except ConfigError as exc:
            log.error("config_reload_failed", error=str(exc), kept="previous settings")
            return
        widened = config_mod.widened_access(self.settings, new)
        if widened:
            log.warning("config_access_widened", changes=widened)
        removed = config_mod.removed_destinations(self.settings, new)
        if removed:
            log.warning("config_destinations_removed", destinations=removed)
        self.apply_settings(new)

    def apply_settings(self, new: Settings) -> None:
        """Apply what can change live; log what needs a restart (and keep its old value)."""
        old = self.settings
        restart = [f"node.{k}" for k, v in vars(new.node).items() if getattr(old.node, k) != v]
        restart += [f"storage.{k}" for k in ("root", "fsync") if getattr(old.storage, k) != getattr(new.storage, k)]
        new = dataclasses.replace(new, node=old.node, storage=dataclasses.replace(
            new.storage, root=old.storage.root, fsync=old.storage.fsync))
        restart += [f"web.{k}" for k, v in vars(new.web).items() if getattr(old.web, k) != v]  # bound at start
        new = dataclasses.replace(new, web=old.web)
        live = [f.name for f in dataclasses.fields(Settings) if getattr(old, f.name) != getattr(new, f.name)]
        self.settings = new
        self.receiver.apply(new)
        self.pipeline.configure(new)
        if old.logging != new.logging:
            logs.configure(new.logging.level, new.logging.format, new.logging.include_phi)
        if old.destinations != new.destinations or old.outbox != new.outbox:
            self._sync_outbox_workers(restart_all=old.outbox != new.outbox)
        self.models.configure(new)
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

    def _models_missing(self) -> list[str]:
        """Configured sequences with no usable model now."""
        return [label.value for label in ROUTED if label not in self.models.models]

    def _write_status(self) -> None:
        """Publish live state for ``dmg-node status`` (a separate process reads it)."""
        models = self.models.models
        state = {
            "pid": os.getpid(), "version": __version__, "started_at": self.started, "updated_at": time.time(),
            "ae_title": self.settings.node.ae_title, "port": self.receiver.port,
            "associations": self.receiver.active_associations(),
            "receive_workers": self.receiver.pids() if isinstance(self.receiver, ReceiverPool) else [],
            "models": {k.value: {"name": m.name, "version": m.version, "device": str(m.device), "members": m.describe()}
                       for k, m in models.items()},
            "models_missing": self._models_missing(),
            "inference": {"backend": str(self.settings.inference.backend), "available": self._inference_error is None,
                          "consecutive_failures": self._inference_failures, "error": self._inference_error,
                          "retry_at": self._inference_retry_at or None},
        }
        try:
            atomic_write(self.spool.root / STATUS_FILE, json.dumps(state).encode(), sync=False)
        except OSError as exc:
            log.warning("status_write_failed", error=str(exc))
