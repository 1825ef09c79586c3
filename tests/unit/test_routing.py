"""Routing a series to one of its sequence's models by voxel spacing (dmg_node.segment.routing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from dmg_node.errors import SeriesError
from dmg_node.segment.routing import ModelSet, admits
from dmg_node.volume import Volume


@dataclass
class FakeModel:
    name: str
    max_spacing_mm: float | None
    version: str = "1.0"
    sequence: str = "t2"
    device: str = "cpu/onnx"

    def predict(self, volume: Volume) -> np.ndarray[Any, Any]:
        return np.full(volume.array.shape, self.name == "fine", dtype=bool)


def volume(spacing: tuple[float, float, float], slices: int = 4) -> Volume:
    affine = np.diag([*spacing, 1.0])
    return Volume(np.zeros((slices, 8, 8), np.float32), affine, "1.2.3", "1.2.4",
                  tuple(f"1.2.5.{i}" for i in range(slices)), "1.2.840.10008.5.1.4.1.1.4")


def test_admits_by_the_largest_spacing_with_header_rounding() -> None:
    assert admits(None, (0.9, 0.9, 6.0))
    assert admits(2.0, (1.0, 1.0, 1.0))
    assert admits(2.0, (0.5, 0.5, 2.004))  # rounding in the header: still 2 mm
    assert not admits(2.0, (0.9, 0.9, 4.0))
    assert not admits(2.0, (2.2, 1.0, 1.0))  # any axis counts, not only the slice direction


def test_thin_series_go_to_the_fine_model_thick_ones_to_the_next() -> None:
    models = ModelSet([FakeModel("fine", 2.0), FakeModel("any", None)])
    assert models.for_volume(volume((1.0, 1.0, 1.0))).name == "fine"
    assert models.for_volume(volume((0.9, 0.9, 5.0))).name == "any"
    assert models.predict(volume((1.0, 1.0, 1.0))).all()
    assert not models.predict(volume((0.9, 0.9, 5.0))).any()
    assert models.name == "fine+any" and models.version == "1.0+1.0" and models.sequence == "t2"
    assert [m["max_spacing_mm"] for m in models.describe()] == [2.0, None]


def test_order_is_preference_a_catch_all_first_takes_everything() -> None:
    models = ModelSet([FakeModel("any", None), FakeModel("fine", 2.0)])
    assert models.for_volume(volume((1.0, 1.0, 1.0))).name == "any"


def test_no_model_for_the_spacing_is_a_series_error_naming_the_limits() -> None:
    models = ModelSet([FakeModel("fine", 2.0)])
    with pytest.raises(SeriesError, match=r"no t2 model is meant for a series of 5.00 mm .*fine <= 2 mm"):
        models.for_volume(volume((0.9, 0.9, 5.0)))


def test_a_set_needs_models_of_one_sequence() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ModelSet([])
    with pytest.raises(ValueError, match="one sequence"):
        ModelSet([FakeModel("a", None), FakeModel("b", None, sequence="flair")])
