"""Choosing one series per label when a study holds several (see :func:`choose`)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmg_node.classify.header import SeriesHeader
from dmg_node.classify.rules import Classification, Label


# --- choosing one series per label ----------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """The series picked for one label and why it beat the others."""

    label: Label
    series_instance_uid: str
    reason: str


def _seconds(text: str | None) -> float | None:
    digits = (text or "").replace(":", "").strip()
    try:
        return int(digits[0:2]) * 3600 + int(digits[2:4] or 0) * 60 + float(digits[4:] or 0)
    except ValueError:
        return None


def _when(h: SeriesHeader) -> tuple[str, float]:
    date = re.sub(r"[^0-9]", "", h.series_date or "")
    times = (_seconds(t) for t in (h.series_time, h.acquisition_time, h.content_time))
    return date, next((s for s in times if s is not None), -1.0)


def _area(h: SeriesHeader) -> float | None:
    return None if h.pixel_spacing is None else round(h.pixel_spacing[0] * h.pixel_spacing[1], 4)


def _fineness(h: SeriesHeader) -> float:
    area = _area(h)
    return -math.inf if area is None else -area


def _show_area(h: SeriesHeader) -> str:
    area = _area(h)
    return "no PixelSpacing" if area is None else f"{area:g} mm2 pixel"


def _show_when(h: SeriesHeader) -> str:
    return " ".join(t for t in (h.series_date, h.series_time or h.acquisition_time or h.content_time) if t) or "no date"


@dataclass(frozen=True)
class _Preference:
    """One rule of :func:`choose`: the larger ``key`` wins; ``show`` renders the value for the reason."""

    name: str
    key: Callable[[SeriesHeader], Any]
    show: Callable[[SeriesHeader], str]


_PREFERENCES = (
    _Preference("ORIGINAL image", lambda h: h.image_type[:1] == ("ORIGINAL",), lambda h: "\\".join(h.image_type)),
    _Preference("finest in-plane resolution", _fineness, _show_area),
    _Preference("most slices", lambda h: h.n_slices, lambda h: f"{h.n_slices} slices"),
    _Preference("latest series date/time", _when, _show_when),
    _Preference("highest series number", lambda h: h.series_number or 0, lambda h: f"series {h.series_number}"),
    _Preference("SeriesInstanceUID order", lambda h: h.series_instance_uid, lambda h: h.series_instance_uid),
)


def choose(candidates: Sequence[tuple[SeriesHeader, Classification]]) -> dict[Label, Choice]:
    """Pick one series per label when a study holds several.

    Rule, in order: prefer an ORIGINAL image (ImageType value 1, PS3.3 C.7.6.1.1.2), then the
    finest in-plane resolution (smallest pixel area), then the most slices, then the latest
    series (SeriesDate/SeriesTime, falling back to AcquisitionTime, ContentTime), then the
    highest SeriesNumber, and last the larger SeriesInstanceUID so the pick is deterministic.

    Parameters
    ----------
    candidates
        Each series with its classification; ``none`` series are ignored.

    Returns
    -------
    dict[Label, Choice]
        One entry per label that has a candidate; never :attr:`Label.NONE`. The reason names the
        rule that decided against each rejected series.
    """
    by_label: dict[Label, list[SeriesHeader]] = {}
    for header, classification in candidates:
        if classification.label is not Label.NONE:
            by_label.setdefault(classification.label, []).append(header)
    chosen: dict[Label, Choice] = {}
    for label, headers in by_label.items():
        ranked = sorted(headers, key=lambda h: tuple(p.key(h) for p in _PREFERENCES), reverse=True)
        best = ranked[0]
        if len(ranked) == 1:
            reason = f"only {label} series"
        else:
            rejected = "; ".join(_versus(best, other) for other in ranked[1:])
            rules = ", then ".join(p.name for p in _PREFERENCES[:-1])
            reason = f"best of {len(ranked)} {label} series by {rules}: {rejected}"
        chosen[label] = Choice(label, best.series_instance_uid, reason)
    return chosen


def _versus(best: SeriesHeader, other: SeriesHeader) -> str:
    for preference in _PREFERENCES:
        if preference.key(best) != preference.key(other):
            shown = f"{preference.show(best)} vs {preference.show(other)}"
            return f"rejected {other.series_instance_uid} by {preference.name} ({shown})"
    return f"rejected {other.series_instance_uid} (a duplicate of the same series)"
