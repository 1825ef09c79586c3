"""Tests for dmg_node.training.train: the GAN step, the training loop, checkpoints and resuming."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from dmg_node.errors import ModelError
from dmg_node.training.evaluate import dice
from dmg_node.segment.manifest import ONNX_WEIGHTS, TORCH_WEIGHTS, load_manifest
from dmg_node.segment.network import Discriminator, Generator, GeneratorConfig
from dmg_node.segment.preprocess import PreprocessConfig
from dmg_node.training.train import GanStep, TrainSettings, train
from tests.unit.test_data import write_blob_case

TINY = GeneratorConfig(channels=(4, 8, 8, 8, 8), aspp_dilations=(1, 2))
# A coarse grid keeps the blob volumes (and so validation) small.
FAST = {
    "steps_per_epoch": 2, "batch_size": 1, "patch_size": (32, 32, 32), "generator": TINY, "device": "cpu",
    "preprocess": PreprocessConfig(spacing_mm=4.0),
}


@pytest.fixture(scope="module")
def blob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four labelled blob cases in the NIfTI layout."""
    root = tmp_path_factory.mktemp("blobs")
    for seed in range(4):
        write_blob_case(root, f"B{seed}", seed)
    return root


@pytest.fixture(scope="module")
def first_run(blob_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder from one epoch of training (seed 7)."""
    out = tmp_path_factory.mktemp("run") / "model"
    train("t2", blob_dir, out, epochs=1, seed=7, **FAST)  # type: ignore[arg-type]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("adversarial", [True, False])
def test_a_few_steps_on_one_batch_lower_the_segmentation_loss(adversarial: bool) -> None:
    """Repeated GAN (or plain) steps on one batch reduce its Dice+CE loss."""
    torch.manual_seed(0)
    step = GanStep(Generator(TINY), Discriminator(channels=4, num_layers=2), 1e-2, adversarial=adversarial)
    x = torch.randn(2, 1, 16, 32, 32) * 0.3
    y = torch.zeros_like(x)
    y[:, :, 4:12, 10:22, 6:18] = 1.0
    x = x + 2 * y
    first = step(x, y)
    for _ in range(4):
        last = step(x, y)
    assert last["seg"] < first["seg"]
    assert ("adv" in last and "disc" in last) == adversarial


@pytest.mark.slow
def test_train_writes_a_verified_model(first_run: Path) -> None:
    """train() writes both weights files and a manifest whose hashes verify."""
    manifest = load_manifest(first_run, "t2")
    assert set(manifest.sha256) == {TORCH_WEIGHTS, ONNX_WEIGHTS}
    assert 0.0 <= manifest.metrics["val_dice"] <= 1.0
    assert manifest.training["train_cases"] and manifest.training["val_cases"]
    assert manifest.preprocess.spacing_mm == 4.0 and manifest.patch_size == (32, 32, 32)


@pytest.mark.slow
def test_same_seed_gives_the_same_weights(blob_dir: Path, first_run: Path, tmp_path: Path) -> None:
    """A second run with the same seed produces identical generator weights."""
    train("t2", blob_dir, tmp_path / "again", epochs=1, seed=7, **FAST)  # type: ignore[arg-type]
    a = torch.load(first_run / TORCH_WEIGHTS, weights_only=True)
    b = torch.load(tmp_path / "again" / TORCH_WEIGHTS, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_training_resumes_and_refuses_other_settings(blob_dir: Path, first_run: Path, tmp_path: Path) -> None:
    """A later call continues at the next epoch; one with another learning rate is refused."""
    out = tmp_path / "model"
    shutil.copytree(first_run, out)
    with capture_logs() as logs:
        resumed = train("t2", blob_dir, out, epochs=2, seed=7, **FAST)  # type: ignore[arg-type]
    assert any(e["event"] == "training_resumed" and e["epoch"] == 1 for e in logs)
    assert [h["epoch"] for h in resumed.training["history"]] == [1, 2]
    with pytest.raises(ModelError, match="other settings"):
        train("t2", blob_dir, out, epochs=3, seed=7, lr=5e-3, **FAST)  # type: ignore[arg-type]


def test_invalid_sequence_and_patch_are_refused(blob_dir: Path, tmp_path: Path) -> None:
    """An unknown sequence, a patch that is not a multiple of the divisor or a thick-slice share
    outside [0, 1] raises ModelError."""
    with pytest.raises(ModelError, match="sequence"):
        train("dwi", blob_dir, tmp_path / "m", epochs=1)
    with pytest.raises(ModelError, match="multiples of 16"):
        train("t2", blob_dir, tmp_path / "m", epochs=1, patch_size=(40, 40, 40))
    with pytest.raises(ModelError, match="thick_slice_fraction must be between 0 and 1"):
        train("t2", blob_dir, tmp_path / "m", epochs=1, thick_slice_fraction=1.5)
    with pytest.raises(ModelError, match="grid spacing must be between 0 and 10 mm"):
        train("t2", blob_dir, tmp_path / "m", epochs=1, preprocess=PreprocessConfig(spacing_mm=0.0))
    with pytest.raises(ModelError, match="lr must be a positive number"):
        train("t2", blob_dir, tmp_path / "m", epochs=1, lr=0.0)
    with pytest.raises(ModelError, match="max_spacing_mm must be a positive number"):
        train("t2", blob_dir, tmp_path / "m", epochs=1, max_spacing_mm=-1.0)


@pytest.mark.slow
def test_train_command_sets_grid_patch_lr_and_max_spacing(blob_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`dmg-node train --spacing --patch --lr --max-spacing-mm` reach the manifest; a bad value is a
    one-line error with exit code 1."""
    from dmg_node.cli import EXIT_FAILURE, EXIT_OK, main

    out = tmp_path / "fine"
    args = ["train", "--sequence", "t2", "--data", str(blob_dir), "--out", str(out), "--epochs", "1",
            "--steps-per-epoch", "1", "--device", "cpu", "--spacing", "4", "--patch", "32", "--lr", "1e-3"]
    assert main([*args, "--max-spacing-mm", "2"]) == EXIT_OK
    manifest = load_manifest(out, "t2")
    assert manifest.preprocess.spacing_mm == 4.0 and manifest.patch_size == (32, 32, 32)
    assert manifest.max_spacing_mm == 2.0 and manifest.training["settings"]["lr"] == 1e-3
    assert main([*args, "--out", str(tmp_path / "bad"), "--patch", "40"]) == EXIT_FAILURE
    assert "multiples of 16" in capsys.readouterr().err


def test_dice_of_identical_disjoint_and_empty_masks() -> None:
    """Dice is 1 for equal masks, 0 for disjoint ones and 1 when both are empty."""
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    a[0], b[1] = True, True
    assert dice(a, a) == 1.0 and dice(a, b) == 0.0 and dice(~np.ones_like(a), ~np.ones_like(a)) == 1.0


def test_checkpoint_settings_from_before_thick_slices_still_resume() -> None:
    """A checkpoint written before thick_slice_fraction existed resumes when the share is 0, not otherwise."""
    old = TrainSettings("t2").to_dict()
    del old["thick_slice_fraction"]
    assert TrainSettings("t2").resumable_from(old)
    assert not TrainSettings("t2", thick_slice_fraction=0.5).resumable_from(old)
