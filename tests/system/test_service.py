"""Running as a service: the systemd unit, the drop folder, live config reload."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmg_node.storage.dropfolder import scan
from dmg_node.storage.spool import Spool
from tests.support import DCMTK, LOCALHOST, dcmtk_env, running_node, write_series

ROOT = Path(__file__).resolve().parents[2]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (with ExecStart pointing at this install's binary)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd)")
    binary = Path(sys.executable).parent / "dmg-node"
    assert binary.exists(), f"{binary} missing: install the package first (pip install -e .)"
    unit = (ROOT / "systemd" / "dmg-node.service").read_text()
    assert "/opt/dmg-node/.venv/bin/dmg-node" in unit
    for needed in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/dmg-node", "PrivateTmp=yes",
                   "ProtectHome=yes", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "RestartPreventExitStatus=3",
                   "Restart=on-failure", "User=dmg-node", "KillSignal=SIGTERM"):
        assert needed in unit, needed
    path = tmp_path / "dmg-node.service"
    path.write_text(unit.replace("/opt/dmg-node/.venv/bin/dmg-node", str(binary)))
    r = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_drop_folder_scan_moves_each_file_once(tmp_path: Path) -> None:
    """Settled DICOM files are spooled and moved to done/; junk goes to failed/ with a reason; fresh files wait."""
    drop = tmp_path / "drop"
    write_series(drop / "media" / "DICOM", 3)
    (drop / "junk.txt").write_text("hello")
    old = time.time() - 60
    for p in drop.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    write_series(drop / "fresh", 1)  # mtime now: still being copied
    spool = Spool(tmp_path / "spool")
    result = scan(drop, spool, settle_seconds=5)
    assert (result.imported, result.failed, result.waiting) == (3, 1, 1)
    assert spool.instance_count() == 3
    assert len(list((drop / "done" / "media" / "DICOM").glob("*.dcm"))) == 3
    assert "not a readable DICOM" in (drop / "failed" / "junk.txt.reason.txt").read_text() or \
        "missing" in (drop / "failed" / "junk.txt.reason.txt").read_text()
    again = scan(drop, spool, settle_seconds=5)
    assert again.imported == 0 and spool.instance_count() == 3
    assert scan(drop, spool, settle_seconds=0).imported == 1


@pytest.mark.network
def test_drop_folder_and_live_config_reload(tmp_path: Path) -> None:
    """A running node imports dropped files, applies a new allow-list live, and says a port change needs a restart."""
    drop = tmp_path / "drop"
    sections = {"import": {"dir": str(drop), "settle_seconds": 0.5, "poll_seconds": 0.5}}
    with running_node(tmp_path, **sections) as node:  # type: ignore[arg-type]
        write_series(tmp_path / "staging", 2)
        drop.mkdir(exist_ok=True)
        for p in (tmp_path / "staging").iterdir():
            shutil.copy(p, drop / p.name)
        node.wait_event("import_scan", imported=2, timeout=30)
        assert len(list((drop / "done").glob("*.dcm"))) == 2

        text = node.config_path.read_text()
        text = text.replace("[access]\n", "") + '\n[access]\nallowed_calling_aets = ["PACS"]\n'
        text = text.replace(f"port = {node.port}", f"port = {node.port + 1}")
        node.config_path.write_text(text)
        node.wait_event("config_reloaded", timeout=30)
        restart = node.wait_event("config_change_needs_restart")
        assert restart["keys"] == ["node.port"]
        r = subprocess.run([DCMTK["echoscu"], "-aet", "SCANNER", "-aec", "DMG_NODE", LOCALHOST, str(node.port)],
                           capture_output=True, text=True, timeout=60, env=dcmtk_env())
        assert r.returncode != 0  # SCANNER is no longer allowed; the old port still serves
        r = subprocess.run([DCMTK["echoscu"], "-aet", "PACS", "-aec", "DMG_NODE", LOCALHOST, str(node.port)],
                           capture_output=True, text=True, timeout=60, env=dcmtk_env())
        assert r.returncode == 0

        node.config_path.write_text(text.replace("[assembly]\n", "[assembly]\nbogus = 1\n"))
        failed = node.wait_event("config_reload_failed", timeout=30)
        assert "unknown key 'assembly.bogus'" in failed["error"]


@pytest.mark.network
def test_model_hot_swap(tmp_path: Path) -> None:
    """A half-copied model is refused (the old one keeps serving); a complete new one loads without a restart."""
    import json

    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "demo-t2", models / "demo-t2")
    with running_node(tmp_path / "node", models={"dir": str(models)}) as node:
        loaded = node.wait_event("model_loaded", sequence="t2", timeout=60)
        old_version = loaded["version"]
        target = models / "demo-t2"
        weights = sorted(p for p in target.iterdir() if p.name.startswith("generator"))
        # half-copied: the weights are cut short, the manifest still lists the old sha256
        full = {p: p.read_bytes() for p in weights}
        for p in weights:
            p.write_bytes(full[p][: len(full[p]) // 2])
        failed = node.wait_event("model_reload_failed", sequence="t2", timeout=60)
        assert failed["kept"] == old_version
        # the complete new version: weights back, then the manifest with a new version
        for p in weights:
            p.write_bytes(full[p])
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["version"] = "9.9.9-test"
        (target / "manifest.json").write_text(json.dumps(manifest))
        reloaded = node.wait_event("model_reloaded", sequence="t2", timeout=60)
        assert reloaded["version"] == "9.9.9-test"
