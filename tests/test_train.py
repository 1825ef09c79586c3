"""Tests for dmg_node.segment.train: the GAN step, the training loop, checkpoints and resuming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dmg_node.errors import ModelError
from dmg_node.segment.manifest import ONNX_WEIGHTS, TORCH_WEIGHTS, load_manifest
from dmg_node.segment.network import Discriminator, Generator, GeneratorConfig
from dmg_node.segment.train import GanStep, PatchSampler, PreparedCase, dice, train
from tests.test_data import write_blob_case

TINY = GeneratorConfig(channels=(4, 8, 8, 8, 8), aspp_dilations=(1, 2))
PATCH = (32, 32, 32)
FAST = {"steps_per_epoch": 2, "batch_size": 1, "patch_size": PATCH, "generator": TINY, "device": "cpu"}


@pytest.fixture(scope="module")
def blob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled blob cases in the NIfTI layout."""
    root = tmp_path_factory.mktemp("blobs")
    for seed in range(4):
        write_blob_case(root, f"B{seed}", seed)
    return root


@pytest.mark.parametrize("adversarial", [True, False])
def test_a_few_steps_on_one_batch_lower_the_segmentation_loss(adversarial: bool) -> None:
    """Repeated GAN (or plain) steps on one batch reduce its Dice+CE loss."""
    torch.manual_seed(0)
    step = GanStep(Generator(TINY), Discriminator(channels=4), 1e-2, adversarial=adversarial)
    x = torch.randn(2, 1, 32, 32, 32) * 0.3
    y = torch.zeros_like(x)
    y[:, :, 8:20, 10:22, 6:18] = 1.0
    x = x + 2 * y
    first = step(x, y)
    for _ in range(5):
        last = step(x, y)
    assert last["seg"] < first["seg"]
    assert ("adv" in last and "disc" in last) == adversarial


def test_sampler_centres_most_patches_on_tumour_and_is_seeded() -> None:
    """Patches have the requested size, mostly contain tumour, and repeat for the same seed."""
    image = np.zeros((40, 40, 40), np.float32)
    label = np.zeros_like(image)
    label[30:34, 5:9, 20:24] = 1.0
    cases = [PreparedCase("a", image, label)]
    x1, y1 = PatchSampler(cases, (16, 16, 16), 0.9, seed=3).batch(8)
    x2, _ = PatchSampler(cases, (16, 16, 16), 0.9, seed=3).batch(8)
    assert x1.shape == (8, 1, 16, 16, 16) and torch.equal(x1, x2)
    assert int((y1.flatten(1).amax(1) > 0).sum()) >= 5


def test_train_writes_a_verified_model_and_resumes(blob_dir: Path, tmp_path: Path) -> None:
    """train() writes weights and a verifiable manifest, and a second call resumes at the next epoch."""
    out = tmp_path / "model"
    manifest = train("t2", blob_dir, out, epochs=1, **FAST)  # type: ignore[arg-type]
    assert load_manifest(out, "t2") == manifest
    assert set(manifest.sha256) == {TORCH_WEIGHTS, ONNX_WEIGHTS}
    assert 0.0 <= manifest.metrics["val_dice"] <= 1.0
    assert manifest.training["train_cases"] and manifest.training["val_cases"]
    with capture_logs() as logs:
        resumed = train("t2", blob_dir, out, epochs=2, **FAST)  # type: ignore[arg-type]
    assert any(e["event"] == "training_resumed" and e["epoch"] == 1 for e in logs)
    assert [h["epoch"] for h in resumed.training["history"]] == [1, 2]


def test_same_seed_gives_the_same_weights(blob_dir: Path, tmp_path: Path) -> None:
    """Two runs with one seed produce identical generator weights."""
    states = []
    for name in ("a", "b"):
        train("t2", blob_dir, tmp_path / name, epochs=1, seed=7, resume=False, **FAST)  # type: ignore[arg-type]
        states.append(torch.load(tmp_path / name / TORCH_WEIGHTS, weights_only=True))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_checkpoint_from_other_settings_is_refused(blob_dir: Path, tmp_path: Path) -> None:
    """Resuming a checkpoint made with another learning rate raises ModelError."""
    train("t2", blob_dir, tmp_path / "m", epochs=1, lr=1e-3, **FAST)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="other settings"):
        train("t2", blob_dir, tmp_path / "m", epochs=2, lr=5e-3, **FAST)  # type: ignore[arg-type]


def test_invalid_sequence_and_patch_are_refused(blob_dir: Path, tmp_path: Path) -> None:
    """An unknown sequence or a patch that is not a multiple of the divisor raises ModelError."""
    with pytest.raises(ModelError, match="sequence"):
        train("dwi", blob_dir, tmp_path / "m", epochs=1)
    with pytest.raises(ModelError, match="multiples of 16"):
        train("t2", blob_dir, tmp_path / "m", epochs=1, patch_size=(40, 40, 40))


def test_dice_of_identical_disjoint_and_empty_masks() -> None:
    """Dice is 1 for equal masks, 0 for disjoint ones and 1 when both are empty."""
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[0], b[1] = True, True
    assert dice(a, a) == 1.0 and dice(a, b) == 0.0 and dice(~np.ones_like(a), ~np.ones_like(a)) == 1.0
