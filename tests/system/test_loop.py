"""The whole loop with real peers: Orthanc (PACS) -> dmg-node -> DCMTK storescp (TPS).

A phantom study goes into Orthanc over HTTP, Orthanc C-STOREs it to a running node, and the
node's RTSTRUCTs must arrive at storescp: one per routed series, each referencing its series,
passing dciodvfy, and contouring the phantom's tumour (Dice against the phantom's truth).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dmg_node.dicomfiles import read_datasets
from dmg_node.rtstruct import read_roi_mask
from dmg_node.phantoms.phantom import StudyManifest, make_case, write_dicom_study
from dmg_node.volume import build_volume
from tests.support import LOCALHOST, free_port, require_tool, running_node, running_orthanc, running_storescp

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Regression floors for the demo weights on one small (2 mm) phantom through the whole loop, on
# the DICOM grids; measured here: T2 0.80, FLAIR 0.86, T1C 0.58. docs/model.md has the held-out
# figures (T1C is the weakest demo model on coarse grids).
LOOP_DICE = {"t2": 0.7, "flair": 0.75, "t1c": 0.5}


def models_dir() -> Path:
    return Path(os.environ.get("DMG_TEST_MODELS_DIR", ROOT / "models"))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    out = tmp_path_factory.mktemp("phantom")
    return write_dicom_study(make_case(31, resolution_mm=2.0), out / "study", seed=31, geometry="small")


def _files(study: StudyManifest) -> list[Path]:
    return sorted(p for s in study.series for p in (study.study_dir / s.folder).glob("*.dcm"))


def _wait_files(folder: Path, n: int, timeout: float, node: object) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob("RS.*"))
        if len(found) >= n:
            time.sleep(0.5)  # let storescp finish writing the last file
            return found
        if getattr(node, "proc").poll() is not None:
            raise RuntimeError("node exited")
        time.sleep(0.5)
    raise TimeoutError(f"{len(list(folder.glob('RS.*')))} of {n} RTSTRUCTs after {timeout} s")


def _routed(study: StudyManifest) -> list[str]:
    return [s.sequence for s in study.series if (models_dir() / f"demo-{s.sequence}" / "manifest.json").exists()]


def test_orthanc_to_node_to_tps(tmp_path: Path, study: StudyManifest) -> None:
    """Orthanc sends a phantom study; the TPS gets one checked RTSTRUCT per routed series."""
    routed = _routed(study)
    assert routed, f"no demo models under {models_dir()}"
    node_port = free_port()
    with running_storescp(tmp_path / "tps", "TPS") as (_tps, tps_port), \
            running_orthanc(tmp_path / "orthanc", "PACS",
                            modalities={"node": ["DMG_NODE", LOCALHOST, node_port]}) as pacs:
        ids = {pacs.rest("POST", "/instances", p.read_bytes())["ParentStudy"] for p in _files(study)}
        assert len(ids) == 1
        with running_node(tmp_path / "node", port=node_port, assembly={"quiet_seconds": 2},
                          models={"dir": str(models_dir())},
                          destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}]
                          ) as node:
            job = pacs.rest("POST", "/modalities/node/store",
                            f'{{"Resources": ["{ids.pop()}"], "Synchronous": true}}'.encode())
            assert job is not None
            received = _wait_files(tmp_path / "tps", len(routed), timeout=600, node=node)
            node.wait_event("rtstruct_sent", timeout=60)
    assert len(received) == len(routed)
    by_series = {s.series_instance_uid: s for s in study.series}
    seen = set()
    numbers: set[int] = set()
    for path in received:
        r = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Error" not in r.stderr, r.stderr
        rt = dcmread(path)
        assert rt.ApprovalStatus == "UNAPPROVED" and "AI" in rt.SeriesDescription
        assert rt.StudyInstanceUID == study.study_instance_uid
        ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        series = by_series[ref.SeriesInstanceUID]
        seen.add(series.sequence)
        assert rt.StructureSetLabel == f"DMG_AI {series.sequence.upper()}"
        numbers.add(int(rt.SeriesNumber))
        source = read_datasets(sorted((study.study_dir / series.folder).glob("*.dcm")))
        volume = build_volume(source)
        referenced = {c.ReferencedSOPInstanceUID for c in ref.ContourImageSequence}
        assert referenced == set(volume.sop_instance_uids)
        roi = rt.StructureSetROISequence[0]
        assert roi.ROIName == f"GTV_DMG_AI_{series.sequence.upper()}"
        assert rt.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
        mask = read_roi_mask(rt, volume, roi.ROIName)
        truth = np.load(study.study_dir / series.truth).astype(bool)
        dice = 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())
        assert dice >= LOOP_DICE[series.sequence], f"{series.sequence}: Dice {dice:.3f}"
    assert seen == set(routed)
    assert len(numbers) == len(routed)  # one Series Number per sequence's RTSTRUCT
    events = [e["event"] for e in node.events()]
    assert events.count("job_done") == 1 and events.count("rtstruct_sent") == len(routed)


def test_tps_down_at_first_still_gets_the_rtstruct(tmp_path: Path, study: StudyManifest) -> None:
    """The TPS is down when the RTSTRUCT is ready; the outbox retries and delivers once it comes up."""
    routed = _routed(study)
    assert routed, f"no demo models under {models_dir()}"
    from dmg_node.config import Destination
    from dmg_node.net.scu import store_files

    tps_port = free_port()
    t2_only = [s for s in study.series if s.sequence == routed[0]]
    with running_node(tmp_path / "node", assembly={"quiet_seconds": 1},
                      models={"dir": str(models_dir())},
                      outbox={"retry_initial_seconds": 1, "retry_max_seconds": 2},
                      destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}]) as node:
        paths = sorted((study.study_dir / t2_only[0].folder).glob("*.dcm"))
        results = store_files(paths, Destination("node", "DMG_NODE", LOCALHOST, node.port), "SCANNER")
        assert all(r.ok for r in results)
        failed = node.wait_event("rtstruct_send_failed", timeout=300)
        assert failed["status"] == "no-association"
        # storescp needs the exact port the node keeps retrying: start it now
        with running_storescp(tmp_path / "tps", "TPS", port=tps_port):
            sent = node.wait_event("rtstruct_sent", timeout=60)
            assert sent["attempt"] >= 2
            received = _wait_files(tmp_path / "tps", 1, timeout=30, node=node)
    assert len(received) == 1


def test_demo_command_reports_each_routed_sequence() -> None:
    """`dmg-node demo` runs the loop on this machine and prints one Dice row per sequence with a model."""
    import sys

    r = subprocess.run([sys.executable, "-m", "dmg_node.cli", "demo"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "GTV_DMG_AI_" in line]
    assert len(rows) == len([s for s in ("t1c", "t2", "flair") if (models_dir() / f"demo-{s}").is_dir()])
    assert "nothing about clinical accuracy" in r.stdout


def test_kill_9_during_segmentation_finishes_once_after_restart(tmp_path: Path, study: StudyManifest) -> None:
    """kill -9 while a job runs: after restart the job is requeued, finishes, and the TPS gets one RTSTRUCT."""
    import signal

    from dmg_node.config import Destination
    from dmg_node.net.scu import store_files

    series = next(s for s in study.series if s.sequence == "t1c")  # the largest series: the longest job
    # Robust on a loaded machine (it once failed there with "Received unexpected C-STORE service
    # message" and a DIMSE timeout): a quiet period longer than any gap in our own send, so the
    # job (CPU-heavy) never starts while the series is still arriving, and DIMSE timeouts far
    # above what a slow response takes, for our SCU and for the node's outbox. Waits are on events.
    sections: dict[str, object] = {"assembly": {"quiet_seconds": 5}, "models": {"dir": str(models_dir())},
                                   "node": {"dimse_timeout": 300, "network_timeout": 600},
                                   "outbox": {"timeout_seconds": 300}}
    with running_storescp(tmp_path / "tps", "TPS", "+uf") as (_tps, tps_port):
        sections["destinations"] = [{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}]
        with running_node(tmp_path / "node", **sections) as node:
            paths = sorted((study.study_dir / series.folder).glob("*.dcm"))
            results = store_files(paths, Destination("n", "DMG_NODE", LOCALHOST, node.port), "SCANNER", timeout=300)
            assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
            node.wait_event("job_started", timeout=300)
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(30)
        assert not any(e["event"] == "rtstruct_sent" for e in node.events())
        with running_node(tmp_path / "node", **sections) as node2:
            reconciled = node2.wait_event("spool_reconciled")
            assert reconciled["jobs_requeued"] == 1
            node2.wait_event("rtstruct_sent", timeout=400)
            received = _wait_files(tmp_path / "tps", 1, timeout=60, node=node2)
    assert len(received) == 1
    assert len(list((tmp_path / "tps").glob("RS.*"))) == 1
    events = [e["event"] for e in node2.events()]
    assert events.count("job_done") == 1 and events.count("rtstruct_sent") == 1
