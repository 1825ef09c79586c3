"""The RTSTRUCT carrying a contour-QA flag and the consensus ROI passes dciodvfy and reads back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom

from dmg_node.classify import Label
from dmg_node.rtstruct import read_roi_mask
from dmg_node.storage.spool import Spool
from dmg_node.volume import build_volume
from tests.support import require_tool
from tests.unit.test_qa import (
    _PHYSICS,
    DISPLACED,
    _models,
    _outbox_files,
    _run,
    _settings,
)
from tests.unit.test_qa import study  # noqa: F401, F811  (pytest fixtures)


def test_pipeline_adds_the_consensus_roi_and_the_file_passes_dciodvfy(study: tuple[Spool, str], tmp_path: Path) -> None:
    """consensus_on = "t2": the T2 RTSTRUCT gets a second ROI where >= 2 sequences agree; the flagged T1C one
    and the T2 one pass dciodvfy and read back (read_roi_mask) to the contoured masks."""
    spool, study_uid = study
    _run(spool, study_uid, _settings(consensus_on="t2"), DISPLACED)
    files = _outbox_files(spool)
    t2, t1c = files["GTV_DMG_AI_T2"], files["GTV_DMG_AI_T1C"]
    assert [str(r.ROIName) for r in t2.StructureSetROISequence] == ["GTV_DMG_AI_T2", "GTV_DMG_AI_CONSENSUS"]
    assert [int(r.ReferencedROINumber) for r in t2.ROIContourSequence] == [1, 2]
    assert [int(o.ObservationNumber) for o in t2.RTROIObservationsSequence] == [1, 2]
    series = {str(pydicom.dcmread(p[0]).SeriesDescription): p for p in spool.series_files(study_uid).values()}
    volumes = {seq: build_volume([pydicom.dcmread(p) for p in series[_PHYSICS[seq]["SeriesDescription"]]])
               for seq in ("t2", "t1c")}
    truth = {seq: _models(DISPLACED)[Label(seq)].models[0].predict(volumes[seq]) for seq in volumes}
    for rt, seq in ((t2, "t2"), (t1c, "t1c")):
        path = tmp_path / f"{seq}.dcm"
        rt.save_as(path, enforce_file_format=True)
        proc = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, timeout=60, check=False)
        lines = (proc.stdout + proc.stderr).decode(errors="replace").splitlines()
        assert proc.returncode == 0 and not [line for line in lines if "Error" in line], "\n".join(lines)
        name = str(rt.StructureSetROISequence[0].ROIName)
        assert np.array_equal(read_roi_mask(rt, volumes[seq], name), truth[seq])
    consensus_mask = read_roi_mask(t2, volumes["t2"], "GTV_DMG_AI_CONSENSUS")
    assert consensus_mask.any() and not (consensus_mask & ~truth["t2"]).any()
