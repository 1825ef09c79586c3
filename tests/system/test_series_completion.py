"""Series-level completion with a real `dmg-node serve` and DCMTK storescp as the TPS, on 127.0.0.1:
the T2's RTSTRUCT is acknowledged before the FLAIR series is even sent (issue 21 item 4)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dmg_node.phantoms.phantom import StudyManifest, make_case, write_dicom_study
from tests.support import LOCALHOST, running_node, running_storescp
from tests.system.test_exactly_once import _by_series, _send
from tests.system.test_loop import models_dir

pytestmark = [pytest.mark.network, pytest.mark.slow]

QUIET = 30.0  # the study rule: long enough that only the series rule can contour the T2 before the FLAIR


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    out = tmp_path_factory.mktemp("phantom")
    return write_dicom_study(make_case(35, resolution_mm=2.0), out / "study", seed=35, geometry="small")


def _wait_for_series(folder: Path, series_uid: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while series_uid not in _by_series(folder):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no RTSTRUCT for series {series_uid} at the TPS within {timeout} s")
        time.sleep(0.2)


def test_t2_contour_reaches_the_tps_before_the_flair_is_sent(tmp_path: Path, study: StudyManifest) -> None:
    """completion = "series": a T2 sent alone is contoured and acknowledged by the TPS while the
    study is still open; the FLAIR sent afterwards gets its own series job; the study rule's final
    pass makes nothing new (both reused): one RTSTRUCT per series at the TPS."""
    uids = {s.sequence: s.series_instance_uid for s in study.series}
    assert all((models_dir() / f"demo-{seq}" / "manifest.json").exists() for seq in ("t2", "flair"))
    with running_storescp(tmp_path / "tps", "TPS", "+uf") as (_tps, tps_port):
        with running_node(tmp_path / "node",
                          assembly={"quiet_seconds": QUIET, "completion": "series", "series_quiet_seconds": 1.0},
                          models={"dir": str(models_dir())},
                          destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST,
                                         "port": tps_port}]) as node:
            _send(study, node.port, ["t2"])
            t2_sent = time.monotonic()
            _wait_for_series(tmp_path / "tps", uids["t2"], timeout=QUIET - 2)
            t2_latency = time.monotonic() - t2_sent
            assert not any(e["event"] == "study_complete" for e in node.events())
            assert set(_by_series(tmp_path / "tps")) == {uids["t2"]}  # before the FLAIR is sent
            _send(study, node.port, ["flair"])
            flair_sent = time.monotonic()
            _wait_for_series(tmp_path / "tps", uids["flair"], timeout=120)
            flair_latency = time.monotonic() - flair_sent
            node.wait_event("study_complete", timeout=QUIET + 30)
            deadline = time.monotonic() + 120
            while [e["event"] for e in node.events()].count("job_done") < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            events = node.events()
        received = _by_series(tmp_path / "tps")
    print(f"series mode: T2 RTSTRUCT at the TPS {t2_latency:.1f} s after the T2's last instance, "
          f"FLAIR {flair_latency:.1f} s (study rule: quiet_seconds {QUIET:g})")
    names = [e["event"] for e in events]
    assert names.count("series_complete") == 2 and names.count("study_complete") == 1
    assert names.count("job_done") == 3
    assert sorted(e["label"] for e in events if e["event"] == "rtstruct_reused") == ["flair", "t2"]
    assert received == {k: v for k, v in received.items() if k in (uids["t2"], uids["flair"])}
    assert len(received) == 2 and all(len(sops) == 1 for sops in received.values()), received
