"""Loading generator weights (torch state_dict) and the names of the ONNX graph's input and output."""

from __future__ import annotations

from pathlib import Path

import torch

from dmg_node.errors import ModelError
from dmg_node.segment.network import Generator, GeneratorConfig

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def load_generator(path: Path, config: GeneratorConfig, device: torch.device | str = "cpu") -> Generator:
    """Build a :class:`Generator` from ``config`` and load ``path`` into it (eval mode).

    Raises
    ------
    ModelError
        If the file cannot be unpickled as tensors or does not fit the configuration.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        generator = Generator(config)
        generator.load_state_dict(state)
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"generator weights {path} must match the manifest's network; loading failed: {exc}") from exc
    return generator.to(device).eval()
