"""DICOM SEGs we write, checked by real peers: dciodvfy finds no errors, and a `dmg-node serve` with
one destination asking for ["rtstruct", "seg"] and another for ["rtstruct"] delivers the right
objects to each DCMTK storescp, each once (issue 21 item 7)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import RTStructureSetStorage, SegmentationStorage

from dmg_node.phantoms.phantom import StudyManifest, make_case, write_dicom_study
from dmg_node.rtstruct import build_seg, read_roi_mask, save_rtstruct
from dmg_node.volume import build_volume
from tests.support import LOCALHOST, running_node, running_storescp
from tests.system.test_exactly_once import _send
from tests.system.test_loop import models_dir
from tests.unit.test_rtstruct import (
    GEOMETRIES,
    ROI,
    dciodvfy,
    make_enhanced,
    make_series,
    tumour,
)
from tests.unit.test_seg import SEG_META, bare_series, mask_from_seg


@pytest.mark.parametrize("name", ["axial", "oblique", "sagittal", "coronal", "negated", "enhanced", "bare"])
def test_dciodvfy_finds_no_error_in_the_seg(name: str, tmp_path: Path) -> None:
    """Single-frame stacks in every orientation, an Enhanced MR source and a source without Type 2 attributes give a SEG
    dciodvfy passes (QA note and a second segment included)."""
    source = ([make_enhanced(GEOMETRIES["oblique"])] if name == "enhanced" else bare_series() if name == "bare"
              else make_series(GEOMETRIES[name]))
    volume = build_volume(source)
    mask = tumour(volume.array.shape, hole=True)
    flagged = replace(ROI, description="QA FLAG: volume 0.4 ml below qa.min_ml 1.0")
    core = mask & (np.indices(mask.shape)[1] > volume.array.shape[1] // 2)
    seg = build_seg(source, volume, mask, flagged, SEG_META, extra_rois=[(replace(ROI, name="CONSENSUS"), core)])
    path = tmp_path / "seg.dcm"
    save_rtstruct(seg, path)
    warnings = dciodvfy(path)
    print(f"{name}: dciodvfy warnings {warnings}")
    assert np.array_equal(mask_from_seg(pydicom.dcmread(path), volume), mask)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyManifest:
    out = tmp_path_factory.mktemp("phantom")
    return write_dicom_study(make_case(35, resolution_mm=2.0), out / "study", seed=35, geometry="small")


def _received(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]


@pytest.mark.network
@pytest.mark.slow
def test_node_sends_the_seg_only_where_asked_each_once(tmp_path: Path, study: StudyManifest) -> None:
    """PACS (formats rtstruct + seg) gets the RTSTRUCT and the SEG of the T2 series, the TPS (rtstruct) only the RTSTRUCT; once each; the SEG holds the RTSTRUCT's voxels."""
    assert (models_dir() / "demo-t2" / "manifest.json").exists(), f"no demo models under {models_dir()}"
    with running_storescp(tmp_path / "tps", "TPS", "+uf") as (_tps, tps_port), \
            running_storescp(tmp_path / "pacs", "PACS", "+uf") as (_pacs, pacs_port):
        sections = {
            "assembly": {"quiet_seconds": 0.5}, "models": {"dir": str(models_dir())},
            "destinations": [
                {"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port, "formats": ["rtstruct"]},
                {"name": "pacs", "ae_title": "PACS", "host": LOCALHOST, "port": pacs_port,
                 "formats": ["rtstruct", "seg"]},
            ],
        }
        with running_node(tmp_path / "node", **sections) as node:
            t0 = time.monotonic()
            _send(study, node.port, ["t2"])
            node.wait_event("job_done", timeout=300)
            written = node.wait_event("seg_written", timeout=10)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and [e["event"] for e in node.events()].count("rtstruct_sent") < 3:
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            time.sleep(2)  # anything sent twice would arrive now
            events = node.events()
        tps, pacs = _received(tmp_path / "tps"), _received(tmp_path / "pacs")
    print(f"study to 3 objects delivered in {elapsed:.1f} s; SEG frames {written['frames']}")
    assert [e["event"] for e in events].count("rtstruct_sent") == 3
    assert [str(ds.SOPClassUID) for ds in tps] == [RTStructureSetStorage]
    assert sorted(str(ds.SOPClassUID) for ds in pacs) == sorted([RTStructureSetStorage, SegmentationStorage])
    rt = next(ds for ds in pacs if ds.SOPClassUID == RTStructureSetStorage)
    seg = next(ds for ds in pacs if ds.SOPClassUID == SegmentationStorage)
    assert rt.SOPInstanceUID == tps[0].SOPInstanceUID and seg.SOPInstanceUID == written["sop_uid"]
    series = next(s for s in study.series if s.sequence == "t2")
    volume = build_volume([pydicom.dcmread(p) for p in (study.study_dir / series.folder).glob("*.dcm")])
    roi_name = str(rt.StructureSetROISequence[0].ROIName)
    assert seg.SegmentSequence[0].SegmentLabel == roi_name
    assert np.array_equal(mask_from_seg(seg, volume), read_roi_mask(rt, volume, roi_name))
    assert "UNAPPROVED" in seg.SeriesDescription and seg.StudyInstanceUID == rt.StudyInstanceUID
