"""Pipeline latency: last instance received -> RTSTRUCTs acknowledged by the TPS.

Usage: python -m integration.bench_pipeline [--repeats 3] [--geometry clinical|small] [--quiet 5]

A three-sequence phantom study is sent with DCMTK storescu to a running `dmg-node serve` whose
destination is DCMTK storescp. From the node's JSON log it reports, per run, the quiet period
(reported apart: it is configuration, not work) and the time of each stage after it: queue ->
classify -> segment (per series) -> RTSTRUCT -> send; then medians over the runs.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from dmg_node.phantoms.phantom import make_case, write_dicom_study
from tests.support import DCMTK, LOCALHOST, dcmtk_env, running_node, running_storescp

ROOT = Path(__file__).resolve().parent.parent


def _ts(e: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()


def one_run(work: Path, study_dir: Path, quiet: float, expected: int) -> dict[str, float]:
    with running_storescp(work / "tps", "TPS") as (_p, tps_port), running_node(
        work / "node", assembly={"quiet_seconds": quiet, "poll_seconds": 0.2},
        models={"dir": str(ROOT / "models")},
        outbox={"poll_seconds": 0.2},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}],
    ) as node:
        subprocess.run([DCMTK["storescu"], "-aet", "BENCH", "-aec", "DMG_NODE", "+sd", "+r", LOCALHOST, str(node.port),
                        str(study_dir / "dicom")], check=True, env=dcmtk_env(), capture_output=True, timeout=600)
        deadline = time.monotonic() + 900
        while sum(e["event"] == "rtstruct_sent" for e in node.events()) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError("RTSTRUCTs not all acknowledged within 900 s")
            time.sleep(0.2)
    ev = node.events()
    last_rx = max(_ts(e) for e in ev if e["event"] == "instance_stored")
    complete = _ts(next(e for e in ev if e["event"] == "study_complete"))
    started = _ts(next(e for e in ev if e["event"] == "job_started"))
    chosen = min(_ts(e) for e in ev if e["event"] == "series_chosen")  # classification done
    segment_ms = sum(e["duration_ms"] for e in ev if e["event"] == "series_segmented")
    written = max(_ts(e) for e in ev if e["event"] == "rtstruct_written")
    done = _ts(next(e for e in ev if e["event"] == "job_done"))
    sent = max(_ts(e) for e in ev if e["event"] == "rtstruct_sent")
    return {
        "quiet period (config)": complete - last_rx,
        "queue": started - complete,
        "classify (headers of every series)": chosen - started,
        "segment (model, all series)": segment_ms / 1000,
        "read series, build volumes and RTSTRUCTs": (written - chosen) - segment_ms / 1000,
        "job end -> all sent": sent - done,
        "total excl. quiet": sent - complete,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--geometry", choices=("clinical", "small"), default="clinical")
    ap.add_argument("--quiet", type=float, default=5.0, help="assembly.quiet_seconds for the run")
    ap.add_argument("--seed", type=int, default=777)
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        study = write_dicom_study(make_case(args.seed), root / "study", seed=args.seed, geometry=args.geometry)
        n_files = sum(s.n_instances for s in study.series)
        for rep in range(args.repeats):
            runs.append(one_run(root / f"run{rep}", study.study_dir, args.quiet, len(study.series)))
    print(f"phantom study ({args.geometry}: {', '.join(f'{s.sequence} {s.n_instances}' for s in study.series)};"
          f" {n_files} instances), {args.repeats} runs, 2-core CPU, demo models\n")
    print("| stage | median s | runs (s) | share of total |")
    print("|---|---:|---|---:|")
    total = statistics.median(r["total excl. quiet"] for r in runs)
    for key in runs[0]:
        vals = [r[key] for r in runs]
        med = statistics.median(vals)
        share = "" if key.startswith(("quiet", "total")) else f"{100 * med / total:.0f} %"
        print(f"| {key} | {med:.1f} | {', '.join(f'{v:.1f}' for v in vals)} | {share} |")


if __name__ == "__main__":
    main()
