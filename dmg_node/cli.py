"""Command line: parse arguments, load the config, call one function per command.

Exit codes: 0 ok, 1 the command failed, 2 usage error (argparse), 3 bad configuration
(systemd's ``RestartPreventExitStatus=3`` keeps a broken config from restart-looping).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import structlog

from dmg_node import __version__, config, logs
from dmg_node.cli_train import add_training_commands
from dmg_node.errors import ConfigError, DmgNodeError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 3
# Import names of the packages in the [train] extra (train, evaluate, phantom, demo need them).
TRAIN_EXTRA_MODULES = frozenset({"nibabel", "nilearn", "onnx", "tqdm", "cv2"})

log = structlog.get_logger(__name__)


def _settings(args: argparse.Namespace) -> config.Settings:
    settings = config.load(args.config)
    level = "debug" if getattr(args, "verbose", False) else settings.logging.level
    # serve logs to stdout (the journal); other commands keep stdout for their own output
    stream = None if args.command in ("serve", "inference-serve") else sys.stderr
    logs.configure(level, settings.logging.format, settings.logging.include_phi, stream=stream)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)  # before the heavy imports: a bad config fails fast with exit 3
    from dmg_node.node import Node

    node = Node(settings)
    _stop_on_signals(node.request_stop)
    node.start()
    try:
        node.wait()
    finally:
        node.stop()
    if node.unfinished:
        # A worker is still inside native code (torch): interpreter teardown would destroy its
        # threads mid-call ("terminate called without an active exception", SIGABRT). Its job
        # is still "running" in the index, and the next start requeues it.
        log.warning("exit_with_unfinished_workers", workers=node.unfinished)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def _stop_on_signals(stop: Callable[[], None]) -> None:
    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def cmd_inference_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    try:
        from dmg_node.serving.run import serve_until
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("ray", "starlette"):
            raise
        print(f"dmg-node: 'inference-serve' needs Ray Serve ({exc.name} is not installed): "
              "pip install 'dmg-node[ray]' (from a checkout: pip install -e '.[ray]')", file=sys.stderr)
        return EXIT_FAILURE
    stop = threading.Event()
    _stop_on_signals(stop.set)
    serve_until(settings, args.address or settings.inference.address, args.http_host, args.http_port, stop)
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    from dmg_node.net.scu import echo

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
    from dmg_node.segment.registry import sequences_without_model_files
    from dmg_node.storage.spool import INDEX_FILE, Spool

    settings = _settings(args)
    if not (settings.storage.root / INDEX_FILE).is_file():  # opening it would create an empty spool
        print(f"no spool at {settings.storage.root} (storage.root in {settings.source}): no {INDEX_FILE} there; "
              "check --config, or start the node once", file=sys.stderr)
        return EXIT_FAILURE
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
    if live is not None and not live.get("stale") and "models_missing" in live:
        missing = list(live["models_missing"])  # what the running node could load
    else:
        missing = sequences_without_model_files(settings)
    warnings = [f"no usable model for {seq} (configured: {', '.join(getattr(settings.models, seq))} under "
                f"{settings.models.dir}): {seq} series get no contour" for seq in missing]
    report = {"node": live, "warnings": warnings, "models_missing": missing, "studies": studies, "jobs": jobs,
              "outbox": outbox}
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
        if live.get("receive_workers"):
            pids = ", ".join(str(p) for p in live["receive_workers"])
            lines.append(f"  receiving in {len(live['receive_workers'])} worker processes (pids {pids})")
        for seq, m in sorted(live["models"].items()):
            members = m.get("members") or [m]
            lines.append(f"  model {seq}: " + ", then ".join(
                f"{x['name']} {x['version']}" + (f" (series <= {x['max_spacing_mm']:g} mm)" if x.get("max_spacing_mm") else "")
                for x in members) + f" on {m['device']}")
        inference = live.get("inference") or {}
        if inference.get("error"):
            wait = max(0.0, float(inference.get("retry_at") or 0) - time.time())
            lines.append(f"  inference ({inference['backend']}) unavailable, {inference['consecutive_failures']} "
                         f"failure(s) in a row, next try in {wait:.0f} s: {inference['error']}")
    else:
        lines.append(f"node not running (spool {settings.storage.root})")
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
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

    from dmg_node.classify import classify, header_from_series
    from dmg_node.dicomfiles import find_series

    settings = _settings(args)
    rules = settings.rules
    path = Path(args.path)
    if not path.exists():
        print(f"no such file or folder: {path}", file=sys.stderr)
        return EXIT_FAILURE
    rows: list[dict[str, Any]] = []
    for uid, paths in sorted(find_series(path).items()):
        header = header_from_series([dcmread(p, stop_before_pixels=True) for p in paths])
        result = classify(header, rules)
        rows.append({"series_instance_uid": uid, "label": result.label.value, "reason": result.reason,
                     "series_description": header.series_description or "", "instances": len(paths)})
    if args.json:  # the same fields as the table
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'label':6} {'inst':>5}  {'description':30}  series / reason")
        for r in rows:
            print(f"{r['label']:6} {r['instances']:5d}  {r['series_description'][:30]:30}  {r['series_instance_uid']}\n"
                  f"{'':44}{r['reason']}")
        if not rows:
            print("no DICOM series found")
    return EXIT_OK


def cmd_segment(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from dmg_node.classify import Label, classify, header_from_series
    from dmg_node.dicomfiles import find_series, read_datasets
    from dmg_node.pipeline import contour_series
    from dmg_node.rtstruct import save_rtstruct
    from dmg_node.segment.registry import load_model

    settings = _settings(args)
    if not args.verbose:  # stdout is for the result; only warnings (readable, on stderr) unless -v
        logs.configure("warning", "console", settings.logging.include_phi, stream=sys.stderr)
    series = find_series(Path(args.series_dir))
    if len(series) != 1:
        print(f"{args.series_dir} must hold exactly one series; found {len(series)}"
              + "".join(f"\n  {uid} ({len(p)} files)" for uid, p in series.items()), file=sys.stderr)
        return EXIT_FAILURE
    [(uid, paths)] = series.items()
    if args.sequence:
        label, reason = Label(args.sequence), "--sequence given"
    else:
        result = classify(header_from_series([dcmread(p, stop_before_pixels=True) for p in paths]),
                          settings.rules)
        label, reason = result.label, result.reason
    if label is Label.NONE:
        print(f"series {uid} is not a t1c/t2/flair series ({reason}); use --sequence to override", file=sys.stderr)
        return EXIT_FAILURE
    model = load_model(settings, label)
    if model is None:
        print(f"no usable {label.value} model under {settings.models.dir} (see the error above)", file=sys.stderr)
        return EXIT_FAILURE
    contour = contour_series(read_datasets(paths), label, model, settings.rtstruct, settings.qa)
    if contour.dataset is None:
        print(f"no tumour found in series {uid} ({label.value}); nothing written")
        return EXIT_OK
    save_rtstruct(contour.dataset, Path(args.out))
    ml = contour.voxels * float(np.prod(contour.volume.spacing)) / 1000.0
    print(f"{args.out}: {label.value} ({reason}); {ml:.1f} ml contoured by {contour.model.name} {contour.model.version}. "
          "AI-generated, UNAPPROVED: review before clinical use.")
    if contour.qa is not None and contour.qa.flagged:
        print(f"{contour.qa.note()} (written into the RTSTRUCT's descriptions)")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from dmg_node.demo import format_rows, run_demo

    settings = _settings(args)
    if not args.verbose:  # a first look: progress lines and warnings, not every instance's JSON line
        logs.configure("warning", "console", stream=sys.stderr)
    print("dmg-node demo: phantom study -> node -> TPS stand-in (synthetic data, demo weights)", file=sys.stderr)
    t0 = time.monotonic()
    rows = run_demo(settings, seed=args.seed, keep=Path(args.keep) if args.keep else None,
                    progress=lambda msg: print(f"  [{time.monotonic() - t0:5.1f} s] {msg}", file=sys.stderr))
    print(format_rows(rows))
    print("Phantom data and phantom-trained weights: these figures say nothing about clinical accuracy.")
    if not rows:
        print("no RTSTRUCT reached the TPS stand-in (see the log above)", file=sys.stderr)
        return EXIT_FAILURE
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
    s = with_config(sub.add_parser("inference-serve", help="serve the models on a Ray cluster (Ray Serve) for nodes "
                                   "with [inference] backend = \"ray\"; needs the [ray] extra"))
    s.add_argument("--address", help="Ray cluster address (default: inference.address)")
    s.add_argument("--http-host", default="127.0.0.1", help="Serve HTTP proxy address, where Serve is not yet running")
    s.add_argument("--http-port", type=int, default=8000, help="Serve HTTP proxy port (likewise)")
    s.set_defaults(func=cmd_inference_serve)
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
    add_training_commands(sub, with_config)
    s = with_config(sub.add_parser("segment", help="classify, segment and write an RTSTRUCT for one series, offline"))
    s.add_argument("series_dir")
    s.add_argument("--out", required=True, help="RTSTRUCT file to write")
    s.add_argument("--sequence", choices=("t1c", "t2", "flair"), help="override the classification")
    s.set_defaults(func=cmd_segment)
    s = with_config(sub.add_parser("demo", help="run the whole loop on a phantom study and report the Dice"))
    s.add_argument("--seed", type=int, default=4242)
    s.add_argument("--keep", help="keep the demo's files in this folder")
    s.set_defaults(func=cmd_demo)
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
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(f"dmg-node: '{args.command}' needs the training packages ({exc.name} is not installed): "
              "pip install 'dmg-node[train]' (from a checkout: pip install -e '.[train]')", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
