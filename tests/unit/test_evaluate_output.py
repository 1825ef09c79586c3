"""`evaluate-output`: the node's own RTSTRUCTs against references on the same series (issue 21)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmg_node.cli import main
from dmg_node.phantoms.phantom import StudyManifest, make_case, write_dicom_study
from tests.support import node_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyManifest, Path, Path]:
    """A small phantom study with reference RTSTRUCTs, and the T2 RTSTRUCT the node's pipeline makes of it."""
    tmp = tmp_path_factory.mktemp("evaluate-output")
    study = write_dicom_study(make_case(12, resolution_mm=2.0), tmp / "study", seed=12, geometry="small",
                              reference_rtstruct=True)
    cfg = node_config(tmp, 11112, models={"dir": str(ROOT / "models")})
    t2 = next(s for s in study.series if s.sequence == "t2")
    sent = tmp / "tps"
    sent.mkdir()
    assert main(["segment", str(study.study_dir / t2.folder), "--out", str(sent / "RS.t2.dcm"),
                 "--config", str(cfg)]) == 0
    return study, sent, cfg


def _rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.startswith("t2 ") and "median" not in line]


@pytest.mark.slow
def test_against_reference_rtstructs_and_phantom_truth(segmented: tuple[StudyManifest, Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The node's T2 RTSTRUCT is compared with the reference RTSTRUCT on its series, and with the phantom's
    truth when the study was written without --rtstruct, or with a NIfTI mask on the series grid; each gives
    the evaluate table with the same Dice."""
    study, sent, cfg = segmented
    capsys.readouterr()
    assert main(["evaluate-output", "--rtstructs", str(sent), "--reference", str(study.study_dir),
                 "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "Dice" in out and "HD95 mm" in out and "t2 dice: median" in out
    [row] = _rows(out)
    with_rtstruct = float(row[2])
    assert 0.5 < with_rtstruct <= 1.0
    # the same study without its reference RTSTRUCTs: the phantom's manifest.json truth is the reference
    bare = tmp_path / "bare"
    shutil.copytree(study.study_dir, bare, ignore=lambda _d, names: [n for n in names if "rtstruct" in n.lower()])
    assert main(["evaluate-output", "--rtstructs", str(sent), "--reference", str(bare), "--config", str(cfg)]) == 0
    [row] = _rows(capsys.readouterr().out)
    assert abs(float(row[2]) - with_rtstruct) < 0.05
    # neither: a NIfTI mask named after the series, on its grid (LPS -> RAS, array (k, j, i) -> (i, j, k))
    import nibabel as nib
    import numpy as np

    from dmg_node.dicomfiles import read_datasets
    from dmg_node.volume import build_volume

    (bare / "manifest.json").unlink()
    t2 = next(s for s in study.series if s.sequence == "t2")
    volume = build_volume(read_datasets(sorted((bare / t2.folder).glob("*.dcm"))))
    truth = np.load(study.study_dir / t2.truth).astype(np.uint8)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(truth.transpose(2, 1, 0), lps_to_ras @ volume.affine),
             str(bare / f"{t2.series_instance_uid}.nii.gz"))
    assert main(["evaluate-output", "--rtstructs", str(sent), "--reference", str(bare), "--config", str(cfg)]) == 0
    [row] = _rows(capsys.readouterr().out)
    assert abs(float(row[2]) - with_rtstruct) < 0.05


@pytest.mark.slow
def test_reads_the_spool_outbox_and_reports_what_it_cannot_compare(segmented: tuple[StudyManifest, Path, Path],
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A spool is read through its outbox; with no reference for the series, it exits 1 and says why."""
    from dmg_node.storage.spool import Spool

    study, sent, cfg = segmented
    Spool(tmp_path / "spool").close()
    shutil.copy(sent / "RS.t2.dcm", tmp_path / "spool" / "outbox" / "x.dcm")
    capsys.readouterr()
    assert main(["evaluate-output", "--rtstructs", str(tmp_path / "spool"), "--reference", str(study.study_dir),
                 "--config", str(cfg)]) == 0
    assert len(_rows(capsys.readouterr().out)) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate-output", "--rtstructs", str(sent), "--reference", str(empty), "--config", str(cfg)]) == 1
    assert "is not under" in capsys.readouterr().err


def test_evaluate_writes_its_report_outside_the_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate` without --report writes to ./evaluation/<model>-<timestamp>, never into the model folder."""
    from dmg_node.training import evaluate as evaluate_mod

    seen: list[Path] = []

    def fake(model: Path, data: Path, report_dir: Path, **_kw: object) -> evaluate_mod.Evaluation:
        seen.append(report_dir)
        return evaluate_mod.Evaluation("m", "t2", (), {})

    monkeypatch.setattr(evaluate_mod, "evaluate", fake)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--model", str(ROOT / "models" / "demo-t2"), "--data", str(tmp_path)]) == 0
    [report] = seen
    assert report.parts[0] == "evaluation" and report.name.startswith("demo-t2-")
    assert (ROOT / "models") not in report.resolve().parents
