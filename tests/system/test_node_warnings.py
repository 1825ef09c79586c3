"""A node that cannot contour says so: at start-up, in its status file and when a job ends (issue 21)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dmg_node import config
from dmg_node.config import Destination
from dmg_node.net.scu import store_files
from dmg_node.node import Node
from tests.support import LOCALHOST, free_port, running_node, write_series

ROOT = Path(__file__).resolve().parents[2]


def test_no_model_is_a_warning_at_start_and_when_a_job_ends(tmp_path: Path) -> None:
    """With no model, start-up warns per sequence and lists models_missing; a T2 series then ends in a
    warning-level job_done naming the series and the reason."""
    settings = config.from_dict({
        "node": {"host": LOCALHOST, "port": free_port()},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "assembly": {"quiet_seconds": 0.5, "poll_seconds": 0.05},
        "models": {"dir": str(tmp_path / "no-models")},
    })
    node = Node(settings, models={})
    paths = write_series(tmp_path / "t2", 3, description="T2 TSE AX")
    with capture_logs() as logs:
        node.start()
        try:
            dest = Destination("node", "DMG_NODE", LOCALHOST, node.receiver.port)
            assert all(r.ok for r in store_files(paths, dest, "SCANNER", timeout=60))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(e["event"] == "job_done" for e in logs):
                time.sleep(0.05)
        finally:
            node.stop(grace_seconds=5)
    [started] = [e for e in logs if e["event"] == "node_started"]
    assert started["models_missing"] == ["t1c", "t2", "flair"]
    missing = [e for e in logs if e["event"] == "sequence_without_model"]
    assert [e["sequence"] for e in missing] == ["t1c", "t2", "flair"]
    assert all(e["log_level"] == "warning" for e in missing)
    [done] = [e for e in logs if e["event"] == "job_done"]
    assert done["log_level"] == "warning" and done["rtstructs"] == 0
    [skipped] = done["not_contoured"]
    assert skipped["label"] == "t2" and skipped["reason"] == "no usable model"


@pytest.mark.slow
def test_serve_from_another_folder_finds_its_models(tmp_path: Path) -> None:
    """`serve` started outside the checkout, with relative paths in its config, loads every model and puts
    the spool beside the config file (not in the current folder)."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    models = Path(os.environ.get("DMG_TEST_MODELS_DIR", ROOT / "models"))
    with running_node(conf, cwd=elsewhere, storage={"root": "spool"},
                      models={"dir": os.path.relpath(models, conf)}) as node:
        started = node.wait_event("node_started")
    assert started["models_missing"] == []
    assert set(started["models"]) == {"t1c", "t2", "flair"}
    assert (conf / "spool" / "index.sqlite3").is_file()
    assert not (elsewhere / "spool").exists()
