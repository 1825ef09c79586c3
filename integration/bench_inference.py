"""Inference benchmark: seconds and peak memory per volume, torch vs ONNX Runtime, on the CPU.

Usage: python -m integration.bench_inference [--repeats 3] [--models models] [--gpu]

Three volumes are cut from one phantom (dmg_node.phantoms.phantom, seed 4242): a 256x256x24 axial
T2 (0.9 x 0.9 x 6 mm), a 3D 1 mm T2 and a 3D 1 mm T1C (176 sagittal slices of 256x256). Each
(volume, backend) pair runs in a fresh process that loads the models the default config lists
for that sequence and picks the one the node would (by voxel spacing; a randomly initialised
model of the default size if none is present), and times ``Segmenter.predict`` (median of the
repeats, after one warm-up); peak memory is that process's VmHWM. Prints a Markdown table.
With ``--gpu`` a third column times torch on CUDA (float16 autocast, as the node runs there),
with its peak GPU memory and the Dice between its mask and ONNX Runtime's on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float).T
VOLUMES = {
    # name: (sequence, array shape (slices, rows, cols), spacing (col, row, slice) mm, direction columns)
    "T2 axial 256x256x24": ("t2", (24, 256, 256), (0.9, 0.9, 6.0), np.eye(3)),
    "T2 3D 1 mm 176x256x256": ("t2", (176, 256, 256), (1.0, 1.0, 1.0), SAGITTAL),
    "T1C 3D 1 mm 176x256x256": ("t1c", (176, 256, 256), (1.0, 1.0, 1.0), SAGITTAL),
}
BACKENDS = ("torch", "onnx")
GPU = "cuda"  # torch on the GPU


def make_volumes(folder: Path) -> None:
    """Resample one phantom onto the two benchmark grids and save them as .npz files."""
    from dmg_node.phantoms.phantom import make_case
    from dmg_node.segment.preprocess import resample

    case = make_case(4242)
    centre = case.affine[:3, :3] @ (np.array(case.label.shape[::-1]) - 1) / 2 + case.affine[:3, 3]
    for index, (name, (sequence, shape, spacing, direction)) in enumerate(VOLUMES.items()):
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(spacing)
        affine[:3, 3] = centre - affine[:3, :3] @ (np.array(shape[::-1]) - 1) / 2
        array = resample(case.images[sequence], case.affine, shape, affine)
        np.savez(folder / f"{index}.npz", array=array, affine=affine, sequence=sequence)


def worker(volume_file: Path, backend: str, models: Path, repeats: int) -> None:
    """Run in a child process: load, warm up, time ``repeats`` predictions, print JSON.

    The mask goes to ``<volume_file>.<backend>.npy`` for the parent to compare backends.
    """
    import torch

    from dmg_node import config
    from dmg_node.training.data import array_volume
    from dmg_node.training.export import save_model
    from dmg_node.segment.infer import Segmenter
    from dmg_node.segment.manifest import RESEARCH_USE
    from dmg_node.segment.network import Generator
    from dmg_node.segment.preprocess import PreprocessConfig
    from dmg_node.segment.routing import ModelSet

    with np.load(volume_file) as npz:
        volume = array_volume(npz["array"], npz["affine"])
        sequence = str(npz["sequence"])
    folders = [models / name for name in getattr(config.from_dict({}).models, sequence)]
    with tempfile.TemporaryDirectory() as tmp:
        folders = [f for f in folders if (f / "manifest.json").is_file()]
        if not folders:
            folders = [Path(tmp) / "random"]
            save_model(folders[0], Generator(), sequence=sequence, preprocess=PreprocessConfig(),
                       patch_size=(48, 48, 48), version="0", intended_use=RESEARCH_USE)
        device, kind = ("cuda", "torch") if backend == GPU else ("cpu", backend)
        segmenter = ModelSet([Segmenter.load(f, device, backend=kind) for f in folders]).for_volume(volume)
        mask = segmenter.predict(volume)
        np.save(f"{volume_file}.{backend}.npy", np.asarray(mask) > 0)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            segmenter.predict(volume)
            times.append(time.perf_counter() - start)
    peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    gpu_gb = torch.cuda.max_memory_allocated() / 1024**3 if backend == GPU else 0.0
    print(json.dumps({"seconds": statistics.median(times), "peak_gb": peak_kb / 1024**2, "gpu_gb": gpu_gb,
                      "model": segmenter.name}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--gpu", action="store_true", help="also time torch on the CUDA device")
    parser.add_argument("--worker", nargs=2, metavar=("VOLUME_NPZ", "BACKEND"))
    args = parser.parse_args()
    from dmg_node.logs import configure

    configure(level="warning", stream=sys.stderr)
    if args.worker:
        worker(Path(args.worker[0]), args.worker[1], args.models, args.repeats)
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA device and a CUDA build of torch; none was found")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_volumes(Path(tmp))
        for index, name in enumerate(VOLUMES):
            result = {}
            for backend in BACKENDS + ((GPU,) if args.gpu else ()):
                out = subprocess.run(
                    [sys.executable, "-m", "integration.bench_inference", "--repeats", str(args.repeats),
                     "--models", str(args.models), "--worker", str(Path(tmp) / f"{index}.npz"), backend],
                    check=True, capture_output=True, text=True, timeout=1800,
                )
                result[backend] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name} {backend}: {result[backend]}", file=sys.stderr, flush=True)  # progress
            if args.gpu:
                from dmg_node.training.evaluate import dice

                masks = {b: np.load(Path(tmp) / f"{index}.npz.{b}.npy") for b in ("onnx", GPU)}
                result[GPU]["dice_vs_onnx"] = dice(masks[GPU], masks["onnx"])
            rows.append((name, result))
    print(f"CPU threads used: {os.cpu_count()} logical; median of {args.repeats} runs after one warm-up\n")
    print("| volume | model | torch (s) | ONNX Runtime (s) | torch / ORT | peak torch (GB) | peak ORT (GB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        t, o = r["torch"], r["onnx"]
        print(f"| {name} | {o['model']} | {t['seconds']:.2f} | {o['seconds']:.2f} | {t['seconds'] / o['seconds']:.2f} | "
              f"{t['peak_gb']:.2f} | {o['peak_gb']:.2f} |")
    if args.gpu:
        import torch

        print(f"\nGPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, float16 autocast\n")
        print("| volume | model | GPU (s) | ORT CPU / GPU | peak GPU memory (GB) | mask Dice GPU vs ORT |")
        print("|---|---|---|---|---|---|")
        for name, r in rows:
            g, o = r[GPU], r["onnx"]
            print(f"| {name} | {g['model']} | {g['seconds']:.3f} | {o['seconds'] / g['seconds']:.1f} | "
                  f"{g['gpu_gb']:.2f} | {g['dice_vs_onnx']:.4f} |")


if __name__ == "__main__":
    main()
