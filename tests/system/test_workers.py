"""The node's worker threads outlive index failures, and stray Python warnings become log events."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from dmg_node import config
from dmg_node.errors import SpoolError
from dmg_node.node import Node
from tests.support import LOCALHOST, free_port


def _settings(tmp_path: Path) -> config.Settings:
    return config.from_dict({
        "node": {"host": LOCALHOST, "port": free_port()},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "assembly": {"quiet_seconds": 0, "poll_seconds": 0.05},
        "models": {"dir": str(tmp_path / "models")},
        "web": {"enabled": False},
    })


def _failing_once(real: Any, times: int) -> Any:
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise SpoolError("database or disk is full")
        return real(*args, **kwargs)

    return flaky


def test_assembler_and_job_threads_survive_a_full_index(tmp_path: Path) -> None:
    """enqueue, claim_job and finish_job failing (SQLITE_FULL) are logged as worker_error; the
    threads stay alive and the study is processed once the index can be written again."""
    from tests.unit.test_spool import _rec

    node = Node(_settings(tmp_path), models={})
    node.spool.enqueue = _failing_once(node.spool.enqueue, 2)  # type: ignore[method-assign]
    node.spool.claim_job = _failing_once(node.spool.claim_job, 2)  # type: ignore[method-assign]
    node.spool.finish_job = _failing_once(node.spool.finish_job, 1)  # type: ignore[method-assign]
    with capture_logs() as logs:
        node.start()
        try:
            node.spool.store(b"not a DICOM file", _rec(t=time.time() - 10))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(e["event"] == "job_done" for e in logs):
                time.sleep(0.05)
            alive = {t.name: t.is_alive() for t in node._threads}
        finally:
            node.stop(grace_seconds=5)
    errors = [e for e in logs if e["event"] == "worker_error"]
    assert {e["worker"] for e in errors} == {"assembler", "jobs"} and len(errors) == 5, errors
    assert alive == {"assembler": True, "jobs": True, "maintenance": True}
    assert any(e["event"] == "job_done" for e in logs)


def test_python_warnings_are_json_log_events_without_the_quoted_value(tmp_path: Path) -> None:
    """A library's warnings.warn becomes one python_warning JSON line, not plain text, and the value
    it quotes (possibly a patient's name) is left out unless include_phi is on."""
    import json

    from dmg_node import logs as logs_module

    for include_phi, expected in ((False, "Invalid value for VR PN: '...'"), (True, "Invalid value for VR PN: 'DOE^JANE'")):
        out = tmp_path / f"log-{include_phi}.jsonl"
        with out.open("w") as stream, warnings.catch_warnings():
            logs_module.configure("info", "json", include_phi=include_phi, stream=stream)
            warnings.simplefilter("always")
            warnings.showwarning = logs_module._warning_to_log
            warnings.warn("Invalid value for VR PN: 'DOE^JANE'", UserWarning, stacklevel=1)
        [event] = [json.loads(line) for line in out.read_text().splitlines()]
        assert event["event"] == "python_warning" and event["category"] == "UserWarning"
        assert event["message"] == expected


@pytest.fixture(autouse=True)
def _restore_showwarning() -> Any:
    saved = warnings.showwarning
    yield
    warnings.showwarning = saved
