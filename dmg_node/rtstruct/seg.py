"""Mask + source series -> DICOM Segmentation (Segmentation IOD, PS3.3 A.51), built by highdicom.

The optional second output beside the RTSTRUCT (``formats = ["rtstruct", "seg"]`` per
destination), for PACS viewers and research archives that show a SEG as a labelled overlay.
It carries the same structures as the RTSTRUCT: segment 1 is the sequence's ROI, further
segments the extra ROIs (the consensus), each a BINARY segment (PS3.3 C.8.20.2) whose Segment
Algorithm Type is AUTOMATIC with the model's name and version (Algorithm Identification,
PS3.3 C.8.20.4.1), and the same "UNAPPROVED, review required" wording in Series Description and
Content Description. A flagged contour's QA note goes into Segment Description (0062,0006).

highdicom does the encoding (1-bit packed frames, Shared and Per-frame Functional Groups, the
Derivation Image and Referenced Series sequences). It pairs mask frame ``i`` with source image
``i`` (single-frame series) or frame ``i+1`` of the one multi-frame source (PS3.3 C.7.6.16),
so :func:`build_seg` puts the mask in that order: the volume's slice order is by position, not
the order the datasets came in. The builder is pure: UIDs and the creation time are passed in,
and the clock highdicom reads is overwritten with them.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
import structlog
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ImplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

import dmg_node
from dmg_node.errors import RtStructError, SegError
from dmg_node.rtstruct.build import RoiSpec, character_set, check_source, fit_text
from dmg_node.volume import Volume

log = structlog.get_logger(__name__)

# Content Label (CS, 16 characters, PS3.3 C.10.9): upper-case letters, digits, space and underscore.
# Patient and General Study attributes highdicom copies as if present (Type 2, PS3.3 C.7.1.1, C.7.2.1).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber", "ReferringPhysicianName")
_CS_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _")


@dataclass(frozen=True)
class SegMeta:
    """Identity and provenance of the SEG instance, chosen by the caller (keeps the builder pure)."""

    sop_instance_uid: str
    series_instance_uid: str
    created: datetime.datetime
    algorithm_name: str
    algorithm_version: str
    manufacturer: str = "dmg-node"
    software_version: str = dmg_node.__version__
    series_description: str = "AI-generated DMG segmentation - UNAPPROVED, review required"
    content_label: str = "DMG_AI"
    series_number: int = 1
    # Device Serial Number (LO, Type 1 in Enhanced General Equipment, PS3.3 C.7.5.2): names the node.
    device_serial_number: str = "DMG_NODE"
    # Content Description (LO, 64 characters); empty = the series description.
    content_description: str = ""


def build_seg(
    source: Sequence[Dataset], volume: Volume, mask: npt.NDArray[np.bool_], roi: RoiSpec, meta: SegMeta,
    *, extra_rois: Sequence[tuple[RoiSpec, npt.NDArray[np.bool_]]] = (),
) -> Dataset:
    """Build a binary Segmentation (PS3.3 A.51) holding *mask* as segment 1 on the grid of *source*.

    Parameters
    ----------
    source
        The datasets of the segmented series, exactly the instances of *volume* (one per slice,
        or one Enhanced MR object whose frames are the slices).
    volume
        The volume built from *source*; its slice order maps the mask to the source's frames.
    mask
        Boolean array of ``volume.array``'s shape (slices, rows, columns), not empty.
    roi
        Segment Label (the ROI name), display colour (as CIELab, PS3.3 C.10.7.1.1) and, when set,
        its description (a QA note) as Segment Description.
    meta
        UIDs, creation time, model name and version, labels of the new instance.
    extra_rois
        Further segments on the same grid (numbered 2, 3, ...), such as the consensus; each
        mask must be non-empty.

    Returns
    -------
    Dataset
        A Part 10 ready dataset (file meta: Implicit VR Little Endian, like the RTSTRUCT, so
        one uncompressed presentation context sends both). Only frames holding a segment are
        stored (highdicom's ``omit_empty_frames``).

    Raises
    ------
    SegError
        A mask is empty or of the wrong shape, *source* does not match *volume*, or highdicom
        cannot encode the series (the message says why).
    """
    rois = [(roi, mask), *extra_rois]
    for spec, roi_mask in rois:
        if roi_mask.shape != volume.array.shape or roi_mask.dtype != np.bool_:
            raise SegError(f"mask must be bool of shape {volume.array.shape}; found {roi_mask.dtype} {roi_mask.shape}")
        if not roi_mask.any():
            raise SegError(f"mask of segment {spec.name!r} is empty; a SEG needs at least one segmented voxel")
    try:
        by_uid = check_source(source, volume)
    except RtStructError as exc:  # the same rule as the RTSTRUCT's, reported as this output's error
        raise SegError(str(exc)) from exc
    stacked = np.stack([m for _, m in rois], axis=-1).astype(np.uint8)
    if volume.frame_numbers is None:
        images = [_stand_in(by_uid[uid], volume) for uid in volume.sop_instance_uids]
        frames = stacked
    else:
        images = [_stand_in(by_uid[volume.sop_instance_uids[0]], volume)]
        frames = np.zeros_like(stacked)
        frames[[n - 1 for n in volume.frame_numbers]] = stacked
    reference = images[0]
    date, time = meta.created.date(), meta.created.time().replace(tzinfo=None)
    try:
        seg = Segmentation(
            source_images=images,
            pixel_array=frames,
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=[_segment(n, spec, meta) for n, (spec, _) in enumerate(rois, start=1)],
            series_instance_uid=meta.series_instance_uid,
            series_number=meta.series_number,
            sop_instance_uid=meta.sop_instance_uid,
            instance_number=1,
            manufacturer=fit_text(meta.manufacturer, 64),
            manufacturer_model_name="dmg-node",
            software_versions=fit_text(meta.software_version, 64),
            device_serial_number=fit_text(meta.device_serial_number, 64) or "DMG_NODE",
            content_description=fit_text(meta.content_description or meta.series_description, 64),
            content_label=_content_label(meta.content_label),
            series_description=fit_text(meta.series_description, 64),
            transfer_syntax_uid=ImplicitVRLittleEndian,
            content_date=date, content_time=time, series_date=date, series_time=time,
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom states its rule in the message (e.g. geometry it cannot derive from the source)
        raise SegError(f"highdicom cannot encode this series as a SEG: {type(exc).__name__}: {exc}") from exc
    ds: Dataset = seg
    ds.InstanceCreationDate, ds.InstanceCreationTime = date.strftime("%Y%m%d"), time.strftime("%H%M%S")
    if meta.created.utcoffset() is not None:
        ds.TimezoneOffsetFromUTC = meta.created.strftime("%z")
    _fit_decimal_strings(ds)
    charset = character_set(ds, reference)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    log.info("seg_built", sop_uid=meta.sop_instance_uid, segments=len(rois), frames=int(ds.NumberOfFrames),
             voxels=int(np.count_nonzero(mask)))
    return ds


def _stand_in(ds: Dataset, volume: Volume) -> Dataset:
    """A header-only view of a source image that highdicom can copy from (PS3.3 C.7.1.1, C.7.2.1, C.7.6.2).

    highdicom reads Type 2 patient and study attributes and Slice Thickness (MR Image, Type 2) as
    if they were always present; a source without them would make no SEG. They are added empty
    (Slice Thickness: the volume's slice spacing); the source itself is not changed.
    """
    item = Dataset({elem.tag: elem for elem in ds if elem.keyword != "PixelData"})
    for keyword in _TYPE2_COPIED:
        if keyword not in item:
            setattr(item, keyword, "")
    if volume.frame_numbers is None and "SliceThickness" not in item:
        item.SliceThickness = format_number_as_ds(float(volume.spacing[2]))
    return item


def _segment(number: int, roi: RoiSpec, meta: SegMeta) -> SegmentDescription:
    """One Segment Sequence item (PS3.3 C.8.20.2): label, what it is, who made it, its colour."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=fit_text(meta.algorithm_name, 64), family=codes.cid7162.ArtificialIntelligence,
        version=fit_text(meta.algorithm_version, 64),
    )
    item = SegmentDescription(
        segment_number=number,
        segment_label=fit_text(roi.name, 64),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*roi.color),
    )
    if roi.description:
        item.SegmentDescription = fit_text(roi.description, 1024)  # ST; the RTSTRUCT's ROI Description is LO 64
    return item


def _fit_decimal_strings(ds: Dataset) -> None:
    """Rewrite DS values over 16 characters (PS3.5 6.2), as highdicom copies positions from the source as floats.

    A source whose Image Position (Patient) was written with full float precision would otherwise
    give a SEG that validators reject; the value is kept to the precision 16 characters hold.
    """
    for elem in ds.iterall():
        if elem.VR != "DS" or elem.value is None or elem.value == "":
            continue
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        if any(len(str(v)) > 16 for v in values):
            fitted = [format_number_as_ds(float(v)) for v in values]
            elem.value = fitted if elem.VM > 1 else fitted[0]


def _content_label(text: str) -> str:
    """*text* as a Content Label (CS, 16 characters): upper case, other characters as underscores."""
    label = "".join(c if c in _CS_ALLOWED else "_" for c in text.upper())[:16].strip()
    return label or "DMG_AI"
