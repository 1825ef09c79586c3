"""CLI commands that work offline: classify, and usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmg_node.cli import main
from tests.support import write_series


def test_classify_json_lists_every_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`classify PATH --json` prints one row per series found, with the table's fields (description, instances)."""
    t2 = write_series(tmp_path / "t2", 3, description="T2 TSE AX")
    loc = write_series(tmp_path / "loc", 3, description="AAHead_Scout")
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert main(["classify", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {tuple(sorted(r)) for r in rows} == {("instances", "label", "reason", "series_description",
                                                  "series_instance_uid")}
    from pydicom import dcmread

    by_uid = {r["series_instance_uid"]: r for r in rows}
    assert by_uid[dcmread(t2[0]).SeriesInstanceUID]["label"] == "t2"
    assert by_uid[dcmread(t2[0]).SeriesInstanceUID]["series_description"] == "T2 TSE AX"
    assert by_uid[dcmread(t2[0]).SeriesInstanceUID]["instances"] == 3
    assert by_uid[dcmread(loc[0]).SeriesInstanceUID]["label"] == "none"


def test_classify_table_and_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json a readable table is printed; a missing path exits 1 with a message."""
    write_series(tmp_path / "t2", 2)
    assert main(["classify", str(tmp_path)]) == 0
    assert "t2" in capsys.readouterr().out
    assert main(["classify", str(tmp_path / "nope")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_unknown_command_is_usage_error() -> None:
    """An unknown sub-command exits with argparse's usage code 2."""
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2




def test_status_lists_each_sequences_models_in_order() -> None:
    """`status` names every model of a sequence, in the order series are offered to them."""
    import time

    from dmg_node import config
    from dmg_node.cli import _format_status

    members = [{"name": "demo-t2-3d", "version": "0.1.0", "device": "cpu/onnx", "max_spacing_mm": 2.0},
               {"name": "demo-t2", "version": "0.2.0", "device": "cpu/onnx", "max_spacing_mm": None}]
    node = {"ae_title": "DMG_NODE", "port": 11112, "pid": 1, "started_at": time.time(), "associations": 0,
            "models": {"t2": {"name": "demo-t2-3d+demo-t2", "version": "0.1.0+0.2.0", "device": "cpu/onnx",
                              "members": members},
                       "flair": {"name": "demo-flair", "version": "0.1.0", "device": "cpu/onnx"}}}
    text = _format_status({"node": node, "studies": [], "outbox": []}, config.from_dict({}))
    assert "model t2: demo-t2-3d 0.1.0 (series <= 2 mm), then demo-t2 0.2.0 on cpu/onnx" in text
    assert "model flair: demo-flair 0.1.0 on cpu/onnx" in text  # a status file written before model lists


def test_status_on_a_folder_without_spool_says_so_and_creates_nothing(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`status` pointed at a wrong spool path exits 1 saying there is no spool there, and leaves no spool behind."""
    from tests.support import node_config

    cfg = node_config(tmp_path, 11112)
    assert main(["status", "--config", str(cfg)]) == 1
    assert f"no spool at {tmp_path / 'spool'}" in capsys.readouterr().err
    assert not (tmp_path / "spool").exists()


def test_status_warns_about_a_sequence_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A configured sequence whose model folder is missing is a WARNING in `status` and in `status --json`."""
    from dmg_node.storage.spool import Spool
    from tests.support import node_config

    root = Path(__file__).resolve().parents[2] / "models"
    cfg = node_config(tmp_path, 11112, models={"dir": str(root), "t1c": "no-such-model"})
    Spool(tmp_path / "spool").close()
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: no usable model for t1c (configured: no-such-model" in out
    assert "for t2" not in out and "for flair" not in out
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models_missing"] == ["t1c"] and len(report["warnings"]) == 1


def test_echo_to_a_closed_port_says_connection_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`echo` to a port where nothing listens says "connection refused" (not "association aborted") and exits 1."""
    from tests.support import LOCALHOST, free_port, node_config

    cfg = node_config(tmp_path, 11112, destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST,
                                                      "port": free_port()}])
    assert main(["echo", "--config", str(cfg), "--timeout", "5"]) == 1
    out = capsys.readouterr().out
    assert "C-ECHO FAILED status=no-association" in out and "connection refused" in out
    assert "association aborted" not in out
