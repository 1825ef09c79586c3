"""``[inference] backend = "ray"`` against a real local Ray cluster and Serve application.

One module-scoped cluster (``ray start --head`` on 127.0.0.1, its own temp dir and process
group, killed by group at the end) and one ``dmg-node inference-serve``; DCMTK storescu sends,
DCMTK storescp plays the TPS. 2-5 minutes on 2 shared cores, so outside the default run:
``pip install -e '.[test,ray]'`` then ``pytest -m ray``. Skipped, with the reason, where Ray Serve is
not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]'); "
                                        "these tests need a real local Ray cluster")

from dmg_node import config  # noqa: E402
from dmg_node.classify import Label  # noqa: E402
from dmg_node.config import RtStructSettings  # noqa: E402
from dmg_node.dicomfiles import read_datasets  # noqa: E402
from dmg_node.phantoms.phantom import StudyManifest, make_case, write_dicom_study  # noqa: E402
from dmg_node.pipeline import contour_series  # noqa: E402
from dmg_node.rtstruct import read_roi_mask  # noqa: E402
from dmg_node.segment.infer import PostprocessConfig, Segmenter  # noqa: E402
from dmg_node.segment.remote import RayModel, models_info  # noqa: E402
from dmg_node.segment.routing import ModelSet  # noqa: E402
from dmg_node.volume import Volume, build_volume  # noqa: E402
from tests.ray_support import RayCluster, ServeApp  # noqa: E402
from tests.support import LOCALHOST, free_port, running_node, running_storescp, storescu  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"t1c": "demo-t1c", "t2": "demo-t2", "flair": "demo-flair"}  # the nodes' [models]
# The nodes here send T2 series only: the Serve side deploys that one folder (a short start on 2 cores)
SERVED = {"t1c": "demo-t2", "t2": "demo-t2", "flair": "demo-t2"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    c = RayCluster(tmp_path_factory.mktemp("ray"))
    c.start()
    try:
        yield c
    finally:
        c.kill()


@pytest.fixture(scope="module")
def serve_app(tmp_path_factory: pytest.TempPathFactory, cluster: RayCluster) -> Iterator[ServeApp]:
    workdir = tmp_path_factory.mktemp("serve")
    models = workdir / "models"
    shutil.copytree(ROOT / "models" / MODELS["t2"], models / MODELS["t2"])  # a copy: the hot-reload test changes it
    app = ServeApp(workdir, models, free_port(), SERVED, {"num_cpus": 0.25})
    app.start(cluster.address)
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    out = tmp_path_factory.mktemp("phantom")
    return write_dicom_study(make_case(31, resolution_mm=2.0), out / "study", seed=31, geometry="small")


def _t2_folder(study: StudyManifest) -> Path:
    return study.study_dir / next(s.folder for s in study.series if s.sequence == "t2")


def _t2_volume(study: StudyManifest) -> Volume:
    return build_volume(read_datasets(sorted(_t2_folder(study).glob("*.dcm"))))


def _local_t2() -> Segmenter:
    return Segmenter.load(ROOT / "models" / MODELS["t2"], device="cpu", sequence="t2",
                          postprocess=PostprocessConfig(min_volume_mm3=RtStructSettings().min_volume_mm3))


def _node_sections(app: ServeApp, tps_port: int, **inference: Any) -> dict[str, Any]:
    return {"assembly": {"quiet_seconds": 1}, "models": dict(MODELS),
            "inference": {"backend": "ray", "url": app.settings.url, "application": app.settings.application, **inference},
            "destinations": [{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}]}


def _dice(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_ray_mask_equals_local_mask(serve_app: ServeApp, study: StudyManifest) -> None:
    """The Serve application's mask for a volume is the local backend's mask, voxel for voxel."""
    volume = _t2_volume(study)
    remote = RayModel(serve_app.settings, "t2", (MODELS["t2"],))
    t0 = time.perf_counter()
    served = remote.predict(volume)
    remote_s = time.perf_counter() - t0
    local = _local_t2().predict(volume)
    assert served.shape == local.shape and local.any()
    assert np.array_equal(served, local)  # Dice 1.0
    assert remote.name == "demo-t2" and remote.version == _local_t2().version
    print(f"remote predict {remote_s:.2f} s")  # noqa: T201 - shown with -s


def test_two_nodes_share_one_serve_app_and_send_local_identical_rtstructs(
        tmp_path: Path, serve_app: ServeApp, study: StudyManifest) -> None:
    """storescu -> two nodes -> one Serve app -> storescp: one RTSTRUCT per node, each the local one."""
    series_dir = _t2_folder(study)
    with running_storescp(tmp_path / "tps", "TPS") as (_tps, tps_port), \
            running_node(tmp_path / "a", **_node_sections(serve_app, tps_port)) as node_a, \
            running_node(tmp_path / "b", **_node_sections(serve_app, tps_port)) as node_b:
        for node in (node_a, node_b):
            r = storescu(node.port, series_dir)
            assert r.returncode == 0, r.stderr
        for node in (node_a, node_b):
            node.wait_event("rtstruct_sent", timeout=300)
        time.sleep(1)  # storescp finishes writing
        received = sorted((tmp_path / "tps").glob("RS.*"))
    assert len(received) == 2
    for node in (node_a, node_b):
        events = [e["event"] for e in node.events()]
        assert events.count("job_done") == 1 and events.count("rtstruct_sent") == 1
    datasets = read_datasets(sorted(series_dir.glob("*.dcm")))
    volume = build_volume(datasets)
    local = contour_series(datasets, Label.T2, ModelSet([_local_t2()]), RtStructSettings())
    assert local.dataset is not None
    roi = RtStructSettings().roi_name("t2")
    local_mask = read_roi_mask(local.dataset, volume, roi)
    truth = np.load(study.study_dir / next(s.truth for s in study.series if s.sequence == "t2")).astype(bool)
    for path in received:
        mask = read_roi_mask(dcmread(path), volume, roi)
        assert _dice(mask, local_mask) == 1.0
        assert _dice(mask, truth) >= 0.7  # the loop floor for T2 (tests/test_loop.py)


def test_hot_reload_reaches_the_deployment_only_once_verified(serve_app: ServeApp, study: StudyManifest) -> None:
    """A new version copied into a model folder is served after its replicas load; a broken one never is."""
    t2 = serve_app.models_dir / MODELS["t2"]
    manifest = json.loads((t2 / "manifest.json").read_text())
    old_version = manifest["version"]
    manifest["version"] = f"{old_version}-reloaded"
    (t2 / "manifest.json").write_text(json.dumps(manifest, indent=2))
    remote = RayModel(serve_app.settings, "t2", (MODELS["t2"],))
    volume = _t2_volume(study)
    remote.predict(volume)  # served meanwhile, by the old or the new replica
    deadline = time.monotonic() + 180
    while models_info(serve_app.settings)[MODELS["t2"]]["version"] != manifest["version"]:
        assert time.monotonic() < deadline, "the new version was not deployed"
        time.sleep(1)
    remote.predict(volume)
    assert remote.version == manifest["version"]

    weights = t2 / "generator.onnx"
    good = weights.read_bytes()
    before = models_info(serve_app.settings)[MODELS["t2"]]
    try:
        weights.write_bytes(good[:-16] + b"\0" * 16)  # altered: its SHA-256 no longer matches the manifest
        serve_app.wait_event("model_reload_failed", timeout=60)
        assert models_info(serve_app.settings)[MODELS["t2"]] == before  # the verified one still serves
        remote.predict(volume)
        assert remote.version == manifest["version"]
    finally:
        weights.write_bytes(good)


def test_cluster_away_jobs_wait_then_complete_once(tmp_path: Path, cluster: RayCluster, serve_app: ServeApp,
                                                   study: StudyManifest) -> None:
    """The cluster vanishes: the node keeps receiving, the job waits (no attempt counted) and retries
    with backoff, shown in status; the cluster returns: the job completes and one RTSTRUCT is sent."""
    cluster.kill()
    serve_app.stop(timeout=5)
    with running_storescp(tmp_path / "tps", "TPS") as (_tps, tps_port), \
            running_node(tmp_path / "node", **_node_sections(serve_app, tps_port, retry_initial_seconds=0.5,
                                                               retry_max_seconds=2, timeout_seconds=60)) as node:
        r = storescu(node.port, _t2_folder(study))
        assert r.returncode == 0, r.stderr  # the SCP receives while inference is away
        node.wait_event("inference_unavailable", timeout=120, consecutive_failures=4)  # > max_attempts (3)
        status = subprocess.run([sys.executable, "-m", "dmg_node.cli", "status", "--json", "--config",
                                 str(node.config_path)], capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(status.stdout)
        assert report["node"]["inference"]["available"] is False
        assert report["node"]["inference"]["consecutive_failures"] >= 4
        assert [j["state"] for j in report["jobs"]] in (["pending"], ["running"])
        assert report["jobs"][0]["attempts"] <= 1  # waiting is not failing
        cluster.start()
        serve_app.start(cluster.address)
        node.wait_event("rtstruct_sent", timeout=300)
        node.wait_event("inference_available", timeout=10)
        time.sleep(2)  # anything sent twice would arrive now
        received = list((tmp_path / "tps").glob("RS.*"))
    events = [e["event"] for e in node.events()]
    assert len(received) == 1
    assert events.count("job_done") == 1 and events.count("rtstruct_sent") == 1 and "job_failed" not in events
    assert config.load(node.config_path).inference.backend == "ray"
