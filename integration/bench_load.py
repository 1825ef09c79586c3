"""Load benchmark: N concurrent storescu associations into dmg-node, then the same burst against
an association limit.

Usage: python -m integration.bench_load [--senders 8] [--images 200] [--size 256] [--limit 4]

Prints, as Markdown tables: wall time, images/s, every instance stored or not, and the node's
resident memory at start and at its peak (VmHWM); DCMTK storescp --fork as a ceiling; and, with
``node.maximum_associations = --limit``, how many of the burst were accepted, refused with
A-ASSOCIATE-RJ (logged ``association_rejected`` "too many associations"), stored, and whether the
node still answers afterwards. Everything runs on 127.0.0.1 and every process is stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from integration.bench_receive import peak_rss_mb
from tests.support import DCMTK, LOCALHOST, dcmtk_env, running_node, running_storescp, write_series


def concurrent_storescu(port: int, folders: list[Path], aec: str = "DMG_NODE",
                        timeout: float = 600) -> list[subprocess.CompletedProcess[str]]:
    """Start one storescu association per folder at once; their results (stdout and stderr merged)."""
    procs = [subprocess.Popen([DCMTK["storescu"], "-aet", f"SENDER{i}", "-aec", aec, "+sd", LOCALHOST, str(port),
                               str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env()) for i, folder in enumerate(folders)]
    done = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return done


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--images", type=int, default=200, help="instances per sender")
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each 16-bit image")
    ap.add_argument("--limit", type=int, default=4, help="node.maximum_associations for the refusal run")
    args = ap.parse_args()
    total = args.senders * args.images
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = Path(tmp)
        folders = [root / f"sender{i}" for i in range(args.senders)]
        for i, folder in enumerate(folders):
            write_series(folder, args.images, rows=args.size, cols=args.size, seed=i)
        mb = total * args.size * args.size * 2 / 2**20
        print(f"{args.senders} concurrent storescu associations x {args.images} images of {args.size}x{args.size} "
              f"16-bit MR ({mb:.0f} MiB of pixels), TCP_NODELAY=1, 127.0.0.1\n")
        print("| receiver | wall s | images/s | stored | senders ok | RSS at start MB | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        with running_storescp(root / "storescp", "STORESCP", "--fork") as (proc, port):
            t0 = time.perf_counter()
            res = concurrent_storescu(port, folders, aec="STORESCP")
            dt = time.perf_counter() - t0
            print(f"| DCMTK storescp --fork | {dt:.1f} | {total / dt:.0f} | {_files(root / 'storescp')} | "
                  f"{sum(r.returncode == 0 for r in res)}/{args.senders} | n/a | n/a (one process per association) |")
        work = root / "node"
        work.mkdir()
        with running_node(work, node={"maximum_associations": max(10, args.senders)},
                          assembly={"quiet_seconds": 3600}) as node:
            start_rss = _rss_mb(node.proc.pid)
            t0 = time.perf_counter()
            res = concurrent_storescu(node.port, folders)
            dt = time.perf_counter() - t0
            peak = peak_rss_mb(node.proc.pid)
        print(f"| dmg-node (fsync on) | {dt:.1f} | {total / dt:.0f} | {_files(work / 'spool' / 'studies')} | "
              f"{sum(r.returncode == 0 for r in res)}/{args.senders} | {start_rss:.0f} | {peak:.0f} |")

        work = root / "limited"
        work.mkdir()
        with running_node(work, node={"maximum_associations": args.limit}, assembly={"quiet_seconds": 3600}) as node:
            res = concurrent_storescu(node.port, folders)
            echo = subprocess.run([DCMTK["echoscu"], "-aet", "BENCH", "-aec", "DMG_NODE", LOCALHOST, str(node.port)],
                                  capture_output=True, timeout=60, env=dcmtk_env())
        accepted = sum(r.returncode == 0 for r in res)
        refused = sum("Association Rejected" in r.stdout for r in res)
        logged = sum(e["event"] == "association_rejected" and e.get("reason") == "too many associations"
                     for e in node.events())
        print(f"\nnode.maximum_associations = {args.limit}, {args.senders} senders at once\n")
        print("| accepted | refused (A-ASSOCIATE-RJ) | logged too many associations | stored | expected | "
              "C-ECHO afterwards |")
        print("|---:|---:|---:|---:|---:|---|")
        print(f"| {accepted} | {refused} | {logged} | {_files(work / 'spool' / 'studies')} | "
              f"{accepted * args.images} | {'OK' if echo.returncode == 0 else 'FAILED'} |")


if __name__ == "__main__":
    main()
