"""The Storage SCP against real DCMTK peers: echo, store, allow-list, bad input, disk errors."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from structlog.testing import capture_logs

from dmg_node.net.scp import Receiver, StoreStatus
from tests.fuzz_support import send_raw
from tests.support import DCMTK, LOCALHOST, dcmtk_env, mr_dataset, running_receiver, storescu, write_series

pytestmark = pytest.mark.network


@pytest.fixture
def scp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    overrides: dict[str, Any] = dict(getattr(request, "param", {}))
    min_free_mb = overrides.pop("storage", {}).get("min_free_mb", 1)
    with running_receiver(tmp_path / "spool", min_free_mb=min_free_mb, **overrides) as rx:
        yield rx


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def test_echoscu(scp: Receiver) -> None:
    """DCMTK echoscu gets a successful C-ECHO."""
    with capture_logs() as logs:
        r = _run([DCMTK["echoscu"], "-aet", "SCANNER", "-aec", "DMG_NODE", LOCALHOST, str(scp.port)])
    assert r.returncode == 0, r.stderr
    assert any(e["event"] == "echo_received" and e["calling_aet"] == "SCANNER" for e in logs)


def test_storescu_series_is_spooled_bit_identical(scp: Receiver, tmp_path: Path) -> None:
    """Every instance storescu sends is in the spool and the index, with the sent dataset bytes."""
    paths = write_series(tmp_path / "in", 12)
    with capture_logs() as logs:
        r = storescu(scp.port, tmp_path / "in")
    assert r.returncode == 0, r.stderr
    assert scp.spool.instance_count() == 12
    [study] = scp.spool.summary()
    assert study["series"][0]["instances"] == 12 and study["series"][0]["modality"] == "MR"
    for p in paths:
        sent = dcmread(p)
        stored = scp.spool.instance_path(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        got = dcmread(stored)
        assert got.PixelData == sent.PixelData and got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    stored_events = [e for e in logs if e["event"] == "instance_stored"]
    assert len(stored_events) == 12 and all(e["calling_aet"] == "SCANNER" for e in stored_events)
    assert any(e["event"] == "association_released" and e["stored"] == 12 for e in logs)


def test_compressed_transfer_syntaxes_are_accepted(scp: Receiver, tmp_path: Path) -> None:
    """JPEG lossless (-xs) and JPEG 2000 lossless (-xv) proposals are accepted and stored as sent."""
    write_series(tmp_path / "raw", 3)
    (tmp_path / "jpeg").mkdir()
    for p in sorted((tmp_path / "raw").iterdir()):
        assert _run([DCMTK["dcmcjpeg"], "+e1", str(p), str(tmp_path / "jpeg" / p.name)]).returncode == 0
    r = storescu(scp.port, tmp_path / "jpeg", "-xs")
    assert r.returncode == 0, r.stderr
    stored = sorted(scp.spool.root.rglob("*.dcm"))
    assert len(stored) == 3
    assert {str(dcmread(p).file_meta.TransferSyntaxUID) for p in stored} == {"1.2.840.10008.1.2.4.70"}


@pytest.mark.parametrize("scp", [{"access": {"allowed_calling_aets": ["SCANNER"]}}], indirect=True)
def test_calling_aet_allow_list(scp: Receiver, tmp_path: Path) -> None:
    """A caller outside the allow-list gets A-ASSOCIATE-RJ and a log line; an allowed one stores."""
    write_series(tmp_path / "in", 2)
    with capture_logs() as logs:
        r = storescu(scp.port, tmp_path / "in", aet="INTRUDER")
    assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
    assert scp.spool.instance_count() == 0
    [rej] = [e for e in logs if e["event"] == "association_rejected"]
    assert rej["calling_aet"] == "INTRUDER" and rej["reason"] == "calling AE title not allowed"
    assert storescu(scp.port, tmp_path / "in", aet="SCANNER").returncode == 0
    assert scp.spool.instance_count() == 2


def test_wrong_called_aet_rejected(scp: Receiver) -> None:
    """An association addressed to another AE title is rejected (require_called_aet)."""
    with capture_logs() as logs:
        r = _run([DCMTK["echoscu"], "-aet", "SCANNER", "-aec", "NOT_US", LOCALHOST, str(scp.port)])
    assert r.returncode != 0
    assert any(e["event"] == "association_rejected" and e["reason"] == "called AE title is not ours" for e in logs)


def test_duplicate_is_stored_once(scp: Receiver, tmp_path: Path) -> None:
    """The same SOP Instance sent twice is indexed once, and the duplicate is logged."""
    write_series(tmp_path / "in", 3)
    assert storescu(scp.port, tmp_path / "in").returncode == 0
    with capture_logs() as logs:
        assert storescu(scp.port, tmp_path / "in").returncode == 0
    assert scp.spool.instance_count() == 3
    assert len(list(scp.spool.root.rglob("*.dcm"))) == 3
    assert sum(e["event"] == "instance_duplicate" and e["kept"] == "later" for e in logs) == 3


def test_malformed_dataset_gets_failure_and_node_keeps_serving(scp: Receiver, tmp_path: Path) -> None:
    """Undecodable bytes get 0xC000 and a log line; the next good instance is stored."""
    uid = generate_uid()
    with capture_logs() as logs:
        status = send_raw(scp.port, b"\x08\x00\x18\x00UI\xff\x7fgarbage" * 3, uid, tmp_path)
    assert status is not None and 0xC000 <= status <= 0xCFFF  # "Cannot understand" range (PS3.4 B.2.3)
    assert any(e["event"] == "store_rejected" and e["status"] == f"0x{status:04X}" for e in logs)
    write_series(tmp_path / "in", 1)
    assert storescu(scp.port, tmp_path / "in").returncode == 0
    assert scp.spool.instance_count() == 1


def test_missing_uids_get_failure(scp: Receiver, tmp_path: Path) -> None:
    """A dataset without Study/Series Instance UID gets a 0xC0xx failure and is not stored."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = mr_dataset("1.2", "1.2.3", 0)
    del ds.StudyInstanceUID
    del ds.SeriesInstanceUID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    with capture_logs() as logs:
        status = send_raw(scp.port, buf.getvalue(), ds.SOPInstanceUID, tmp_path)
    assert status == StoreStatus.MISSING_UID
    assert [e["reason"] for e in logs if e["event"] == "store_rejected"] == [
        "missing StudyInstanceUID, SeriesInstanceUID"]
    assert scp.spool.instance_count() == 0


def test_write_error_answers_out_of_resources(scp: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError while writing (e.g. a full disk) answers 0xA700, never success, and stores nothing."""
    def full(*_a: Any, **_k: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scp.spool, "store", full)
    write_series(tmp_path / "in", 2)
    with capture_logs() as logs:
        r = storescu(scp.port, tmp_path / "in", "-nh", "-v")
    assert "Refused: OutOfResources" in r.stdout + r.stderr
    assert sum(e["event"] == "store_failed" and e["status"] == "0xA700" for e in logs) >= 1
    assert not any(e["event"] == "instance_stored" for e in logs)


@pytest.mark.parametrize("scp", [{"storage": {"min_free_mb": 10**8}}], indirect=True)
def test_low_disk_reserve_refuses(scp: Receiver, tmp_path: Path) -> None:
    """Below the free-space reserve the SCP answers 0xA700 and logs a warning, before the disk is full."""
    write_series(tmp_path / "in", 1)
    with capture_logs() as logs:
        storescu(scp.port, tmp_path / "in")
    assert any(e["event"] == "store_refused_low_disk" and e["status"] == "0xA700" for e in logs)
    assert scp.spool.instance_count() == 0
