"""Large data sets go to the spool as they arrive (issue 19 item 4, dmg_node.net.streamed).

A data set over ``node.spool_in_memory_mb`` is written to ``storage.root/incoming`` fragment by
fragment and renamed into the spool; the node's peak memory (VmHWM of a ``dmg-node serve``
subprocess) grows by far less than the instance. A data set cut off half-way, or refused, leaves
no file and no index row. Bounded in time; every process started is stopped.
"""

from __future__ import annotations

import errno
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dmg_node.net import streamed
from dmg_node.net.status import StoreStatus
from tests import rawdicom
from tests.support import DCMTK, LOCALHOST, dcmtk_env, mr_dataset, running_node, running_receiver, stop_process
from tests.system.test_hostile import _encoded, _status_mb

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

_MB = 1024 * 1024
_STUDY = "1.2.826.0.1.3680043.8.498.7"
_SERIES = "1.2.826.0.1.3680043.8.498.7.1"


@pytest.fixture(params=[True, False], ids=["fast_path", "stock"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _big_file(path: Path, index: int, size_mb: int) -> Path:
    """An MR instance with a private OB element of *size_mb* in group 0009, before the study UIDs
    (so the header the index reads lies behind it)."""
    ds = mr_dataset(_STUDY, _SERIES, index)
    ds.SOPInstanceUID = generate_uid()
    block = ds.private_block(0x0009, "DMG STREAM TEST", create=True)
    block.add_new(0x00, "OB", bytes(range(256)) * (size_mb * _MB // 256))
    ds.save_as(path, enforce_file_format=True)
    return path


def _data_set(path: Path) -> bytes:
    """The bytes after the File Meta group (whose group length is its first element)."""
    raw = path.read_bytes()
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return raw[132 + 12 + group_length:]


def _hwm_mb(pid: int) -> float:
    return _status_mb(str(pid), "VmHWM")


def _send(port: int, *files: Path) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([DCMTK["storescu"], "-aet", "SCANNER", "-aec", "DMG_NODE", LOCALHOST, str(port), str(f)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
            for f in files]


def _wait_all(procs: list[subprocess.Popen[str]], timeout: float = 200) -> None:
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            stop_process(p)


def _indexed(spool: Path) -> int:
    with sqlite3.connect(spool / "index.sqlite3") as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def test_a_200_mb_instance_is_stored_bit_identical_without_holding_it(tmp_path: Path) -> None:
    """storescu sends a 200 MB instance to a node subprocess: stored bit-identical, streamed, and
    the node's peak RSS grows by under 60 MB (in memory it took several times the instance)."""
    src = _big_file(tmp_path / "big.dcm", 1, 200)
    with running_node(tmp_path / "node") as node:
        hwm0 = _hwm_mb(node.proc.pid)
        t0 = time.monotonic()
        _wait_all(_send(node.port, src))
        seconds = time.monotonic() - t0
        grown = _hwm_mb(node.proc.pid) - hwm0
        stored = node.wait_event("instance_stored", timeout=30)
    spool = tmp_path / "node" / "spool"
    files = list((spool / "studies").rglob("*.dcm"))
    assert stored["streamed"] is True and len(files) == 1
    assert _data_set(files[0]) == _data_set(src)
    assert list((spool / "incoming").iterdir()) == []
    print(f"200 MB: {seconds:.1f} s, VmHWM +{grown:.0f} MB")  # noqa: T201 - a figure for docs/reliability.md
    assert grown < 60, f"VmHWM +{grown:.0f} MB"


def test_several_large_instances_at_once_are_not_held(tmp_path: Path) -> None:
    """Three 100 MB instances on three associations at once: all stored, peak RSS under +100 MB."""
    srcs = [_big_file(tmp_path / f"big{i}.dcm", i, 100) for i in range(3)]
    with running_node(tmp_path / "node") as node:
        hwm0 = _hwm_mb(node.proc.pid)
        _wait_all(_send(node.port, *srcs))
        grown = _hwm_mb(node.proc.pid) - hwm0
    spool = tmp_path / "node" / "spool"
    assert len(list((spool / "studies").rglob("*.dcm"))) == 3 and _indexed(spool) == 3
    assert list((spool / "incoming").iterdir()) == []
    print(f"3 x 100 MB at once: VmHWM +{grown:.0f} MB")  # noqa: T201
    assert grown < 100, f"VmHWM +{grown:.0f} MB"


def _start_large_store(a: rawdicom.RawAssociation, sop_class: str, sop_uid: str, head: bytes, fragments: int) -> None:
    a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, sop_class, sop_uid)))
    a.send(rawdicom.p_data(1, 0, head))
    chunk = rawdicom.p_data(1, 0, b"\x00" * 16000)
    for _ in range(fragments):
        a.send(chunk)


def _wait_until(check: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(check) and check():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["close", "a_abort"])
def test_a_peer_that_stops_mid_instance_leaves_no_file_and_no_row(tmp_path: Path, fast_path: bool, how: str) -> None:
    """5 MB of a data set over spool_in_memory_mb (1), then the peer closes or sends an A-ABORT:
    the temp file in incoming/ goes away and nothing is indexed; the node goes on serving."""
    ds = mr_dataset(_STUDY, _SERIES, 5)
    head = _encoded(ds)
    spool = tmp_path / "spool"
    node = {"fast_path": fast_path, "spool_in_memory_mb": 1}
    with running_receiver(spool, node=node) as rx:
        with rawdicom.RawAssociation(rx.port) as a:
            assert a.associate() == 2
            _start_large_store(a, str(ds.SOPClassUID), str(ds.SOPInstanceUID), head, 5 * _MB // 16000)
            assert _wait_until(lambda: any((spool / "incoming").iterdir()), 10), "nothing was spilled"
            if how == "a_abort":
                a.send(rawdicom.pdu(0x07, bytes(4)))
        assert _wait_until(lambda: not any((spool / "incoming").iterdir()), 10), "temp file left behind"
        with rawdicom.RawAssociation(rx.port) as b:
            assert b.associate() == 2
            b.send(rawdicom.p_data(3, 3, rawdicom.c_echo_rq(1)))
            assert b.response_status() == 0
    assert _indexed(spool) == 0 and not list((spool / "studies").rglob("*.dcm"))


def test_a_spilled_data_set_that_is_refused_leaves_no_file(tmp_path: Path, fast_path: bool) -> None:
    """Spilled data sets answered with a failure leave incoming/ empty: one whose SOP Instance UID
    differs from the request's (0xA900), one over max_instance_mb (0xA700); a spilled one that
    matches is stored on the same association."""
    spool = tmp_path / "spool"
    node = {"fast_path": fast_path, "spool_in_memory_mb": 1, "max_instance_mb": 4}
    with running_receiver(spool, node=node) as rx, rawdicom.RawAssociation(rx.port) as a:
        assert a.associate() == 2
        ds = mr_dataset(_STUDY, _SERIES, 6)
        ds.add_new(0x7FE00010, "OB", bytes(2 * _MB))
        data = _encoded(ds)
        a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, str(ds.SOPClassUID), "1.2.3.999")))
        for i in range(0, len(data), 16000):
            a.send(rawdicom.p_data(1, 2 if i + 16000 >= len(data) else 0, data[i:i + 16000]))
        assert a.response_status() == StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        _start_large_store(a, str(ds.SOPClassUID), str(ds.SOPInstanceUID), data[:16000], 5 * _MB // 16000)
        a.send(rawdicom.p_data(1, 2, b"\x00" * 16))
        assert a.response_status() == StoreStatus.OUT_OF_RESOURCES
        assert not any((spool / "incoming").iterdir())
        a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(2, str(ds.SOPClassUID), str(ds.SOPInstanceUID))))
        for i in range(0, len(data), 16000):
            a.send(rawdicom.p_data(1, 2 if i + 16000 >= len(data) else 0, data[i:i + 16000]))
        assert a.response_status() == StoreStatus.SUCCESS
    files = list((spool / "studies").rglob("*.dcm"))
    assert len(files) == 1 and files[0].read_bytes().endswith(data)
    assert not any((spool / "incoming").iterdir()) and _indexed(spool) == 1


def test_a_full_disk_half_way_gets_out_of_resources_and_the_association_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spill file's writes fail after 3 MB (ENOSPC): the request gets 0xA700 when complete,
    incoming/ is empty, and the next C-STORE on the same association is stored."""
    real_write = streamed.StreamedDataSet._write

    def failing(self: streamed.StreamedDataSet, data: bytes) -> None:
        if self.size > 3 * _MB:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(streamed.StreamedDataSet, "_write", failing)
    spool = tmp_path / "spool"
    ds = mr_dataset(_STUDY, _SERIES, 7)
    with running_receiver(spool, node={"spool_in_memory_mb": 1}) as rx, rawdicom.RawAssociation(rx.port) as a:
        assert a.associate() == 2
        _start_large_store(a, str(ds.SOPClassUID), str(ds.SOPInstanceUID), _encoded(ds), 5 * _MB // 16000)
        a.send(rawdicom.p_data(1, 2, b"\x00" * 16))
        assert a.response_status() == StoreStatus.OUT_OF_RESOURCES
        assert not any((spool / "incoming").iterdir())
        small = mr_dataset(_STUDY, _SERIES, 8)
        a.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(2, str(small.SOPClassUID), str(small.SOPInstanceUID))))
        a.send(rawdicom.p_data(1, 2, _encoded(small)))
        assert a.response_status() == StoreStatus.SUCCESS
    assert _indexed(spool) == 1
