"""Series header -> (label, reason): which model, if any, an MR series goes to.

Pure: no file I/O, no clock, no logging; the caller logs the returned reason. Every
decision is one row of a table below, tried in order, and the first row that fires wins:

1. **Header exclusions** (``_EXCLUSIONS``): not MR, not an MR image SOP class (PS3.4 B.5),
   derived secondary images, ImageType values of localizers, maps, reformats or phase
   images, echo-planar readout, diffusion weighting (any b-value > 0, standard or vendor private,
   DiffusionDirectionality, an MR Diffusion Sequence), several images per slice position, angio / phase-contrast / ASL flags,
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

Patterns (:data:`DEFAULT_PATTERNS`, kept in :mod:`dmg_node.classify.patterns`) are matched with
:meth:`re.Pattern.search` (anywhere in the name) and ``re.IGNORECASE``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from dmg_node.classify.header import SeriesHeader, series_name
from dmg_node.classify.rules import Classification, Label, Rules

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
    if b is not None and b > 0:
        return f"b-value {b:g} s/mm2 (diffusion-weighted)"
    if h.diffusion_directionality not in (None, "NONE"):
        return f"DiffusionDirectionality {h.diffusion_directionality} (diffusion-weighted)"
    if h.diffusion_sequence:
        return "MR Diffusion Sequence present (diffusion acquisition)"
    return None


def _several_per_position(h: SeriesHeader) -> str | None:
    n = h.images_per_position
    if n is not None and n > 1:
        return f"{n:g} images per slice position (b-values, echoes or phases in one series)"
    return None


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
    _several_per_position,
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
