"""CLI commands that work offline: classify, and usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmg_node.cli import main
from tests.support import write_series


def test_classify_json_lists_every_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`classify PATH --json` prints one {series_instance_uid, label, reason} per series found."""
    t2 = write_series(tmp_path / "t2", 3, description="T2 TSE AX")
    loc = write_series(tmp_path / "loc", 3, description="AAHead_Scout")
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert main(["classify", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {tuple(sorted(r)) for r in rows} == {("label", "reason", "series_instance_uid")}
    from pydicom import dcmread

    by_uid = {r["series_instance_uid"]: r for r in rows}
    assert by_uid[dcmread(t2[0]).SeriesInstanceUID]["label"] == "t2"
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
