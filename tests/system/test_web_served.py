"""The status page and metrics served by a running node (real sockets, uvicorn, headless Chromium)."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dmg_node import metrics
from dmg_node.storage.spool import Spool
from tests.support import (
    DCMTK,
    LOCALHOST,
    dcmtk_env,
    free_port,
    mr_dataset,
    running_node,
)
from tests.unit.test_web import (
    PHI,
    _head_series,
    _screenshot,
    add_contour,
    decode_png,
)
from tests.unit.test_web import spool  # noqa: F401, F811  (pytest fixtures)


@pytest.mark.network
@pytest.mark.slow
def test_running_node_serves_the_page_metrics_and_a_browser_renders_it(tmp_path: Path) -> None:
    """A running node serves the page and /metrics on its [web] port; after a storescu the metrics
    count the instances and the association; headless Chromium renders the page (with an overlay)."""
    series = _head_series(generate_uid(), generate_uid())
    folder = tmp_path / "in"
    folder.mkdir()
    for k, ds in enumerate(series):
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    web_port = free_port()
    with running_node(tmp_path, web={"enabled": True, "port": web_port}) as node:
        started = node.wait_event("web_started")
        assert started["port"] == web_port and started["host"] == LOCALHOST and started["started"] is True
        sent = subprocess.run([DCMTK["storescu"], "-aet", "SCANNER", "-aec", "DMG_NODE", "+sd", "+r", LOCALHOST,
                               str(node.port), str(folder)], capture_output=True, text=True, timeout=120,
                              env=dcmtk_env())
        assert sent.returncode == 0, sent.stderr
        node.wait_event("job_done", timeout=60)
        # The node has no model here: queue an RTSTRUCT of the received series as the pipeline would
        # (a second connection to the index, as `dmg-node status` opens one).
        reader = Spool(tmp_path / "spool", fsync=False)
        try:
            files = next(iter(reader.series_files(str(series[0].StudyInstanceUID)).values()))
            add_contour(reader, 1, [dcmread(p) for p in files], ["nowhere"])
        finally:
            reader.close()
        base = f"http://{LOCALHOST}:{web_port}"
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        png = urllib.request.urlopen(base + "/overlay/1.png", timeout=30).read()
        assert "T2 TSE AX" in page and "overlay/1.png" in page
        assert not any(secret in page for secret in PHI)
        assert f"dmg_node_store_seconds_count {len(series)}.0" in text
        assert 'dmg_node_associations_total{outcome="accepted"} 1.0' in text
        assert re.search(r"^dmg_node_received_bytes_total [1-9]", text, re.M)
        assert decode_png(png).shape[1] >= 3 * 256
        shot = _screenshot(base + "/", tmp_path)
    assert node.stop() == 0
    assert any(e["event"] == "web_stopped" for e in node.events())
    image = decode_png(shot.read_bytes())
    assert image.shape[:2] == (900, 1200)
    assert (image < 200).any(axis=2).sum() > 5_000  # text, tables and the overlay: not a blank page


def test_server_on_a_taken_port_is_logged_and_the_node_goes_on(spool: Spool) -> None:
    """A taken [web] port gives web_start_failed and no server; port 0 picks a free one, served until stop."""
    import socket

    from structlog.testing import capture_logs

    from dmg_node import config
    from dmg_node.web import server

    with socket.create_server((LOCALHOST, 0)) as taken, capture_logs() as events:
        port = taken.getsockname()[1]
        settings = config.from_dict({"web": {"port": port}})
        assert server.start(settings, spool, spool.root / "node-status.json", lambda: False, list) is None
        web = server.start(config.from_dict({"web": {"port": 0}}), spool, spool.root / "node-status.json",
                           lambda: False, list)
        assert web is not None and web.port not in (0, port)
        try:
            body = urllib.request.urlopen(f"http://{LOCALHOST}:{web.port}/healthz", timeout=10).read()
        finally:
            web.stop()
    assert body == b"ok"
    names = [e["event"] for e in events]
    assert names == ["web_start_failed", "web_started", "web_stopped"]
    assert events[0]["port"] == port and events[2]["clean"] is True
    assert config.from_dict({"web": {"enabled": False}}).web.enabled is False


@pytest.mark.network
def test_scp_counts_instances_bytes_failures_and_associations(tmp_path: Path) -> None:
    """Each stored instance adds to the store histogram and the bytes; a failure status and a
    rejected association are counted by name."""
    from pydicom.uid import MRImageStorage
    from pynetdicom import AE

    from dmg_node.net.scp import StoreStatus
    from tests.support import running_receiver

    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = {"n": value("dmg_node_store_seconds_count"), "bytes": value("dmg_node_received_bytes_total"),
              "bad": value("dmg_node_store_failures_total", status="missing_uid"),
              "ok": value("dmg_node_associations_total", outcome="accepted"),
              "no": value("dmg_node_associations_total", outcome="rejected")}
    good = [mr_dataset("1.2.3", "1.2.3.4", k) for k in range(3)]
    bad = mr_dataset("1.2.3", "1.2.3.4", 9)
    del bad.StudyInstanceUID
    with running_receiver(tmp_path / "spool", access={"allowed_calling_aets": ["SCANNER"]}) as rx:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate(LOCALHOST, rx.port, ae_title="DMG_NODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [*good, bad]]
        assoc.release()
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(MRImageStorage)
        assert not stranger.associate(LOCALHOST, rx.port, ae_title="DMG_NODE").is_established
    assert statuses == [StoreStatus.SUCCESS] * 3 + [StoreStatus.MISSING_UID]
    assert value("dmg_node_store_seconds_count") - before["n"] == 3
    assert value("dmg_node_received_bytes_total") - before["bytes"] > 3 * 64 * 64 * 2
    assert value("dmg_node_store_failures_total", status="missing_uid") - before["bad"] == 1
    assert value("dmg_node_associations_total", outcome="accepted") - before["ok"] == 1
    assert value("dmg_node_associations_total", outcome="rejected") - before["no"] == 1


def test_node_starts_and_stops_its_page_and_a_web_change_needs_a_restart(tmp_path: Path) -> None:
    """Node.start serves the page from [web] (port 0: a free one), a reloaded [web] is logged as
    needing a restart and keeps the running address, and Node.stop stops the server."""
    from structlog.testing import capture_logs

    from dmg_node import config
    from dmg_node.node import Node

    settings = config.from_dict({
        "node": {"host": LOCALHOST, "port": free_port()},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "models": {"dir": str(tmp_path / "models")},
        "web": {"port": 0},
    })
    node = Node(settings, models={})
    with capture_logs() as events:
        node.start()
        try:
            [started] = [e for e in events if e["event"] == "web_started"]
            page = urllib.request.urlopen(f"http://{LOCALHOST}:{started['port']}/", timeout=10).read().decode()
            node.apply_settings(config.from_dict({"node": {"host": LOCALHOST, "port": node.receiver.port},
                                                  "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
                                                  "models": {"dir": str(tmp_path / "models")},
                                                  "web": {"port": 9}}))
        finally:
            node.stop(grace_seconds=5)
    assert "running" in page and "DMG_NODE" in page
    [restart] = [e for e in events if e["event"] == "config_change_needs_restart"]
    assert restart["keys"] == ["web.port"] and node.settings.web.port == 0
    assert any(e["event"] == "web_stopped" and e["clean"] for e in events)
