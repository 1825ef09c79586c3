"""Mask + source series -> RTSTRUCT dataset (RT Structure Set IOD, PS3.3 A.19), and back.

rt-utils' helpers build the dataset skeleton (Patient, General Study, the Referenced Frame of
Reference Sequence listing every source instance, the Structure Set ROI item). They are handed
header-only stand-ins built from the datasets we were given (never a folder: its loader mixes
series and skips compressed images). What they get wrong is overwritten or added here (random
UIDs, the source's series date copied as ours, missing Type 2 study attributes); its base
dataset (clock, ``ISO_IR 100``, "Qurit" equipment) and its RT ROI Observations item (empty RT
ROI Interpreted Type) are not used.

The contours are NOT rt-utils': it traces voxel centres (a half-voxel inset), swaps row and
column spacing, takes z from the mean slice spacing and can emit 1-2 point contours. Correcting
that chain code is messier than tracing the mask ourselves, so
:func:`dmg_node.rtstruct.contours.slice_polygons` traces the voxel-edge boundary exactly (pixel corners),
with holes joined to their outer boundary by a zero-width cut along a pixel edge (a "keyhole").
A reader that fills each contour at voxel centres by the even-odd or non-zero rule gives the
mask back voxel for voxel whether it ORs the contours of a slice (plastimatch's default, which
would fill nested hole contours) or XORs them.
Each point is placed with the slice's own Image Position (Patient), not a mean spacing.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ImplicitVRLittleEndian, RTStructureSetStorage
from pydicom.valuerep import format_number_as_ds
from rt_utils import ds_helper
from rt_utils.utils import ROIData

import dmg_node
from dmg_node.errors import RtStructError
from dmg_node.fsutil import atomic_write
from dmg_node.rtstruct.contours import closing_edge_along, slice_polygons
from dmg_node.volume import Volume

log = structlog.get_logger(__name__)

UTF8_CHARSET = "ISO_IR 192"
# Coordinates are written to 1 micrometre: far below the half voxel that separates a boundary
# from a voxel centre, and short enough (<= 9 characters) to keep one contour of ~2400 points
# under the 64 KiB value limit of Explicit VR (PS3.5 7.1.2).
DECIMALS_MM = 3
EXPLICIT_VR_MAX_VALUE_BYTES = 0xFFFE
# A source slice may sit this fraction of the slice step away from the volume's regular grid
# (build_volume allows 5 % irregular gaps); more means source and volume disagree.
MAX_SLICE_OFFSET_FRACTION = 0.5
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1), copied
# from the source and present but empty when it lacks them; then Type 3 ones copied if present.
_COPIED_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)
_COPIED_TYPE3 = ("IssuerOfPatientID", "StudyDescription")
# Empty Type 3 attributes that rt-utils writes.
_RT_UTILS_EXTRAS = ("PatientAge", "PatientSize", "PatientWeight")


@dataclass(frozen=True)
class RoiSpec:
    """A structure written: name, display colour, how it was generated and an optional description (a QA note)."""

    name: str
    color: tuple[int, int, int]
    generation_description: str
    interpreted_type: str = "GTV"
    description: str = ""


@dataclass(frozen=True)
class RtStructMeta:
    """Identity and provenance of the RTSTRUCT instance, chosen by the caller (keeps the builder pure)."""

    sop_instance_uid: str
    series_instance_uid: str
    created: datetime.datetime
    manufacturer: str = "dmg-node"
    software_version: str = dmg_node.__version__
    series_description: str = "AI-generated DMG contour - UNAPPROVED, review required"
    structure_set_label: str = "DMG_AI"
    series_number: int = 1
    # Structure Set Description (ST, 1024 characters); empty = the series description.
    structure_set_description: str = ""


def build_rtstruct(
    source: Sequence[Dataset], volume: Volume, mask: npt.NDArray[np.bool_], roi: RoiSpec, meta: RtStructMeta,
    *, allow_empty: bool = False, extra_rois: Sequence[tuple[RoiSpec, npt.NDArray[np.bool_]]] = (),
) -> Dataset:
    """Build an RT Structure Set (PS3.3 A.19) holding *mask* as a closed-planar ROI (ROI Number 1).

    Parameters
    ----------
    source
        The datasets of the segmented series, exactly the instances of *volume* (one per slice,
        or one Enhanced MR object whose frames are referenced by Referenced Frame Number).
    volume
        The volume built from *source*; its affine gives the in-plane axes.
    mask
        Boolean array of ``volume.array``'s shape (slices, rows, columns).
    roi
        Name, colour and generation description of the structure (ROIGenerationAlgorithm is
        AUTOMATIC, PS3.3 C.8.8.5).
    meta
        UIDs, creation time and labels of the new instance (no UID or clock is read here).
    allow_empty
        Accept an empty mask and write the ROI with no contour (``rtstruct.send_empty``), so the
        planner sees that the model ran and found nothing.
    extra_rois
        Further structures on the same grid (numbered 2, 3, ...), such as the consensus ROI; each
        mask must be non-empty.

    Returns
    -------
    Dataset
        A Part 10 ready dataset (file meta: Implicit VR Little Endian).

    Raises
    ------
    RtStructError
        If the mask is empty (and not *allow_empty*), has the wrong shape or type, or *source* does not match *volume*.
    """
    rois = [(roi, mask), *extra_rois]
    for number, (spec, roi_mask) in enumerate(rois, start=1):
        if roi_mask.shape != volume.array.shape or roi_mask.dtype != np.bool_:
            raise RtStructError(f"mask must be bool of shape {volume.array.shape}; found {roi_mask.dtype} {roi_mask.shape}")
        if not roi_mask.any() and not (allow_empty and number == 1):
            raise RtStructError("mask is empty" if number == 1 else f"mask of ROI {spec.name!r} is empty")
        if any(not 0 <= c <= 255 for c in spec.color) or len(spec.color) != 3:
            raise RtStructError(f"ROI colour must be three values in 0..255; found {spec.color}")
    by_uid = check_source(source, volume)
    ds = _skeleton(_stand_ins(source, volume, by_uid), by_uid[volume.sop_instance_uids[0]], meta)
    n_contours = 0
    for number, (spec, roi_mask) in enumerate(rois, start=1):
        n_contours += _add_roi(ds, number, spec, roi_mask, volume, by_uid)

    charset = character_set(ds, by_uid[volume.sop_instance_uids[0]])
    if charset is not None:
        ds.SpecificCharacterSet = charset
    log.info("rtstruct_built", sop_uid=meta.sop_instance_uid, contours=n_contours,
             voxels=int(np.count_nonzero(mask)))
    return ds


def _add_roi(ds: Dataset, number: int, roi: RoiSpec, mask: npt.NDArray[np.bool_], volume: Volume,
             by_uid: dict[str, Dataset]) -> int:
    """Add one ROI: its Structure Set ROI, ROI Contour and RT ROI Observations items (PS3.3 C.8.8.5-C.8.8.8).

    Returns the number of contours written.
    """
    ssroi = ds_helper.create_structure_set_roi(
        ROIData(mask, list(roi.color), number, fit_text(roi.name, 64), volume.frame_of_reference_uid)
    )
    ssroi.ROIGenerationDescription = fit_text(roi.generation_description, 64)
    if roi.description:
        ssroi.ROIDescription = fit_text(roi.description, 64)
    else:
        del ssroi.ROIDescription  # rt-utils' empty Type 3 value
    ds.StructureSetROISequence.append(ssroi)

    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = list(roi.color)
    contours = _contour_sequence(mask, volume, by_uid)
    if contours:  # Contour Sequence is Type 3: omitted, not empty, when nothing was found
        roi_contour.ContourSequence = contours
    roi_contour.ReferencedROINumber = number
    ds.ROIContourSequence.append(roi_contour)

    observation = Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.RTROIInterpretedType = roi.interpreted_type
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence.append(observation)
    return len(contours)


def save_rtstruct(ds: Dataset, path: Path) -> None:
    """Write *ds* as a DICOM Part 10 file (PS3.10 7.1) atomically, in its file meta's transfer syntax.

    Raises
    ------
    OSError
        If the file cannot be written; *path* is then untouched.
    """
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    atomic_write(path, buffer.getvalue())


def check_source(source: Sequence[Dataset], volume: Volume) -> dict[str, Dataset]:
    """Index *source* by SOP Instance UID after checking it is exactly the volume's series."""
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in source}
    if len(by_uid) != len(source) or set(by_uid) != set(volume.sop_instance_uids):
        raise RtStructError(
            f"source must be the {len(set(volume.sop_instance_uids))} instance(s) of the volume; "
            f"found {len(source)} dataset(s) with {len(set(by_uid) & set(volume.sop_instance_uids))} matching"
        )
    for keyword, expected in (("SeriesInstanceUID", volume.series_instance_uid),
                              ("FrameOfReferenceUID", volume.frame_of_reference_uid)):
        found = {str(ds.get(keyword, "")) for ds in source}
        if found != {expected}:
            raise RtStructError(f"source {keyword} must all be the volume's; found {len(found)} different value(s)")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in source}
    if len(studies) != 1 or "" in studies:
        raise RtStructError(f"source needs one StudyInstanceUID (0020,000D); found {sorted(studies)}")
    return by_uid


def _stand_ins(source: Sequence[Dataset], volume: Volume, by_uid: dict[str, Dataset]) -> list[Dataset]:
    """Header-only copies for rt-utils in slice order; the first carries what it insists on reading.

    rt-utils fails on a source without StudyDate, StudyTime or StudyID (Type 2, may be absent
    in practice): placeholders go in here and :func:`_skeleton` copies the real values.
    """
    stand_ins = []
    for uid in dict.fromkeys(volume.sop_instance_uids):
        item = Dataset()
        item.SOPClassUID = by_uid[uid].SOPClassUID
        item.SOPInstanceUID = uid
        stand_ins.append(item)
    first = stand_ins[0]
    first.SeriesInstanceUID = volume.series_instance_uid
    first.FrameOfReferenceUID = volume.frame_of_reference_uid
    first.StudyInstanceUID = by_uid[volume.sop_instance_uids[0]].StudyInstanceUID
    first.StudyDate = first.StudyTime = first.StudyID = ""
    return stand_ins


def _skeleton(stand_ins: list[Dataset], reference: Dataset, meta: RtStructMeta) -> Dataset:
    """rt-utils' study, patient and referenced-frame-of-reference parts, then ours on top.

    rt-utils' ``create_rtstruct_dataset`` is not used: its base dataset reads the clock, uses
    deprecated pydicom attributes and names "Qurit" as institution. What its helpers set from
    random UIDs or copy wrongly (the source's series date as ours) is overwritten here, and the
    source's patient and study attributes are copied (str() decodes them with the source's
    character set).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds_helper.add_sequence_lists_to_ds(ds)
    ds_helper.add_study_and_series_information(ds, stand_ins)
    ds_helper.add_patient_information(ds, stand_ins)
    ds_helper.add_refd_frame_of_ref_sequence(ds, stand_ins)
    date, time = meta.created.strftime("%Y%m%d"), meta.created.strftime("%H%M%S")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(meta.sop_instance_uid)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = meta.sop_instance_uid
    ds.Modality = "RTSTRUCT"
    ds.SeriesNumber = meta.series_number
    ds.SeriesInstanceUID = meta.series_instance_uid
    ds.InstanceCreationDate = ds.StructureSetDate = ds.SeriesDate = date
    ds.InstanceCreationTime = ds.StructureSetTime = ds.SeriesTime = time
    if meta.created.utcoffset() is not None:
        ds.TimezoneOffsetFromUTC = meta.created.strftime("%z")
    ds.Manufacturer = fit_text(meta.manufacturer, 64)
    ds.SoftwareVersions = fit_text(meta.software_version, 64)
    ds.SeriesDescription = fit_text(meta.series_description, 64)
    ds.StructureSetLabel = fit_text(meta.structure_set_label, 16)
    ds.StructureSetName = fit_text(meta.structure_set_label, 64)
    ds.StructureSetDescription = fit_text(meta.structure_set_description or meta.series_description, 1024)
    ds.ApprovalStatus = "UNAPPROVED"
    ds.InstanceNumber = 1
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = reference.FrameOfReferenceUID
    ds.PositionReferenceIndicator = str(reference.get("PositionReferenceIndicator") or "")
    for keyword in _COPIED_TYPE2:
        setattr(ds, keyword, str(reference.get(keyword) or ""))
    for keyword in _COPIED_TYPE3:
        value = str(reference.get(keyword) or "")
        if value:
            setattr(ds, keyword, value)
        elif keyword in ds:
            del ds[keyword]
    for keyword in _RT_UTILS_EXTRAS:
        if keyword in ds:
            del ds[keyword]
    return ds


def _contour_sequence(mask: npt.NDArray[np.bool_], volume: Volume, by_uid: dict[str, Dataset]) -> DicomSequence:
    """One CLOSED_PLANAR contour per connected region of each slice (PS3.3 C.8.8.6)."""
    axis_i, axis_j = volume.affine[:3, 0], volume.affine[:3, 1]
    closing_axis = 0 if np.linalg.norm(axis_i[:2]) >= np.linalg.norm(axis_j[:2]) else 1
    contours = DicomSequence()
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        uid = volume.sop_instance_uids[k]
        image = Dataset()
        image.ReferencedSOPClassUID = by_uid[uid].SOPClassUID
        image.ReferencedSOPInstanceUID = uid
        if volume.frame_numbers is not None:
            image.ReferencedFrameNumber = volume.frame_numbers[k]
        origin = _slice_origin(by_uid[uid], volume, int(k))
        for polygon in slice_polygons(mask[k]):
            polygon = closing_edge_along(polygon, closing_axis)
            points = origin + polygon[:, :1] * axis_i + polygon[:, 1:] * axis_j
            contour = Dataset()
            contour.ContourNumber = len(contours) + 1
            contour.ContourImageSequence = DicomSequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            values = [format_number_as_ds(round(float(v), DECIMALS_MM) + 0.0) for v in points.ravel()]
            contour.ContourData = values
            size = sum(map(len, values)) + len(values) - 1
            if size > EXPLICIT_VR_MAX_VALUE_BYTES:
                log.warning("contour_too_long_for_explicit_vr", contour=contour.ContourNumber, value_bytes=size)
            contours.append(contour)
    return contours


def _slice_origin(ds: Dataset, volume: Volume, k: int) -> npt.NDArray[np.float64]:
    """Patient position of voxel (0, 0) of slice *k*: the image's own Image Position (Patient).

    The volume's affine uses the mean slice step; the image says where the slice really is
    (PS3.3 C.7.6.2.1.1; per frame in the Plane Position functional group, C.7.6.16.2.3).
    """
    grid = volume.index_to_patient([0.0, 0.0, float(k)])
    if volume.frame_numbers is not None:
        frames = ds.get("PerFrameFunctionalGroupsSequence") or []
        group = frames[volume.frame_numbers[k] - 1] if len(frames) >= volume.frame_numbers[k] else Dataset()
        position = (group.get("PlanePositionSequence") or [Dataset()])[0].get("ImagePositionPatient")
    else:
        position = ds.get("ImagePositionPatient")
    if position is None:
        return grid
    origin = np.asarray([float(v) for v in position], dtype=np.float64)
    offset = float(np.linalg.norm(origin - grid))
    if offset > MAX_SLICE_OFFSET_FRACTION * volume.spacing[2]:
        raise RtStructError(f"slice {k} of the source lies {offset:.2f} mm from the volume's grid; they disagree")
    return origin


def character_set(ds: Dataset, reference: Dataset) -> str | list[str] | None:
    """Specific Character Set for *ds* (PS3.3 C.12.1.1.2): the source's if it encodes all our text.

    Falls back to UTF-8 (``ISO_IR 192``) so that names such as 张三 survive (rt-utils writes
    ``ISO_IR 100`` and they become ``??``); ``None`` (attribute absent: the default repertoire)
    when the source has none and all text is ASCII.
    """
    source = reference.get("SpecificCharacterSet")
    terms = [] if not source else [str(source)] if isinstance(source, str) else [str(t) for t in source]
    if any(term not in python_encoding for term in terms):
        return UTF8_CHARSET
    encodings = [python_encoding[term] for term in terms if term] or ["ascii"]
    texts = [str(v) for elem in ds.iterall() if elem.VR in _TEXT_VRS and elem.value
             for v in (elem.value if elem.VM > 1 else [elem.value])]
    if not all(any(_encodes(text, encoding) for encoding in encodings) for text in texts):
        return UTF8_CHARSET
    if not terms:
        return None
    return terms if len(terms) > 1 else terms[0]


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeError:
        return False
    return True


def fit_text(text: str, max_chars: int) -> str:
    """*text* cut to the maximum length of its value representation (PS3.5 6.2)."""
    return text[:max_chars]
