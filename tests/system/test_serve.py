"""`dmg-node serve` as a process, driven by real DCMTK peers: store, status, echo, stop, restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support import DCMTK, LOCALHOST, dcmtk_env, running_node, running_storescp, storescu, write_series

pytestmark = pytest.mark.network


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmg_node.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_serve_receives_and_status_reports(tmp_path: Path) -> None:
    """echoscu and storescu talk to a running node; status --json lists every instance; no PHI in the log."""
    write_series(tmp_path / "a", 8, description="T2 TSE AX")
    write_series(tmp_path / "b", 5, description="T1 SE AX")
    with running_node(tmp_path, assembly={"quiet_seconds": 3600}) as node:
        echo = subprocess.run([DCMTK["echoscu"], "-aet", "SCANNER", "-aec", "DMG_NODE", LOCALHOST, str(node.port)],
                              capture_output=True, text=True, timeout=60, env=dcmtk_env())
        assert echo.returncode == 0, echo.stderr
        assert storescu(node.port, tmp_path / "a").returncode == 0
        assert storescu(node.port, tmp_path / "b").returncode == 0
        status = _cli("status", "--json", "--config", str(node.config_path))
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        counts = sorted(se["instances"] for st in report["studies"] for se in st["series"])
        assert counts == [5, 8]
        assert all(st["state"] == "waiting" for st in report["studies"])
        assert report["node"]["port"] == node.port
        text = _cli("status", "--config", str(node.config_path))
        assert text.returncode == 0 and "waiting" in text.stdout
    log = node.log_path.read_text()
    assert sum(e["event"] == "instance_stored" for e in node.events()) == 13
    for secret in ("DOE", "JANE", "PID-SECRET-123", "19800101"):
        assert secret not in log


def test_duplicate_and_rejected_caller(tmp_path: Path) -> None:
    """A caller outside the allow-list is refused; a re-sent series is stored once."""
    write_series(tmp_path / "a", 4)
    with running_node(tmp_path, access={"allowed_calling_aets": ["SCANNER"]}) as node:
        denied = storescu(node.port, tmp_path / "a", aet="ROGUE")
        assert denied.returncode != 0
        assert storescu(node.port, tmp_path / "a").returncode == 0
        assert storescu(node.port, tmp_path / "a").returncode == 0
        node.wait_event("association_released", stored=4)
        rejected = [e for e in node.events() if e["event"] == "association_rejected"]
        assert [e["calling_aet"] for e in rejected] == ["ROGUE"]
    assert len(list((tmp_path / "spool" / "studies").rglob("*.dcm"))) == 4
    assert sum(e["event"] == "instance_duplicate" for e in node.events()) == 4


def test_sigterm_during_send_exits_0_and_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    """SIGTERM mid-association: the node finishes in-flight writes, exits 0, and every instance it
    acknowledged is in the spool, complete."""
    write_series(tmp_path / "a", 150, rows=128, cols=128)
    with running_node(tmp_path) as node:
        sender = subprocess.Popen([DCMTK["storescu"], "-v", "-nh", "-aet", "SCANNER", "-aec", "DMG_NODE", "+sd", "+r",
                                   LOCALHOST, str(node.port), str(tmp_path / "a")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
        try:
            node.wait_event("instance_stored", timeout=60)
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(60) == 0
            out, _ = sender.communicate(timeout=60)
        finally:
            sender.kill()
    acknowledged = out.count("Received Store Response (Success)")
    assert acknowledged >= 1
    files = list((tmp_path / "spool" / "studies").rglob("*.dcm"))
    assert len(files) >= acknowledged
    for f in files:
        assert len(dcmread(f).PixelData) == 128 * 128 * 2
    assert not list((tmp_path / "spool").rglob("*.part"))
    assert any(e["event"] == "node_stopped" for e in node.events())


def test_echo_command(tmp_path: Path) -> None:
    """`dmg-node echo` reports OK for a live destination and FAILED (exit 1) for a dead one."""
    from tests.support import free_port, node_config

    with running_storescp(tmp_path / "rx", "TPS") as (_proc, port):
        cfg = node_config(tmp_path, free_port(), destinations=[
            {"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": port},
            {"name": "dead", "ae_title": "NOPE", "host": LOCALHOST, "port": free_port()},
        ])
        ok = _cli("echo", "tps", "--config", str(cfg))
        assert ok.returncode == 0 and "C-ECHO OK status=0x0000" in ok.stdout
        bad = _cli("echo", "--config", str(cfg), "--timeout", "3")
        assert bad.returncode == 1 and "dead" in bad.stdout and "FAILED" in bad.stdout


def test_restart_keeps_waiting_study(tmp_path: Path) -> None:
    """A study that was waiting when the node stopped is completed exactly once after restart."""
    write_series(tmp_path / "a", 3)
    with running_node(tmp_path, assembly={"quiet_seconds": 4}) as node:
        assert storescu(node.port, tmp_path / "a").returncode == 0
    assert not any(e["event"] == "study_complete" for e in node.events())
    with running_node(tmp_path, assembly={"quiet_seconds": 4}) as node2:
        node2.wait_event("study_complete", timeout=30)
        node2.wait_event("job_done", timeout=60)
        # No sleep for "not queued twice": the index says one job, done, covering every instance,
        # and the assembler never queues a covered study again (tests/unit/test_assemble.py).
        status = json.loads(_cli("status", "--json", "--config", str(node2.config_path)).stdout)
    assert [j["state"] for j in status["jobs"]] == ["done"]
    assert sum(e["event"] == "study_complete" for e in node2.events()) == 1


@pytest.mark.parametrize("policy", ["reprocess", "ignore"])
def test_late_arrival_policy(tmp_path: Path, policy: str) -> None:
    """An instance arriving after its study was processed re-opens it (reprocess) or is only stored (ignore)."""
    paths = write_series(tmp_path / "all", 4)
    (tmp_path / "first").mkdir()
    (tmp_path / "late").mkdir()
    for p in paths[:3]:
        p.rename(tmp_path / "first" / p.name)
    paths[3].rename(tmp_path / "late" / paths[3].name)
    # A second study sent after the late instance: once it is complete, the assembler has passed
    # the late instance's quiet period too, so "not reprocessed" is read from events, not a sleep.
    write_series(tmp_path / "marker", 1, study_uid="1.2.826.0.1.3680043.10.999", series_uid="1.2.826.0.1.3680043.10.999.1")
    with running_node(tmp_path, assembly={"quiet_seconds": 1.5, "late_policy": policy}) as node:
        assert storescu(node.port, tmp_path / "first").returncode == 0
        node.wait_event("job_done", timeout=60)
        assert storescu(node.port, tmp_path / "late").returncode == 0
        node.wait_event("late_instance", late_policy=policy)
        assert storescu(node.port, tmp_path / "marker").returncode == 0
        node.wait_event("study_complete", study_uid="1.2.826.0.1.3680043.10.999", timeout=60)
    completes = [e for e in node.events() if e["event"] == "study_complete" and e["study_uid"] != "1.2.826.0.1.3680043.10.999"]
    assert len(completes) == (2 if policy == "reprocess" else 1)
    assert len(list((tmp_path / "spool" / "studies").rglob("*.dcm"))) == 5


def test_second_node_on_the_same_spool_or_port_is_refused_clearly(tmp_path: Path) -> None:
    """A second `serve` on a spool in use, or on a port in use, exits 1 at once with one line
    naming the spool (and the holder's pid) or the address; the first node serves on."""
    from tests.support import free_port, node_config

    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    with running_node(tmp_path / "a", assembly={"quiet_seconds": 3600}) as node:
        same_spool = node_config(tmp_path / "b", free_port(), storage={"root": str(tmp_path / "a" / "spool")})
        r = subprocess.run([sys.executable, "-m", "dmg_node.cli", "serve", "--config", str(same_spool)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"is in use by another dmg-node (pid {node.proc.pid})" in r.stderr
        same_port = node_config(tmp_path / "c", node.port)
        r = subprocess.run([sys.executable, "-m", "dmg_node.cli", "serve", "--config", str(same_port)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"cannot listen on {LOCALHOST}:{node.port}" in r.stderr and "in use" in r.stderr
        write_series(tmp_path / "in", 2)
        sent = subprocess.run([DCMTK["storescu"], "-aec", "DMG_NODE", "+sd", LOCALHOST, str(node.port),
                               str(tmp_path / "in")], capture_output=True, env=dcmtk_env(), timeout=60)
        assert sent.returncode == 0
