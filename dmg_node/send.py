"""C-STORE / C-ECHO SCU and the outbox worker that retries until a destination accepts.

Each destination gets its own worker thread, so one that is down or slow never blocks the others.
An RTSTRUCT leaves the outbox only when the destination answered Success (or a warning status,
PS3.4 B.2.3); an empty or missing response is a failure to retry, never a success (resending the
same SOP Instance UID is safe).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dmg_node.config import Destination, OutboxSettings
from dmg_node.receive import tune_connection
from dmg_node.errors import SpoolError
from dmg_node.spool import OutboxState, Spool

log = structlog.get_logger(__name__)

_SUCCESS_OR_WARNING = {0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class SendResult:
    """Outcome of one DIMSE exchange: ``ok`` only on an explicit Success/Warning status."""

    ok: bool
    status: str
    error: str | None = None


def _scu(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def echo(dest: Destination, calling_aet: str, timeout: float = 10.0) -> SendResult:
    """C-ECHO *dest* (PS3.7 9.1.5) and report the outcome."""
    ae = _scu(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        return SendResult(False, "no-association", _assoc_failure(assoc))
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    return _result(rsp)


def store_file(path: Path, dest: Destination, calling_aet: str, timeout: float = 30.0) -> SendResult:
    """C-STORE one Part 10 file to *dest* (see :func:`store_files`)."""
    return store_files([path], dest, calling_aet, timeout)[0]


def store_files(paths: Sequence[Path], dest: Destination, calling_aet: str, timeout: float = 30.0) -> list[SendResult]:
    """C-STORE Part 10 files to *dest* in one association, uncompressed (PS3.4 B.2).

    Implicit VR Little Endian is proposed first (it encodes RTSTRUCT contours of any length), then
    Explicit VR Little Endian; pynetdicom would add Deflated, which some readers cannot decode.
    Returns one result per path, in order.
    """
    datasets: list[Any] = []
    results: list[SendResult | None] = []
    for path in paths:
        try:
            ds = dcmread(path)
            str(ds.SOPClassUID)  # needed to propose a context; a file without it is unsendable
            datasets.append(ds)
            results.append(None)
        except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
            # Any of these escaping would end the destination's OutboxWorker thread: every later
            # RTSTRUCT for it would wait forever behind one damaged file.
            datasets.append(None)
            results.append(SendResult(False, "unreadable", f"{path.name}: {exc}"))
    classes = sorted({str(ds.SOPClassUID) for ds in datasets if ds is not None})
    if not classes:
        return [r or SendResult(False, "unreadable") for r in results]
    ae = _scu(calling_aet, timeout)
    for uid in classes:
        ae.add_requested_context(uid, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        failure = SendResult(False, "no-association", _assoc_failure(assoc))
        return [r or failure for r in results]
    try:
        for i, ds in enumerate(datasets):
            if ds is None:
                continue
            if not assoc.is_established:
                results[i] = SendResult(False, "no-association", "association lost during the send")
                continue
            try:
                results[i] = _result(assoc.send_c_store(ds))
            except ValueError as exc:
                # pynetdicom: the peer accepted no presentation context for this SOP class (or
                # the dataset cannot be encoded in the accepted one). A failure, not a crash.
                results[i] = SendResult(False, "not-sent", str(exc))
    finally:
        if assoc.is_established:
            assoc.release()
    return [r or SendResult(False, "not-sent") for r in results]


def _assoc_failure(assoc: Any) -> str:
    if assoc.is_rejected:
        return "association rejected"
    if assoc.is_aborted:
        return "association aborted"
    return "no association (peer unreachable or timed out)"


def _result(rsp: Any) -> SendResult:
    status = getattr(rsp, "Status", None)
    if status is None:
        return SendResult(False, "no-response", "empty or missing response (timeout or abort)")
    code = int(status)
    text = f"0x{code:04X}"
    if code in _SUCCESS_OR_WARNING:
        return SendResult(True, text)
    return SendResult(False, text, str(getattr(rsp, "ErrorComment", "") or "failure status"))


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

    def _send(self, item: Any) -> None:
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
