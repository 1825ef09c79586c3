"""The header of one series as classification reads it, and reading it from a pydicom Dataset.

Untrusted input: a missing or malformed value becomes ``None`` (or ``()``), never an exception.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.errors import BytesLengthException


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
    # DiffusionDirectionality (0018,9075) or the MR Diffusion Sequence (0018,9117) present anywhere.
    diffusion_directionality: str | None = None
    diffusion_sequence: bool = False
    # Series level (see :func:`header_from_series`): instances per distinct ImagePositionPatient.
    images_per_position: float | None = None
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


# --- reading a pydicom Dataset --------------------------------------------------------------
# Enhanced MR (PS3.3 C.8.13.5): the functional group macro that holds each attribute.
_MACRO = {
    "RepetitionTime": "MRTimingAndRelatedParametersSequence",
    "FlipAngle": "MRTimingAndRelatedParametersSequence",
    "EffectiveEchoTime": "MREchoSequence",
    "InversionRecovery": "MRModifierSequence",
    "InversionTimes": "MRModifierSequence",
    "DiffusionBValue": "MRDiffusionSequence",
    "DiffusionDirectionality": "MRDiffusionSequence",
    "FrameType": "MRImageFrameTypeSequence",
    "AcquisitionContrast": "MRImageFrameTypeSequence",
    "ComplexImageComponent": "MRImageFrameTypeSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "ContrastBolusAgentAdministered": "ContrastBolusUsageSequence",
}
# What pydicom raises while converting a malformed stored value.
_BAD_VALUE = (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError, BytesLengthException,
              NotImplementedError)


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
    b_values = _b_values(ds)
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
        diffusion_directionality=_code(_first(ds, "DiffusionDirectionality")),
        diffusion_sequence=bool(_items(ds, "MRDiffusionSequence")) or any(
            _items(g, "MRDiffusionSequence")
            for g in _items(ds, "SharedFunctionalGroupsSequence") + _items(ds, "PerFrameFunctionalGroupsSequence")[:1]
        ),
        temporal_positions=_int(_get(ds, "NumberOfTemporalPositions")),
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
        pixel_spacing=(spacing[0], spacing[1]) if len(spacing) == 2 else None,
        slice_thickness=_number(_first(ds, "SliceThickness")),
        n_instances=n_instances,
        number_of_frames=_int(_get(ds, "NumberOfFrames")),
    )


# Vendor private b-values (group, private creator, element offset): Siemens CSA "B_value",
# GE "Slop_int_6" (the b-value, sometimes plus 10^9), Philips "Diffusion B-Factor".
_PRIVATE_B_VALUES = (
    (0x0019, "SIEMENS MR HEADER", 0x0C),
    (0x0043, "GEMS_PARM_01", 0x39),
    (0x2001, "Philips Imaging DD 001", 0x03),
)
_GE_B_OFFSET = 1e9


def _private(ds: pydicom.Dataset, group: int, creator: str, offset: int) -> Any:
    """A private element's value under its creator (PS3.5 7.8.1), or None; raw bytes of FL/FD decoded."""
    try:
        value = ds.private_block(group, creator)[offset].value
    except Exception:  # noqa: BLE001 - absent, or undecodable (e.g. an unknown VR): no value
        return None
    if isinstance(value, bytes):  # VR unknown to pydicom: text (IS/DS) or little-endian FL/FD
        text = _number(value.decode("latin-1").strip("\x00 ").split("\\")[0])
        if text is None and len(value) in (4, 8):
            return struct.unpack("<f" if len(value) == 4 else "<d", value)[0]
        return text
    return value


def _b_values(ds: pydicom.Dataset) -> list[float]:
    """Every b-value the instance records: DiffusionBValue (0018,9087) and the vendors' private tags."""
    out = [b for b in (_number(v) for v in _values(ds, "DiffusionBValue")) if b is not None]
    for group, creator, offset in _PRIVATE_B_VALUES:
        b = _number(_private(ds, group, creator, offset))
        if b is not None:
            out.append(b - _GE_B_OFFSET if b >= _GE_B_OFFSET else b)
    return out


def _position(item: Any) -> tuple[float, ...] | None:
    values = [_signed(v) for v in _tokens(_get(item, "ImagePositionPatient"))]
    if len(values) != 3 or any(v is None for v in values):
        return None
    return tuple(round(float(v), 1) for v in values if v is not None)


def _positions(ds: pydicom.Dataset) -> list[tuple[float, ...] | None]:
    """ImagePositionPatient of each frame: Enhanced MR's Plane Position Sequence, else the top level."""
    frames = _items(ds, "PerFrameFunctionalGroupsSequence")
    if not frames:
        return [_position(ds)]
    return [next((_position(i) for i in _items(fg, "PlanePositionSequence")), None) for fg in frames]


def _signed(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def header_from_series(datasets: Sequence[pydicom.Dataset]) -> SeriesHeader:
    """The header of a whole series: the first instance's, plus what only the series shows.

    Diffusion hides in a series whose first image is b = 0 (Philips writes b = 0 and b = 1000
    images at each position of one series) and whose description a de-identifier removed
    (PS3.15 E.1): so the largest b-value of *any* instance is kept, and the number of
    instances per distinct ImagePositionPatient (PS3.3 C.7.6.2.1.1) is counted; more than
    one image per position means b-values, echoes or phases share the series.

    Parameters
    ----------
    datasets
        Every instance of one series (headers are enough), at least one.

    Returns
    -------
    SeriesHeader
    """
    header = header_from_dataset(datasets[0], n_instances=len(datasets))
    b_values = [b for ds in datasets for b in _b_values(ds)]
    positions = [p for ds in datasets for p in _positions(ds)]
    known = [p for p in positions if p is not None]
    per_position = len(known) / len(set(known)) if known and len(known) == len(positions) else None
    return dataclasses.replace(
        header, diffusion_b_value=max(b_values) if b_values else None, images_per_position=per_position
    )
