"""Test helpers: free ports, small MR series on disk, DCMTK/Orthanc runners, a node subprocess.

Every process started here is bounded in time and stopped (killed if it will not stop) by the
context manager that started it; every socket is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LOCALHOST = "127.0.0.1"
DCMTK = {name: f"/usr/bin/{name}" for name in ("storescu", "storescp", "echoscu", "dcmdump", "dcmcjpeg", "dcmdjpeg")}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until something listens on 127.0.0.1:*port* (fail early if *proc* died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((LOCALHOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {LOCALHOST}:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within *timeout* seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: TCP_NODELAY=1 or every image waits ~50 ms on Nagle."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, folder: Path, *extra: str, aet: str = "SCANNER", aec: str = "DMG_NODE",
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu of every file under *folder* in one association to 127.0.0.1:*port*."""
    return subprocess.run([DCMTK["storescu"], "-aet", aet, "-aec", aec, *extra, "+sd", "+r", LOCALHOST, str(port),
                           str(folder)], capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def mr_dataset(
    study_uid: str, series_uid: str, index: int, *, rows: int = 64, cols: int = 64,
    patient_name: str = "DOE^JANE", description: str = "T2 TSE AX", seed: int = 0,
) -> Dataset:
    """One classic MR Image Storage slice (axial, 1 mm pixels, 4 mm slices) with 12-bit pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    sop_uid = generate_uid(entropy_srcs=[series_uid, str(index)])
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.Modality = "MR"
    ds.PatientName = patient_name
    ds.PatientID = "PID-SECRET-123"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 3, index + 1
    ds.SeriesDescription = description
    ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", ["SK", "SP"], "2D"
    ds.RepetitionTime, ds.EchoTime = 5000, 100
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-cols / 2, -rows / 2, 4.0 * index]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 4.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(seed + index)
    ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
    return ds


def write_series(folder: Path, n: int, **kw: Any) -> list[Path]:
    """Write an *n*-slice MR series into *folder*; returns the file paths in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = kw.pop("study_uid", None) or generate_uid()
    series_uid = kw.pop("series_uid", None) or generate_uid()
    paths = []
    for i in range(n):
        ds = mr_dataset(study_uid, series_uid, i, **kw)
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


@dataclass
class NodeProcess:
    """A `dmg-node serve` subprocess with its own config and spool under a temp dir."""

    workdir: Path
    port: int
    config_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited ({self.proc.returncode}) while waiting for {name}:\n"
                                   + self.log_path.read_text()[-3000:])
            time.sleep(0.1)
        raise TimeoutError(f"no {name} {match} within {timeout} s:\n" + self.log_path.read_text()[-3000:])

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            stop_process(self.proc, timeout)
        return int(self.proc.returncode)


def node_config(workdir: Path, port: int, **sections: dict[str, Any]) -> Path:
    """Write a node.toml for a test node: loopback, its own spool, fast polling, no models."""
    base: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "DMG_NODE", "host": LOCALHOST, "port": port},
        "storage": {"root": str(workdir / "spool"), "min_free_mb": 1},
        "assembly": {"quiet_seconds": 2.0, "poll_seconds": 0.2},
        "outbox": {"poll_seconds": 0.2, "retry_initial_seconds": 0.5, "retry_max_seconds": 2.0},
        "models": {"dir": str(workdir / "no-models")},
        "logging": {"level": "info", "format": "json"},
        "web": {"enabled": False},  # a test that wants the status page sets enabled and a free port
    }
    destinations = sections.pop("destinations", [])
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    lines = []
    for section, values in base.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for d in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml(v)}" for k, v in d.items()]
    path = workdir / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: Any) -> str:
    return json.dumps([str(x) if isinstance(x, Path) else x for x in v] if isinstance(v, list) else
                      (str(v) if isinstance(v, Path) else v))


@contextlib.contextmanager
def running_node(workdir: Path, port: int | None = None, cwd: Path | None = None,
                 **sections: Any) -> Iterator[NodeProcess]:
    """Start `dmg-node serve` on a free loopback port (from *cwd*, default *workdir*); always stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg = node_config(workdir, port, **sections)
    # not beside node.toml: the node watches that folder, and a log line a C-STORE would wake it
    log_path = workdir / "log" / "node.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "dmg_node.cli", "serve", "--config", str(cfg)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=cwd or workdir)
    node = NodeProcess(workdir, port, cfg, proc, log_path)
    try:
        node.wait_event("node_started", timeout=120)
        yield node
    finally:
        node.stop()


def require_tool(path: str) -> str:
    """Return *path* if the tool is installed, else fail with the install hint (no silent skips)."""
    if shutil.which(path) is None:
        raise RuntimeError(f"{path} is not installed: apt-get install -y dcmtk orthanc dicom3tools plastimatch")
    return path


def orthanc_binary() -> str:
    """Path of Debian's Orthanc server binary (not always on PATH)."""
    out = subprocess.run(["dpkg", "-L", "orthanc"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.endswith("bin/Orthanc"):
            return line
    raise RuntimeError("Orthanc is not installed: apt-get install -y orthanc")


@dataclass
class Orthanc:
    """A private Orthanc instance on loopback (its own storage, no plugins, no remote access)."""

    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    aet: str

    def rest(self, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> Any:
        import urllib.request

        req = urllib.request.Request(f"http://{LOCALHOST}:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - loopback only
            data = rsp.read()
        return json.loads(data) if data else None


@contextlib.contextmanager
def running_orthanc(workdir: Path, aet: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
                    sync: bool = True) -> Iterator[Orthanc]:
    """Start Orthanc in the foreground with a generated config; always stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg = {
        "Name": "dmg-test", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": aet, "Plugins": [],
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomModalities": modalities or {}, "DicomCheckCalledAet": False, "StorageCompression": False,
        "SyncStorageArea": sync, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
    }
    (workdir / "orthanc.json").write_text(json.dumps(cfg))
    log = open(workdir / "orthanc.log", "wb")
    proc = subprocess.Popen([orthanc_binary(), str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            env=dcmtk_env())
    try:
        wait_port(http_port, 60, proc)
        wait_port(dicom_port, 60, proc)
        yield Orthanc(proc, http_port, dicom_port, aet)
    finally:
        stop_process(proc, 30)
        log.close()


@contextlib.contextmanager
def running_storescp(outdir: Path, aet: str = "STORESCP", *extra: str,
                     port: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start DCMTK storescp writing into *outdir*; always stopped on exit."""
    outdir.mkdir(parents=True, exist_ok=True)
    fixed = port is not None
    for attempt in range(3):
        # free_port() only says the port was free a moment ago: another process may take it before
        # storescp binds (storescp then exits 1); a port we picked ourselves is picked again.
        chosen = port if fixed else free_port()
        assert chosen is not None
        proc = subprocess.Popen([DCMTK["storescp"], "-aet", aet, "-od", str(outdir), *extra, str(chosen)],
                                env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(chosen, 30, proc)
        except RuntimeError:
            stop_process(proc)
            if fixed or attempt == 2:
                raise
            continue
        break
    try:
        yield proc, chosen
    finally:
        stop_process(proc)


@contextlib.contextmanager
def running_receiver(root: Path, min_free_mb: int = 1, **sections: dict[str, Any]) -> Iterator[Any]:
    """An in-process Storage SCP (dmg_node.net.scp.Receiver) on a free loopback port, spool at *root*."""
    from dmg_node import config
    from dmg_node.net.scp import Receiver
    from dmg_node.storage.spool import Spool

    raw: dict[str, Any] = {"node": {"host": LOCALHOST, "port": free_port()},
                           "storage": {"root": str(root), "min_free_mb": min_free_mb}}
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    spool = Spool(root)
    rx = Receiver(config.from_dict(raw), spool)
    rx.start()
    try:
        yield rx
    finally:
        rx.stop(grace_seconds=5)
        spool.close()
