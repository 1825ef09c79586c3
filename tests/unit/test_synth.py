"""Tests for the domain-randomized generator (dmg_node.phantoms.randomize, lesion, synth) and its held-out sets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from dmg_node.phantoms.lesion import make_lesion
from dmg_node.phantoms.randomize import (
    CLASSES,
    ENHANCEMENTS,
    MIN_TUMOUR_CONTRAST,
    ORDERINGS,
    SEQUENCES,
    SETS,
    SHAPES,
    SHIFTS,
    TEST_SEEDS,
    TRAIN_SEEDS,
    TRAINING,
    VALIDATION_SEEDS,
    SynthParams,
    draw_params,
)
from dmg_node.phantoms.synth import generate, render, sample_slices, slab_filter, slice_positions
from dmg_node.segment.network import GeneratorConfig
from dmg_node.segment.preprocess import PreprocessConfig
from dmg_node.training.data import find_cases
from dmg_node.training.evaluate import dice
from dmg_node.training.heldout import ShiftCase, shift_table
from dmg_node.training.train import train

ROOT = Path(__file__).resolve().parents[2]
COARSE = 3.0  # mm: the coarsest case grid render() takes, fast enough for tests


@pytest.fixture(scope="module")
def drawn() -> list[SynthParams]:
    """Four hundred training records (drawing renders nothing, so this is quick)."""
    return [draw_params(seed) for seed in range(400)]


def test_training_draws_respect_ranges(drawn: list[SynthParams]) -> None:
    """Every drawn number lies in its documented range, and the held-out regions never occur in training."""
    for p in drawn:
        assert 0.8 <= p.head_scale <= 1.0 and all(0.92 <= s <= 1.08 for s in p.axis_scale)
        assert 1.0 <= p.tumour.volume_ml <= 60.0
        assert p.tumour.site != "thalamus" and p.family != "inverted_gm_wm"
        assert 0.0 <= p.deformation_mm <= 6.0
        for acq in p.acquisitions.values():
            assert 1.0 <= acq.thickness_mm <= TRAINING.thickness_mm[1]
            assert TRAINING.snr[0] <= acq.snr <= TRAINING.snr[1]
            assert set(acq.signal) == set(CLASSES)
            assert min(abs(acq.signal["tumour"] - acq.signal["gm"]),
                       abs(acq.signal["tumour"] - acq.signal["wm"])) >= MIN_TUMOUR_CONTRAST


def test_every_shape_site_and_enhancement_occurs(drawn: list[SynthParams]) -> None:
    """Shapes, training sites, enhancement patterns, cysts, haemorrhages, both families and all planes occur."""
    assert {p.tumour.shape for p in drawn} == set(SHAPES)
    assert {p.tumour.site for p in drawn} == set(TRAINING.sites)
    assert {p.tumour.enhancement for p in drawn} == set(ENHANCEMENTS)
    assert any(p.tumour.cyst for p in drawn) and any(p.tumour.haemorrhage for p in drawn)
    assert any(p.tumour.mass_effect == 0 for p in drawn) and any(p.tumour.mass_effect > 0 for p in drawn)
    assert {p.family for p in drawn} == set(TRAINING.families)
    assert {a.plane for p in drawn for a in p.acquisitions.values()} == {"axial", "coronal", "sagittal"}
    thick = [a.thickness_mm for p in drawn for a in p.acquisitions.values()]
    assert min(thick) < 1.5 and max(thick) > 4.0


def test_plausible_family_keeps_sequence_orderings(drawn: list[SynthParams]) -> None:
    """Plausible contrasts keep what defines each sequence; the held-out family inverts grey and white matter."""
    for p in drawn:
        if p.family == "plausible":
            for seq in SEQUENCES:
                values = [p.acquisitions[seq].signal[name] for name in ORDERINGS[seq] if name != "tumour"]
                assert values == sorted(values, reverse=True)
    inverted = draw_params(SHIFTS["contrast_inverted_gm_wm"].seeds[0], SHIFTS["contrast_inverted_gm_wm"])
    assert inverted.acquisitions["t1c"].signal["gm"] > inverted.acquisitions["t1c"].signal["wm"]
    assert inverted.acquisitions["t2"].signal["gm"] < inverted.acquisitions["t2"].signal["wm"]


def test_seed_ranges_are_reserved() -> None:
    """Training refuses test seeds, and the sets' seed ranges never overlap."""
    with pytest.raises(ValueError, match="seed"):
        draw_params(TEST_SEEDS[0], TRAINING)
    with pytest.raises(ValueError, match="seed"):
        draw_params(VALIDATION_SEEDS[0], TRAINING)
    ranges = sorted(d.seeds for d in SETS.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert ranges[0] == TRAIN_SEEDS and all(TEST_SEEDS[0] <= d.seeds[0] < TEST_SEEDS[1] for d in SHIFTS.values())


def test_params_round_trip_through_json() -> None:
    """A record read back from its JSON equals the original."""
    p = draw_params(17)
    assert SynthParams.from_json(p.to_json()) == p


def test_render_is_reproducible_per_seed() -> None:
    """The same seed gives identical arrays; another seed gives other arrays."""
    a, b = render(draw_params(3), resolution_mm=COARSE), render(draw_params(3), resolution_mm=COARSE)
    c = render(draw_params(4), resolution_mm=COARSE)
    for seq in SEQUENCES:
        np.testing.assert_array_equal(a.images[seq], b.images[seq])
        np.testing.assert_array_equal(a.labels[seq], b.labels[seq])
    assert a.images["t2"].shape != c.images["t2"].shape or not np.array_equal(a.images["t2"], c.images["t2"])


def test_boxcar_slab_is_the_slab_average_not_a_point_sample() -> None:
    """A boxcar slice of 3 voxels equals the mean of the 3 voxels it covers, and differs from point sampling."""
    image = np.random.default_rng(0).random((20, 6, 6)).astype(np.float32)
    slab = slab_filter(image, 0, 3.0, "boxcar")
    positions = slice_positions(20, 3.0, 1.0)[:-1]  # the last slab would reach past the edge
    thick = sample_slices(slab, 0, positions)
    expected = np.stack([image[int(k) - 1:int(k) + 2].mean(axis=0) for k in positions])
    np.testing.assert_allclose(thick, expected, rtol=1e-5)
    assert not np.allclose(thick, sample_slices(image, 0, positions), atol=0.05)
    gaussian = slab_filter(image, 0, 4.0, "gaussian")
    assert gaussian.std() < image.std() and abs(float(gaussian.mean() - image.mean())) < 1e-2


def test_thick_series_on_its_own_grid_keeps_the_tumour() -> None:
    """On the acquired grid a thick series has the drawn slice spacing and about the case grid's tumour volume."""
    params = draw_params(SHIFTS["thick_5_6mm"].seeds[0], SHIFTS["thick_5_6mm"])
    acquired = render(params, resolution_mm=COARSE, grid="acquired")
    case = render(params, resolution_mm=COARSE, grid="case")
    for seq in SEQUENCES:
        acq = params.acquisitions[seq]
        spacing = np.linalg.norm(acquired.affines[seq][:3, :3], axis=0)
        assert max(spacing) == pytest.approx(acq.thickness_mm * (1 + acq.gap), rel=1e-6)
        assert acquired.tumour_volume_ml(seq) == pytest.approx(case.tumour_volume_ml(seq), rel=0.3)


def test_label_matches_the_rendered_tumour() -> None:
    """With signal in tumour components only and no noise, blur or bias, the image is the label."""
    p = draw_params(11)
    quiet = {seq: dataclasses.replace(a, signal={k: float(k in ("tumour", "enhancing", "necrosis", "cyst",
                                                                  "haemorrhage")) for k in a.signal},
                                      gamma=1.0, bias_sd=0.0, snr=1e9, thickness_mm=1.0, inplane_mm=1.0)
             for seq, a in p.acquisitions.items()}
    case = render(dataclasses.replace(p, acquisitions=quiet), resolution_mm=COARSE)
    for seq in SEQUENCES:
        image, label = case.images[seq], case.labels[seq] > 0
        assert label.any()
        assert dice(image > 0.5 * float(image.max()), label) > 0.85


def test_lesion_parts_sum_to_the_tumour_fraction() -> None:
    """The components of every shape sum to the soft fraction, whose 0.5 level is the label, at the drawn volume."""
    icv = np.ones((40, 40, 40), np.float32)
    for shape in ("lobulated", "infiltrative", "exophytic", "multifocal"):
        p = dataclasses.replace(draw_params(5).tumour, shape=shape, volume_ml=8.0, n_lobes=3, cyst=True,
                                haemorrhage=True, enhancement="ring")
        lesion = make_lesion(np.random.default_rng(1), p, icv, np.array([20.0, 20.0, 20.0]), 2.0)
        np.testing.assert_allclose(sum(lesion.parts.values()), lesion.fraction, atol=1e-5)
        np.testing.assert_array_equal(lesion.label, lesion.fraction >= 0.5)
        assert lesion.label.sum() * 8.0 / 1000.0 == pytest.approx(8.0, rel=0.05)


def test_no_module_uses_the_independent_check_brain() -> None:
    """No module or config names the template kept for an independent check (Colin27, Debian mricron-data)."""
    pattern = re.compile(r"colin|mricron", re.IGNORECASE)
    files = [*ROOT.joinpath("dmg_node").rglob("*.py"), *ROOT.joinpath("config").rglob("*.toml")]
    assert files
    assert [str(f) for f in files if pattern.search(f.read_text())] == []


def test_shift_table_has_one_row_per_set_and_sequence() -> None:
    """The docs table summarises held-out results per set and sequence."""
    rows = [ShiftCase("low_snr", "t2", f"C{i}", "m", (1.0, 1.0, 1.0), d, 2.0, 10.0, 9.0, -10.0)
            for i, d in enumerate((0.6, 0.8))]
    table = shift_table(rows)
    assert "| low_snr | t2 | 2 | m | 0.700 (0.650-0.750) | 2.0 | 10 |" in table


@pytest.mark.slow
def test_training_runs_on_generated_randomized_cases(tmp_path: Path) -> None:
    """Randomized training and validation cases train one tiny step (resuming is tested in test_train.py)."""
    data, val = tmp_path / "train", tmp_path / "validation"
    generate(data, "train", 1, resolution_mm=COARSE)
    generate(val, "validation", 1, resolution_mm=COARSE)
    assert [c.case_id for c in find_cases(val, "t2")] == ["SY-validation-1000000"]
    tiny = {"steps_per_epoch": 1, "batch_size": 1, "patch_size": (32, 32, 32), "device": "cpu",
            "generator": GeneratorConfig(channels=(4, 8, 8, 8, 8), aspp_dilations=(1, 2)),
            "preprocess": PreprocessConfig(spacing_mm=6.0), "work_dir": tmp_path / "work", "val_dir": val}
    first = train("t2", data, tmp_path / "model", epochs=1, **tiny)  # type: ignore[arg-type]
    assert first.training["epochs_run"] == 1 and first.training["val_cases"] == ["SY-validation-1000000"]


def test_phantom_command_writes_a_held_out_set_on_acquired_grids(tmp_path: Path) -> None:
    """`dmg-node phantom --randomized --set low_snr --grid acquired` writes one folder per sequence from the set's seeds."""
    from dmg_node.cli import EXIT_OK, main

    args = ["phantom", str(tmp_path), "--randomized", "--set", "low_snr", "--n", "1", "--resolution", "3",
            "--grid", "acquired"]
    assert main(args) == EXIT_OK
    for seq in SEQUENCES:
        (case,) = find_cases(tmp_path / seq, seq)
        assert case.case_id == f"SY-low_snr-{SHIFTS['low_snr'].seeds[0]:07d}"
