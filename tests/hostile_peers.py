"""Four hostile peers at once against a node on 127.0.0.1 (tests/system/test_hostile.py runs this).

Usage: python -m tests.hostile_peers PORT SECONDS SOURCE_ADDRESS...

Each peer (a thread bound to its own loopback address) repeats, for SECONDS: two connections
declaring a 4 GiB PDU (issue 19 item 1); one association that stalls half-way through a P-DATA
(item 2), reopened when the node drops it; up to 50 connections that sent half an
A-ASSOCIATE-RQ (item 3), topped up as the node drops them; and, on one association, data
fragments that never carry the last-fragment bit, about 5 MB/s (item 4). Prints what it did; exits 1 if a peer failed unexpectedly.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import threading
import time

from tests import rawdicom

#: Half-open connections each peer keeps open (topped up by 10 a round as the node drops them).
HALF_OPEN = 50
FRAGMENT = rawdicom.p_data(1, 0, b"\x00" * 16000)


def attack(port: int, source: str, until: float, counts: dict[str, int], errors: list[str]) -> None:
    held: list[rawdicom.RawAssociation] = []
    half: list[rawdicom.RawAssociation] = []
    stalled: rawdicom.RawAssociation | None = None
    endless = rawdicom.RawAssociation(port, source=source)
    try:
        if endless.associate() != 2:
            errors.append(f"{source}: the endless-fragment association was refused")
            return
        endless.send(rawdicom.p_data(1, 3, rawdicom.c_store_rq(1, "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4")))
        while time.monotonic() < until:
            for pdu_type in (1, 4):
                with contextlib.suppress(OSError):
                    c = rawdicom.RawAssociation(port, source=source)
                    c.send(struct.pack(">BBI", pdu_type, 0, 0xFFFFFFFF))
                    held.append(c)
                    counts["huge_header"] += 1
            if stalled is None or _closed(stalled):
                with contextlib.suppress(OSError):
                    stalled = rawdicom.RawAssociation(port, source=source)
                    if stalled.associate() == 2:
                        stalled.send(struct.pack(">BBI", 4, 0, 1000) + b"\x00" * 10)
                        counts["stalled_pdata"] += 1
            half = [c for c in half if not _closed(c)]
            for _ in range(min(10, HALF_OPEN - len(half))):
                with contextlib.suppress(OSError):
                    c = rawdicom.RawAssociation(port, source=source)
                    c.send(rawdicom.associate_rq()[:40])
                    half.append(c)
                    counts["half_open"] += 1
            for _ in range(60):  # ~1 MB per round, ~5 rounds a second
                endless.send(FRAGMENT)
                counts["fragment_bytes"] += len(FRAGMENT)
            if len(held) > 200:
                for c in held[:100]:
                    c.close()
                del held[:100]
            time.sleep(0.2)
    except OSError as exc:
        errors.append(f"{source}: {type(exc).__name__}: {exc}")
    finally:
        for c in held + half:
            c.close()
        if stalled is not None:
            stalled.close()
        endless.close()


def _closed(a: rawdicom.RawAssociation) -> bool:
    a.sock.settimeout(0)
    try:
        return a.sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        a.sock.settimeout(10)


def main(argv: list[str]) -> int:
    port, seconds, sources = int(argv[0]), float(argv[1]), argv[2:]
    until = time.monotonic() + seconds
    counts = {"huge_header": 0, "stalled_pdata": 0, "half_open": 0, "fragment_bytes": 0}
    errors: list[str] = []
    threads = [threading.Thread(target=attack, args=(port, s, until, counts, errors)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    sys.stdout.write(f"{counts} errors={errors}\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
