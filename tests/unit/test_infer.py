"""Tests for dmg_node.segment.infer (with manifest and export): loading, parity, source-grid output.

The last test runs the committed demo models on freshly generated phantoms (seeds never used in
training) and checks the Dice figures that docs/model.md reports.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmg_node.errors import ModelError
from dmg_node.training.data import array_volume
from dmg_node.training.evaluate import dice, evaluate, hd95
from dmg_node.segment.weights import load_generator
from dmg_node.training.export import save_model
from dmg_node.segment.infer import (
    PostprocessConfig,
    Segmenter,
    onnx_predictor,
    postprocess,
    sliding_window_probability,
    torch_predictor,
)
from dmg_node.segment.manifest import (
    DEMO_USE,
    MANIFEST_NAME,
    ONNX_WEIGHTS,
    TORCH_WEIGHTS,
    Manifest,
    load_manifest,
    write_manifest,
)
from dmg_node.segment.network import Generator, GeneratorConfig
from dmg_node.phantoms.phantom import PhantomCase, make_case
from dmg_node.segment.preprocess import PreprocessConfig, prepare
from tests.unit.test_data import write_blob_case
from tests.unit.test_preprocess import TUMOUR_CENTRE, oblique_head

TINY = GeneratorConfig(channels=(4, 8, 8, 8, 8), aspp_dilations=(1, 2))
MODELS = Path(__file__).resolve().parents[2] / "models"
# Regression floors for the demo models on two fresh 1.5 mm phantoms (measured there: T1C
# 0.81/0.79, T1C-3D 0.82/0.69, T2 0.83/0.89, T2-3D 0.88/0.94 (0.86/0.94 without its growth), FLAIR 0.91/0.94; 9002 is a
# non-enhancing tumour, the kind demo-t1c-3d under-segments). The targets of docs/model.md (T2/FLAIR
# 0.90, T1C 0.85) are for the 20 held-out 1 mm phantoms; two coarser phantoms are a regression
# check small enough for CI, not that measurement.
DEMO_DICE_FLOOR = {"demo-t1c": 0.72, "demo-t1c-3d": 0.62, "demo-t2": 0.78, "demo-t2-3d": 0.80, "demo-flair": 0.85}


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    """A randomly initialised tiny model folder for sequence t2."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    save_model(
        folder, Generator(TINY).eval(), sequence="t2", preprocess=PreprocessConfig(), patch_size=(32, 32, 32),
        version="0.0.1", intended_use=DEMO_USE,
    )
    return folder


def test_saved_and_reloaded_generator_gives_identical_outputs(tiny_model: Path) -> None:
    """Weights written by save_model reload into a generator with bit-identical outputs."""
    torch.manual_seed(0)
    original = Generator(TINY).eval()
    reloaded = load_generator(tiny_model / TORCH_WEIGHTS, TINY)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        assert torch.equal(original(x), reloaded(x))


def test_onnx_runtime_matches_torch(tiny_model: Path) -> None:
    """The ONNX graph under ONNX Runtime reproduces torch's logits (max abs diff < 1e-4)."""
    generator = load_generator(tiny_model / TORCH_WEIGHTS, TINY)
    x = torch.randn(1, 1, 48, 32, 64)
    ref = torch_predictor(generator, torch.device("cpu"))(x)
    out = onnx_predictor(tiny_model / ONNX_WEIGHTS, threads=1)(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) < 1e-4


def test_altered_weights_are_refused(tiny_model: Path) -> None:
    """A weights file whose sha256 differs from the manifest's raises ModelError."""
    data = bytearray((tiny_model / TORCH_WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (tiny_model / TORCH_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        Segmenter.load(tiny_model, "cpu")


def test_missing_files_and_wrong_sequence_are_refused(tiny_model: Path) -> None:
    """A model for another sequence, a missing weights file or manifest raise ModelError."""
    with pytest.raises(ModelError, match="sequence 't1c'"):
        load_manifest(tiny_model, "t1c")
    (tiny_model / ONNX_WEIGHTS).unlink()
    with pytest.raises(ModelError, match="missing"):
        load_manifest(tiny_model)
    (tiny_model / MANIFEST_NAME).unlink()
    with pytest.raises(ModelError, match="manifest.json"):
        Segmenter.load(tiny_model)


def test_corrupt_manifest_is_refused(tiny_model: Path) -> None:
    """A manifest that is not JSON, or lacks a field, raises ModelError."""
    path = tiny_model / MANIFEST_NAME
    path.write_text("{not json")
    with pytest.raises(ModelError, match="JSON"):
        load_manifest(tiny_model)
    path.write_text('{"format": 1, "name": "x"}')
    with pytest.raises(ModelError, match="missing or has an invalid field"):
        load_manifest(tiny_model)


def test_max_spacing_round_trips_and_must_be_positive(tiny_model: Path) -> None:
    """The optional max_spacing_mm survives the manifest's JSON; absent means any series; <= 0 is refused."""
    manifest = load_manifest(tiny_model)
    assert manifest.max_spacing_mm is None and "max_spacing_mm" not in manifest.to_json()
    bounded = dataclasses.replace(manifest, max_spacing_mm=2.0)
    assert Manifest.from_json(bounded.to_json()).max_spacing_mm == 2.0
    data = json.loads(bounded.to_json())
    data["max_spacing_mm"] = 0
    with pytest.raises(ModelError, match="max_spacing_mm must be a positive number"):
        Manifest.from_json(json.dumps(data))
    write_manifest(tiny_model, bounded)
    assert Segmenter.load(tiny_model, "cpu").max_spacing_mm == 2.0


def test_load_reports_sequence_name_version_and_backend(tiny_model: Path) -> None:
    """Segmenter.load exposes the manifest's identity and picks ONNX Runtime on the CPU."""
    seg = Segmenter.load(tiny_model, "cpu")
    assert (seg.sequence, seg.name, seg.version) == ("t2", "tiny", "0.0.1")
    assert seg.device == "cpu/onnx"
    assert Segmenter.load(tiny_model, "cpu", backend="torch").device == "cpu/torch"


def test_mask_lies_on_the_oblique_source_grid(tiny_model: Path) -> None:
    """Prediction maps back onto an oblique anisotropic source: same shape, tumour in place."""
    volume, tumour = oblique_head()
    manifest = load_manifest(tiny_model)

    def bright(x: torch.Tensor) -> torch.Tensor:  # a stand-in network: tumour = z-score above 1.5
        return (x - 1.5) * 20

    seg = Segmenter(manifest, bright, "cpu/test", postprocess=PostprocessConfig(min_volume_mm3=100))
    mask = seg.predict(volume)
    assert mask.shape == volume.array.shape and mask.dtype == np.bool_
    assert dice(mask, tumour) > 0.9
    centroid = volume.index_to_patient(np.argwhere(mask).mean(axis=0)[::-1])
    np.testing.assert_allclose(centroid, TUMOUR_CENTRE, atol=1.0)


def test_postprocess_keeps_the_largest_component_fills_holes_and_drops_specks() -> None:
    """Post-processing keeps one filled component and empties masks below the minimum volume."""
    prob = np.zeros((20, 20, 20), np.float32)
    prob[2:12, 2:12, 2:12] = 1.0
    prob[6, 6, 6] = 0.0  # a hole
    prob[16:18, 16:18, 16:18] = 1.0  # a second, smaller component
    mask = postprocess(prob, (1.0, 1.0, 1.0), PostprocessConfig(min_volume_mm3=10))
    assert mask.sum() == 1000 and mask[6, 6, 6]
    assert not postprocess(prob, (1.0, 1.0, 1.0), PostprocessConfig(min_volume_mm3=5000)).any()


def test_hd95_is_zero_for_equal_masks_and_in_mm_for_a_shift() -> None:
    """HD95 is 0 for identical masks, spacing-scaled for a shifted voxel and NaN for an empty one."""
    a = np.zeros((10, 10, 10), bool)
    a[2, 5, 5] = True
    b = np.zeros_like(a)
    b[5, 5, 5] = True
    assert hd95(a, a, (2.0, 1.0, 1.0)) == 0.0
    assert hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert np.isnan(hd95(a, np.zeros_like(a), (1.0, 1.0, 1.0)))


def test_evaluate_writes_report_metrics_and_overlays(tiny_model: Path, tmp_path: Path) -> None:
    """evaluate() reports every case in report.md and metrics.json and draws overlay PNGs."""
    data = tmp_path / "data"
    for seed in range(2):
        write_blob_case(data, f"B{seed}", seed)
    evaluation = evaluate(tiny_model, data, tmp_path / "report", device="cpu", n_overlays=1)
    assert [c.case_id for c in evaluation.cases] == ["B0", "B1"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| B0 |" in report and "| B1 |" in report and "median" in report
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["cases"][1]["case_id"] == "B1"
    assert (tmp_path / "report" / "overlays" / "B0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "report" / "overlays" / "B1.png").exists()


@pytest.fixture(scope="module")
def fresh_phantoms() -> list[PhantomCase]:
    """Two phantoms at 1.5 mm from seeds never used for training or the documented test set."""
    return [make_case(seed, resolution_mm=1.5) for seed in (9001, 9002)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["demo-t1c", "demo-t1c-3d", "demo-t2", "demo-t2-3d", "demo-flair"])
def test_demo_model_reaches_its_dice_floor_on_fresh_phantoms(model: str, fresh_phantoms: list[PhantomCase]) -> None:
    """Each committed demo model segments fresh phantoms with at least its regression Dice floor."""
    sequence = model.split("-")[1]
    segmenter = Segmenter.load(MODELS / model, "cpu", sequence=sequence)
    assert segmenter.manifest.intended_use == DEMO_USE
    scores = [dice(segmenter.predict(array_volume(c.images[sequence], c.affine)), c.label > 0) for c in fresh_phantoms]
    assert min(scores) >= DEMO_DICE_FLOOR[model], scores


@pytest.mark.slow
@pytest.mark.parametrize("sequence", ["t1c", "t2"])
def test_default_config_sends_3d_series_to_the_fine_model_and_2d_series_to_the_other(
    sequence: str, fresh_phantoms: list[PhantomCase],
) -> None:
    """With the shipped [models] list, a 1.5 mm phantom goes to the sequence's fine-grid model
    (demo-t1c-3d, demo-t2-3d) and the same head cut as 2D axial 5 mm slices to the 2 mm-grid one
    (what the node does with each series)."""
    from dmg_node import config
    from dmg_node.classify import Label
    from dmg_node.segment.registry import load_model
    from dmg_node.segment.preprocess import resample

    models = load_model(config.from_dict({"models": {"dir": str(MODELS), "device": "cpu"}}), Label(sequence))
    assert models is not None and models.name == f"demo-{sequence}-3d+demo-{sequence}"
    case = fresh_phantoms[0]
    thin = array_volume(case.images[sequence], case.affine)
    affine = np.diag([0.9, 0.9, 5.0, 1.0])
    affine[:3, 3] = case.affine[:3, 3]
    thick_shape = (int(case.label.shape[0] * 1.5 / 5.0), int(case.label.shape[1] * 1.5 / 0.9),
                   int(case.label.shape[2] * 1.5 / 0.9))
    thick = array_volume(resample(case.images[sequence], case.affine, thick_shape, affine), affine)
    assert models.for_volume(thin).name == f"demo-{sequence}-3d"
    assert models.for_volume(thick).name == f"demo-{sequence}"


@pytest.mark.slow
def test_demo_model_onnx_and_torch_agree_on_a_phantom(fresh_phantoms: list[PhantomCase]) -> None:
    """ONNX Runtime and torch give nearly equal probabilities; >= 99.9 % of voxels agree at 0.5."""
    folder = MODELS / "demo-t2"
    manifest = load_manifest(folder)
    case = fresh_phantoms[0]
    image = prepare(array_volume(case.images["t2"], case.affine), manifest.preprocess).image
    generator = load_generator(folder / TORCH_WEIGHTS, manifest.generator)
    by_torch = sliding_window_probability(torch_predictor(generator, torch.device("cpu")), image, manifest.patch_size)
    by_onnx = sliding_window_probability(onnx_predictor(folder / ONNX_WEIGHTS, 2), image, manifest.patch_size)
    assert float(np.abs(by_torch - by_onnx).max()) < 1e-3
    assert float(np.mean((by_torch > 0.5) == (by_onnx > 0.5))) >= 0.999


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where a GPU is lent)")
def test_demo_model_on_the_gpu_agrees_with_onnx_runtime_on_the_cpu(fresh_phantoms: list[PhantomCase]) -> None:
    """The torch backend on CUDA (float16 autocast) gives the mask of ONNX Runtime on the CPU.

    Before the fix of torch_predictor (logits returned on the input's device), any CUDA
    inference failed inside MONAI's sliding window with a cuda/cpu device mismatch.
    """
    case = fresh_phantoms[0]
    volume = array_volume(case.images["t2"], case.affine)
    on_gpu = Segmenter.load(MODELS / "demo-t2", "cuda", backend="torch").predict(volume)
    on_cpu = Segmenter.load(MODELS / "demo-t2", "cpu", backend="onnx").predict(volume)
    assert on_gpu.shape == on_cpu.shape
    assert dice(np.asarray(on_gpu) > 0, np.asarray(on_cpu) > 0) >= 0.99
