"""Series-level vs study-level completion: each series' last instance -> its RTSTRUCT acknowledged.

Usage: python -m integration.bench_series [--repeats 1] [--geometry clinical|small] [--gap 15]
       [--quiet 20] [--series-quiet 2] [--order t2,flair,t1c]

A scanner-like send: a three-sequence phantom study goes series by series (one DCMTK storescu
association each, in acquisition order, post-contrast T1C last) to a running `dmg-node serve`,
``--gap`` seconds apart, as a scanner sends each series when it is reconstructed. Time is scaled
down: a 15 s gap stands for the minutes between sequences of an exam. The study rule's
``quiet_seconds`` must outlast the gap (else the study would be cut after its first series and
reprocessed), so it is set above it. Each run starts a fresh node; both modes run on the same study
in the same invocation. Per series it reports the time from the sender's acknowledgement of the
series' last instance to the node's ``rtstruct_sent`` (the TPS, DCMTK storescp, acknowledged the
RTSTRUCT), then medians.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dmg_node.phantoms.phantom import StudyManifest, make_case, write_dicom_study
from tests.support import DCMTK, LOCALHOST, dcmtk_env, running_node, running_storescp

ROOT = Path(__file__).resolve().parent.parent


def _ts(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def one_run(work: Path, study: StudyManifest, order: list[str], mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds from each series' last instance to its RTSTRUCT acknowledged, by sequence."""
    series = {s.sequence: s for s in study.series}
    with running_storescp(work / "tps", "TPS") as (_p, tps_port), running_node(
        work / "node", assembly={"quiet_seconds": args.quiet, "poll_seconds": 0.2, "completion": mode,
                                 "series_quiet_seconds": args.series_quiet},
        models={"dir": str(ROOT / "models")}, outbox={"poll_seconds": 0.2},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}],
    ) as node:
        last: dict[str, float] = {}
        for i, seq in enumerate(order):
            if i:
                time.sleep(args.gap)
            subprocess.run([DCMTK["storescu"], "-aet", "SCANNER", "-aec", "DMG_NODE", "+sd", "+r", LOCALHOST,
                            str(node.port), str(study.study_dir / series[seq].folder)],
                           check=True, env=dcmtk_env(), capture_output=True, timeout=600)
            last[seq] = time.time()
        deadline = time.monotonic() + 900
        while sum(e["event"] == "rtstruct_sent" for e in node.events()) < len(order):
            if time.monotonic() > deadline:
                raise TimeoutError("RTSTRUCTs not all acknowledged within 900 s")
            time.sleep(0.2)
        ev = node.events()
    source = {e["sop_uid"]: e["series_uid"] for e in ev if e["event"] == "rtstruct_written"}
    acked: dict[str, float] = {}
    for e in ev:
        if e["event"] == "rtstruct_sent":
            acked.setdefault(source[e["sop_uid"]], _ts(e["ts"]))
    return {seq: acked[series[seq].series_instance_uid] - last[seq] for seq in order}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--geometry", choices=("clinical", "small"), default="clinical")
    ap.add_argument("--gap", type=float, default=15.0, help="seconds between the series (scanner-like send)")
    ap.add_argument("--quiet", type=float, default=20.0, help="assembly.quiet_seconds (must outlast --gap)")
    ap.add_argument("--series-quiet", type=float, default=2.0, help="assembly.series_quiet_seconds")
    ap.add_argument("--order", default="t2,flair,t1c", help="sequences in the order they are sent")
    ap.add_argument("--seed", type=int, default=777)
    args = ap.parse_args()
    order = args.order.split(",")
    runs: dict[str, list[dict[str, float]]] = {"study": [], "series": []}
    with tempfile.TemporaryDirectory(prefix="bench-series-") as tmp:
        root = Path(tmp)
        study = write_dicom_study(make_case(args.seed), root / "study", seed=args.seed, geometry=args.geometry)
        for rep in range(args.repeats):
            for mode, results in runs.items():
                results.append(one_run(root / f"{mode}{rep}", study, order, mode, args))
    counts = {s.sequence: s.n_instances for s in study.series}
    print(f"phantom study ({args.geometry}: {', '.join(f'{q} {counts[q]}' for q in order)} instances, sent in this "
          f"order {args.gap:g} s apart); quiet_seconds {args.quiet:g}, series_quiet_seconds {args.series_quiet:g}; "
          f"{args.repeats} run(s) per mode; demo models\n")
    print("| completion | series | last instance -> RTSTRUCT acknowledged, median s | runs (s) |")
    print("|---|---|---:|---|")
    for mode, results in runs.items():
        for seq in order:
            vals = [r[seq] for r in results]
            print(f"| {mode} | {seq} | {statistics.median(vals):.1f} | {', '.join(f'{v:.1f}' for v in vals)} |")
        every = [r[seq] for r in results for seq in order]
        print(f"| {mode} | all series | {statistics.median(every):.1f} | |")


if __name__ == "__main__":
    main()
