"""C-STORE / C-ECHO SCU: one association to one destination, and its outcome.

``ok`` only on an explicit Success or Warning status (PS3.4 B.2.3); an empty or missing response
is a failure, never a success. The retrying lives in :mod:`dmg_node.net.outbox`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dmg_node.config import Destination
from dmg_node.net.tuning import tune_connection

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
        return SendResult(False, "no-association", _assoc_failure(assoc, dest, timeout))
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
        failure = SendResult(False, "no-association", _assoc_failure(assoc, dest, timeout))
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


def _assoc_failure(assoc: Any, dest: Destination, timeout: float) -> str:
    """Why no association: rejected, or (asked of TCP, as pynetdicom reports it as an abort) refused."""
    if assoc.is_rejected:
        return "association rejected"
    tcp = _tcp_failure(dest.host, dest.port, min(timeout, 5.0))
    if tcp is not None:
        return tcp
    if assoc.is_aborted:
        return "association aborted"
    return "no association (peer unreachable or timed out)"


def _tcp_failure(host: str, port: int, timeout: float) -> str | None:
    """Why a plain TCP connect to *host*:*port* fails now ("connection refused", ...); None if it connects.

    pynetdicom ends a refused connect as an aborted association; an admin needs to know
    that nothing listens there (wrong port, peer down), not that DICOM went wrong.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return f"connection refused: nothing listens on {host}:{port}"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s (TCP connect timed out)"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def _result(rsp: Any) -> SendResult:
    status = getattr(rsp, "Status", None)
    if status is None:
        return SendResult(False, "no-response", "empty or missing response (timeout or abort)")
    code = int(status)
    text = f"0x{code:04X}"
    if code in _SUCCESS_OR_WARNING:
        return SendResult(True, text)
    return SendResult(False, text, str(getattr(rsp, "ErrorComment", "") or "failure status"))


