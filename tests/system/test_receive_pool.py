"""Receiving in several worker processes ([node] workers, dmg_node.net.pool) with real DCMTK peers.

Every test starts `dmg-node serve` on 127.0.0.1 with two receive workers, is bounded in time and
stops every process it starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dmg_node.storage.spool import INDEX_FILE
from tests import rawdicom
from tests.support import (
    DCMTK,
    LOCALHOST,
    NodeProcess,
    dcmtk_env,
    running_node,
    storescu,
    write_series,
)

pytestmark = pytest.mark.network


def _status(node: NodeProcess) -> dict[str, Any]:
    return dict(json.loads((node.workdir / "spool" / "node-status.json").read_text()))


def _worker_pids(node: NodeProcess, n: int = 2, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pids = _status(node).get("receive_workers") or []
        except (OSError, ValueError):
            pids = []
        if len(pids) == n:
            return [int(p) for p in pids]
        time.sleep(0.1)
    raise TimeoutError("node-status.json never listed the receive workers")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _storescu_async(port: int, folder: Path, aet: str) -> subprocess.Popen[str]:
    return subprocess.Popen([DCMTK["storescu"], "-aet", aet, "-aec", "DMG_NODE", "+sd", "+r", LOCALHOST,
                             str(port), str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dcmtk_env())


def _stored_sops(node: NodeProcess) -> set[str]:
    return {str(e["sop_uid"]) for e in node.events() if e.get("event") == "instance_stored"}


def _spool_sops(node: NodeProcess) -> set[str]:
    import sqlite3

    db = sqlite3.connect(f"file:{node.workdir / 'spool' / INDEX_FILE}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        db.close()


def test_parallel_senders_of_one_study_spread_over_workers_and_make_one_job(tmp_path: Path) -> None:
    """Four storescu associations at once, each with a series of the same study: every instance is
    stored, both workers served, and the study is still one job, run once."""
    study = "1.2.826.0.1.3680043.8.498.23"
    folders = []
    for i in range(4):
        folder = tmp_path / f"s{i}"
        write_series(folder, 12, study_uid=study, series_uid=f"{study}.{i}")
        folders.append(folder)
    with running_node(tmp_path / "n", node={"workers": 2}, assembly={"quiet_seconds": 1.0}) as node:
        pids = _worker_pids(node)
        status = subprocess.run([sys.executable, "-m", "dmg_node.cli", "status", "--config", str(node.config_path)],
                                capture_output=True, text=True, timeout=60)
        assert f"receiving in 2 worker processes (pids {pids[0]}, {pids[1]})" in status.stdout, status.stdout
        procs = [_storescu_async(node.port, f, f"SCANNER{i}") for i, f in enumerate(folders)]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        node.wait_event("study_complete", timeout=60, study_uid=study)
        node.wait_event("job_done", timeout=120)
        time.sleep(1.5)  # a second job would be enqueued within a poll or two
        events = node.events()
    stored = [e for e in events if e["event"] == "instance_stored"]
    assert len(stored) == 48 and len({e["sop_uid"] for e in stored}) == 48
    assert {e["receive_worker"] for e in stored} == {0, 1}
    assert sum(e["event"] == "study_complete" for e in events) == 1
    assert sum(e["event"] == "job_started" for e in events) == 1


def test_a_killed_worker_loses_no_acknowledged_instance_and_is_replaced(tmp_path: Path) -> None:
    """kill -9 of the worker serving one of two senders: every instance it answered Success for is
    in the spool, the other sender finishes, a new worker takes the dead one's place, and the node
    goes on receiving through both."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_series(a, 400, rows=128, cols=128)
    write_series(b, 60)
    with running_node(tmp_path / "n", node={"workers": 2}, assembly={"quiet_seconds": 3600}) as node:
        pids = _worker_pids(node)
        victim_proc = _storescu_async(node.port, a, "VICTIM")
        first = node.wait_event("instance_stored", timeout=60, calling_aet="VICTIM")
        other_proc = _storescu_async(node.port, b, "OTHER")
        victim = pids[int(first["receive_worker"])]
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        other_out, _ = other_proc.communicate(timeout=120)
        victim_proc.communicate(timeout=120)
        replaced = node.wait_event("receive_worker_replaced", timeout=60)
        exited = node.wait_event("receive_worker_exited", timeout=5)
        assert exited["pid"] == victim and exited["returncode"] == -signal.SIGKILL
        new_pids = _worker_pids(node)
        assert victim not in new_pids and replaced["pid"] in new_pids
        assert not _alive(victim)
        acknowledged = _stored_sops(node)
        assert acknowledged <= _spool_sops(node)  # nothing answered Success is missing
        assert other_proc.returncode == 0, other_out
        # both workers serve again: the victim's sender sends again, two associations at once
        again = [_storescu_async(node.port, a, "RESEND1"), _storescu_async(node.port, b, "RESEND2")]
        for p in again:
            out, _ = p.communicate(timeout=180)
            assert p.returncode == 0, out
        assert len(_spool_sops(node)) == 460
        workers_after = {e["receive_worker"] for e in node.events()
                         if e.get("event") == "association_accepted" and str(e.get("calling_aet")).startswith("RESEND")}
        assert workers_after == {0, 1}


def test_sigterm_stops_every_worker_and_the_node_exits_0(tmp_path: Path) -> None:
    """SIGTERM while a sender is mid-series: its association may finish within the grace period,
    everything it was answered Success for is stored, every worker process is gone, exit 0."""
    write_series(tmp_path / "in", 300, rows=128, cols=128)
    with running_node(tmp_path / "n", node={"workers": 2}, assembly={"quiet_seconds": 3600}) as node:
        pids = _worker_pids(node)
        sender = _storescu_async(node.port, tmp_path / "in", "SCANNER")
        node.wait_event("instance_stored", timeout=60)
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=60) == 0
        sender.communicate(timeout=60)
        events = node.events()
    assert any(e["event"] == "scp_stopped" and e.get("workers") == 2 and e.get("killed_workers") == 0
               for e in events)
    assert all(not _alive(p) for p in pids)
    assert _stored_sops(node) <= _spool_sops(node)


def test_association_limit_and_pending_cap_are_global_across_workers(tmp_path: Path) -> None:
    """maximum_associations = 2 over two workers: two held associations (one on each worker) make
    a third refused, and freeing one admits the next; max_pending_connections = 3 counts silent
    connections on every worker, refused at accept; C-ECHO works throughout."""
    with running_node(tmp_path / "n", node={"workers": 2, "maximum_associations": 2,
                                            "max_pending_connections": 3, "max_pending_per_peer": 3,
                                            "acse_timeout": 30}) as node:
        _worker_pids(node)
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = [ae.associate(LOCALHOST, node.port, ae_title="DMG_NODE") for _ in range(2)]
        try:
            assert all(a.is_established for a in held)
            third = ae.associate(LOCALHOST, node.port, ae_title="DMG_NODE")
            assert third.is_rejected
            held[0].release()
            deadline = time.monotonic() + 10
            fourth = ae.associate(LOCALHOST, node.port, ae_title="DMG_NODE")
            while not fourth.is_established and time.monotonic() < deadline:
                time.sleep(0.2)  # the release reaches the supervisor asynchronously
                fourth = ae.associate(LOCALHOST, node.port, ae_title="DMG_NODE")
            assert fourth.is_established
            fourth.release()
        finally:
            for a in held:
                if a.is_established:
                    a.release()
        accepted = [e for e in node.events() if e["event"] == "association_accepted"]
        assert {e["receive_worker"] for e in accepted[:2]} == {0, 1}
        assert any(e["event"] == "association_rejected" and e["reason"] == "too many associations"
                   for e in node.events())

        # silent connections: three pending over the workers, the fourth closed at accept
        silent = [socket.create_connection((LOCALHOST, node.port), timeout=5) for _ in range(3)]
        try:
            time.sleep(0.5)
            extra = socket.create_connection((LOCALHOST, node.port), timeout=5)
            extra.settimeout(5)
            assert extra.recv(1) == b""  # closed by the supervisor without a byte
            extra.close()
        finally:
            for s in silent:
                s.close()
        node.wait_event("connection_refused", timeout=10)
        deadline = time.monotonic() + 10
        while True:  # the closes reach the ledger through the workers
            echo = subprocess.run([DCMTK["echoscu"], "-aet", "SCANNER", "-aec", "DMG_NODE", LOCALHOST,
                                   str(node.port)], capture_output=True, text=True, timeout=30, env=dcmtk_env())
            if echo.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert echo.returncode == 0, echo.stdout + echo.stderr


def test_hostile_pdu_through_a_worker_is_bounded_and_the_node_serves_on(tmp_path: Path) -> None:
    """A PDU header claiming 4 GiB and a stalled association reach a worker: the connection is
    closed quickly, no worker dies, and a real storescu is served afterwards."""
    write_series(tmp_path / "in", 3)
    with running_node(tmp_path / "n", node={"workers": 2, "pdu_timeout": 2.0}) as node:
        pids = _worker_pids(node)
        with rawdicom.RawAssociation(node.port) as raw:
            raw.send(b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64)  # A-ASSOCIATE-RQ of 4 GiB
            t0 = time.monotonic()
            pdu_type, _ = raw.read_pdu()
            assert pdu_type in (0, 7) and time.monotonic() - t0 < 10
        with rawdicom.RawAssociation(node.port) as raw:
            raw.send(rawdicom.associate_rq()[:20])  # half a request, then silence
            t0 = time.monotonic()
            pdu_type, _ = raw.read_pdu()
            assert pdu_type in (0, 7) and time.monotonic() - t0 < 15
        r = storescu(node.port, tmp_path / "in")
        assert r.returncode == 0, r.stderr
        assert _worker_pids(node) == pids and all(_alive(p) for p in pids)
        assert not any(e["event"] == "receive_worker_exited" for e in node.events())


def test_allow_list_reload_reaches_every_worker(tmp_path: Path) -> None:
    """A hot-reloaded calling-AE allow-list is enforced by both workers."""
    with running_node(tmp_path / "n", node={"workers": 2}) as node:
        _worker_pids(node)
        text = node.config_path.read_text().replace("[node]", '[access]\nallowed_calling_aets = ["PACS"]\n\n[node]', 1)
        node.config_path.write_text(text)
        node.wait_event("config_reloaded", timeout=30)
        time.sleep(0.5)
        results = []
        for aet in ("SCANNER", "SCANNER", "PACS", "PACS"):  # consecutive callers go round the workers
            results.append(subprocess.run([DCMTK["echoscu"], "-aet", aet, "-aec", "DMG_NODE", LOCALHOST,
                                           str(node.port)], capture_output=True, text=True, timeout=30,
                                          env=dcmtk_env()).returncode)
        assert results[:2] != [0, 0] and results[0] != 0 and results[1] != 0
        assert results[2:] == [0, 0]
        rejected = [e for e in node.events() if e["event"] == "association_rejected"]
        assert {e["receive_worker"] for e in rejected} == {0, 1}


def test_kill_9_of_the_node_takes_its_workers_and_a_restart_waits_for_them(tmp_path: Path) -> None:
    """kill -9 of the node process mid-series: its workers abort and exit (they hold the spool lock
    until then, so no new node shares the spool with them), a node started at once on the same
    spool comes up, and every instance answered Success before the kill is in its index."""
    write_series(tmp_path / "in", 400, rows=128, cols=128)
    with running_node(tmp_path / "n", node={"workers": 2}, assembly={"quiet_seconds": 3600}) as node:
        pids = _worker_pids(node)
        sender = _storescu_async(node.port, tmp_path / "in", "SCANNER")
        node.wait_event("instance_stored", timeout=60)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        sender.communicate(timeout=60)
        acknowledged = _stored_sops(node)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "receive workers outlived their node"
    assert 1 <= len(acknowledged) < 400, "the kill did not land mid-association"
    with running_node(tmp_path / "n", node={"workers": 2}, assembly={"quiet_seconds": 3600}) as again:
        again.wait_event("spool_reconciled", timeout=5)
        assert acknowledged <= _spool_sops(again)
