"""Receive benchmark: one storescu association of N MR images to DCMTK storescp, Orthanc and dmg-node.

Usage: python -m integration.bench_receive [--images 600] [--repeats 3]

Prints images/s (median of the repeats) and peak RSS of each receiver, and the ratios of
dmg-node against the two peers measured in the same run. dmg-node runs twice: with its default
receive workers (one process per core, docs/reliability.md) and receiving in the node process
itself (``workers = 1``), so one association through a worker is seen against the single process. Everything runs on 127.0.0.1 and every
process is stopped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from tests.support import (
    DCMTK,
    LOCALHOST,
    dcmtk_env,
    running_node,
    running_orthanc,
    running_storescp,
    write_series,
)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def send(folder: Path, port: int, aec: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([DCMTK["storescu"], "-aet", "BENCH", "-aec", aec, "+sd", "+r", LOCALHOST, str(port), str(folder)],
                   check=True, env=dcmtk_env(), capture_output=True, timeout=600)
    return time.perf_counter() - t0


def storescp(work: Path) -> Iterator[tuple[int, int, str]]:
    with running_storescp(work / "out") as (proc, port):
        yield proc.pid, port, "STORESCP"


def orthanc(work: Path) -> Iterator[tuple[int, int, str]]:
    with running_orthanc(work) as o:
        yield o.proc.pid, o.dicom_port, o.aet


def dmg_node(work: Path, workers: int = 0, **storage: object) -> Iterator[tuple[int, int, str]]:
    with running_node(work, storage={"root": str(work / "spool"), "min_free_mb": 1, **storage},
                      node={"workers": workers}) as n:
        yield n.proc.pid, n.port, "DMG_NODE"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-fsync-variant", action="store_true", help="also measure dmg-node with fsync off")
    args = ap.parse_args()
    from contextlib import contextmanager

    receivers: dict[str, Callable[[Path], AbstractContextManager[tuple[int, int, str]]]] = {
        "DCMTK storescp": contextmanager(storescp),
        "Orthanc": contextmanager(orthanc),
        "dmg-node (fsync)": contextmanager(dmg_node),
        "dmg-node (fsync), workers = 1": contextmanager(lambda w: dmg_node(w, workers=1)),
    }
    if args.no_fsync_variant:
        receivers["dmg-node (no fsync)"] = contextmanager(lambda w: dmg_node(w, fsync=False))
    rates: dict[str, list[float]] = {name: [] for name in receivers}
    rss: dict[str, float] = {name: 0.0 for name in receivers}
    with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp:
        root = Path(tmp)
        write_series(root / "series", args.images, rows=256, cols=256)
        # Round-robin, a fresh receiver each run: a drift in disk speed during the run (seen here:
        # storescp from 900 to 2500 images/s within minutes) touches every receiver alike.
        for rep in range(args.repeats):
            for index, (name, ctx) in enumerate(receivers.items()):
                work = root / f"receiver{index}-run{rep}"
                work.mkdir()
                with ctx(work) as (pid, port, aec):
                    rates[name].append(args.images / send(root / "series", port, aec))
                    rss[name] = max(rss[name], peak_rss_mb(pid))
    results = {name: (rates[name], rss[name]) for name in receivers}
    med = {k: statistics.median(v[0]) for k, v in results.items()}
    print(f"{args.images} x 256x256 16-bit MR, one storescu association (TCP_NODELAY=1), "
          f"median of {args.repeats}\n")
    # Same-round ratio: each receiver against Orthanc's run of the same round (seconds apart),
    # which the disk's drift moves far less than a ratio of medians.
    print("| receiver | images/s (median) | runs | peak RSS MB | vs storescp | vs Orthanc | vs Orthanc, same round (median) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for k, (rates, rss) in results.items():
        runs = ", ".join(f"{r:.0f}" for r in rates)
        paired = statistics.median(r / o for r, o in zip(rates, results["Orthanc"][0]))
        print(f"| {k} | {med[k]:.0f} | {runs} | {rss:.0f} | {med[k] / med['DCMTK storescp']:.2f} | "
              f"{med[k] / med['Orthanc']:.2f} | {paired:.2f} |")


if __name__ == "__main__":
    main()
