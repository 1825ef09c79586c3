"""Tests for dmg_node.web: the read-only status page, the contour overlays and /metrics.

In process with Starlette's TestClient on a spool holding two studies and an outbox RTSTRUCT,
and one system test against a running node with an HTTP client and headless Chromium.
"""

from __future__ import annotations

import datetime
import io
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
import structlog
from pydicom import Dataset
from pydicom.uid import generate_uid
from starlette.testclient import TestClient

from dmg_node import logs, metrics
from dmg_node.records import JobState, OutboxState, instance_record
from dmg_node.rtstruct import RoiSpec, RtStructMeta, build_rtstruct
from dmg_node.storage.spool import Spool
from dmg_node.volume import build_volume
from dmg_node.web.app import Sources, build_app
from dmg_node.web.render import overlay, pick_slices, png_rgb
from tests.support import (
    mr_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
PHI = ("DOE^JANE", "DOE", "PID-SECRET-123", "19800101")
CHROMIUM = Path("/usr/bin/chromium")
ROI = RoiSpec(name="GTV_DMG_AI_T2", color=(255, 0, 0), generation_description="demo-t2 0.0 (test)")


def _head_series(study_uid: str, series_uid: str, n: int = 12, size: int = 96) -> list[Dataset]:
    """An axial MR series of a bright ellipse (a 'head') holding a brighter blob (a 'tumour')."""
    datasets = []
    j, i = np.indices((size, size), dtype=np.float64)
    for k in range(n):
        ds = mr_dataset(study_uid, series_uid, k, rows=size, cols=size, description="T2 TSE AX")
        head = ((j - size / 2) / (size * 0.42)) ** 2 + ((i - size / 2) / (size * 0.35)) ** 2 <= 1.0
        blob = ((j - size * 0.45) ** 2 + (i - size * 0.55) ** 2 + ((k - n / 2) * 4) ** 2) <= (size * 0.15) ** 2
        pixels = np.where(head, 800 + 400 * np.cos(j / 7.0) ** 2, 0) + np.where(blob, 1800, 0)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        datasets.append(ds)
    return datasets


def _store(spool: Spool, datasets: list[Dataset]) -> None:
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        spool.store(buf.getvalue(), instance_record(ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                                    calling_aet="SCANNER", received_at=time.time()))


def _rtstruct(datasets: list[Dataset]) -> tuple[Dataset, npt.NDArray[np.bool_]]:
    volume = build_volume(datasets)
    mask = volume.array > 1500
    meta = RtStructMeta(sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
                        created=datetime.datetime.now().astimezone())
    return build_rtstruct(datasets, volume, mask, ROI, meta), mask


def add_contour(spool: Spool, job_id: int, datasets: list[Dataset], dests: list[str]) -> str:
    """Queue an RTSTRUCT of the series' bright blob in the outbox, as the pipeline does; its SOP UID."""
    rt, _mask = _rtstruct(datasets)
    buf = io.BytesIO()
    rt.save_as(buf, enforce_file_format=True)
    sop = str(rt.SOPInstanceUID)
    spool.add_outbox(job_id, str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID), sop,
                     buf.getvalue(), dests, time.time())
    return sop


def write_status(root: Path) -> None:
    now = time.time()
    (root / "node-status.json").write_text(json.dumps({
        "pid": 4242, "version": "0.1.0", "started_at": now - 7200, "updated_at": now, "ae_title": "DMG_NODE",
        "port": 11112, "associations": 1,
        "models": {"t2": {"name": "demo-t2-3d", "version": "0.2.0", "device": "cpu", "members": [
            {"name": "demo-t2-3d", "version": "0.2.0", "device": "cpu", "max_spacing_mm": 1.5}]}},
    }))


@pytest.fixture
def spool(tmp_path: Path) -> Any:
    """Study A: a T2 series (contoured; RTSTRUCT sent to one destination, failed to another) and a
    localiser; study B: waiting. Patient DOE^JANE everywhere."""
    sp = Spool(tmp_path / "spool", fsync=False)
    study_a, study_b = generate_uid(), generate_uid()
    t2 = _head_series(study_a, generate_uid())
    loc_uid, flair_uid = generate_uid(), generate_uid()
    loc = [mr_dataset(study_a, loc_uid, k, description="LOCALIZER") for k in range(3)]
    _store(sp, t2 + loc + [mr_dataset(study_b, flair_uid, k, description="FLAIR AX") for k in range(3)])
    sp.set_series_result(str(t2[0].SeriesInstanceUID), "t2", "T2-weighted: TR 5000 ms, TE 100 ms")
    sp.set_series_result(str(loc[0].SeriesInstanceUID), "none", "excluded by name pattern 'LOCALI[SZ]ER'")
    job_id = sp.enqueue(study_a, time.time(), time.time())
    job = sp.claim_job(time.time())
    assert job is not None and job.id == job_id
    sp.finish_job(job_id, JobState.DONE, time.time())
    add_contour(sp, job_id, t2, ["tps", "backup"])
    items = {o["destination"]: o["id"] for o in sp.outbox()}
    sp.outbox_result(items["tps"], OutboxState.SENT, "0x0000", None, time.time(), time.time())
    sp.outbox_result(items["backup"], OutboxState.PENDING, "-", "connection refused", time.time(), time.time() + 30)
    write_status(sp.root)
    yield sp
    sp.close()


def _client(sp: Spool, include_phi: bool = False, warnings: list[dict[str, str]] | None = None) -> TestClient:
    src = Sources(sp, sp.root / "node-status.json", lambda: include_phi, lambda: list(warnings or []))
    return TestClient(build_app(src))


def decode_png(data: bytes) -> npt.NDArray[np.uint8]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable PNG"
    return np.asarray(image[:, :, ::-1])  # BGR -> RGB


def test_page_shows_health_models_labels_jobs_outbox_and_no_phi(spool: Spool) -> None:
    """The page lists node health, models, each series' label and reason, jobs, outbox retries; no patient identity."""
    with _client(spool) as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for needle in ("running", "DMG_NODE", "demo-t2-3d", "0.2.0", "T2-weighted: TR 5000 ms, TE 100 ms",
                   "LOCALI[SZ]ER", "waiting", "connection refused", "backup", "tps", "sent", "overlay/1.png"):
        assert needle in page, needle
    for secret in PHI:
        assert secret not in page


def test_patient_shown_only_with_include_phi(spool: Spool) -> None:
    """With logging.include_phi the page names the patient of each study."""
    with _client(spool, include_phi=True) as client:
        page = client.get("/").text
    assert "DOE^JANE" in page and "PID-SECRET-123" in page


def test_api_status_is_the_same_snapshot_as_json(spool: Spool) -> None:
    """/api/status carries studies with series labels, jobs, outbox and contours, and no PHI."""
    with _client(spool) as client:
        r = client.get("/api/status")
    assert r.status_code == 200
    snap = r.json()
    labels = sorted(se["label"] or "-" for s in snap["studies"] for se in s["series"])
    assert labels == ["-", "none", "t2"]
    assert snap["contours"][0]["label"] == "t2" and "tps: sent" in snap["contours"][0]["destinations"]
    assert snap["health"]["jobs"] == {"done": 1}
    assert not any(secret in r.text for secret in PHI)


def test_overlay_png_shows_the_contour_on_its_series(spool: Spool) -> None:
    """/overlay/{id}.png decodes to three greyscale slices side by side with the contour's edge in its colour."""
    with _client(spool) as client:
        r = client.get("/overlay/1.png")
        again = client.get("/overlay/1.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert again.content == r.content  # cached
    image = decode_png(r.content)
    slices = [int(k) for k in r.headers["x-slices"].split(",")]
    assert len(slices) == 3 and slices == sorted(slices)
    assert image.shape[0] >= 256 and image.shape[1] >= 3 * 256
    red = (image[:, :, 0] == 255) & (image[:, :, 1] == 0) & (image[:, :, 2] == 0)
    assert red.sum() > 100  # the edge is drawn
    grey = (image[:, :, 0] == image[:, :, 1]) & (image[:, :, 1] == image[:, :, 2]) & (image[:, :, 0] > 50)
    assert grey.sum() > 10_000  # and the series under it


def test_overlay_of_a_missing_item_is_404_and_writes_are_refused(spool: Spool) -> None:
    """An unknown outbox id is 404; the app is GET-only (POST and DELETE are 405)."""
    with _client(spool) as client:
        assert client.get("/overlay/999.png").status_code == 404
        assert client.post("/").status_code == 405
        assert client.delete("/api/status").status_code == 405
        assert client.get("/healthz").text == "ok"


def test_metrics_has_every_documented_metric(spool: Spool) -> None:
    """/metrics serves each metric named in docs/metrics.md, with jobs, outbox and free disk from the spool."""
    documented = set(re.findall(r"^\| `(dmg_node_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M))
    assert len(documented) >= 10
    metrics.SEGMENT_SECONDS.labels("t2", "demo-t2-3d").observe(1.5)
    with _client(spool) as client:
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = set(re.findall(r"^# TYPE (\S+) ", r.text, re.M))
    assert documented <= names, documented - names
    assert 'dmg_node_jobs{state="done"} 1.0' in r.text
    assert 'dmg_node_outbox_items{destination="backup",state="pending"} 1.0' in r.text
    assert 'dmg_node_model_info{model="demo-t2-3d",sequence="t2",version="0.2.0"} 1.0' in r.text
    assert re.search(r"^dmg_node_spool_free_bytes [1-9]", r.text, re.M)


def test_recent_warnings_are_shown_without_phi(spool: Spool) -> None:
    """Warning and error events reach the page through the log's PHI filter; info events do not."""
    logs.RECENT_WARNINGS.clear()  # the process's buffer: earlier tests' events (some with include_phi on) are not ours
    logs.configure("info", "json", include_phi=False, stream=io.StringIO())
    log = structlog.get_logger("test")
    log.warning("series_rejected", series_uid="1.2.3", reason="slice gap 8.0 mm", patient_name="DOE^JANE")
    log.info("instance_stored", sop_uid="9.9.9")
    with _client(spool, warnings=logs.RECENT_WARNINGS.events()) as client:
        page = client.get("/").text
    assert "series_rejected" in page and "slice gap 8.0 mm" in page
    assert "DOE^JANE" not in page and "9.9.9" not in page


def test_pick_slices_prefers_the_largest_cross_section() -> None:
    """Three slices through the region, the largest among them; the middle slice when it is empty."""
    mask = np.zeros((20, 8, 8), bool)
    mask[5:15, 2:4, 2:4] = True
    mask[9, :, :] = True
    assert pick_slices(mask) == [5, 9, 14]
    assert pick_slices(np.zeros((20, 8, 8), bool)) == [10]


def test_png_writer_round_trips() -> None:
    """png_rgb writes a PNG that OpenCV decodes to the same pixels."""
    image = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(png_rgb(image)), image)


def test_overlay_draws_the_edge_only() -> None:
    """The contour's inside keeps the image's grey; only its edge (2 px on the scaled image) is coloured."""
    datasets = _head_series(generate_uid(), generate_uid(), n=4, size=32)
    volume = build_volume(datasets)
    mask = np.zeros(volume.array.shape, bool)
    mask[2, 10:20, 10:20] = True
    image = overlay(volume, mask, [2], (0, 255, 0))
    green = (image[:, :, 1] == 255) & (image[:, :, 0] == 0)
    factor = image.shape[0] // 32
    assert factor == 8
    assert green.sum() == (10 * factor) ** 2 - (10 * factor - 4) ** 2




def _screenshot(url: str, tmp_path: Path) -> Path:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install -y chromium")
    out = tmp_path / "page.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium'}", f"--screenshot={out}", "--window-size=1200,900", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
    return out








def test_shipped_config_spells_out_the_web_defaults() -> None:
    """config/node.toml's [web] holds the values the code uses when the table is missing."""
    from dmg_node import config

    assert config.load().web == config.from_dict({}).web == config.WebSettings(True, "127.0.0.1", 8080)
