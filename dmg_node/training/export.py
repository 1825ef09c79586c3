"""Writing a trained model: torch state_dict, the ONNX graph used on CPU, and the manifest.

Both are written through :func:`dmg_node.fsutil.atomic_write`, so a model folder never holds a
torn weights file whose hash the manifest would then refuse.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from dmg_node.fsutil import atomic_write, ensure_dir
from dmg_node.segment.manifest import (
    ONNX_WEIGHTS,
    TORCH_WEIGHTS,
    Manifest,
    sha256_file,
    write_manifest,
)
from dmg_node.segment.network import Generator
from dmg_node.segment.preprocess import PreprocessConfig
from dmg_node.segment.weights import INPUT_NAME, OUTPUT_NAME

ONNX_OPSET = 17


def save_generator(generator: Generator, path: Path) -> None:
    """Write the generator's state_dict (CPU tensors) to ``path``."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in generator.state_dict().items()}, buffer)
    atomic_write(path, buffer.getvalue())


def export_onnx(generator: Generator, path: Path) -> None:
    """Export the generator to ONNX with dynamic batch and spatial axes.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no extra packages and
    handles every layer here (instance norm, transposed convolution, global pooling).
    """
    was_training = generator.training
    generator = generator.eval()
    divisor = generator.config.divisor
    example = torch.zeros(1, 1, divisor * 2, divisor * 2, divisor * 2, device=next(generator.parameters()).device)
    axes = {0: "batch", 2: "slices", 3: "rows", 4: "columns"}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The exporter warns that it is the legacy path and that instance norm is exported in
        # inference mode; both are what we want.
        warnings.simplefilter("ignore")
        scratch = Path(tmp) / path.name
        torch.onnx.export(
            generator,
            (example,),
            scratch,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
        )
        data = scratch.read_bytes()
    generator.train(was_training)
    atomic_write(path, data)


def save_model(
    model_dir: Path,
    generator: Generator,
    *,
    sequence: str,
    preprocess: PreprocessConfig,
    patch_size: tuple[int, int, int],
    version: str,
    intended_use: str,
    threshold: float = 0.5,
    training: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    max_spacing_mm: float | None = None,
) -> Manifest:
    """Write a complete model folder: torch weights, ONNX graph, then the manifest with hashes.

    The manifest is written last, so a folder whose manifest exists has all its weights.
    """
    ensure_dir(model_dir)
    save_generator(generator, model_dir / TORCH_WEIGHTS)
    export_onnx(generator, model_dir / ONNX_WEIGHTS)
    manifest = Manifest(
        name=model_dir.name,
        sequence=sequence,
        version=version,
        generator=generator.config,
        preprocess=preprocess,
        patch_size=patch_size,
        sha256={name: sha256_file(model_dir / name) for name in (TORCH_WEIGHTS, ONNX_WEIGHTS)},
        threshold=threshold,
        training=training or {},
        metrics=metrics or {},
        intended_use=intended_use,
        max_spacing_mm=max_spacing_mm,
    )
    write_manifest(model_dir, manifest)
    return manifest
