"""Hostile input over 127.0.0.1 (issue 19, items 1-8): the node bounds memory, threads and time.

Raw sockets (tests/rawdicom.py) send what no well-behaved SCU would. Each test is bounded in
time (socket timeouts, pytest-timeout) and stops everything it starts. The in-process tests run
on both receive paths: the pynetdicom 3.0 fast path and stock pynetdicom (``node.fast_path``).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from structlog.testing import capture_logs

from dmg_node.net import compat
from dmg_node.net.scp import Receiver
from dmg_node.net.status import StoreStatus
from tests import rawdicom
from tests.support import LOCALHOST, mr_dataset, running_node, running_receiver, stop_process

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]

#: Loopback addresses standing for four attacking peers (Linux routes all of 127/8 to lo).
ATTACKERS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


@pytest.fixture(params=[True, False], ids=["fast_path", "stock"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _encoded(ds: Any, implicit: bool = False) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return bytes(buf.getvalue())


def _instance(index: int = 0) -> tuple[str, str, bytes]:
    ds = mr_dataset("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1", index)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), _encoded(ds)


def _store(a: rawdicom.RawAssociation, message_id: int = 1, index: int = 0) -> int | None:
    sop_class, sop_uid, data = _instance(index)
    a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(message_id, sop_class, sop_uid)))
    a.send(rawdicom.p_data(1, 2, data))
    return a.response_status()


def echo_seconds(port: int, source: str = LOCALHOST, calling: str = "ECHOER") -> float:
    """Seconds for a pynetdicom C-ECHO from *source*, association included (inf if refused)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    t0 = time.monotonic()
    assoc = ae.associate(LOCALHOST, port, ae_title="DMG_NODE", bind_address=(source, 0))
    if not assoc.is_established:
        return float("inf")
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return time.monotonic() - t0 if ok else float("inf")


def _closed_within(a: rawdicom.RawAssociation, seconds: float) -> bool:
    """Whether the node closed (or aborted) the connection within *seconds*."""
    a.sock.settimeout(seconds)
    try:
        while True:
            chunk = a.sock.recv(65536)
            if not chunk:
                return True
            if chunk[:1] == b"\x07":  # A-ABORT, then the close
                continue
    except TimeoutError:
        return False
    except OSError:
        return True


def _rss_mb() -> float:
    return _status_mb("self", "VmRSS")


def _status_mb(pid: str, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


# -- item 1: a PDU header is not trusted for allocation ------------------------------------------


@pytest.mark.parametrize("pdu_type", [1, 4])
def test_a_4_gib_pdu_header_is_refused_without_allocating(tmp_path: Path, fast_path: bool, pdu_type: int) -> None:
    """Six bytes declaring 4 GiB, before any association: the node closes at once, allocates nothing
    (pynetdicom 3.0 with recv_exactly zeroed 4 GiB) and logs pdu_refused."""
    with running_receiver(tmp_path / "spool", node={"fast_path": fast_path}) as rx, capture_logs() as logs:
        rss0 = _rss_mb()
        with rawdicom.RawAssociation(rx.port) as a:
            a.send(struct.pack(">BBI", pdu_type, 0, 0xFFFFFFFF))
            assert _closed_within(a, 2.0)
        assert _rss_mb() - rss0 < 100
        assert echo_seconds(rx.port) < 1.0
    refused = [e for e in logs if e["event"] == "pdu_refused"]
    assert refused and refused[0]["declared_bytes"] == 0xFFFFFFFF


def test_an_oversized_associate_rq_is_refused(tmp_path: Path, fast_path: bool) -> None:
    """An A-ASSOCIATE-RQ declaring more than 1 MiB is answered with A-ABORT and a close, unread."""
    with running_receiver(tmp_path / "spool", node={"fast_path": fast_path}) as rx, capture_logs() as logs:
        with rawdicom.RawAssociation(rx.port) as a:
            a.send(struct.pack(">BBI", 1, 0, (1 << 20) + 1) + b"\x00" * 1000)
            assert a.read_pdu()[0] == 7  # A-ABORT
            assert _closed_within(a, 2.0)
    assert any(e["event"] == "pdu_refused" and e["pdu_type"] == "0x01" for e in logs)


def test_a_p_data_over_the_negotiated_maximum_aborts(tmp_path: Path, fast_path: bool) -> None:
    """With node.maximum_pdu_size = 65536, a P-DATA-TF declaring more is aborted; a legal one is served."""
    node = {"fast_path": fast_path, "maximum_pdu_size": 65536}
    with running_receiver(tmp_path / "spool", node=node) as rx, capture_logs() as logs:
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate() == 2
            assert _store(a) == StoreStatus.SUCCESS
            a.send(struct.pack(">BBI", 4, 0, 65537))
            assert a.read_pdu()[0] == 7
            assert _closed_within(a, 2.0)
    assert any(e["event"] == "pdu_refused" and e["limit_bytes"] == 65536 for e in logs)


# -- item 2: a half-received PDU does not hold a slot ---------------------------------------------


@pytest.mark.parametrize("how", ["stall", "trickle"])
def test_partial_pdus_do_not_hold_association_slots(tmp_path: Path, fast_path: bool, how: str) -> None:
    """maximum_associations = 4: four peers that send a P-DATA header and 10 bytes, then stall (or
    trickle a byte a second), are dropped at node.pdu_timeout; another caller is served meanwhile
    or right after."""
    node = {"fast_path": fast_path, "maximum_associations": 4, "network_timeout": 10, "pdu_timeout": 1.5}
    with running_receiver(tmp_path / "spool", node=node) as rx:
        peers = [rawdicom.RawAssociation(rx.port, source=src) for src in ATTACKERS]
        stop = threading.Event()
        try:
            for a in peers:
                assert a.associate() == 2
                a.send(struct.pack(">BBI", 4, 0, 1000) + b"\x00" * 10)
            if how == "trickle":
                def trickle() -> None:
                    while not stop.wait(1.0):
                        for a in peers:
                            try:
                                a.send(b"\x00")
                            except OSError:
                                pass
                threading.Thread(target=trickle, daemon=True).start()
            t0 = time.monotonic()
            assert all(_closed_within(a, 4.0) for a in peers)
            assert time.monotonic() - t0 < 4.0
            assert echo_seconds(rx.port) < 1.0
        finally:
            stop.set()
            for a in peers:
                a.close()


# -- item 3: half-open connections are capped ------------------------------------------------------


def test_half_open_connections_are_capped_in_total_and_per_peer(tmp_path: Path, fast_path: bool) -> None:
    """200 connections sending half an A-ASSOCIATE-RQ from one address: only max_pending_per_peer are
    kept (each costing two threads), the rest closed at accept; all are gone after pdu_timeout;
    another caller's C-ECHO is served under 1 s throughout."""
    node = {"fast_path": fast_path, "pdu_timeout": 2.0, "max_pending_connections": 16, "max_pending_per_peer": 4}
    half = rawdicom.associate_rq()[:40]
    with running_receiver(tmp_path / "spool", node=node) as rx, capture_logs() as logs:
        threads0 = threading.active_count()
        conns = []
        try:
            for _ in range(200):
                c = rawdicom.RawAssociation(rx.port, source=ATTACKERS[0])
                try:
                    c.send(half)
                except OSError:
                    pass
                conns.append(c)
            time.sleep(0.3)
            assert rx.gate.pending() <= 4
            assert threading.active_count() - threads0 <= 2 * 4 + 4
            assert echo_seconds(rx.port) < 1.0
            alive = [c for c in conns if not _closed_within(c, 0.01)]
            assert len(alive) <= 4
            assert all(_closed_within(c, 4.0) for c in alive)  # pdu_timeout from the first byte
        finally:
            for c in conns:
                c.close()
    refused = [e for e in logs if e["event"] == "connection_refused"]
    # one line per address and second (with a count), not one per refused connection
    assert refused and "max_pending_per_peer" in refused[0]["reason"] and len(refused) <= 10


def test_the_total_cap_counts_every_peer(tmp_path: Path) -> None:
    """With max_pending_connections = 6 and 4 per peer, a second address gets only the 2 left."""
    node = {"pdu_timeout": 5.0, "max_pending_connections": 6, "max_pending_per_peer": 4}
    with running_receiver(tmp_path / "spool", node=node) as rx:
        conns = [rawdicom.RawAssociation(rx.port, source=src) for src in ATTACKERS[:2] for _ in range(4)]
        try:
            for c in conns:
                c.send(b"\x01")
            time.sleep(0.3)
            alive = [c for c in conns if not _closed_within(c, 0.05)]
            assert len(alive) == 6 and rx.gate.pending() == 6
        finally:
            for c in conns:
                c.close()


# -- item 4: no cap on one message -------------------------------------------------------------------


def test_an_instance_over_max_instance_mb_gets_a_failure_and_the_association_goes_on(tmp_path: Path,
                                                                                   fast_path: bool) -> None:
    """node.max_instance_mb = 1: a 3 MB data set in 64 KiB fragments is answered 0xA700 and not
    stored; the next C-STORE on the same association succeeds."""
    node = {"fast_path": fast_path, "max_instance_mb": 1}
    with running_receiver(tmp_path / "spool", node=node) as rx, capture_logs() as logs:
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate() == 2
            sop_class, sop_uid, _ = _instance(1)
            a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, sop_class, sop_uid)))
            chunk = b"\x00" * 65536
            for _ in range(48):
                a.send(rawdicom.p_data(1, 0, chunk))
            a.send(rawdicom.p_data(1, 2, chunk))
            assert a.response_status() == StoreStatus.OUT_OF_RESOURCES
            assert _store(a, message_id=2, index=2) == StoreStatus.SUCCESS
    assert any(e["event"] == "store_rejected" and e["status"] == "0xA700" for e in logs)
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1


def test_fragments_that_never_end_are_not_held(tmp_path: Path, fast_path: bool) -> None:
    """300 MB of data fragments without the last-fragment bit: memory stays near max_instance_mb (8)."""
    node = {"fast_path": fast_path, "max_instance_mb": 8}
    with running_receiver(tmp_path / "spool", node=node) as rx:
        rss0 = _rss_mb()
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate() == 2
            sop_class, sop_uid, _ = _instance(3)
            a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, sop_class, sop_uid)))
            chunk = rawdicom.p_data(1, 0, b"\x00" * 16000)
            for _ in range(300_000_000 // 16000):
                a.send(chunk)
            grown = _rss_mb() - rss0
        assert echo_seconds(rx.port) < 1.0
    assert grown < 100, f"+{grown:.0f} MB"


def _deflated_bomb(inflated_mb: int) -> tuple[str, str, bytes]:
    """A valid header followed by pixel data of zeros, raw-deflated (PS3.5 A.5)."""
    ds = mr_dataset("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1", 9)
    ds.PixelData = b""
    body = _encoded(ds)
    pixel_tag = struct.pack("<HH2s2sI", 0x7FE0, 0x0010, b"OW", b"\x00\x00", inflated_mb << 20)
    body = body[:body.rindex(struct.pack("<HH", 0x7FE0, 0x0010))] + pixel_tag
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [packer.compress(body)]
    zeros = bytes(1 << 20)
    chunks += [packer.compress(zeros) for _ in range(inflated_mb)]
    chunks.append(packer.flush())
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), b"".join(chunks)


def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path, fast_path: bool) -> None:
    """A Deflated data set of ~250 KB inflating to 256 MB, with node.max_inflated_mb = 16: 0xA700,
    not stored, and the node never holds the inflated bytes."""
    sop_class, sop_uid, bomb = _deflated_bomb(256)
    assert len(bomb) < 1 << 20
    node = {"fast_path": fast_path, "max_inflated_mb": 16}
    with running_receiver(tmp_path / "spool", node=node) as rx, capture_logs() as logs:
        rss0 = _rss_mb()
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate(transfer=str(DeflatedExplicitVRLittleEndian)) == 2
            a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, sop_class, sop_uid)))
            for i in range(0, len(bomb), 16000):
                a.send(rawdicom.p_data(1, 2 if i + 16000 >= len(bomb) else 0, bomb[i:i + 16000]))
            assert a.response_status() == StoreStatus.OUT_OF_RESOURCES
        grown = _rss_mb() - rss0
    assert grown < 64, f"+{grown:.0f} MB"
    assert any(e["event"] == "store_rejected" and "max_inflated_mb" in e["reason"] for e in logs)
    assert not list((tmp_path / "spool").rglob("*.dcm"))


# -- item 5: every C-STORE gets a status at once -------------------------------------------------------


@pytest.mark.parametrize("bad_uid", ["\\", "1.2.3\\4.5", "1.2.3\\"])
def test_a_backslash_in_the_sop_instance_uid_gets_a_status_at_once(tmp_path: Path, fast_path: bool,
                                                                   bad_uid: str) -> None:
    """pydicom reads a backslash as two values: the request is answered 0xC000 at once (it got no
    response and waited for the DIMSE timeout), and the association serves the next request."""
    with running_receiver(tmp_path / "spool", node={"fast_path": fast_path}) as rx:
        with rawdicom.RawAssociation(rx.port, timeout=5) as a:
            assert a.associate() == 2
            sop_class, _, data = _instance(4)
            t0 = time.monotonic()
            a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, sop_class, bad_uid)))
            a.send(rawdicom.p_data(1, 2, data))
            assert a.response_status() == StoreStatus.CANNOT_UNDERSTAND
            assert time.monotonic() - t0 < 1.0
            assert _store(a, message_id=2, index=5) == StoreStatus.SUCCESS


# -- item 6: control characters in AE titles ----------------------------------------------------------


@pytest.mark.parametrize("allowed", [["SCANNER"], []], ids=["allow-list", "anyone"])
@pytest.mark.parametrize("calling, answer", [(b"\tSCANNER", 3), (b"SCANNER\n", 3), (b"SCAN\x1bNER", 7)])
def test_control_characters_in_the_calling_ae_title_are_rejected(tmp_path: Path, fast_path: bool, allowed: list[str],
                                                                 calling: bytes, answer: int) -> None:
    """A leading tab passed an allow-list naming SCANNER (pynetdicom strips it): now A-ASSOCIATE-RJ.
    One inside the title already failed pynetdicom's decoding (A-ABORT); both are refused."""
    with running_receiver(tmp_path / "spool", node={"fast_path": fast_path},
                          access={"allowed_calling_aets": allowed}) as rx, capture_logs() as logs:
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate(calling=calling) == answer
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate(calling=b"SCANNER") == 2
    if answer == 3:
        assert any(e["event"] == "association_rejected" and "control characters" in e["reason"] for e in logs)


# -- item 7: hot reload never applies an empty or half-written file ---------------------------------------


@pytest.mark.slow
def test_an_empty_or_half_written_config_is_never_applied(tmp_path: Path) -> None:
    """An empty node.toml (an editor truncating it) is refused and the allow-list stays; a file
    written in two halves is applied only whole; emptying the allow-list on purpose is applied
    with a warning that names it, and dropping a destination is named too."""
    dest = {"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": 9}
    with running_node(tmp_path / "node", access={"allowed_calling_aets": ["PACS"]}, destinations=[dest]) as n:
        full = n.config_path.read_text()
        n.config_path.write_text("")
        refused = n.wait_event("config_reload_refused", timeout=40)
        assert refused["reason"] == "the file is empty"
        assert echo_seconds(n.port, calling="SCANNER") == float("inf")
        assert echo_seconds(n.port, calling="PACS") < 5

        # written in two parts 0.2 s apart: the first part alone (no [access], no destination) parses
        cut = full.index("[access]")
        n.config_path.write_text(full[:cut])
        time.sleep(0.2)
        n.config_path.write_text(full)
        time.sleep(3.0)
        assert echo_seconds(n.port, calling="SCANNER") == float("inf")

        n.config_path.write_text(full.replace('allowed_calling_aets = ["PACS"]', "allowed_calling_aets = []"))
        widened = n.wait_event("config_access_widened", timeout=40)
        assert any("allowed_calling_aets emptied" in c for c in widened["changes"])
        assert echo_seconds(n.port, calling="SCANNER") < 5

        n.config_path.write_text(full[:full.index("[[destinations]]")])
        removed = n.wait_event("config_destinations_removed", timeout=40)
        assert removed["destinations"] == ["tps"]
        events = n.events()
    # the half-written file was never applied: no widening before the deliberate one
    first_widening = next(i for i, e in enumerate(events) if e.get("event") == "config_access_widened")
    assert not any(e.get("event") == "config_destinations_removed" for e in events[:first_widening])


# -- item 8: the fast path only on the pynetdicom it was tested with ---------------------------------------


def test_an_untested_pynetdicom_gets_the_stock_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom 3.1 (say): no patches of its internals, a warning naming the version; still receives."""
    monkeypatch.setattr(compat, "pynetdicom_version", lambda: "3.1.0")
    with capture_logs() as logs, running_receiver(tmp_path / "spool") as rx:
        assert not rx.guarded and not rx.fast_path
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate() == 2
            [server_side] = [x for x in rx.ae.active_associations if x.is_acceptor]
            assert server_side.dul._read_pdu_data.__qualname__ == "DULServiceProvider._read_pdu_data"
            assert _store(a) == StoreStatus.SUCCESS
    assert any(e["event"] == "pynetdicom_untested" and e["version"] == "3.1.0" for e in logs)


def test_the_installed_pynetdicom_is_a_tested_one(tmp_path: Path, fast_path: bool) -> None:
    """On the pinned 3.0.x the guards always apply and the fast path follows node.fast_path."""
    assert compat.patches_supported(compat.pynetdicom_version())
    assert not compat.patches_supported("3.1.0") and not compat.patches_supported("4.0.0")
    with running_receiver(tmp_path / "spool", node={"fast_path": fast_path}) as rx:
        assert rx.guarded and rx.fast_path is fast_path
        assert isinstance(rx, Receiver)


def test_each_connection_gets_its_own_copy_of_the_contexts_cheaply() -> None:
    """CheapCopyContexts gives what deepcopy gave (pynetdicom copies them per connection), in ~1 ms."""
    import copy

    from dmg_node import config
    from dmg_node.net.gate import CheapCopyContexts

    contexts = Receiver._build_ae(config.from_dict({})).supported_contexts
    cheap = CheapCopyContexts(contexts)
    t0 = time.perf_counter()
    ours = copy.deepcopy(cheap)
    took = time.perf_counter() - t0
    assert [vars(a) for a in ours] == [vars(b) for b in copy.deepcopy(contexts)]
    ours[0].context_id = 99
    ours[0]._transfer_syntax.append("1.2.3")
    assert contexts[0].context_id is None and "1.2.3" not in contexts[0].transfer_syntax
    assert took < 0.05


# -- items 1-4 at once, against `dmg-node serve` ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "stock"])
def test_four_hostile_peers_cost_under_500_mb_and_echo_stays_under_1_s(tmp_path: Path, fast: bool) -> None:
    """Attacks 1-4 from four peer addresses at once for 20 s against `dmg-node serve`
    (tests/hostile_peers.py, a separate process): a C-ECHO from a fifth address (association
    included) answers in under 1 s every time, and the node's RSS grows by less than 500 MB."""
    node = {"fast_path": fast, "pdu_timeout": 2.0, "acse_timeout": 5.0, "max_instance_mb": 32}
    with running_node(tmp_path / "node", node=node) as n:
        pid = str(n.proc.pid)
        quiet = sorted(echo_seconds(n.port) for _ in range(5))
        rss0 = _status_mb(pid, "VmRSS")
        peers = subprocess.Popen([sys.executable, "-m", "tests.hostile_peers", str(n.port), "20", *ATTACKERS],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        echoes = []
        try:
            time.sleep(2.0)
            while peers.poll() is None:
                echoes.append(echo_seconds(n.port))
                time.sleep(0.5)
            report = peers.communicate(timeout=60)[0]
        finally:
            if peers.poll() is None:
                stop_process(peers)
        peak = _status_mb(pid, "VmHWM")
        events = {e.get("event") for e in n.events()}
    grown = peak - rss0
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"fast_path={fast}: quiet echo median {quiet[2]:.3f} s; under attack {len(echoes)} echoes, max "
          f"{max(echoes):.3f} s, median {sorted(echoes)[len(echoes) // 2]:.3f} s; RSS {rss0:.0f} -> peak {peak:.0f} MB "
          f"(+{grown:.0f}); load average {load}; {report}")
    assert peers.returncode == 0, report
    assert len(echoes) >= 10 and max(echoes) < 1.0, echoes
    assert grown < 500, f"+{grown:.0f} MB"
    assert {"pdu_refused", "pdu_incomplete", "connection_refused"} <= events
