"""The Storage SCP: a pynetdicom AE with C-ECHO and C-STORE handlers. No business logic here.

The C-STORE handler checks the identifiers, writes the bytes as received into the spool (durably)
and only then returns Success; every other outcome is a named failure status (PS3.4 B.2.3).
Before any handler runs, unauthenticated input is bounded: connections not yet associated
(:mod:`dmg_node.net.gate`), each PDU's size and time (:mod:`dmg_node.net.pdu_reader`), each
message's size and UIDs (:mod:`dmg_node.net.dimse_guard`); docs/reliability.md has the figures.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dmg_node.config import DuplicatePolicy, Settings
from dmg_node.errors import InstanceTooLarge, ReceiveError, SpoolError
from dmg_node.net import compat, dimse_guard, pdu_reader, reactor, store_rsp, streamed
from dmg_node.net.admission import AdmittingAE
from dmg_node.net.gate import ConnectionGate, GatedAE, GatedServer
from dmg_node.net.part10 import file_header, header_values
from dmg_node.net.status import EchoStatus, StoreStatus
from dmg_node.net.syntaxes import TRANSFER_SYNTAXES
from dmg_node.net.tls import tls_context
from dmg_node.net.tuning import tune_connection
from dmg_node.records import instance_record
from dmg_node.storage.spool import Spool
from dmg_node import metrics

if TYPE_CHECKING:
    from dmg_node.net.worker import WorkerLink

log = structlog.get_logger(__name__)


_MIB = 1024 * 1024


@dataclass
class _AssocStats:
    calling_aet: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0


class Receiver:
    """Owns the AE and its server thread; :meth:`apply` updates the live-changeable settings.

    With *link* (a receive worker process, :mod:`dmg_node.net.worker`) it does not listen: the
    supervisor accepts and hands each connection over (:meth:`serve_connection`), and the pending
    connection and association counts are the supervisor's (global over all workers).
    """

    def __init__(self, settings: Settings, spool: Spool, link: WorkerLink | None = None) -> None:
        self.settings = settings
        self.link = link
        self.spool = spool
        self.pynetdicom_version = compat.pynetdicom_version()
        #: the input guards and the fast path patch pynetdicom internals: only where tested
        self.guarded = compat.patches_supported(self.pynetdicom_version)
        self.fast_path = self.guarded and settings.node.fast_path
        node = settings.node
        self.pdu_limits = pdu_reader.limits_for(node.pdu_timeout, node.maximum_pdu_size, node.max_instance_mb * _MIB)
        self.gate: ConnectionGate | WorkerLink
        if link is None:
            self.gate = ConnectionGate(node.max_pending_connections, node.max_pending_per_peer)
            # fair admission is no speed-up: it applies wherever the guards do (half-open connections
            # would otherwise count against maximum_associations in pynetdicom's own check)
            self.ae = self._build_ae(settings, AdmittingAE if self.guarded else GatedAE)
            self.ae.gate = self.gate
        else:
            self.gate = link
            self.ae = self._build_ae(settings, link.ae_class())
        self._server: Any = None
        self._detached = False
        self._stats: dict[int, _AssocStats] = {}
        self._stats_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in background threads (one per association)."""
        node = self.settings.node
        try:
            self._server = self.ae.start_server((node.host, node.port), block=False, evt_handlers=self._handlers(),
                                                ssl_context=tls_context(self.settings))
        except OSError as exc:
            raise ReceiveError(f"cannot listen on {node.host}:{node.port} ([node] in {self.settings.source}): "
                               f"{exc.strerror or exc}") from exc
        if not self.guarded:
            log.warning("pynetdicom_untested", version=self.pynetdicom_version, tested=list(compat.TESTED_PREFIXES),
                        fast_path=False, input_guards=False,
                        action="stock pynetdicom; limits on PDU size and time, message size and UIDs are off")
        log.info("scp_started", ae_title=node.ae_title, host=node.host, port=self.port,
                 maximum_associations=node.maximum_associations, tls=self.settings.tls.enabled,
                 pynetdicom=self.pynetdicom_version, fast_path=self.fast_path, input_guards=self.guarded)

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]

    def attach(self) -> None:
        """Worker mode: an association server that never listens; connections come from
        :meth:`serve_connection`."""
        handlers = self._handlers()
        # pynetdicom's server binds in its constructor: an ephemeral loopback port, closed at once
        self._server = self.ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=GatedServer)
        self._server.gate = None
        self._server.socket.close()
        self._detached = True

    def serve_connection(self, sock: socket.socket | ssl.SSLSocket, address: tuple[str, int]) -> None:
        """Worker mode: serve one TCP connection accepted by the supervisor (TLS already set up)."""
        sock.setblocking(True)  # as socket.accept() leaves it
        self._server.finish_request(sock, address)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.settings.node.port

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server is not None else 0

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish for up to *grace_seconds*, then abort."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # TCPServer.shutdown stops the accept loop and server_close the listening socket; running
        # associations keep their own threads and finish their current C-STORE. A worker's server
        # never ran its accept loop (shutdown would wait for it forever).
        if not self._detached:
            server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        log.info("scp_stopped", aborted_associations=len(remaining))

    def apply(self, settings: Settings) -> None:
        """Apply settings that can change while running (allow-list, storage policy)."""
        self.settings = settings
        self.ae.require_calling_aet = list(settings.access.allowed_calling_aets)

    # -- AE ------------------------------------------------------------------------------------

    @staticmethod
    def _build_ae(settings: Settings, kind: type[GatedAE] = AdmittingAE) -> GatedAE:
        node = settings.node
        ae = kind(ae_title=node.ae_title)
        ae.maximum_associations = node.maximum_associations
        ae.maximum_pdu_size = node.maximum_pdu_size
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.require_called_aet = node.require_called_aet
        ae.require_calling_aet = list(settings.access.allowed_calling_aets)
        # Accept every storage class a scanner may send along with the MR (secondary captures,
        # reports, presentation states), so a study send never fails half-way; they are stored and
        # later classified as none.
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    # -- event handlers ------------------------------------------------------------------------

    @staticmethod
    def _peer(event: Event) -> str:
        req = event.assoc.requestor
        return f"{req.address}:{req.port}"

    @staticmethod
    def _called(event: Event) -> str:
        # The title the peer asked for: acceptor.ae_title is always ours, even when
        # require_called_aet is off and the peer called another title.
        primitive = event.assoc.requestor.primitive
        return str(primitive.called_ae_title) if primitive is not None else ""

    def _on_conn_open(self, event: Event) -> None:
        assoc = event.assoc
        tune_connection(event)
        self.gate.bind(getattr(assoc.dul.socket, "socket", None), assoc)
        if self.guarded:
            pdu_reader.install(assoc, self.pdu_limits, on_dropped=self.gate.release)
            node = self.settings.node
            dimse_guard.install(assoc, node.max_instance_mb * _MIB, node.spool_in_memory_mb * _MIB, self.spool.incoming)
        if self.fast_path:
            reactor.install(assoc)
            store_rsp.install(assoc)

    def _on_conn_close(self, event: Event) -> None:
        self.gate.release(event.assoc)
        dimse_guard.discard_partial(event.assoc)  # a data set cut off half-way leaves no file
        if self.link is not None:
            self.link.closed(event.assoc)

    def _on_requested(self, event: Event) -> None:
        """Refuse AE titles with control characters (PS3.5 6.2), which pynetdicom strips away."""
        assoc = event.assoc
        if not getattr(assoc, "dmg_bad_ae_title", False):
            return
        # A-ASSOCIATE-RJ rejected-permanent, service-user, calling AE title not recognized (PS3.8 9.3.4)
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        self.gate.release(assoc)
        log.warning("association_rejected", calling_aet=assoc.requestor.ae_title, called_aet=self._called(event),
                    peer=self._peer(event), reason="AE title contains control characters or a backslash")
        assoc.kill()  # as pynetdicom after its own rejections: the DUL sends the A-ASSOCIATE-RJ first

    def _on_accepted(self, event: Event) -> None:
        self.gate.release(event.assoc)
        calling = event.assoc.requestor.ae_title
        with self._stats_lock:
            self._stats[id(event.assoc)] = _AssocStats(calling_aet=calling, peer=self._peer(event))
        metrics.association("accepted")
        log.info("association_accepted", calling_aet=calling, called_aet=self._called(event), peer=self._peer(event))

    def _on_rejected(self, event: Event) -> None:
        assoc = event.assoc
        self.gate.release(assoc)
        if isinstance(self.ae, AdmittingAE):
            self.ae.release_slot(assoc)
        metrics.association("rejected")
        calling = assoc.requestor.ae_title
        called = self._called(event)
        allowed = [a.strip() for a in self.ae.require_calling_aet]
        if allowed and calling not in allowed:
            reason = "calling AE title not allowed"
        elif self.ae.require_called_aet and called != self.ae.ae_title.strip():
            reason = "called AE title is not ours"
        else:
            reason = "too many associations"
        log.warning("association_rejected", calling_aet=calling, called_aet=called, peer=self._peer(event),
                    reason=reason)

    def _on_closed(self, event: Event) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        duration = time.monotonic() - stats.started
        log.info(
            "association_released" if event.event.name == "EVT_RELEASED" else "association_aborted",
            calling_aet=stats.calling_aet, peer=stats.peer, stored=stats.stored, failed=stats.failed,
            duration_ms=round(duration * 1000, 1),
        )

    def _count(self, event: Event, ok: bool) -> None:
        with self._stats_lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                if ok:
                    stats.stored += 1
                else:
                    stats.failed += 1

    def _on_echo(self, event: Event) -> int:
        log.info("echo_received", calling_aet=event.assoc.requestor.ae_title, peer=self._peer(event))
        return EchoStatus.SUCCESS

    def _on_store(self, event: Event) -> int:
        status = self._store(event)
        self._count(event, status == StoreStatus.SUCCESS)
        if status != StoreStatus.SUCCESS:
            metrics.store_failed(status.name.lower())
        return status

    def _store(self, event: Event) -> StoreStatus:
        spilled = streamed.of_request(event.request)
        if spilled is None:
            return self._store_received(event, None)
        try:
            spilled.close()
            if spilled.error is not None:
                raise spilled.error
            with open(spilled.path, "rb") as fp:
                fp.seek(spilled.data_set_offset)
                return self._store_received(event, (spilled, fp))
        except OSError as exc:
            log.error("store_failed", status=f"0x{StoreStatus.OUT_OF_RESOURCES:04X}", error=str(exc)[:300],
                      calling_aet=event.assoc.requestor.ae_title, peer=self._peer(event))
            return StoreStatus.OUT_OF_RESOURCES
        finally:
            spilled.discard()  # nothing left once renamed into the spool

    def _store_received(self, event: Event, spilled: tuple[streamed.StreamedDataSet, BinaryIO] | None) -> StoreStatus:
        """Check and store one received data set: in memory, or the spilled file and its reader."""
        t0 = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        request = cast(C_STORE, event.request)
        # the data set exactly as received
        raw: bytes | BinaryIO = cast(BytesIO, request.DataSet).getvalue() if spilled is None else spilled[1]
        syntax = str(event.context.transfer_syntax)
        fields = {"calling_aet": calling, "peer": self._peer(event),
                  "sop_uid": str(request.AffectedSOPInstanceUID or "")}
        try:
            rec = instance_record(header_values(raw, syntax, self.settings.node.max_inflated_mb * _MIB),
                                  transfer_syntax_uid=syntax, calling_aet=calling, received_at=time.time())
        except InstanceTooLarge as exc:
            log.warning("store_rejected", status=f"0x{StoreStatus.OUT_OF_RESOURCES:04X}", reason=str(exc), **fields)
            return StoreStatus.OUT_OF_RESOURCES
        except SpoolError as exc:
            log.warning("store_rejected", status=f"0x{StoreStatus.MISSING_UID:04X}", reason=str(exc), **fields)
            return StoreStatus.MISSING_UID
        except Exception as exc:  # noqa: BLE001 - any decode failure of untrusted input is a failure status
            log.warning("store_rejected", status=f"0x{StoreStatus.CANNOT_UNDERSTAND:04X}",
                        reason=f"dataset cannot be decoded: {type(exc).__name__}: {exc}"[:300], **fields)
            return StoreStatus.CANNOT_UNDERSTAND
        fields.update(study_uid=rec.study_instance_uid, series_uid=rec.series_instance_uid,
                      sop_uid=rec.sop_instance_uid)
        if rec.sop_class_uid != request.AffectedSOPClassUID or rec.sop_instance_uid != request.AffectedSOPInstanceUID:
            log.warning("store_rejected", status=f"0x{StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS:04X}",
                        reason="SOP Class/Instance UID in the data set differ from the C-STORE request", **fields)
            return StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        try:
            header = file_header(rec.sop_class_uid, rec.sop_instance_uid, syntax)
        except UnicodeEncodeError as exc:
            log.warning("store_rejected", status=f"0x{StoreStatus.CANNOT_UNDERSTAND:04X}",
                        reason=f"a UID is not ASCII: {exc}"[:300], **fields)
            return StoreStatus.CANNOT_UNDERSTAND
        if spilled is not None and spilled[0].header != header:
            # the file's header came from the command set, whose UIDs were checked equal above
            log.warning("store_rejected", status=f"0x{StoreStatus.CANNOT_UNDERSTAND:04X}",
                        reason="File Meta header differs from the command set's", **fields)
            return StoreStatus.CANNOT_UNDERSTAND
        storage = self.settings.storage
        try:
            free = self.spool.free_bytes()
            if free < storage.min_free_mb * _MIB:
                log.warning("store_refused_low_disk", status=f"0x{StoreStatus.OUT_OF_RESOURCES:04X}",
                            free_mb=free // _MIB, min_free_mb=storage.min_free_mb, **fields)
                return StoreStatus.OUT_OF_RESOURCES
            # The bytes as received behind our File Meta header (event.encoded_dataset() builds the
            # same bytes through pydicom, at a fifth of this handler's time).
            keep_first = storage.duplicate_policy is DuplicatePolicy.KEEP_FIRST
            if spilled is None:
                data = header + cast(bytes, raw)
                size = len(data)
                outcome = self.spool.store(data, rec, keep_first=keep_first)
            else:
                size = spilled[0].size
                outcome = self.spool.store_file(spilled[0].path, size, rec, keep_first=keep_first)
        except (OSError, SpoolError) as exc:
            # SpoolError: the file was written but the index is full (SQLITE_FULL) - still a full disk.
            log.error("store_failed", status=f"0x{StoreStatus.OUT_OF_RESOURCES:04X}", error=str(exc), **fields)
            return StoreStatus.OUT_OF_RESOURCES
        if outcome.duplicate:
            log.info("instance_duplicate", policy=storage.duplicate_policy,
                     kept="first" if not outcome.stored else "later", **fields)
        if outcome.reopened:
            log.info("late_instance", late_policy=self.settings.assembly.late_policy, **fields)
        metrics.stored(size, time.perf_counter() - t0)
        log.info("instance_stored", status="0x0000", size=size, streamed=spilled is not None,
                 duration_ms=round((time.perf_counter() - t0) * 1000, 2), **fields)
        return StoreStatus.SUCCESS
