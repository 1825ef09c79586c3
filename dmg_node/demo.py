"""`dmg-node demo`: the whole loop on this machine in one command.

It writes a phantom study, starts a node (its own spool in a temp folder, loopback, a short quiet
period) and a receiving TPS stand-in (a minimal pynetdicom Storage SCP), sends the study to the
node, waits for the RTSTRUCTs to arrive at the stand-in, and reports each one's Dice against the
phantom's truth. Nothing here is clinical: the phantom is synthetic and so are the demo weights.
"""

from __future__ import annotations

import dataclasses
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import RTStructureSetStorage  # type: ignore[attr-defined]

from dmg_node.config import Destination, Settings
from dmg_node.dicomfiles import read_datasets
from dmg_node.net.scu import store_files
from dmg_node.node import Node
from dmg_node.rtstruct import read_roi_mask
from dmg_node.volume import build_volume

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DemoRow:
    sequence: str
    series_description: str
    roi_name: str
    dice: float
    truth_ml: float
    contour_ml: float


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def tps_stand_in(folder: Path, ae_title: str = "DEMO_TPS") -> Iterator[Destination]:
    """A Storage SCP that accepts RT Structure Sets on loopback and writes them to *folder*."""
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(RTStructureSetStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # non-blocking start returns the server
    try:
        yield Destination(name="demo_tps", ae_title=ae_title, host="127.0.0.1", port=port)
    finally:
        server.shutdown()


def run_demo(settings: Settings, *, seed: int = 4242, timeout_s: float = 900.0, keep: Path | None = None,
             progress: Callable[[str], None] = lambda _msg: None) -> list[DemoRow]:
    """Run the loop once and return one row per RTSTRUCT that reached the TPS stand-in."""
    from dmg_node.phantoms.phantom import make_case, write_dicom_study

    with tempfile.TemporaryDirectory(prefix="dmg-demo-") as tmp:
        work = keep or Path(tmp)
        progress(f"writing a phantom MR study (seed {seed}: T2, FLAIR, T1C) ...")
        study = write_dicom_study(make_case(seed), work / "study", seed=seed)
        with tps_stand_in(work / "tps") as tps:
            node_settings = dataclasses.replace(
                settings,
                node=dataclasses.replace(settings.node, host="127.0.0.1", port=_free_port()),
                storage=dataclasses.replace(settings.storage, root=work / "spool", min_free_mb=1),
                assembly=dataclasses.replace(settings.assembly, quiet_seconds=2.0, poll_seconds=0.5),
                outbox=dataclasses.replace(settings.outbox, poll_seconds=0.5),
                destinations=(tps,),
            )
            node = Node(node_settings)
            node.start()
            progress(f"node {node_settings.node.ae_title} listening on 127.0.0.1:{node.receiver.port}; "
                     f"TPS stand-in {tps.ae_title} on 127.0.0.1:{tps.port}")
            try:
                me = Destination("node", node_settings.node.ae_title, "127.0.0.1", node.receiver.port)
                files = sorted(p for s in study.series for p in (study.study_dir / s.folder).glob("*.dcm"))
                results = store_files(files, me, "DEMO_SCANNER")
                failed = [r for r in results if not r.ok]
                if failed:
                    raise RuntimeError(f"{len(failed)} of {len(files)} instances were refused: {failed[0]}")
                log.info("demo_study_sent", instances=len(files))
                progress(f"sent {len(files)} instances; waiting for the quiet period, segmentation and the "
                         "RTSTRUCTs ...")
                expected = len(study.series)
                deadline = time.monotonic() + timeout_s
                while len(list((work / "tps").glob("*.dcm"))) < expected and time.monotonic() < deadline:
                    if _all_jobs_settled(node):
                        break
                    time.sleep(0.5)
                time.sleep(1.0)
            finally:
                node.request_stop()
                node.stop(grace_seconds=10)
        return _score(study, work / "tps")


def _all_jobs_settled(node: Node) -> bool:
    jobs = node.spool.jobs()
    outbox = node.spool.outbox()
    return bool(jobs) and all(j["state"] in ("done", "failed") for j in jobs) and all(
        o["state"] != "pending" for o in outbox)


def _score(study: Any, tps_dir: Path) -> list[DemoRow]:
    by_series = {s.series_instance_uid: s for s in study.series}
    rows = []
    for path in sorted(tps_dir.glob("*.dcm")):
        rt = dcmread(path)
        ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        series = by_series[str(ref.SeriesInstanceUID)]
        source = read_datasets(sorted((study.study_dir / series.folder).glob("*.dcm")))
        volume = build_volume(source)
        roi_name = str(rt.StructureSetROISequence[0].ROIName)
        mask = read_roi_mask(rt, volume, roi_name)
        truth = np.load(study.study_dir / series.truth).astype(bool)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        inter = float(np.logical_and(mask, truth).sum())
        denom = float(mask.sum() + truth.sum())
        rows.append(DemoRow(series.sequence, series.series_description, roi_name,
                            2 * inter / denom if denom else 1.0, float(truth.sum()) * voxel_ml,
                            float(mask.sum()) * voxel_ml))
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    lines = ["| sequence | series | ROI | Dice vs phantom truth | truth ml | contour ml |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.sequence} | {r.series_description} | {r.roi_name} | {r.dice:.3f} | {r.truth_ml:.1f} | "
              f"{r.contour_ml:.1f} |" for r in rows]
    return "\n".join(lines)

