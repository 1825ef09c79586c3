"""Scale benchmark: N studies sent at once to two nodes; local inference vs one Ray Serve application.

Usage: nice -n 10 python -m integration.bench_scale [--studies 4] [--hops 5]   (needs the [ray] extra)

N copies of one small phantom T2 series (new Study/Series/SOP UIDs each, 24 x 128 x 128, ~1.9 x 1.9 x
4.4 mm) go out at once with DCMTK storescu, alternately to two ``dmg-node serve`` processes (their
own spools and ports) that send to one DCMTK storescp. Three rounds in one run, on this machine:
``[inference] backend = "local"`` (each node runs ONNX Runtime itself), then ``"ray"`` on a local
Ray cluster (``ray start --head``, 2 CPUs) with the demo-t2 deployment at 1 and then 2 replicas. A round's time runs from the first storescu to the last RTSTRUCT acknowledged
(it includes ``assembly.quiet_seconds`` = 1). Then the Ray hop alone: the same volume posted
``--hops`` times to the application, round trip minus the replica's own predict time (the
``x-dmg-predict-seconds`` header): encoding, HTTP, Serve's proxy and router, the object store.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from dmg_node.dicomfiles import read_datasets
from dmg_node.phantoms.phantom import make_case, write_dicom_study
from dmg_node.segment.remote import CONTENT_TYPE, SECONDS_HEADER, encode_volume
from dmg_node.volume import build_volume
from tests.ray_support import RayCluster, ServeApp
from tests.support import DCMTK, LOCALHOST, dcmtk_env, free_port, running_node, running_storescp

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"t1c": "demo-t1c", "t2": "demo-t2", "flair": "demo-flair"}
SERVED = {"t1c": "demo-t2", "t2": "demo-t2", "flair": "demo-t2"}  # only T2 series are sent
# Ray's CPU accounting per replica: 2 replicas plus a surge one fit the 2-CPU head (each replica's
# ONNX Runtime still uses both cores)
REPLICA_CPUS = 0.5


def make_studies(folder: Path, n: int) -> list[Path]:
    """N copies of the phantom's T2 series, each its own study (new UIDs)."""
    manifest = write_dicom_study(make_case(31, resolution_mm=2.0), folder / "phantom", seed=31, geometry="small")
    source = manifest.study_dir / next(s.folder for s in manifest.series if s.sequence == "t2")
    out = []
    for i in range(n):
        study, series = generate_uid(), generate_uid()
        dest = folder / f"study{i}"
        dest.mkdir(parents=True)
        for path in sorted(source.glob("*.dcm")):
            ds = dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(dest / path.name, enforce_file_format=True)
        out.append(dest)
    return out


def run_round(workdir: Path, studies: list[Path], inference: dict[str, Any]) -> dict[str, Any]:
    """Send every study at once (alternately to two nodes); seconds until the last RTSTRUCT is sent."""
    with running_storescp(workdir / "tps", "TPS", "--ignore") as (_tps, tps_port):
        sections = {"assembly": {"quiet_seconds": 1}, "models": {"dir": str(ROOT / "models"), **MODELS},
                    "inference": inference,
                    "destinations": [{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}]}
        with running_node(workdir / "a", **sections) as a, running_node(workdir / "b", **sections) as b:
            nodes = [a, b]
            t0 = time.perf_counter()
            senders = [subprocess.Popen([DCMTK["storescu"], "-aet", "SCANNER", "-aec", "DMG_NODE", "+sd", "+r",
                                         LOCALHOST, str(nodes[i % 2].port), str(s)], env=dcmtk_env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for i, s in enumerate(studies)]
            for p in senders:
                p.wait(300)
            deadline = time.monotonic() + 1800
            while sum(e["event"] == "rtstruct_sent" for n in nodes for e in n.events()) < len(studies):
                if time.monotonic() > deadline:
                    raise TimeoutError("not every RTSTRUCT was sent")
                time.sleep(0.2)
            seconds = time.perf_counter() - t0
            segment_ms = [e["duration_ms"] for n in nodes for e in n.events() if e["event"] == "series_segmented"]
    return {"seconds": seconds, "segment_s": statistics.median(segment_ms) / 1000}


def hop_overhead(app: ServeApp, series: Path, repeats: int) -> dict[str, float]:
    """Round trip of one volume to the application minus the replica's predict time (median)."""
    volume = build_volume(read_datasets(sorted(series.glob("*.dcm"))))
    settings = app.settings
    query = urllib.parse.urlencode({"sequence": "t2", "models": "demo-t2"})
    url = f"{settings.url}/{settings.application}/predict?{query}"
    rtt, model, encode = [], [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        body = encode_volume(volume)
        t1 = time.perf_counter()
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": CONTENT_TYPE})
        with urllib.request.urlopen(req, timeout=300) as rsp:  # noqa: S310 - loopback
            rsp.read()
            server = float(rsp.headers[SECONDS_HEADER])
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        rtt.append(t2 - t1)
        model.append(server)
    rtt, model, encode = rtt[1:], model[1:], encode[1:]
    return {"rtt_s": statistics.median(rtt), "model_s": statistics.median(model),
            "hop_ms": statistics.median(r - m for r, m in zip(rtt, model)) * 1000,
            "encode_ms": statistics.median(encode) * 1000, "mb": len(body) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--hops", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        studies = make_studies(work / "studies", args.studies)
        rounds = {"local (ONNX Runtime in each node)": run_round(work / "local", studies, {"backend": "local"})}
        cluster = RayCluster(work / "ray")
        cluster.start()
        hop: dict[str, float] = {}
        try:
            models = work / "models"
            shutil.copytree(ROOT / "models" / "demo-t2", models / "demo-t2")
            http_port = free_port()  # Serve's proxy outlives an application: both rounds use it
            for replicas in (1, 2):
                app = ServeApp(work / f"serve{replicas}", models, http_port, SERVED,
                               {"num_replicas": replicas, "num_cpus": REPLICA_CPUS})
                app.start(cluster.address)
                try:
                    inference = {"backend": "ray", "url": app.settings.url, "application": app.settings.application,
                                 "retry_initial_seconds": 1, "retry_max_seconds": 5}
                    rounds[f"ray, {replicas} replica{'s' if replicas > 1 else ''}"] = run_round(
                        work / f"ray{replicas}", studies, inference)
                    if replicas == 1:
                        hop = hop_overhead(app, studies[0], args.hops)
                finally:
                    app.stop(timeout=90)  # deletes the application: its CPUs are free for the next
        finally:
            cluster.kill()
    base = next(iter(rounds.values()))["seconds"]
    print(f"{args.studies} studies (T2 24x128x128) sent at once to two nodes; 2-core CPU, demo-t2, ONNX Runtime\n")
    print("| inference | all RTSTRUCTs sent after (s) | studies/min | time vs local | median segment per series (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rounds.items():
        print(f"| {name} | {r['seconds']:.1f} | {60 * args.studies / r['seconds']:.1f} | {r['seconds'] / base:.2f} "
              f"| {r['segment_s']:.1f} |")
    print(f"\nRay hop, one volume ({hop['mb']:.1f} MB encoded), median of {args.hops}:\n")
    print("| round trip (s) | replica predict (s) | hop overhead (ms) | encode on the node (ms) |")
    print("|---:|---:|---:|---:|")
    print(f"| {hop['rtt_s']:.2f} | {hop['model_s']:.2f} | {hop['hop_ms']:.0f} | {hop['encode_ms']:.1f} |")


if __name__ == "__main__":
    main()
