"""Run a trained generator on one source volume and return a mask on that volume's exact grid.

Backends behind one interface: torch (GPU, with float16 autocast; or CPU) and ONNX Runtime
(CPU, the default there: about twice as fast as torch for this network). The volume is put on
the model grid (:mod:`dmg_node.segment.preprocess`), segmented with MONAI's sliding-window
inferer (the window is the training patch), set to 0 outside the head less a skin margin,
mapped back onto the source grid, thresholded (at the manifest's calibrated threshold) and cleaned up (largest
connected component, holes filled, minimum volume); when the manifest asks for it, the mask then
grows into adjacent voxels that look like its core (:mod:`dmg_node.segment.refine`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog
import torch
from monai.inferers.utils import sliding_window_inference
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidProtobuf,
    NoSuchFile,
    RuntimeException,
)
from scipy import ndimage

from dmg_node.errors import ModelError
from dmg_node.segment.manifest import (
    ONNX_WEIGHTS,
    TORCH_WEIGHTS,
    Manifest,
    load_manifest,
)
from dmg_node.segment.preprocess import Prepared, head_mask, prepare, to_source
from dmg_node.segment.refine import grow_mask
from dmg_node.segment.weights import INPUT_NAME, load_generator
from dmg_node.volume import Volume

log = structlog.get_logger(__name__)

BACKENDS = ("auto", "torch", "onnx")
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PostprocessConfig:
    """How a probability map becomes a mask on the source grid.

    Attributes
    ----------
    skin_margin_mm
        Probabilities within this distance of the head's surface are set to 0 (the tumour is
        deep midline; scalp and skull are not).
    largest_component
        Keep only the largest 26-connected component (DMG is one lesion).
    fill_holes
        Fill enclosed holes (necrotic or cystic centres belong to the GTV).
    min_volume_mm3
        A mask smaller than this is returned empty (no contour is better than a speck).
    """

    skin_margin_mm: float = 10.0
    largest_component: bool = True
    fill_holes: bool = True
    min_volume_mm3: float = 100.0


def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads slow 3D convolutions down)."""
    available = len(os.sched_getaffinity(0))
    try:
        pairs = set()
        physical = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                core = value.strip()
                pairs.add((physical, core))
        cores = len(pairs) or available
    except OSError:
        cores = available
    return max(1, min(cores, available))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch spells it.

    Raises
    ------
    ModelError
        If a CUDA device is asked for and none is available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} needs CUDA; torch found no CUDA device")
    return resolved


def torch_predictor(generator: torch.nn.Module, device: torch.device) -> Predictor:
    """Logits from the torch generator (float16 autocast on GPU only: bf16 on CPU is far slower).

    The logits come back on the input's device (MONAI's sliding window stitches them there).
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=device.type == "cuda"):
            out: torch.Tensor = generator(x.to(device))
        return out.float().to(x.device)

    return run


def onnx_predictor(path: Path, threads: int) -> Predictor:
    """Logits from the ONNX graph with ONNX Runtime on the CPU.

    Raises
    ------
    ModelError
        If ONNX Runtime cannot load the graph.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidArgument, InvalidProtobuf, NoSuchFile, RuntimeException) as exc:
        raise ModelError(f"ONNX model {path} cannot be loaded by ONNX Runtime: {exc}") from exc

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {INPUT_NAME: x.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(out)

    return run


def sliding_window_probability(
    predictor: Predictor,
    image: npt.NDArray[np.float32],
    patch_size: tuple[int, int, int],
    *,
    overlap: float = 0.25,
    flip: bool = False,
) -> npt.NDArray[np.float32]:
    """Tumour probability for a model-grid image (S, P, L), window by window.

    With ``flip``, the left-right mirrored image is segmented too and the probabilities are
    averaged (training mirrors left-right, so this is the one flip the network has seen).
    """
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    views = [x, torch.flip(x, dims=(4,))] if flip else [x]
    total = torch.zeros_like(x)
    for n, view in enumerate(views):
        with torch.inference_mode():
            logits = cast(
                torch.Tensor,
                sliding_window_inference(
                    view, roi_size=patch_size, sw_batch_size=1, predictor=predictor, overlap=overlap, mode="gaussian"
                ),
            )
        prob = torch.sigmoid(logits.float().cpu())
        total += torch.flip(prob, dims=(4,)) if n else prob
    result: npt.NDArray[np.float32] = (total / len(views))[0, 0].numpy()
    return result


def restrict_to_head(
    probability: npt.NDArray[np.float32], image: npt.NDArray[np.float32], margin_voxels: int
) -> npt.NDArray[np.float32]:
    """Zero the probability outside the head of the model-grid ``image`` shrunk by a margin.

    A midline glioma lies deep in the brain, centimetres from the skin; this removes false
    positives in air, scalp and skull (the head mask includes them).
    """
    head = head_mask(image)
    if margin_voxels:
        head = ndimage.binary_erosion(head, iterations=margin_voxels)
    out: npt.NDArray[np.float32] = np.where(head, probability, np.float32(0.0))
    return out


def postprocess(
    probability: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    config: PostprocessConfig,
    threshold: float = 0.5,
) -> npt.NDArray[np.bool_]:
    """Threshold, keep the largest component, fill holes and apply the minimum volume."""
    mask: npt.NDArray[np.bool_] = probability > threshold
    if not mask.any():
        return mask
    (box,) = ndimage.find_objects(mask.astype(np.uint8))
    sub = mask[box]
    if config.largest_component:
        labels, n = ndimage.label(sub, structure=np.ones((3, 3, 3), dtype=bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            sub = labels == int(np.argmax(sizes))
    if config.fill_holes:
        sub = ndimage.binary_fill_holes(sub)
    mask = np.zeros_like(mask)
    mask[box] = sub
    volume_mm3 = float(mask.sum()) * float(np.prod(spacing))
    if volume_mm3 < config.min_volume_mm3:
        log.info("mask_below_min_volume", volume_mm3=round(volume_mm3, 1), min_volume_mm3=config.min_volume_mm3)
        return np.zeros_like(mask)
    return mask


class Segmenter:
    """One trained model, ready to segment volumes of its sequence.

    Use :meth:`load`; the constructor takes an already-built predictor (tests use this).
    """

    def __init__(
        self,
        manifest: Manifest,
        predictor: Predictor,
        device: str,
        *,
        flip: bool = False,
        overlap: float = 0.25,
        postprocess: PostprocessConfig | None = None,
        threshold: float | None = None,
        grow: bool = True,
    ) -> None:
        self.manifest = manifest
        self.threshold = manifest.threshold if threshold is None else threshold
        self.predictor = predictor
        self.device = device
        self.flip = flip
        self.overlap = overlap
        self.postprocess = postprocess or PostprocessConfig()
        self.grow = manifest.grow if grow else None

    @property
    def sequence(self) -> str:
        """The MR sequence this model segments (``t1c``, ``t2`` or ``flair``)."""
        return self.manifest.sequence

    @property
    def name(self) -> str:
        """Model name from the manifest."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Model version from the manifest."""
        return self.manifest.version

    @property
    def max_spacing_mm(self) -> float | None:
        """Coarsest series voxel spacing the model is meant for (manifest; None = any)."""
        return self.manifest.max_spacing_mm

    @classmethod
    def load(
        cls,
        model_dir: Path,
        device: str = "auto",
        *,
        backend: str = "auto",
        sequence: str | None = None,
        flip: bool = False,
        overlap: float = 0.25,
        postprocess: PostprocessConfig | None = None,
        threshold: float | None = None,
        grow: bool = True,
    ) -> Segmenter:
        """Verify and load the model in ``model_dir``.

        Parameters
        ----------
        model_dir
            Folder with ``manifest.json`` and the weights it lists.
        device
            ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        backend
            ``auto`` (ONNX Runtime on CPU when the manifest lists the ONNX graph, torch
            otherwise), ``torch`` or ``onnx`` (CPU only).
        sequence
            When given, the model must be for this sequence.
        flip
            Test-time left-right flipping (twice the time; off by default).
        overlap
            Sliding-window overlap fraction.
        postprocess
            Clean-up and minimum volume.
        threshold
            Probability threshold; by default the one calibrated on the validation cases and
            stored in the manifest.
        grow
            Apply the manifest's intensity-guided growth (``grow``), when it has one; False
            turns it off (to compare the two).

        Raises
        ------
        ModelError
            If the manifest or weights are missing, altered or for another sequence, or the
            backend/device combination is not possible.
        """
        if backend not in BACKENDS:
            raise ModelError(f"backend must be one of {BACKENDS}; found {backend!r}")
        manifest = load_manifest(model_dir, sequence)
        torch_device = resolve_device(device)
        if backend == "auto":
            backend = "onnx" if torch_device.type == "cpu" and ONNX_WEIGHTS in manifest.sha256 else "torch"
        threads = physical_cores()
        if backend == "onnx":
            if torch_device.type != "cpu":
                raise ModelError(f"the onnx backend runs on the CPU; device {device!r} asks for {torch_device}")
            if ONNX_WEIGHTS not in manifest.sha256:
                raise ModelError(f"model {model_dir} lists no {ONNX_WEIGHTS} in its manifest")
            predictor = onnx_predictor(model_dir / ONNX_WEIGHTS, threads)
        else:
            if TORCH_WEIGHTS not in manifest.sha256:
                raise ModelError(f"model {model_dir} lists no {TORCH_WEIGHTS} in its manifest")
            if torch_device.type == "cpu":
                torch.set_num_threads(threads)
            generator = load_generator(model_dir / TORCH_WEIGHTS, manifest.generator, torch_device)
            predictor = torch_predictor(generator, torch_device)
        log.info(
            "model_loaded", model=manifest.name, sequence=manifest.sequence, version=manifest.version,
            backend=backend, device=str(torch_device), threads=threads,
        )
        return cls(
            manifest, predictor, f"{torch_device}/{backend}", flip=flip, overlap=overlap, postprocess=postprocess,
            threshold=threshold, grow=grow,
        )

    def probability(self, prepared: Prepared) -> npt.NDArray[np.float32]:
        """Tumour probability on the model grid for an already prepared image (0 outside the head)."""
        probability = sliding_window_probability(
            self.predictor, prepared.image, self.manifest.patch_size, overlap=self.overlap, flip=self.flip
        )
        margin = int(round(self.postprocess.skin_margin_mm / self.manifest.preprocess.spacing_mm))
        return restrict_to_head(probability, prepared.image, margin)

    def predict(self, volume: Volume) -> npt.NDArray[np.bool_]:
        """Segment ``volume``; the mask has ``volume.array``'s shape and lies on its grid.

        Raises
        ------
        SeriesError
            If the volume cannot be preprocessed (for example a constant image).
        """
        start = time.perf_counter()
        prepared = prepare(volume, self.manifest.preprocess)
        probability = self.probability(prepared)
        source = to_source(probability, prepared.affine, volume, self.threshold)
        mask = postprocess(source, volume.spacing, self.postprocess, self.threshold)
        grown = 0
        if self.grow is not None and mask.any():
            before = int(mask.sum())
            mask = grow_mask(volume.array, mask, volume.spacing, self.grow)
            grown = int(mask.sum()) - before
        log.info(
            "volume_segmented", model=self.name, sequence=self.sequence, shape=list(volume.array.shape),
            grown_voxels=grown,
            voxels=int(mask.sum()), volume_ml=round(float(mask.sum()) * float(np.prod(volume.spacing)) / 1000, 2),
            seconds=round(time.perf_counter() - start, 2),
        )
        return mask
