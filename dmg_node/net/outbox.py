"""The outbox worker: sends each RTSTRUCT to one destination, retrying until it is accepted.

Each destination gets its own worker thread, so one that is down or slow never blocks the others.
An item leaves the outbox only when the destination answered Success (or a warning status,
PS3.4 B.2.3); an empty or missing response is a failure to retry, never a success (resending the
same SOP Instance UID is safe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from dmg_node.config import Destination, OutboxSettings
from dmg_node.errors import SpoolError
from dmg_node.net.scu import store_file
from dmg_node.records import OutboxItem, OutboxState
from dmg_node.storage.spool import Spool

log = structlog.get_logger(__name__)


def backoff(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the *attempts*-th failure: exponential, capped."""
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


class OutboxWorker(threading.Thread):
    """Sends due outbox items to one destination, retrying with exponential backoff."""

    def __init__(
        self, spool: Spool, dest: Destination, calling_aet: str, settings: OutboxSettings,
        stop: threading.Event, clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name=f"outbox-{dest.name}", daemon=True)
        self.spool, self.dest, self.calling_aet, self.settings = spool, dest, calling_aet, settings
        # Not "_stop": that would shadow threading.Thread._stop(), which join() and is_alive() call
        # once the thread has ended (TypeError: 'Event' object is not callable in Node.stop).
        self._halt, self._clock = stop, clock
        self.wake = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                items = self.spool.due_outbox(self._clock(), destination=self.dest.name)
                for item in items:
                    if self._halt.is_set():
                        return
                    self._send(item)
            except SpoolError as exc:
                # The index cannot record a result (e.g. SQLITE_FULL): the item stays pending and is
                # retried after a poll; ending the thread would strand this destination until restart.
                log.error("outbox_index_failed", destination=self.dest.name, error=str(exc))
                items = []
            if not items:
                self.wake.wait(self.settings.poll_seconds)
                self.wake.clear()

    def _send(self, item: OutboxItem) -> None:
        t0 = time.perf_counter()
        result = store_file(item.path, self.dest, self.calling_aet, self.settings.timeout_seconds)
        now = self._clock()
        fields = {"job_id": item.job_id, "study_uid": item.study_instance_uid, "sop_uid": item.sop_instance_uid,
                  "destination": self.dest.name, "status": result.status, "attempt": item.attempts + 1,
                  "duration_ms": round((time.perf_counter() - t0) * 1000, 1)}
        if result.ok:
            self.spool.outbox_result(item.id, OutboxState.SENT, result.status, None, now, now)
            log.info("rtstruct_sent", **fields)
            return
        if now - item.created_at >= self.settings.give_up_hours * 3600:
            self.spool.outbox_result(item.id, OutboxState.FAILED, result.status, result.error, now, now)
            log.error("rtstruct_send_gave_up", error=result.error, **fields)
            return
        delay = backoff(item.attempts + 1, self.settings.retry_initial_seconds, self.settings.retry_max_seconds)
        self.spool.outbox_result(item.id, OutboxState.PENDING, result.status, result.error, now, now + delay)
        log.warning("rtstruct_send_failed", error=result.error, retry_in_s=delay, **fields)
