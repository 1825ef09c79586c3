"""Train one per-sequence model: generator + patch discriminator (or the generator alone).

Loss of the generator: Dice + binary cross-entropy (MONAI ``DiceCELoss``) plus, unless
``adversarial=False``, ``adv_weight`` times the adversarial loss of the discriminator's verdict
on (image, predicted probability) pairs. The discriminator learns to tell those from
(image, reference mask) pairs. Cases are preprocessed once onto the model grid and cached;
training samples patches (half centred on tumour, half elsewhere in the head) with left-right
flips and intensity jitter. After each epoch the validation Dice (whole volumes, sliding window, model grid) is
logged, the best generator kept and a resumable checkpoint written.

Outputs in ``out_dir``: ``generator.pt``, ``generator.onnx`` and ``manifest.json`` (best
epoch). Scratch in ``work_dir`` (default ``out_dir/work``): the cache and ``checkpoint.pt``.

One module because the GAN step, the epoch loop, validation, calibration and checkpoint/resume
are one training run that shares its state (optimizers, schedulers, best epoch) throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from monai.losses.adversarial_loss import PatchAdversarialLoss
from monai.losses.dice import DiceCELoss
from tqdm import tqdm

from dmg_node.classify import Rules
from dmg_node.errors import ModelError
from dmg_node.fsutil import atomic_write
from dmg_node.segment.infer import (
    PostprocessConfig,
    postprocess,
    resolve_device,
    restrict_to_head,
    sliding_window_probability,
    torch_predictor,
)
from dmg_node.segment.manifest import (
    RESEARCH_USE,
    SEQUENCES,
    TORCH_WEIGHTS,
    Manifest,
    load_manifest,
)
from dmg_node.segment.network import (
    Discriminator,
    Generator,
    GeneratorConfig,
    count_parameters,
)
from dmg_node.segment.preprocess import PreprocessConfig
from dmg_node.segment.weights import load_generator
from dmg_node.training.data import (
    DEFAULT_ROI_PATTERN,
    CaseSource,
    PatchSampler,
    PreparedCase,
    find_cases,
    load_prepared,
)
from dmg_node.training.evaluate import dice
from dmg_node.training.export import save_model

log = structlog.get_logger(__name__)

CHECKPOINT = "checkpoint.pt"
ADV_CRITERIA = ("least_squares", "bce", "hinge")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes a training run (stored in the checkpoint and the manifest)."""

    sequence: str
    epochs: int = 40
    steps_per_epoch: int = 40
    batch_size: int = 2
    lr: float = 3e-3
    seed: int = 0
    adversarial: bool = True
    adv_weight: float = 0.05
    adv_criterion: str = "least_squares"
    val_fraction: float = 0.15
    pos_fraction: float = 0.5
    thick_slice_fraction: float = 0.0
    patch_size: tuple[int, int, int] = (48, 48, 48)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def resumable_from(self, other: dict[str, Any]) -> bool:
        """Whether a checkpoint made with ``other`` may continue under these settings."""
        mine = self.to_dict()
        other = {"thick_slice_fraction": 0.0, **other}  # checkpoints made before the setting existed
        return {k: v for k, v in mine.items() if k != "epochs"} == {k: v for k, v in other.items() if k != "epochs"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        data["generator"] = self.generator.to_dict()
        data["preprocess"] = self.preprocess.to_dict()
        return data


class GanStep:
    """One optimisation step: generator on Dice+CE (+ adversarial), then the discriminator.

    Parameters
    ----------
    generator, discriminator
        The two networks (the discriminator is left untouched when ``adversarial`` is off).
    lr
        Learning rate of both (AdamW for the generator; Adam with beta1 0.5 for the
        discriminator, as usual for GANs).
    adversarial, adv_weight, adv_criterion
        Whether, how much and with which criterion (MONAI ``PatchAdversarialLoss``) the
        discriminator's verdict enters the generator loss.
    """

    def __init__(
        self,
        generator: Generator,
        discriminator: Discriminator,
        lr: float,
        *,
        adversarial: bool = True,
        adv_weight: float = 0.05,
        adv_criterion: str = "least_squares",
    ) -> None:
        self.generator = generator
        self.discriminator = discriminator
        self.adversarial = adversarial
        self.adv_weight = adv_weight
        self.opt_g = torch.optim.AdamW(generator.parameters(), lr=lr, weight_decay=1e-5)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.seg_loss = DiceCELoss(sigmoid=True)
        self.adv_loss = PatchAdversarialLoss(criterion=adv_criterion)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Update on one batch of images ``x`` and tumour fractions ``y``; return the losses."""
        logits = self.generator(x)
        loss_seg = self.seg_loss(logits, y)
        losses = {"seg": loss_seg.item()}
        loss_g = loss_seg
        if self.adversarial:
            prob = torch.sigmoid(logits)
            loss_adv = self.adv_loss(self.discriminator(x, prob), target_is_real=True, for_discriminator=False)
            loss_g = loss_seg + self.adv_weight * loss_adv
            losses["adv"] = loss_adv.item()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        if self.adversarial:
            real = self.adv_loss(self.discriminator(x, y), target_is_real=True, for_discriminator=True)
            fake = self.adv_loss(self.discriminator(x, prob.detach()), target_is_real=False, for_discriminator=True)
            loss_d = 0.5 * (real + fake)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            losses["disc"] = loss_d.item()
        return losses


CALIBRATION_THRESHOLDS = tuple(round(float(t), 2) for t in np.arange(0.1, 0.91, 0.05))


def validate(
    generator: Generator,
    cases: list[PreparedCase],
    patch: tuple[int, int, int],
    device: torch.device,
    spacing_mm: float,
    thresholds: tuple[float, ...] = (0.5,),
) -> dict[float, float]:
    """Mean Dice over whole model-grid volumes, post-processed as at inference, per threshold."""
    generator.eval()
    predictor = torch_predictor(generator, device)
    clean = PostprocessConfig(min_volume_mm3=0.0)
    margin = int(round(clean.skin_margin_mm / spacing_mm))
    probabilities = [
        restrict_to_head(sliding_window_probability(predictor, c.image, patch), c.image, margin) for c in cases
    ]
    generator.train()
    return {
        t: float(np.mean([
            dice(postprocess(p, (1.0, 1.0, 1.0), clean, t), c.label > 0.5) for p, c in zip(probabilities, cases)
        ]))
        for t in thresholds
    }


def _split(cases: list[CaseSource], val_fraction: float, seed: int) -> tuple[list[CaseSource], list[CaseSource]]:
    """Seeded split into training and validation cases (at least one of each when possible)."""
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1) if len(cases) > 1 else 0
    val = [cases[i] for i in sorted(order[:n_val])]
    return [cases[i] for i in sorted(order[n_val:])], val


def _save(path: Path, obj: object) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def train(
    sequence: str,
    data_dir: Path,
    out_dir: Path,
    *,
    epochs: int = 40,
    steps_per_epoch: int = 40,
    batch_size: int = 2,
    lr: float = 3e-3,
    seed: int = 0,
    adversarial: bool = True,
    adv_weight: float = 0.05,
    adv_criterion: str = "least_squares",
    device: str = "auto",
    resume: bool = True,
    val_fraction: float = 0.15,
    patch_size: tuple[int, int, int] = (48, 48, 48),
    thick_slice_fraction: float = 0.0,
    generator: GeneratorConfig | None = None,
    preprocess: PreprocessConfig | None = None,
    roi_pattern: str = DEFAULT_ROI_PATTERN,
    init_from: Path | None = None,
    work_dir: Path | None = None,
    time_limit_s: float | None = None,
    version: str = "0.1.0",
    intended_use: str = RESEARCH_USE,
    data_description: str = "",
    max_spacing_mm: float | None = None,
    rules: Rules | None = None,
    val_dir: Path | None = None,
) -> Manifest:
    """Train a model for ``sequence`` on the labelled cases in ``data_dir``; write ``out_dir``.

    Parameters
    ----------
    sequence
        ``t1c``, ``t2`` or ``flair``.
    data_dir
        Labelled cases (see :func:`dmg_node.training.data.find_cases`).
    out_dir
        Model folder to write (weights + manifest of the best epoch).
    epochs, steps_per_epoch, batch_size, lr, seed
        Schedule (cosine learning-rate decay over ``epochs``) and reproducibility.
    adversarial, adv_weight, adv_criterion
        Train against the patch discriminator (``least_squares``, ``bce`` or ``hinge``), or
        the plain generator with ``adversarial=False``.
    device
        ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    resume
        Continue from ``work_dir/checkpoint.pt`` when it exists (same settings; ``epochs``
        may grow).
    val_fraction
        Fraction of cases held out for the per-epoch validation Dice.
    patch_size
        Training patch (also the inference window), model-grid voxels (S, P, L).
    thick_slice_fraction
        Share of training patches degraded as a 2D axial series of 3-6 mm slices would be
        (:func:`dmg_node.training.data.thick_slices`): for a model that must work on thick-slice
        T2/FLAIR when the training images are 3D.
    generator, preprocess
        Network and preprocessing parameters (defaults when None).
    roi_pattern
        Regular expression (``re.search``) choosing RTSTRUCT ROIs for DICOM data.
    init_from
        A model folder (same network configuration, any sequence) whose generator weights
        start the training (fine-tuning) instead of a random initialisation; a checkpoint
        being resumed takes precedence.
    work_dir
        Cache and checkpoint folder (default ``out_dir/work``; not part of the model).
    time_limit_s
        Stop after the last epoch that fits in this many seconds.
    version, intended_use, data_description
        Written to the manifest.
    val_dir
        Labelled cases for validation (model selection and threshold calibration) instead of a
        ``val_fraction`` split of ``data_dir``: e.g. the ``validation`` set of
        :mod:`dmg_node.phantoms.randomize`, whose seeds never meet the training or test sets'.
    max_spacing_mm
        Written to the manifest: the coarsest series (largest voxel spacing, mm) the model is
        meant for, so a fine-grid model for 3D series can be listed before a model for 2D
        series of thick slices (:mod:`dmg_node.segment.routing`). None: any series.

    Returns
    -------
    Manifest
        The manifest written to ``out_dir``.

    Raises
    ------
    ModelError
        On invalid arguments or a checkpoint made with other settings.
    SeriesError
        If the data folder holds no usable case.
    """
    if sequence not in SEQUENCES:
        raise ModelError(f"sequence must be one of {SEQUENCES}; found {sequence!r}")
    if adv_criterion not in ADV_CRITERIA:
        raise ModelError(f"adv_criterion must be one of {ADV_CRITERIA}; found {adv_criterion!r}")
    if not 0.0 <= thick_slice_fraction <= 1.0:
        raise ModelError(f"thick_slice_fraction must be between 0 and 1; found {thick_slice_fraction}")
    if max_spacing_mm is not None and not max_spacing_mm > 0:
        raise ModelError(f"max_spacing_mm must be a positive number of mm; found {max_spacing_mm}")
    settings = TrainSettings(
        sequence, epochs, steps_per_epoch, batch_size, lr, seed, adversarial, adv_weight, adv_criterion,
        val_fraction, thick_slice_fraction=thick_slice_fraction, patch_size=patch_size,
        generator=generator or GeneratorConfig(),
        preprocess=preprocess or PreprocessConfig(),
    )
    if not 0.0 < settings.preprocess.spacing_mm <= 10.0:
        raise ModelError(f"the model grid spacing must be between 0 and 10 mm; found {settings.preprocess.spacing_mm}")
    if not lr > 0.0:
        raise ModelError(f"lr must be a positive number; found {lr}")
    if any(p % settings.generator.divisor for p in patch_size):
        raise ModelError(f"patch_size must be multiples of {settings.generator.divisor}; found {patch_size}")
    work = work_dir or out_dir / "work"
    torch_device = resolve_device(device)
    started = time.monotonic()
    torch.manual_seed(seed)

    sources = list(find_cases(data_dir, sequence, roi_pattern, rules))
    if val_dir is None:
        train_src, val_src = _split(sources, val_fraction, seed)
    else:
        train_src, val_src = sources, list(find_cases(val_dir, sequence, roi_pattern, rules))
    key = hashlib.sha256(json.dumps(settings.preprocess.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    cache = work / f"cache-{sequence}-{key}"
    train_cases = load_prepared(train_src, settings.preprocess, cache)
    val_cases = load_prepared(val_src, settings.preprocess, cache)

    gen = Generator(settings.generator)
    origin: dict[str, str] = {}
    if init_from is not None:
        start_from = load_manifest(init_from)
        if start_from.generator != settings.generator:
            raise ModelError(f"init_from model {init_from} must have the generator configuration {settings.generator}")
        gen = load_generator(init_from / TORCH_WEIGHTS, settings.generator)
        origin = {"name": start_from.name, "sequence": start_from.sequence, "sha256": start_from.sha256[TORCH_WEIGHTS]}
    gen = gen.to(torch_device)
    disc = Discriminator().to(torch_device)
    step = GanStep(gen, disc, lr, adversarial=adversarial, adv_weight=adv_weight, adv_criterion=adv_criterion)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(step.opt_g, T_max=epochs, eta_min=lr * 0.02)
    sampler = PatchSampler(train_cases, patch_size, settings.pos_fraction, seed,
                           settings.thick_slice_fraction, settings.preprocess.spacing_mm)
    state: dict[str, Any] = {"epoch": 0, "best_dice": -1.0, "best_epoch": 0, "history": [], "best": None}

    checkpoint = work / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not settings.resumable_from(saved["settings"]):
            raise ModelError(
                f"checkpoint {checkpoint} was made with other settings; pass resume=False or another work dir"
            )
        gen.load_state_dict(saved["generator"])
        disc.load_state_dict(saved["discriminator"])
        step.opt_g.load_state_dict(saved["opt_g"])
        step.opt_d.load_state_dict(saved["opt_d"])
        sched.load_state_dict(saved["sched"])
        sched.T_max = epochs
        sampler.rng.bit_generator.state = saved["sampler_rng"]
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log.info("training_resumed", checkpoint=str(checkpoint), epoch=state["epoch"])

    log.info(
        "training_started", sequence=sequence, train_cases=len(train_cases), val_cases=len(val_cases),
        device=str(torch_device), generator_params=count_parameters(gen), adversarial=adversarial,
    )
    gen.train()
    disc.train()
    epoch_seconds = 0.0
    while state["epoch"] < epochs:
        if time_limit_s is not None and time.monotonic() - started + epoch_seconds > time_limit_s:
            log.info("training_time_limit", seconds=round(time.monotonic() - started), epoch=state["epoch"])
            break
        t0 = time.monotonic()
        epoch = state["epoch"] + 1
        sums = {"seg": 0.0, "adv": 0.0, "disc": 0.0}
        bar = tqdm(range(steps_per_epoch), desc=f"{sequence} epoch {epoch}/{epochs}", disable=not sys.stderr.isatty())
        for _ in bar:
            x, y = (t.to(torch_device) for t in sampler.batch(batch_size))
            losses = step(x, y)
            for k, v in losses.items():
                sums[k] += v
            bar.set_postfix(seg=f"{losses['seg']:.3f}")
        sched.step()
        val_dice = validate(gen, val_cases, patch_size, torch_device, settings.preprocess.spacing_mm)[0.5] if val_cases else math.nan
        record = {k: round(v / steps_per_epoch, 4) for k, v in sums.items()} | {"epoch": epoch, "val_dice": round(val_dice, 4)}
        state["history"].append(record)
        state["epoch"] = epoch
        if not val_cases or val_dice > state["best_dice"]:
            state["best_dice"], state["best_epoch"] = (val_dice if val_cases else -1.0), epoch
            state["best"] = {k: v.detach().cpu().clone() for k, v in gen.state_dict().items()}
        _save(checkpoint, {
            "settings": settings.to_dict(), "generator": gen.state_dict(), "discriminator": disc.state_dict(),
            "opt_g": step.opt_g.state_dict(), "opt_d": step.opt_d.state_dict(), "sched": sched.state_dict(),
            "sampler_rng": sampler.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "state": state,
        })
        epoch_seconds = time.monotonic() - t0
        log.info("epoch_finished", sequence=sequence, seconds=round(epoch_seconds, 1), **record)

    if state["best"] is None:
        raise ModelError(f"training must run at least one epoch; time_limit_s={time_limit_s} allowed none")
    final = Generator(settings.generator)
    final.load_state_dict(state["best"])
    metrics, threshold = {}, 0.5
    if val_cases:
        # Patches centred on tumour half of the time bias the network towards tumour; the
        # threshold that best undoes this on the validation cases goes into the manifest.
        by_threshold = validate(
            final, val_cases, patch_size, torch.device("cpu"), settings.preprocess.spacing_mm, CALIBRATION_THRESHOLDS
        )
        threshold = max(by_threshold, key=lambda t: by_threshold[t])
        metrics = {"val_dice": state["best_dice"], "val_dice_calibrated": by_threshold[threshold]}
    manifest = save_model(
        out_dir,
        final,
        sequence=sequence,
        preprocess=settings.preprocess,
        patch_size=patch_size,
        version=version,
        intended_use=intended_use,
        threshold=threshold,
        training={
            "data": data_description or str(data_dir),
            "init_from": origin,
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
            "settings": settings.to_dict(),
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "history": state["history"],
            "device": str(torch_device),
            "seconds": round(time.monotonic() - started, 1),
        },
        metrics=metrics,
        max_spacing_mm=max_spacing_mm,
    )
    log.info(
        "training_finished", sequence=sequence, out_dir=str(out_dir), best_epoch=state["best_epoch"],
        threshold=threshold, **metrics,
    )
    return manifest
