"""dmg-node segment writes an RTSTRUCT that dciodvfy accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmg_node.cli import main
from tests.support import write_series


@pytest.mark.slow
def test_segment_writes_a_valid_rtstruct_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`segment SERIES_DIR --out RT.dcm` classifies, segments with the demo model and writes a valid RTSTRUCT."""
    import subprocess

    import numpy as np
    from pydicom import dcmread

    from dmg_node.dicomfiles import read_datasets
    from dmg_node.phantoms.phantom import make_case, write_dicom_study
    from dmg_node.rtstruct import read_roi_mask
    from dmg_node.volume import build_volume
    from tests.support import node_config, require_tool

    study = write_dicom_study(make_case(12, resolution_mm=2.0), tmp_path / "study", seed=12, geometry="small")
    t2 = next(s for s in study.series if s.sequence == "t2")
    cfg = node_config(tmp_path, 11112, models={"dir": str(Path(__file__).resolve().parents[2] / "models")})
    out = tmp_path / "rt.dcm"
    assert main(["segment", str(study.study_dir / t2.folder), "--out", str(out), "--config", str(cfg)]) == 0
    printed = capsys.readouterr()
    assert "t2" in printed.out
    assert "{" not in printed.out + printed.err  # human output; no JSON log lines mixed in (issue 21)
    r = subprocess.run([require_tool("dciodvfy"), str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rt = dcmread(out)
    # its own series, named after the sequence and the model, in the sequence's colour (issue 21)
    source_number = int(dcmread(next((study.study_dir / t2.folder).glob("*.dcm"))).SeriesNumber)
    assert rt.SeriesNumber == 9002 != source_number
    assert rt.StructureSetLabel == "DMG_AI T2"
    assert rt.SeriesDescription.startswith("AI DMG contour T2 demo-t2") and rt.SeriesDescription.endswith("UNAPPROVED")
    assert list(rt.ROIContourSequence[0].ROIDisplayColor) == [255, 255, 0]
    volume = build_volume(read_datasets(sorted((study.study_dir / t2.folder).glob("*.dcm"))))
    mask = read_roi_mask(rt, volume, "GTV_DMG_AI_T2")
    truth = np.load(study.study_dir / t2.truth).astype(bool)
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.5  # plumbing; model quality: test_infer
    # a folder with several series is refused with the list; a localizer is refused as not routable
    assert main(["segment", str(study.study_dir / "dicom"), "--out", str(out), "--config", str(cfg)]) == 1
    assert "exactly one series" in capsys.readouterr().err
    loc = write_series(tmp_path / "loc", 3, description="AAHead_Scout")
    assert main(["segment", str(loc[0].parent), "--out", str(out), "--config", str(cfg)]) == 1
    assert "--sequence to override" in capsys.readouterr().err
