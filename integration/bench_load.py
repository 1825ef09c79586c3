"""Load benchmark: N concurrent storescu associations into DCMTK storescp --fork, Orthanc and
dmg-node with 1, 2 and 4 receive workers, then the same burst against an association limit.

Usage: python -m integration.bench_load [--senders 8] [--images 200] [--size 256] [--rounds 3]
       [--workers 1,2,4] [--limit 4]

Prints, as Markdown tables: images/s per receiver (median of interleaved rounds, each run), whether
every sender succeeded, and the ratio to Orthanc (of the medians, and within each round); then,
with ``node.maximum_associations = --limit`` and the most workers, how many of the burst were
accepted, refused with A-ASSOCIATE-RJ (logged ``association_rejected`` "too many associations"),
stored, and whether the node still answers afterwards: the limit is one for all workers.
Everything runs on 127.0.0.1 and every process is stopped.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from integration.bench_receive import orthanc
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


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _receivers(senders: int, workers: list[int]) -> dict[str, Callable[[Path], AbstractContextManager[tuple[int, int, str]]]]:
    """The receivers of one round: the two peers, then dmg-node with each worker count."""

    @contextmanager
    def node(work: Path, n: int) -> Iterator[tuple[int, int, str]]:
        with running_node(work, node={"maximum_associations": max(10, senders), "workers": n},
                          assembly={"quiet_seconds": 3600}) as nd:
            yield nd.proc.pid, nd.port, "DMG_NODE"

    out: dict[str, Callable[[Path], AbstractContextManager[tuple[int, int, str]]]] = {
        "DCMTK storescp --fork": contextmanager(lambda w: storescp_fork(w)),
        "Orthanc": contextmanager(orthanc),
    }
    for n in workers:
        out[f"dmg-node, workers = {n}"] = (lambda n: lambda w: node(w, n))(n)
    return out


def storescp_fork(work: Path) -> Iterator[tuple[int, int, str]]:
    with running_storescp(work / "out", "STORESCP", "--fork") as (proc, port):
        yield proc.pid, port, "STORESCP"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--images", type=int, default=200, help="instances per sender")
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each 16-bit image")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each receiver once a round)")
    ap.add_argument("--workers", default="1,2,4", help="dmg-node [node] workers values to measure")
    ap.add_argument("--limit", type=int, default=4, help="node.maximum_associations for the refusal run")
    args = ap.parse_args()
    total = args.senders * args.images
    workers = [int(w) for w in args.workers.split(",")]
    receivers = _receivers(args.senders, workers)
    rates: dict[str, list[float]] = {name: [] for name in receivers}
    stored_ok: dict[str, list[bool]] = {name: [] for name in receivers}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        root = Path(tmp)
        folders = [root / f"sender{i}" for i in range(args.senders)]
        for i, folder in enumerate(folders):
            write_series(folder, args.images, rows=args.size, cols=args.size, seed=i)
        mb = total * args.size * args.size * 2 / 2**20
        # Round-robin, a fresh receiver each run: drift in disk speed touches every receiver alike.
        for rnd in range(args.rounds):
            for index, (name, ctx) in enumerate(receivers.items()):
                work = root / f"r{rnd}-{index}"
                work.mkdir()
                with ctx(work) as (_pid, port, aec):
                    t0 = time.perf_counter()
                    res = concurrent_storescu(port, folders, aec=aec)
                    dt = time.perf_counter() - t0
                rates[name].append(total / dt)
                stored_ok[name].append(all(r.returncode == 0 for r in res))
        print(f"{args.senders} concurrent storescu associations x {args.images} images of {args.size}x{args.size} "
              f"16-bit MR ({mb:.0f} MiB of pixels), TCP_NODELAY=1, 127.0.0.1, fsync on; {args.rounds} interleaved "
              f"rounds, a fresh receiver each run\n")
        print("| receiver | images/s (median) | runs | every sender ok | vs Orthanc (medians) | "
              "vs Orthanc, same round (median) |")
        print("|---|---:|---|---|---:|---:|")
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in rates.items():
            paired = statistics.median(r / o for r, o in zip(v, rates["Orthanc"]))
            print(f"| {k} | {med[k]:.0f} | {', '.join(f'{r:.0f}' for r in v)} | "
                  f"{'yes' if all(stored_ok[k]) else 'NO'} | {med[k] / med['Orthanc']:.2f} | {paired:.2f} |")

        work = root / "limited"
        work.mkdir()
        n = max(workers)
        with running_node(work, node={"maximum_associations": args.limit, "workers": n},
                          assembly={"quiet_seconds": 3600}) as node:
            res = concurrent_storescu(node.port, folders)
            echo = subprocess.run([DCMTK["echoscu"], "-aet", "BENCH", "-aec", "DMG_NODE", LOCALHOST, str(node.port)],
                                  capture_output=True, timeout=60, env=dcmtk_env())
        accepted = sum(r.returncode == 0 for r in res)
        refused = sum("Association Rejected" in r.stdout for r in res)
        logged = sum(e["event"] == "association_rejected" and e.get("reason") == "too many associations"
                     for e in node.events())
        print(f"\nnode.maximum_associations = {args.limit} with workers = {n}, {args.senders} senders at once\n")
        print("| accepted | refused (A-ASSOCIATE-RJ) | logged too many associations | stored | expected | "
              "C-ECHO afterwards |")
        print("|---:|---:|---:|---:|---:|---|")
        print(f"| {accepted} | {refused} | {logged} | {_files(work / 'spool' / 'studies')} | "
              f"{accepted * args.images} | {'OK' if echo.returncode == 0 else 'FAILED'} |")


if __name__ == "__main__":
    main()
