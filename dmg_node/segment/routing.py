"""Which of a sequence's models segments a series: the first whose manifest admits its voxel size.

A sequence may be configured with several models in order of preference, for example
``t2 = ["demo-t2-3d", "demo-t2"]`` (T1C likewise): a model trained on a fine grid for 3D (thin-slice) series,
then a model for anything coarser, such as 2D axial series of 4-5 mm slices. Each manifest's
``max_spacing_mm`` bounds the largest voxel spacing (any axis) of the series it is meant for;
a model without one takes any series. Pure selection logic: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from dmg_node.errors import SeriesError
from dmg_node.volume import Volume

SPACING_TOLERANCE_MM = 0.01  # header rounding: a 2.0004 mm series counts as 2.0 mm


class Routable(Protocol):
    """What routing needs of a model (a :class:`~dmg_node.segment.infer.Segmenter`)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def sequence(self) -> str: ...
    @property
    def device(self) -> Any: ...
    @property
    def max_spacing_mm(self) -> float | None: ...

    def predict(self, volume: Volume) -> np.ndarray[Any, Any]: ...


def admits(max_spacing_mm: float | None, spacing: Sequence[float]) -> bool:
    """True when a model bounded by ``max_spacing_mm`` is meant for a series of voxel ``spacing``."""
    return max_spacing_mm is None or max(spacing) <= max_spacing_mm + SPACING_TOLERANCE_MM


class ModelSet:
    """The models configured for one sequence, in order of preference.

    Behaves like one model (``name``, ``version``, ``predict``) so the pipeline need not know how
    many there are; :meth:`for_volume` says which one a series goes to.
    """

    def __init__(self, models: Sequence[Routable]) -> None:
        if not models:
            raise ValueError("a ModelSet needs at least one model")
        sequences = {m.sequence for m in models}
        if len(sequences) != 1:
            raise ValueError(f"a ModelSet's models must share one sequence; found {sorted(sequences)}")
        self.models: tuple[Routable, ...] = tuple(models)

    @property
    def sequence(self) -> str:
        return self.models[0].sequence

    @property
    def name(self) -> str:
        """The members' names, in order of preference (``demo-t2-3d+demo-t2``)."""
        return "+".join(m.name for m in self.models)

    @property
    def version(self) -> str:
        return "+".join(m.version for m in self.models)

    @property
    def device(self) -> str:
        return str(self.models[0].device)

    def for_volume(self, volume: Volume) -> Routable:
        """The first model meant for ``volume``'s voxel size.

        Raises
        ------
        SeriesError
            If no configured model admits the series (every one has a smaller ``max_spacing_mm``).
        """
        spacing = volume.spacing
        for model in self.models:
            if admits(model.max_spacing_mm, spacing):
                return model
        limits = ", ".join(f"{m.name} <= {m.max_spacing_mm:g} mm" for m in self.models if m.max_spacing_mm is not None)
        raise SeriesError(
            f"no {self.sequence} model is meant for a series of {max(spacing):.2f} mm voxel spacing "
            f"(configured: {limits}); add a model without max_spacing_mm to the sequence's list"
        )

    def predict(self, volume: Volume) -> np.ndarray[Any, Any]:
        """Segment ``volume`` with the model :meth:`for_volume` picks."""
        return self.for_volume(volume).predict(volume)

    def describe(self) -> list[dict[str, Any]]:
        """One entry per member for status reports: name, version, device, max_spacing_mm."""
        return [{"name": m.name, "version": m.version, "device": str(m.device), "max_spacing_mm": m.max_spacing_mm}
                for m in self.models]
