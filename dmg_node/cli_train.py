"""The offline training and evaluation commands: phantom, train, evaluate, evaluate-output,
evaluate-shifts. They need the ``[train]`` extra; every heavy import is inside its command, so
the running node (``serve``) never loads training code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dmg_node import config, logs

EXIT_OK = 0
EXIT_FAILURE = 1


def cmd_phantom(args: argparse.Namespace) -> int:
    from dmg_node.phantoms.phantom import generate

    logs.configure("info", "console", stream=sys.stderr)
    if args.randomized:
        from dmg_node.phantoms.synth import generate as generate_randomized

        for path in generate_randomized(Path(args.out), args.set, args.n, first=args.seed,
                                        resolution_mm=args.resolution, grid=args.grid):
            print(path)
        return EXIT_OK
    formats = {f.strip() for f in args.format.split(",") if f.strip()}
    written = generate(Path(args.out), args.n, args.seed, formats, geometry=args.geometry,
                       reference_rtstruct=args.rtstruct, resolution_mm=args.resolution)
    for path in written:
        print(path)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from dmg_node.segment.preprocess import PreprocessConfig
    from dmg_node.training.train import train

    logs.configure("info", "console", stream=sys.stderr)
    manifest = train(args.sequence, Path(args.data), Path(args.out), epochs=args.epochs, seed=args.seed,
                     adversarial=not args.no_adversarial, adv_weight=args.adv_weight, device=args.device,
                     resume=not args.no_resume, steps_per_epoch=args.steps_per_epoch,
                     thick_slice_fraction=args.thick_slice_fraction, lr=args.lr,
                     patch_size=(args.patch, args.patch, args.patch),
                     preprocess=PreprocessConfig(spacing_mm=args.spacing),
                     init_from=Path(args.init_from) if args.init_from else None,
                     max_spacing_mm=args.max_spacing_mm, rules=config.load(args.config).rules,
                     val_dir=Path(args.val_data) if args.val_data else None)
    print(json.dumps({"model": str(args.out), "sequence": manifest.sequence, "metrics": manifest.metrics}, indent=2))
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dmg_node.training.evaluate import evaluate

    logs.configure("info", "console", stream=sys.stderr)
    # a folder of its own, never inside the model folder (untracked files in the repository)
    report_dir = (Path(args.report) if args.report else
                  Path("evaluation") / f"{Path(args.model).resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = evaluate(Path(args.model), Path(args.data), report_dir, device=args.device, grow=not args.no_grow,
                      rules=config.load(args.config).rules)
    _print_metrics(result.cases, {"": result.summary})
    print(f"report with overlays: {report_dir / 'report.md'}")
    return EXIT_OK


def _print_metrics(cases: Sequence[Any], summaries: dict[str, dict[str, dict[str, float]]]) -> None:
    """The metrics table of `evaluate` and `evaluate-output`: one row per case, then medians (per sequence)."""
    print(f"{'case':24} {'Dice':>6} {'HD95 mm':>8} {'ref ml':>7} {'model ml':>8} {'vol err %':>9}")
    for r in cases:
        print(f"{r.case_id:24} {r.dice:6.3f} {r.hd95_mm:8.1f} {r.reference_ml:7.1f} {r.predicted_ml:8.1f} "
              f"{r.volume_error_pct:9.1f}")
    for group, summary in summaries.items():
        for name, s in summary.items():
            print(f"{group + ' ' if group else ''}{name}: median {s['median']:.3f} "
                  f"(IQR {s['q1']:.3f}-{s['q3']:.3f}, n={int(s['n'])})")


def cmd_evaluate_output(args: argparse.Namespace) -> int:
    from dmg_node.training.data import DEFAULT_ROI_PATTERN
    from dmg_node.training.evaluate_output import evaluate_output

    settings = config.load(args.config)
    logs.configure("debug" if args.verbose else "warning", "console", settings.logging.include_phi, stream=sys.stderr)
    for path in (Path(args.rtstructs), Path(args.reference)):
        if not path.exists():
            print(f"no such file or folder: {path}", file=sys.stderr)
            return EXIT_FAILURE
    roi_names = {settings.rtstruct.roi_name(seq): seq for seq in config.SEQUENCES}
    result = evaluate_output(Path(args.rtstructs), Path(args.reference), roi_names,
                             roi_pattern=args.roi or DEFAULT_ROI_PATTERN)
    _print_metrics([c.result for c in result.cases], result.summary)
    for line in result.unmatched:
        print(f"not compared: {line}", file=sys.stderr)
    print("Phantom or research figures only: they say nothing about clinical accuracy.")
    return EXIT_OK


def cmd_evaluate_shifts(args: argparse.Namespace) -> int:
    from dmg_node.training.heldout import evaluate_sets

    logs.configure("info", "console", stream=sys.stderr)
    report = Path(args.report)
    evaluate_sets(config.load(args.config), Path(args.data), report)
    print((report / "shifts.md").read_text(), end="")
    return EXIT_OK


def add_training_commands(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """Register the commands above on the CLI's subparsers."""
    s = sub.add_parser("phantom", help="write synthetic DMG phantom studies (DICOM and/or NIfTI)")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=1, help="number of cases")
    s.add_argument("--seed", type=int, default=0, help="case i uses seed + i")
    s.add_argument("--format", default="dicom,nifti", help="dicom, nifti or both (comma-separated)")
    s.add_argument("--geometry", choices=("clinical", "small"), default="clinical")
    s.add_argument("--rtstruct", action="store_true", help="also write a reference RTSTRUCT per series")
    s.add_argument("--resolution", type=float, default=1.0, help="case grid in mm (2 is faster, coarser)")
    s.add_argument("--randomized", action="store_true",
                   help="domain-randomized NIfTI cases (dmg_node.phantoms.synth); --seed is then the first case index")
    s.add_argument("--set", default="train", help="with --randomized: train, validation or a held-out set (docs/model.md)")
    s.add_argument("--grid", choices=("case", "acquired"), default="case",
                   help="with --randomized: case grid for training, each series' own grid (<seq>/ folders) for tests")
    s.set_defaults(func=cmd_phantom)
    s = with_config(sub.add_parser("train", help="train a generator for one sequence"))
    s.add_argument("--sequence", choices=("t1c", "t2", "flair"), required=True)
    s.add_argument("--data", required=True, help="NIfTI case folders, or DICOM series with reference RTSTRUCTs")
    s.add_argument("--out", required=True, help="model folder, e.g. models/my-t2")
    s.add_argument("--epochs", type=int, default=40)
    s.add_argument("--steps-per-epoch", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-adversarial", action="store_true", help="train the plain generator (no GAN term)")
    s.add_argument("--adv-weight", type=float, default=0.05)
    s.add_argument("--thick-slice-fraction", type=float, default=0.0,
                   help="share of patches seen as 3-6 mm axial slices (3D training data, 2D clinical series)")
    s.add_argument("--lr", type=float, default=3e-3, help="initial learning rate (cosine decay over the epochs)")
    s.add_argument("--spacing", type=float, default=2.0, help="model grid in mm (isotropic)")
    s.add_argument("--patch", type=int, default=48, help="patch edge in model-grid voxels (a multiple of 16)")
    s.add_argument("--init-from", help="start from this model folder's generator weights (fine-tuning)")
    s.add_argument("--max-spacing-mm", type=float, default=None,
                   help="manifest: coarsest series (largest voxel spacing) the model is meant for; default any")
    s.add_argument("--device", default="auto")
    s.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    s.add_argument("--val-data", help="validation cases (model selection) instead of a split of --data")
    s.set_defaults(func=cmd_train)
    s = with_config(sub.add_parser("evaluate", help="Dice, HD95 and volume error of a model on labelled cases"))
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--report", help="report folder (default: ./evaluation/MODELNAME-YYYYmmdd-HHMMSS)")
    s.add_argument("--device", default="auto")
    s.add_argument("--no-grow", action="store_true",
                   help="leave out the manifest's intensity-guided growth of the mask (to compare)")
    s.set_defaults(func=cmd_evaluate)
    s = with_config(sub.add_parser("evaluate-output", help=(
        "Dice, HD95 and volume error of the RTSTRUCTs the node sent, against references on the same series")))
    s.add_argument("--rtstructs", required=True, help="folder of the node's RTSTRUCTs, or its spool (the outbox)")
    s.add_argument("--reference", required=True, help=(
        "folder with the series' DICOM files and reference RTSTRUCTs, a phantom study (manifest.json truth) "
        "or NIfTI masks on the series grid"))
    s.add_argument("--roi", help="reference ROI names to use (Python re.search; default: GTV, tumour or DMG)")
    s.set_defaults(func=cmd_evaluate_output)
    s = with_config(sub.add_parser("evaluate-shifts", help="the configured models on held-out randomized sets"))
    s.add_argument("--data", required=True, help="folder of <set>/<seq>/ cases (phantom --randomized --grid acquired)")
    s.add_argument("--report", required=True, help="folder for shifts.md and shifts.json")
    s.set_defaults(func=cmd_evaluate_shifts)
