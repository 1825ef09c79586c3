"""Intensity-guided growth of a predicted mask (dmg_node.segment.refine) and its manifest entry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from dmg_node.errors import ModelError
from dmg_node.training.data import array_volume
from dmg_node.training.evaluate import dice
from dmg_node.segment.infer import PostprocessConfig, Segmenter
from dmg_node.segment.manifest import Manifest, load_manifest, write_manifest
from dmg_node.segment.preprocess import Prepared, prepare
from dmg_node.segment.refine import GrowConfig, ball, grow_mask
from tests.unit.test_infer import tiny_model  # noqa: F401  (fixture)

BRAIN, TUMOUR, CSF = 450.0, 800.0, 1000.0
# The mechanics are tested with a window wide enough that white noise leaves no holes in the
# tumour (the demo-t2-3d settings, quantiles 0.02 and median + 1.5 MADs, were chosen on phantoms
# whose tumour texture is smooth).
CONFIG = GrowConfig(max_mm=9.0, low_quantile=0.0, high_quantile=1.0, core_erosion_mm=1.0, opening_mm=1.5,
                    high_mads=4.0)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    return tuple(np.indices(shape, dtype=np.float32))


def _noisy(image: np.ndarray, seed: int = 0, sd: float = 15.0) -> np.ndarray:
    return image + np.random.default_rng(seed).normal(0.0, sd, image.shape).astype(np.float32)


def sphere_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tumour sphere (radius 10) in brain with a CSF slab beside it; the mask misses one side."""
    z, y, x = _grid((40, 40, 40))
    tumour = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 100
    image = np.full((40, 40, 40), BRAIN, np.float32)
    image[tumour] = TUMOUR
    image[:, :, 31:35] = CSF  # touches the sphere's right side
    mask = tumour & (x < 22)  # the network stopped 9 voxels short of the right border
    return _noisy(image), tumour, mask


def test_growth_recovers_the_missed_part_of_the_tumour_and_stops_at_csf_and_brain() -> None:
    """The missed side of the sphere is added; the brighter CSF and the darker brain are not."""
    image, tumour, mask = sphere_case()
    grown = grow_mask(image, mask, (1.0, 1.0, 1.0), CONFIG)
    assert dice(mask, tumour) < 0.85
    assert dice(grown, tumour) > 0.97
    assert (grown & mask).sum() == mask.sum()  # nothing removed
    assert not grown[:, :, 31:35].any()  # CSF stays out
    assert (grown & ~tumour).sum() < 0.02 * tumour.sum()


def test_median_plus_mads_keeps_csf_out_when_the_mask_already_holds_some() -> None:
    """A mask that strayed into CSF would pull the upper quantile up to CSF; the MAD bound does not."""
    image, tumour, mask = sphere_case()
    strayed = mask | np.pad(np.ones((8, 8, 3), bool), ((16, 16), (16, 16), (31, 6)))  # a bit of CSF
    strayed |= tumour & (np.indices(tumour.shape)[2] >= 22) & (np.indices(tumour.shape)[1] > 23)
    loose = dataclasses.replace(CONFIG, high_mads=0.0, high_quantile=1.0)
    assert grow_mask(image, strayed, (1.0, 1.0, 1.0), loose)[:, :, 31:35].sum() > 500
    grown = grow_mask(image, strayed, (1.0, 1.0, 1.0), CONFIG)
    assert grown[:, :, 31:35].sum() == strayed[:, :, 31:35].sum()
    assert dice(grown, tumour) > 0.95


def test_growth_stays_within_max_mm_in_millimetres_on_an_anisotropic_grid() -> None:
    """A bar of tumour-like signal is followed at most max_mm from the mask, in mm per axis."""
    image = np.full((30, 40, 40), BRAIN, np.float32)
    image[10:20, 10:30, 5:15] = TUMOUR  # the core the mask covers
    image[10:20, 10:30, 15:40] = TUMOUR  # a long extension to the right (x)
    mask = np.zeros(image.shape, bool)
    mask[10:20, 10:30, 5:15] = True
    image = _noisy(image)
    grown = grow_mask(image, mask, (1.0, 1.0, 1.0), dataclasses.replace(CONFIG, max_mm=6.0))
    assert grown[15, 20, 20] and not grown[15, 20, 22]  # 6 mm along x
    grown = grow_mask(image, mask, (1.0, 1.0, 3.0), dataclasses.replace(CONFIG, max_mm=6.0, opening_mm=0.0))
    assert grown[15, 20, 16] and not grown[15, 20, 18]  # 3 mm columns: two of them


def test_thin_strands_are_not_followed_but_holes_are_filled() -> None:
    """A one-voxel strand of tumour-like signal (partial volume along CSF) is opened away."""
    z, y, x = _grid((40, 40, 40))
    tumour = (z - 20) ** 2 + (y - 20) ** 2 + (x - 12) ** 2 <= 64
    image = np.full((40, 40, 40), BRAIN, np.float32)
    image[tumour] = TUMOUR
    image[20, 20, 20:30] = TUMOUR  # strand leaving the tumour
    mask = tumour.copy()
    mask[20, 20, 12] = False  # an enclosed hole
    grown = grow_mask(_noisy(image, sd=5.0), mask, (1.0, 1.0, 1.0), CONFIG)
    assert grown[20, 20, 12]
    assert not grown[20, 20, 23:30].any()


def test_empty_mask_is_returned_empty_and_shapes_must_match() -> None:
    image = np.zeros((8, 8, 8), np.float32)
    assert not grow_mask(image, np.zeros((8, 8, 8), bool), (1.0, 1.0, 1.0), CONFIG).any()
    with pytest.raises(ValueError, match="shape"):
        grow_mask(image, np.zeros((8, 8, 7), bool), (1.0, 1.0, 1.0), CONFIG)


def test_ball_is_measured_in_millimetres() -> None:
    assert ball(1.0, (1.0, 1.0, 1.0)).sum() == 7
    assert ball(2.0, (2.0, 1.0, 1.0)).shape == (3, 5, 5)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_mm": 0}, "max_mm must be a positive"),
        ({"low_quantile": 0.9, "high_quantile": 0.5}, "quantiles must satisfy"),
        ({"opening_mm": -1}, "opening_mm must be a number of mm >= 0"),
        ({"high_mads": float("nan")}, "high_mads must be"),
    ],
)
def test_invalid_grow_settings_are_refused(bad: dict[str, float], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        GrowConfig(**bad)


def test_grow_round_trips_through_the_manifest_and_unknown_keys_are_refused(tiny_model: Path) -> None:  # noqa: F811
    """``grow`` is optional (absent: no growth); present, it survives JSON; a typo is refused."""
    manifest = load_manifest(tiny_model)
    assert manifest.grow is None and '"grow"' not in manifest.to_json()
    with_grow = dataclasses.replace(manifest, grow=CONFIG)
    assert Manifest.from_json(with_grow.to_json()).grow == CONFIG
    data = json.loads(with_grow.to_json())
    data["grow"]["max_distance"] = 3
    with pytest.raises(ModelError, match="unknown keys"):
        Manifest.from_json(json.dumps(data))
    data["grow"] = {"max_mm": -2}
    with pytest.raises(ModelError, match="max_mm"):
        Manifest.from_json(json.dumps(data))


class _KnowsPart(Segmenter):
    """A Segmenter whose "network" returns a fixed probability map (the part of the tumour it found)."""

    known: np.ndarray

    def probability(self, prepared: Prepared) -> np.ndarray:
        return self.known


def test_segmenter_applies_the_manifests_growth_unless_turned_off(tiny_model: Path) -> None:  # noqa: F811
    """Segmenter.predict grows the mask when the manifest says so; grow=False gives the plain mask."""
    image, tumour, found = sphere_case()
    volume = array_volume(image, np.eye(4))
    manifest = dataclasses.replace(load_manifest(tiny_model), grow=CONFIG)
    known = prepare(volume, manifest.preprocess, label=found).label
    post = PostprocessConfig(min_volume_mm3=100, skin_margin_mm=0)
    plain_seg = _KnowsPart(manifest, lambda x: x, "cpu/test", postprocess=post, grow=False)
    grow_seg = _KnowsPart(manifest, lambda x: x, "cpu/test", postprocess=post)
    plain_seg.known = grow_seg.known = known
    plain, grown = plain_seg.predict(volume), grow_seg.predict(volume)
    assert dice(plain, tumour) < 0.9
    assert dice(grown, tumour) > 0.95
    write_manifest(tiny_model, manifest)
    assert Segmenter.load(tiny_model, "cpu").grow == CONFIG
    assert Segmenter.load(tiny_model, "cpu", grow=False).grow is None


def test_evaluate_report_says_whether_growth_was_applied(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """The report names the growth settings it used, or that they were turned off (--no-grow)."""
    from dmg_node.training.evaluate import evaluate
    from tests.unit.test_data import write_blob_case

    write_manifest(tiny_model, dataclasses.replace(load_manifest(tiny_model), grow=CONFIG))
    write_blob_case(tmp_path / "data", "B0", 0)
    evaluate(tiny_model, tmp_path / "data", tmp_path / "on", device="cpu", n_overlays=0)
    assert "intensity-guided growth (max_mm 9, low_quantile 0," in (tmp_path / "on" / "report.md").read_text()
    evaluate(tiny_model, tmp_path / "data", tmp_path / "off", device="cpu", n_overlays=0, grow=False)
    assert "growth was turned off" in (tmp_path / "off" / "report.md").read_text()
