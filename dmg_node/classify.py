"""Series header -> (label, reason): which model, if any, an MR series goes to.

Pure: no file I/O, no clock, no logging; the caller logs the returned reason. Every
decision is one row of a table below, tried in order, and the first row that fires wins:

1. **Header exclusions** (``_EXCLUSIONS``): not MR, not an MR image SOP class (PS3.4 B.5),
   derived secondary images, ImageType values of localizers, maps, reformats or phase
   images, echo-planar readout, diffusion weighting, angio / phase-contrast / ASL flags,
   multi-phase series, gradient echo with TE >= 10 ms (T2*, SWI) and balanced SSFP
   -> ``none``.
2. **Name exclusions**: the series name (see :func:`series_name`) matches a ``none`` pattern
   -> ``none``. Anything that says "not a plain T1c/T2/FLAIR" wins over physics, because
   such series (Philips spin-echo DWI, DCE, MP2RAGE INV2) can look like one of them.
3. **Physics** (``_weighting``, PS3.3 C.8.3.1 and C.8.13): ScanningSequence, inversion,
   TR/TE/TI decide T2-FLAIR, T2, T1, PD or STIR. Physics wins over a name that disagrees,
   and the reason says so; the one exception is a name saying FLAIR on a long-TR/long-TE
   spin echo that records no inversion pulse: that conflict gives ``none``.
4. **Name** (physics inconclusive or missing): ``t1c``, then ``t1``, then ``flair``, then
   ``t2`` patterns, in that order, so "T1 FLAIR" is a T1 and "T2 FLAIR" is a FLAIR.
   Nothing matched -> ``none``.

A T1-weighted series is ``t1c`` only with contrast evidence (ContrastBolusAgent,
ContrastBolusVolume, ContrastBolusAgentAdministered, ImageType POST_CONTRAST, or a ``t1c`` /
``contrast`` name pattern); a T1 without it is ``none``: pre-contrast T1 is not routed. A
name that says "pre" / 平扫 beside a T1 word is a ``none`` pattern, so it beats a
ContrastBolusAgent left over from an earlier series; a pre-contrast T1 whose name says nothing
and whose header carries such a stale agent is still labelled ``t1c``.

:func:`choose` then picks one series per label when a study has several (see its docstring).

Patterns (:data:`DEFAULT_PATTERNS`, kept in :mod:`dmg_node.classify_patterns`) are matched with
:meth:`re.Pattern.search` (anywhere in the name) and ``re.IGNORECASE``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pydicom
from pydicom.errors import BytesLengthException
from pydicom.uid import UID, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, MRImageStorage

from dmg_node.classify_patterns import DEFAULT_PATTERNS as DEFAULT_PATTERNS  # re-exported: the documented name


class Label(StrEnum):
    """Which model a series goes to; ``none`` is not routed."""

    T1C = "t1c"
    T2 = "t2"
    FLAIR = "flair"
    NONE = "none"


@dataclass(frozen=True)
class Rules:
    """Compiled name patterns, one tuple per key of :data:`DEFAULT_PATTERNS`."""

    t1c: tuple[re.Pattern[str], ...]
    t2: tuple[re.Pattern[str], ...]
    flair: tuple[re.Pattern[str], ...]
    none: tuple[re.Pattern[str], ...]
    contrast: tuple[re.Pattern[str], ...]
    t1: tuple[re.Pattern[str], ...]

    def search(self, key: str, text: str) -> str | None:
        """Describe the first pattern of *key* that ``re.search`` finds in *text*, else ``None``.

        The description ("t2 pattern #1 matched 'T2'") counts patterns from 1 in list order.
        """
        patterns: tuple[re.Pattern[str], ...] = getattr(self, key)
        for number, pattern in enumerate(patterns, start=1):
            match = pattern.search(text)
            if match is not None:
                return f"{key} pattern #{number} matched {match.group(0)!r}"
        return None


def compile_rules(overrides: Mapping[str, Sequence[str]] | None = None) -> Rules:
    """Compile :data:`DEFAULT_PATTERNS`, with each key in *overrides* replacing that key's list.

    Parameters
    ----------
    overrides
        Key -> list of regular expressions (e.g. the ``[classify]`` table of node.toml). A key
        present here replaces the default list entirely; an empty list disables the key.

    Returns
    -------
    Rules
        Patterns compiled with ``re.IGNORECASE``, applied with ``re.search``.

    Raises
    ------
    ValueError
        A key is unknown, a value is not a list of strings, or a pattern does not compile;
        the message names the key and the pattern.
    """
    merged: dict[str, Sequence[str]] = dict(DEFAULT_PATTERNS)
    for key, patterns in (overrides or {}).items():
        if key not in DEFAULT_PATTERNS:
            raise ValueError(f"unknown classify pattern key {key!r} (known: {', '.join(DEFAULT_PATTERNS)})")
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"classify pattern key {key!r} must be a list of strings, found {patterns!r}")
        merged[key] = patterns
    compiled: dict[str, tuple[re.Pattern[str], ...]] = {}
    for key, patterns in merged.items():
        try:
            compiled[key] = tuple(re.compile(p, re.IGNORECASE) for p in patterns)
        except re.error as exc:
            raise ValueError(f"classify pattern {exc.pattern!r} for key {key!r} does not compile: {exc}") from exc
    return Rules(**compiled)


# --- the header ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesHeader:
    """The attributes of one series that classification and :func:`choose` read.

    Multi-valued attributes are tuples of upper-case strings; a missing or malformed value is
    ``None`` (or ``()``). Times are in ms, angles in degrees, lengths in mm (PS3.3 C.8.3.1).
    """

    series_instance_uid: str
    series_number: int | None = None
    series_date: str | None = None
    series_time: str | None = None
    acquisition_time: str | None = None
    content_time: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    sop_class_uid: str | None = None
    image_type: tuple[str, ...] = ()
    series_description: str | None = None
    protocol_name: str | None = None
    sequence_name: str | None = None
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    mr_acquisition_type: str | None = None
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    flip_angle: float | None = None
    contrast_bolus_agent: str | None = None
    contrast_bolus_route: str | None = None
    contrast_bolus_volume: float | None = None
    # Enhanced MR (PS3.3 C.8.13): None where the object does not record it.
    contrast_administered: bool | None = None
    echo_pulse_sequence: str | None = None
    inversion_recovery: bool | None = None
    echo_planar: bool | None = None
    steady_state: str | None = None
    acquisition_contrast: str | None = None
    complex_image_component: str | None = None
    angio: bool | None = None
    diffusion_b_value: float | None = None
    temporal_positions: int | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    n_instances: int = 1
    number_of_frames: int | None = None

    @property
    def n_slices(self) -> int:
        """Images in the series: instances times frames (Enhanced MR holds them as frames)."""
        return self.n_instances * (self.number_of_frames or 1)


@dataclass(frozen=True)
class Classification:
    """The label of one series and why."""

    series_instance_uid: str
    label: Label
    reason: str


def series_name(header: SeriesHeader) -> tuple[str, str] | None:
    """The name the patterns read: the first non-blank of SeriesDescription, ProtocolName, SequenceName.

    ProtocolName is only a fallback because GE writes the exam's protocol ("BRAIN W/WO") there.
    Returns ``(attribute keyword, text)`` or ``None``.
    """
    for keyword, text in (
        ("SeriesDescription", header.series_description),
        ("ProtocolName", header.protocol_name),
        ("SequenceName", header.sequence_name),
    ):
        if text and text.strip():
            return keyword, text.strip()
    return None


# --- header exclusions ----------------------------------------------------------------------
# PS3.4 B.5: the storage SOP classes that hold an MR image a model can read.
MR_IMAGE_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})
# ImageType values (PS3.3 C.7.6.1.1.2 and vendor value 3+) that mark an image no model takes.
_EXCLUDED_IMAGE_TYPES = frozenset(
    {
        "LOCALIZER", "SCREEN SAVE", "MPR", "CSA MPR", "CSAMPR", "MIP", "MINIP", "MIN IP", "MNIP",
        "PROJECTION IMAGE", "REFORMATTED", "ADC", "EADC", "TRACEW", "FA", "DIFFUSION",
        "DIFFUSION_ANISO", "TENSOR", "PHASE", "P", "PHASE MAP", "IMAGINARY", "ANGIO", "PERFUSION",
        "MOSAIC", "SUB", "SUBTRACTION", "T1 MAP", "T2 MAP", "SWI", "VELOCITY", "FAT", "IN_PHASE",
        "OPP_PHASE", "OUT_PHASE",
    }
)  # fmt: skip
# Enhanced MR AcquisitionContrast (PS3.3 C.8.13.1.1.1) values that are not T1/T2/FLAIR.
_EXCLUDED_ACQUISITION_CONTRASTS = frozenset(
    {"DIFFUSION", "FLOW_ENCODED", "PERFUSION", "PROTON_DENSITY", "SPECTROSCOPY", "STIR", "TAGGING", "T2_STAR"}
)
# Physics thresholds (ms, degrees); typical values at 1.5 and 3 T are in the comments.
FLAIR_TI_MS = (1400.0, 3500.0)  # 2D FLAIR TI 2000-2800, 3D SPACE/CUBE/VISTA FLAIR 1600-2200
FLAIR_MIN_TR_MS = 4000.0  # 3D FLAIR TR 4800-8000, 2D 8000-11000 (T1 FLAIR 2000-2500)
T2_MIN_TE_MS = 60.0  # T2 TSE TE 80-120, 3D T2 effective TE up to ~400
LONG_TR_MS = 1000.0  # below: T1 spin echo (TR 400-800); above: T2 / PD
STIR_MAX_TI_MS = 400.0  # STIR TI 150-250; T1 FLAIR TI 700-1000
T1_SE_MAX_TE_MS = 40.0  # T1 SE / T1 FLAIR TE 8-25; also the PD limit
GRE_T1_MAX_TE_MS = 10.0  # MPRAGE/BRAVO/VIBE TE 1.5-5; T2*/SWI TE 15-40
SSFP_MAX_TR_MS, SSFP_MIN_FLIP = 20.0, 35.0  # bSSFP flip 40-70 at TR < 10; spoiled 3D T1 flip 8-15


def _joined(values: tuple[str, ...]) -> str:
    return "\\".join(values)


def _in(value: float | None, low: float, high: float) -> bool:
    return value is not None and low <= value < high


def _is_gradient_echo(h: SeriesHeader) -> bool:
    ss = set(h.scanning_sequence)
    return ("GR" in ss and "SE" not in ss) or h.echo_pulse_sequence == "GRADIENT"


def _is_spin_echo(h: SeriesHeader) -> bool:
    ss = set(h.scanning_sequence)
    return not _is_gradient_echo(h) and (bool(ss & {"SE", "IR"}) or h.echo_pulse_sequence == "SPIN")


def _has_inversion(h: SeriesHeader) -> bool:
    if "IR" in h.scanning_sequence or h.inversion_recovery is True:
        return True
    return h.inversion_recovery is not False and (h.inversion_time or 0.0) > 0.0


def _prepared_gre(h: SeriesHeader) -> bool:
    return _is_gradient_echo(h) and (_has_inversion(h) or "MP" in h.sequence_variant)


def _not_mr(h: SeriesHeader) -> str | None:
    return f"Modality {h.modality} is not MR" if h.modality not in (None, "MR") else None


def _not_mr_image(h: SeriesHeader) -> str | None:
    if h.sop_class_uid is None or h.sop_class_uid in MR_IMAGE_SOP_CLASSES:
        return None
    return f"SOP Class {h.sop_class_uid} ({UID(h.sop_class_uid).name}) is not an MR image"


def _derived_secondary(h: SeriesHeader) -> str | None:
    if h.image_type[:2] == ("DERIVED", "SECONDARY"):
        return "ImageType DERIVED\\SECONDARY (reformat, projection or screen capture)"
    return None


def _image_type_value(h: SeriesHeader) -> str | None:
    hit = next((v for v in h.image_type[2:] if v in _EXCLUDED_IMAGE_TYPES), None)
    return f"ImageType value {hit} ({_joined(h.image_type)})" if hit else None


def _not_magnitude(h: SeriesHeader) -> str | None:
    if h.complex_image_component in ("PHASE", "IMAGINARY", "REAL"):
        return f"ComplexImageComponent {h.complex_image_component} (not a magnitude image)"
    return None


def _echo_planar(h: SeriesHeader) -> str | None:
    if "EP" in h.scanning_sequence or h.echo_planar:
        return "echo-planar readout (diffusion, perfusion or BOLD)"
    return None


def _diffusion(h: SeriesHeader) -> str | None:
    b = h.diffusion_b_value
    return f"DiffusionBValue {b:g} s/mm2 (diffusion-weighted)" if b is not None and b > 0 else None


def _acquisition_contrast(h: SeriesHeader) -> str | None:
    c = h.acquisition_contrast
    return f"AcquisitionContrast {c}" if c in _EXCLUDED_ACQUISITION_CONTRASTS else None


def _angio(h: SeriesHeader) -> str | None:
    return "angiography / phase-contrast / ASL flag set" if h.angio else None


def _multi_phase(h: SeriesHeader) -> str | None:
    n = h.temporal_positions
    return f"NumberOfTemporalPositions {n} (dynamic / multi-phase)" if n is not None and n > 1 else None


def _gre_t2star(h: SeriesHeader) -> str | None:
    if _is_gradient_echo(h) and not _prepared_gre(h) and _in(h.echo_time, GRE_T1_MAX_TE_MS, math.inf):
        return f"gradient echo with TE {h.echo_time:g} ms (T2*/susceptibility weighted)"
    return None


def _balanced_ssfp(h: SeriesHeader) -> str | None:
    if h.steady_state in ("FREE_PRECESSION", "TIME_REVERSED") or "TRSS" in h.sequence_variant:
        return f"steady-state free precession ({h.steady_state or 'SequenceVariant TRSS'})"
    if (
        _is_gradient_echo(h)
        and not _prepared_gre(h)
        and _in(h.repetition_time, 0.0, SSFP_MAX_TR_MS)
        and _in(h.flip_angle, SSFP_MIN_FLIP, math.inf)
    ):
        return f"gradient echo TR {h.repetition_time:g} ms, flip {h.flip_angle:g} deg (balanced SSFP)"
    return None


_EXCLUSIONS: tuple[Callable[[SeriesHeader], str | None], ...] = (
    _not_mr,
    _not_mr_image,
    _derived_secondary,
    _image_type_value,
    _not_magnitude,
    _echo_planar,
    _diffusion,
    _acquisition_contrast,
    _angio,
    _multi_phase,
    _gre_t2star,
    _balanced_ssfp,
)


# --- physics weighting ----------------------------------------------------------------------
def _physics(h: SeriesHeader) -> str:
    parts = ["\\".join(h.scanning_sequence) or h.echo_pulse_sequence or "sequence unknown"]
    parts += [
        f"{name} {value:g} ms"
        for name, value in (("TR", h.repetition_time), ("TE", h.echo_time), ("TI", h.inversion_time))
        if value is not None
    ]
    if "MP" in h.sequence_variant:
        parts.append("magnetization prepared")
    return ", ".join(parts)


def _weighting(h: SeriesHeader) -> tuple[str, str] | None:
    """Return (weighting, rule) from the physics, or None when no rule fires.

    Weightings: "flair", "t2", "t1" (routable), "pd", "stir" (never routed).
    """
    tr, te, ti = h.repetition_time, h.echo_time, h.inversion_time
    inv, se, gr = _has_inversion(h), _is_spin_echo(h), _is_gradient_echo(h)
    table: tuple[tuple[bool, str, str], ...] = (
        (
            inv and not gr and _in(ti, *FLAIR_TI_MS) and _in(tr, FLAIR_MIN_TR_MS, math.inf)
            and _in(te, T2_MIN_TE_MS, math.inf),
            "flair", "inversion recovery with fluid-nulling TI and long TR/TE",
        ),
        (inv and not gr and _in(ti, 1.0, STIR_MAX_TI_MS), "stir", "short-TI inversion recovery (STIR)"),
        (
            inv and not gr and _in(ti, STIR_MAX_TI_MS, FLAIR_TI_MS[0]) and _in(te, 0.0, T1_SE_MAX_TE_MS),
            "t1", "T1 inversion recovery (dark-fluid T1 / T1 FLAIR)",
        ),
        (
            _prepared_gre(h) and _in(te, 0.0, GRE_T1_MAX_TE_MS) and (ti is None or ti < FLAIR_TI_MS[0]),
            "t1", "magnetization-prepared gradient echo (MPRAGE / BRAVO / TFE type)",
        ),
        (gr and not inv and _in(te, 0.0, GRE_T1_MAX_TE_MS), "t1", "spoiled gradient echo with short TE"),
        (
            se and not inv and _in(tr, 0.0, LONG_TR_MS) and _in(te, 0.0, T1_SE_MAX_TE_MS),
            "t1", "spin echo with short TR/TE",
        ),
        (
            se and not inv and _in(tr, LONG_TR_MS, math.inf) and _in(te, T2_MIN_TE_MS, math.inf),
            "t2", "spin echo with long TR/TE and no inversion",
        ),
        (se and not inv and _in(tr, LONG_TR_MS, math.inf) and _in(te, 0.0, T1_SE_MAX_TE_MS), "pd", "proton density"),
        (h.acquisition_contrast == "FLUID_ATTENUATED", "flair", "AcquisitionContrast FLUID_ATTENUATED"),
        (h.acquisition_contrast == "T2", "t2", "AcquisitionContrast T2"),
        (h.acquisition_contrast == "T1", "t1", "AcquisitionContrast T1"),
    )  # fmt: skip
    return next(((weight, why) for fires, weight, why in table if fires), None)


# --- contrast evidence ----------------------------------------------------------------------
# ContrastBolusAgent values that sites type to mean "no contrast".
_NO_AGENT = re.compile(r"(none|no|n|0|nil|null|n/?a|-+|\.|unknown|no contrast|not applicable|无|無|否)", re.I)


def _contrast(h: SeriesHeader, name: tuple[str, str] | None, rules: Rules) -> str | None:
    """Return the first piece of contrast evidence, or None (PS3.3 C.7.6.4, C.7.6.4b)."""
    if h.contrast_administered is False:
        return None
    agent = h.contrast_bolus_agent
    if agent and not _NO_AGENT.fullmatch(agent.strip()):
        return f"ContrastBolusAgent {agent!r}"
    if h.contrast_bolus_volume is not None and h.contrast_bolus_volume > 0:
        return f"ContrastBolusVolume {h.contrast_bolus_volume:g} ml"
    if h.contrast_administered:
        return "ContrastBolusAgentAdministered YES"
    if "POST_CONTRAST" in h.image_type:
        return "ImageType POST_CONTRAST"
    if name is not None:
        for key in ("t1c", "contrast"):
            hit = rules.search(key, name[1])
            if hit is not None:
                return f"{name[0]} {name[1]!r}: {hit}"
    return None


def _name_label(name: tuple[str, str] | None, rules: Rules) -> tuple[str, str] | None:
    """Return (key, match description) of the first of t1c, t1, flair, t2 that the name matches."""
    if name is None:
        return None
    for key in ("t1c", "t1", "flair", "t2"):
        hit = rules.search(key, name[1])
        if hit is not None:
            return key, hit
    return None


def _t1(h: SeriesHeader, name: tuple[str, str] | None, rules: Rules, why: str) -> tuple[Label, str]:
    evidence = _contrast(h, name, rules)
    if evidence is None:
        return Label.NONE, f"{why}, no contrast evidence: pre-contrast T1 is not routed"
    return Label.T1C, f"{why}, contrast: {evidence}"


def classify(header: SeriesHeader, rules: Rules) -> Classification:
    """Label one series ``t1c``, ``t2``, ``flair`` or ``none`` (see the module docstring).

    Parameters
    ----------
    header
        The series' attributes (see :func:`header_from_dataset`).
    rules
        Compiled name patterns (see :func:`compile_rules`).

    Returns
    -------
    Classification
        The label and a one-line reason naming the rule and the values it read.
    """
    label, reason = _decide(header, rules)
    return Classification(header.series_instance_uid, label, reason)


def _decide(h: SeriesHeader, rules: Rules) -> tuple[Label, str]:
    for exclusion in _EXCLUSIONS:
        why = exclusion(h)
        if why is not None:
            return Label.NONE, f"excluded: {why}"
    name = series_name(h)
    said = f"{name[0]} {name[1]!r}" if name else "no series name"
    hit = rules.search("none", name[1]) if name else None
    if hit is not None:
        return Label.NONE, f"excluded: {said}: {hit}"
    named = _name_label(name, rules)
    weighting = _weighting(h)
    if weighting is None:
        if named is None:
            matched = f"{said} matches no pattern" if name else said
            return Label.NONE, f"no physics rule fired ({_physics(h)}) and {matched}"
        key, hit = named
        why = f"physics inconclusive ({_physics(h)}); {said}: {hit}"
        return _t1(h, name, rules, why) if key in ("t1c", "t1") else (Label(key), why)
    weight, rule = weighting
    why = f"physics ({_physics(h)}): {rule}"
    if named is not None:
        key, hit = named
        family = "t1" if key == "t1c" else key
        if weight == "t2" and family == "flair":
            # No recorded inversion is weaker evidence than a recorded one: refuse, don't guess.
            return Label.NONE, f"conflict: {why}, but {said} says FLAIR ({hit}); not routed"
        verdict = "agrees" if family == weight else f"suggests {key} ({hit}) but physics wins"
        why += f"; {said} {verdict}"
    if weight == "t1":
        return _t1(h, name, rules, why)
    if weight in ("flair", "t2"):
        return Label(weight), why
    return Label.NONE, f"{why}: not routed"


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
    _Preference("ORIGINAL image", lambda h: h.image_type[:1] == ("ORIGINAL",), lambda h: _joined(h.image_type)),
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


# --- reading a pydicom Dataset --------------------------------------------------------------
# Enhanced MR (PS3.3 C.8.13.5): the functional group macro that holds each attribute.
_MACRO = {
    "RepetitionTime": "MRTimingAndRelatedParametersSequence",
    "FlipAngle": "MRTimingAndRelatedParametersSequence",
    "EffectiveEchoTime": "MREchoSequence",
    "InversionRecovery": "MRModifierSequence",
    "InversionTimes": "MRModifierSequence",
    "DiffusionBValue": "MRDiffusionSequence",
    "FrameType": "MRImageFrameTypeSequence",
    "AcquisitionContrast": "MRImageFrameTypeSequence",
    "ComplexImageComponent": "MRImageFrameTypeSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "ContrastBolusAgentAdministered": "ContrastBolusUsageSequence",
}
# What pydicom raises while converting a malformed stored value.
_BAD_VALUE = (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError, BytesLengthException)


def _get(ds: Any, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except _BAD_VALUE:
        return None


def _items(ds: Any, keyword: str) -> list[Any]:
    seq = _get(ds, keyword)
    return list(seq) if isinstance(seq, pydicom.Sequence) else []


def _values(ds: pydicom.Dataset, keyword: str) -> Iterator[Any]:
    """Yield *keyword* from the top level, then the shared, then each per-frame functional group."""
    top = _get(ds, keyword)
    if top is not None:
        yield top
    macro = _MACRO.get(keyword)
    if macro is None:
        return
    for group in _items(ds, "SharedFunctionalGroupsSequence") + _items(ds, "PerFrameFunctionalGroupsSequence"):
        for item in _items(group, macro):
            value = _get(item, keyword)
            if value is not None:
                yield value


def _first(ds: pydicom.Dataset, *keywords: str) -> Any:
    """The first value found for the first keyword that has one (classic name, then Enhanced)."""
    return next((v for k in keywords for v in _values(ds, k)), None)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip() if value is not None else ""
    return text or None


def _tokens(value: Any, split: str = r"\\") -> tuple[str, ...]:
    text = _text(value)
    return tuple(t.strip().upper() for t in re.split(split, text) if t.strip()) if text else ()


def _number(value: Any) -> float | None:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _code(value: Any) -> str | None:
    """A code string (CS) value, upper case, or None."""
    text = _text(value)
    return text.upper() if text else None


def _yes_no(value: Any) -> bool | None:
    # YES/NO for the Enhanced MR flags, Y/N for AngioFlag (PS3.3 C.8.3.1).
    return {"YES": True, "Y": True, "NO": False, "N": False}.get(_code(value) or "")


def header_from_dataset(ds: pydicom.Dataset, n_instances: int = 1) -> SeriesHeader:
    """Read the attributes classification needs from one instance of a series.

    Classic MR Image (PS3.3 C.8.3.1) attributes are read from the top level; for Enhanced MR
    (C.8.13) the same physics is looked up in the shared and per-frame functional groups
    (EffectiveEchoTime for EchoTime, InversionTimes for InversionTime, ...). Never raises on
    odd headers: a missing or malformed value becomes ``None``.

    Parameters
    ----------
    ds
        Any instance of the series (header only is enough).
    n_instances
        How many instances the series holds.

    Returns
    -------
    SeriesHeader
    """
    spacing = [n for n in (_number(v) for v in _tokens(_first(ds, "PixelSpacing"))) if n]
    agent = _text(_get(ds, "ContrastBolusAgent"))
    for item in _items(ds, "ContrastBolusAgentSequence")[:1]:
        agent = agent or _text(_get(item, "CodeMeaning")) or _text(_get(item, "CodeValue"))
    administered = {v for v in (_yes_no(x) for x in _values(ds, "ContrastBolusAgentAdministered")) if v is not None}
    b_values = [b for b in (_number(v) for v in _values(ds, "DiffusionBValue")) if b is not None]
    flags = [_yes_no(_get(ds, k)) for k in ("AngioFlag", "PhaseContrast", "TimeOfFlightContrast")]
    asl = _code(_get(ds, "ArterialSpinLabelingContrast"))
    image_type = _tokens(_get(ds, "ImageType")) or _tokens(_first(ds, "FrameType"))
    return SeriesHeader(
        series_instance_uid=_text(_get(ds, "SeriesInstanceUID")) or "",
        series_number=_int(_get(ds, "SeriesNumber")),
        series_date=_text(_get(ds, "SeriesDate")),
        series_time=_text(_get(ds, "SeriesTime")),
        acquisition_time=_text(_get(ds, "AcquisitionTime")),
        content_time=_text(_get(ds, "ContentTime")),
        modality=_code(_get(ds, "Modality")),
        manufacturer=_text(_get(ds, "Manufacturer")),
        sop_class_uid=_text(_get(ds, "SOPClassUID")),
        image_type=image_type,
        series_description=_text(_get(ds, "SeriesDescription")),
        protocol_name=_text(_get(ds, "ProtocolName")),
        sequence_name=_text(_get(ds, "SequenceName")) or _text(_get(ds, "PulseSequenceName")),
        scanning_sequence=_tokens(_get(ds, "ScanningSequence"), r"[\\/,\s]+"),
        sequence_variant=_tokens(_get(ds, "SequenceVariant"), r"[\\/,\s]+"),
        scan_options=_tokens(_get(ds, "ScanOptions")),
        mr_acquisition_type=_code(_get(ds, "MRAcquisitionType")),
        repetition_time=_number(_first(ds, "RepetitionTime")),
        echo_time=_number(_first(ds, "EchoTime", "EffectiveEchoTime")),
        inversion_time=_number(_first(ds, "InversionTime", "InversionTimes")),
        flip_angle=_number(_first(ds, "FlipAngle")),
        contrast_bolus_agent=agent,
        contrast_bolus_route=_text(_get(ds, "ContrastBolusRoute")),
        contrast_bolus_volume=_number(_get(ds, "ContrastBolusVolume")),
        contrast_administered=(True in administered) if administered else None,
        echo_pulse_sequence=_code(_get(ds, "EchoPulseSequence")),
        inversion_recovery=_yes_no(_first(ds, "InversionRecovery")),
        echo_planar=_yes_no(_get(ds, "EchoPlanarPulseSequence")),
        steady_state=_code(_get(ds, "SteadyStatePulseSequence")),
        acquisition_contrast=_code(_first(ds, "AcquisitionContrast")),
        complex_image_component=_code(_first(ds, "ComplexImageComponent")),
        angio=True if True in flags or asl not in (None, "NONE") else None,
        diffusion_b_value=max(b_values) if b_values else None,
        temporal_positions=_int(_get(ds, "NumberOfTemporalPositions")),
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
        pixel_spacing=(spacing[0], spacing[1]) if len(spacing) == 2 else None,
        slice_thickness=_number(_first(ds, "SliceThickness")),
        n_instances=n_instances,
        number_of_frames=_int(_get(ds, "NumberOfFrames")),
    )

