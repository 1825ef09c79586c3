"""Command line: parse arguments, load the config, call one function per command.

Exit codes: 0 ok, 1 the command failed, 2 usage error (argparse), 3 bad configuration
(systemd's ``RestartPreventExitStatus=3`` keeps a broken config from restart-looping).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from dmg_node import __version__, config, logs
from dmg_node.errors import ConfigError, DmgNodeError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 3

log = structlog.get_logger(__name__)


def _settings(args: argparse.Namespace) -> config.Settings:
    settings = config.load(args.config)
    level = "debug" if getattr(args, "verbose", False) else settings.logging.level
    logs.configure(level, settings.logging.format, settings.logging.include_phi, stream=sys.stderr
                   if args.command not in ("serve",) else None)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)  # before the heavy imports: a bad config fails fast with exit 3
    from dmg_node.node import Node

    node = Node(settings)

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        node.request_stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node.start()
    try:
        node.wait()
    finally:
        node.stop()
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from dmg_node.send import echo

    settings = _settings(args)
    dests = [settings.destination(args.destination)] if args.destination else list(settings.destinations)
    if not dests:
        print(f"no destinations configured in {settings.source}", file=sys.stderr)
        return EXIT_FAILURE
    worst = EXIT_OK
    for dest in dests:
        t0 = time.perf_counter()
        result = echo(dest, settings.node.ae_title, timeout=args.timeout)
        ms = (time.perf_counter() - t0) * 1000
        verdict = "OK" if result.ok else "FAILED"
        detail = f" ({result.error})" if result.error else ""
        print(f"{dest.name}: {dest.ae_title}@{dest.host}:{dest.port} C-ECHO {verdict} status={result.status} "
              f"{ms:.0f} ms{detail}")
        worst = worst if result.ok else EXIT_FAILURE
    return worst


def cmd_status(args: argparse.Namespace) -> int:
    from dmg_node.node import STATUS_FILE
    from dmg_node.spool import Spool

    settings = _settings(args)
    spool = Spool(settings.storage.root, fsync=False)
    try:
        studies, jobs, outbox = spool.summary(), spool.jobs(), spool.outbox()
    finally:
        spool.close()
    live_path = settings.storage.root / STATUS_FILE
    live: dict[str, Any] | None = None
    if live_path.exists():
        live = json.loads(live_path.read_text())
        if time.time() - float(live.get("updated_at", 0)) > 10:
            live["stale"] = True  # the node is not running (or hung): figures are from its last beat
    report = {"node": live, "studies": studies, "jobs": jobs, "outbox": outbox}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    print(_format_status(report, settings))
    return EXIT_OK


def _format_status(report: dict[str, Any], settings: config.Settings) -> str:
    lines = []
    live = report["node"]
    if live and not live.get("stale"):
        up = time.time() - live["started_at"]
        lines.append(f"node {live['ae_title']} port {live['port']} pid {live['pid']} up {up / 3600:.1f} h, "
                     f"{live['associations']} association(s) open")
        for seq, m in sorted(live["models"].items()):
            lines.append(f"  model {seq}: {m['name']} {m['version']} on {m['device']}")
    else:
        lines.append(f"node not running (spool {settings.storage.root})")
    states: dict[str, int] = {}
    for s in report["studies"]:
        states[s["state"]] = states.get(s["state"], 0) + 1
    lines.append("studies: " + (", ".join(f"{n} {k}" for k, n in sorted(states.items())) or "none"))
    for s in report["studies"]:
        lines.append(f"  study {s['study_instance_uid']}  {s['state']}  job {s['job_id'] or '-'}"
                     f"  attempts {s['attempts']}" + (f"  error: {s['error']}" if s["error"] else ""))
        for se in s["series"]:
            label = se["label"] or "-"
            reason = f"  ({se['reason']})" if se["reason"] else ""
            lines.append(f"    series {se['series_number'] or '?':>4} {se['modality'] or '?':3} {se['instances']:4d} inst "
                         f" {label:5} {se['series_description'][:30]}{reason}")
    pending = [o for o in report["outbox"] if o["state"] != "sent"]
    lines.append(f"outbox: {len(pending)} unsent of {len(report['outbox'])} recent")
    for o in pending:
        lines.append(f"  {o['sop_instance_uid']} -> {o['destination']}  {o['state']}  attempts {o['attempts']}"
                     f"  last {o['last_status'] or '-'} {o['last_error'] or ''}")
    return "\n".join(lines)


def cmd_classify(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from dmg_node.classify import classify, compile_rules, header_from_dataset
    from dmg_node.dicomfiles import find_series

    settings = _settings(args)
    rules = compile_rules(settings.classify.overrides())
    path = Path(args.path)
    if not path.exists():
        print(f"no such file or folder: {path}", file=sys.stderr)
        return EXIT_FAILURE
    rows = []
    for uid, paths in sorted(find_series(path).items()):
        header = header_from_dataset(dcmread(paths[0], stop_before_pixels=True), n_instances=len(paths))
        result = classify(header, rules)
        rows.append({"series_instance_uid": uid, "label": result.label.value, "reason": result.reason,
                     "series_description": header.series_description or "", "instances": len(paths)})
    if args.json:
        print(json.dumps([{k: r[k] for k in ("series_instance_uid", "label", "reason")} for r in rows], indent=2))
    else:
        print(f"{'label':6} {'inst':>5}  {'description':30}  series / reason")
        for r in rows:
            print(f"{r['label']:6} {r['instances']:5d}  {r['series_description'][:30]:30}  {r['series_instance_uid']}\n"
                  f"{'':44}{r['reason']}")
        if not rows:
            print("no DICOM series found")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmg-node", description=(
        "DICOM node that auto-contours diffuse midline glioma on MR. Research use: every contour is "
        "AI-generated, unapproved and must be reviewed."))
    p.add_argument("--version", action="version", version=f"dmg-node {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", type=Path, default=None, help="node.toml (default: config/node.toml)")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        return sp

    s = with_config(sub.add_parser("serve", help="run the node (SCP, assembly, segmentation, sending)"))
    s.set_defaults(func=cmd_serve)
    s = with_config(sub.add_parser("echo", help="C-ECHO the configured destinations"))
    s.add_argument("destination", nargs="?", help="destination name (default: all)")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_echo)
    s = with_config(sub.add_parser("status", help="studies, jobs and outbox in the spool"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = with_config(sub.add_parser("classify", help="label each MR series under PATH (t1c/t2/flair/none)"))
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_classify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"dmg-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DmgNodeError as exc:
        print(f"dmg-node: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
