"""Tests for dmg_node.segment.preprocess: source volume <-> model grid in patient coordinates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dmg_node.errors import SeriesError
from dmg_node.training.data import array_volume
from dmg_node.segment.preprocess import PreprocessConfig, canonical_grid, otsu_threshold, prepare, to_source
from dmg_node.training.evaluate import dice
from dmg_node.volume import Volume

CONFIG = PreprocessConfig(spacing_mm=2.0)
TUMOUR_CENTRE = np.array([12.0, -8.0, 5.0])  # LPS mm


def oblique_head(
    shape: tuple[int, int, int] = (40, 64, 56), spacing: tuple[float, float, float] = (1.8, 1.6, 3.0)
) -> tuple[Volume, np.ndarray]:
    """An ellipsoidal head with a 15 mm-radius tumour, sampled on an oblique anisotropic grid."""
    rot = Rotation.from_euler("xyz", [20, -15, 10], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rot * np.array(spacing)
    centre_ijk = (np.array(shape[::-1]) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre_ijk
    k, j, i = np.indices(shape)
    lps = np.stack([i, j, k], axis=-1) @ affine[:3, :3].T + affine[:3, 3]
    head = ((lps / np.array([60.0, 70.0, 55.0])) ** 2).sum(-1) < 1
    tumour = ((lps - TUMOUR_CENTRE) ** 2).sum(-1) < 15.0**2
    image = np.where(head, 100.0, 0.0) + np.where(tumour, 60.0, 0.0)
    return array_volume(image, affine), tumour


def _centroid_lps(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ kji[::-1] + affine[:3, 3]


def test_canonical_grid_is_lps_aligned_and_covers_the_source() -> None:
    """The canonical grid is diagonal at the model spacing and contains every source corner."""
    volume, _ = oblique_head()
    shape, affine = canonical_grid(volume, 2.0)
    np.testing.assert_allclose(affine[:3, :3], np.eye(3) * 2.0)
    corners = volume.index_to_patient(np.array([[0, 0, 0], [55, 63, 39]]))
    hi = affine[:3, 3] + (np.array(shape[::-1]) - 1) * 2.0
    assert np.all(corners >= affine[:3, 3] - 1e-6) and np.all(corners <= hi + 2.0)


def test_prepared_image_is_cropped_padded_and_z_scored() -> None:
    """Each axis is a multiple of the divisor, and the head has mean ~0 and unit spread."""
    volume, _ = oblique_head()
    prepared = prepare(volume, CONFIG)
    assert all(n % CONFIG.divisor == 0 for n in prepared.image.shape)
    assert prepared.image.dtype == np.float32
    inside = prepared.image[prepared.image > prepared.image.min() + 1]
    assert abs(float(inside.mean())) < 0.5
    assert float(prepared.image.max()) <= CONFIG.clip


def test_label_lands_at_the_same_patient_position_on_the_model_grid() -> None:
    """The resampled label's centroid is where the tumour is in LPS, on an oblique source."""
    volume, tumour = oblique_head()
    prepared = prepare(volume, CONFIG, tumour)
    assert prepared.label is not None
    np.testing.assert_allclose(_centroid_lps(prepared.label > 0.5, prepared.affine), TUMOUR_CENTRE, atol=1.0)


def test_round_trip_back_onto_the_oblique_source_grid() -> None:
    """Model grid -> source grid restores the source label (shape, position and overlap)."""
    volume, tumour = oblique_head()
    prepared = prepare(volume, CONFIG, tumour)
    assert prepared.label is not None
    back = to_source(prepared.label, prepared.affine, volume)
    assert back.shape == volume.array.shape
    mask = back > 0.5
    assert dice(mask, tumour) > 0.9
    np.testing.assert_allclose(_centroid_lps(mask, volume.affine), TUMOUR_CENTRE, atol=1.0)


def test_to_source_of_an_empty_map_is_all_zero() -> None:
    """A probability map with nothing above threshold maps back to zeros of the source shape."""
    volume, _ = oblique_head()
    prepared = prepare(volume, CONFIG)
    out = to_source(np.zeros_like(prepared.image), prepared.affine, volume)
    assert out.shape == volume.array.shape and not out.any()


def test_otsu_separates_two_populations() -> None:
    """Otsu's threshold falls between two well separated intensity groups."""
    values = np.concatenate([np.full(1000, 10.0), np.full(500, 200.0)])
    assert 10.0 < otsu_threshold(values) < 200.0


def test_constant_image_and_mismatched_label_are_refused() -> None:
    """A constant image or a label of another shape raises SeriesError."""
    flat = array_volume(np.ones((8, 8, 8)), np.eye(4))
    with pytest.raises(SeriesError, match="non-constant"):
        prepare(flat, CONFIG)
    volume, _ = oblique_head()
    with pytest.raises(SeriesError, match="label shape"):
        prepare(volume, CONFIG, np.zeros((2, 2, 2)))
