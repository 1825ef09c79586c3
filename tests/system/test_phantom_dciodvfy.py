"""Phantom DICOM series pass dciodvfy."""

from __future__ import annotations

import subprocess

import pytest

from dmg_node.phantoms.phantom import (
    StudyManifest,
)
from tests.support import require_tool
from tests.unit.test_phantom import case, cases, study  # noqa: F401, F811  (pytest fixtures)


@pytest.mark.parametrize("sequence", ["t2", "t1c"])
def test_dciodvfy_finds_no_errors(study: StudyManifest, sequence: str) -> None:
    """dciodvfy (dicom3tools) reports no errors for a generated MR instance (warnings are allowed)."""
    entry = next(s for s in study.series if s.sequence == sequence)
    path = sorted((study.study_dir / entry.folder).glob("*.dcm"))[0]
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    assert "Error" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 0
