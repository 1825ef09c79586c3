"""The DICOM SEG beside the RTSTRUCT: build it from the RTSTRUCT's structures and queue it, once.

Only destinations whose ``formats`` list ``"seg"`` get it (:mod:`dmg_node.config`); the builder is
:func:`dmg_node.rtstruct.seg.build_seg`. A SEG is made once per source series, exact instances
and model version, like the RTSTRUCT (the spool's ``segs`` table, :class:`RtStructKey` with
``kind="seg"``): a rerun queues the same SOP Instance UID again, and a SEG asked for after its
RTSTRUCT was made is drawn from the RTSTRUCT's own contours, so both show the same voxels.
A SEG that cannot be built is logged (``seg_failed``) and never stops the RTSTRUCT.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dmg_node.classify import Label
from dmg_node.errors import RtStructError, SegError, SeriesError
from dmg_node.records import Job, RtStructKey, RtStructRecord
from dmg_node.rtstruct import RoiSpec, SegMeta, build_seg, read_roi_mask
from dmg_node.segment.routing import Routable
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume, build_volume

log = structlog.get_logger(__name__)

# A SEG's Series Number: its RTSTRUCT's plus this (the RTSTRUCT numbers are base + 1..3, or + 11..13).
SEG_SERIES_NUMBER_OFFSET = 20
Rois = list[tuple[RoiSpec, np.ndarray[Any, Any]]]


@dataclasses.dataclass(frozen=True)
class SegTarget:
    """Where one series' SEG goes and what it is called: the destinations, the RTSTRUCT's series identity."""

    destinations: list[str]
    identity: dict[str, Any]  # series_number, structure_set_label, series_description of the RTSTRUCT
    device_serial_number: str  # the node's AE title


def queue_seg(spool: Spool, job: Job, label: Label, datasets: list[Dataset], fingerprint: str, volume: Volume,
              model: Routable, rois: Rois, target: SegTarget) -> None:
    """Build the series' SEG holding *rois* (the RTSTRUCT's structures) and queue it to the target's destinations."""
    series_uid, dests = volume.series_instance_uid, target.destinations
    if not rois or not rois[0][1].any():  # rtstruct.send_empty: a SEG cannot hold an empty segment
        log.info("seg_skipped_empty", label=label.value, series_uid=series_uid)
        return
    identity = target.identity
    meta = SegMeta(sop_instance_uid=generate_uid(prefix=None), series_instance_uid=generate_uid(prefix=None),
                   created=datetime.datetime.now().astimezone(), algorithm_name=model.name,
                   algorithm_version=model.version,
                   series_number=int(identity["series_number"]) + SEG_SERIES_NUMBER_OFFSET,
                   series_description=str(identity["series_description"]).replace(" contour ", " SEG ", 1),
                   content_label=str(identity["structure_set_label"]),
                   content_description=f"AI-generated, UNAPPROVED, review required ({label.value.upper()})",
                   device_serial_number=target.device_serial_number)
    if rois[0][0].description:  # the RTSTRUCT's QA note: say it where a viewer lists the series
        meta = dataclasses.replace(meta, series_description=f"{meta.series_description} QA FLAG"[:64],
                                   content_description=f"{meta.content_description} QA FLAG"[:64])
    try:
        dataset = build_seg(datasets, volume, rois[0][1], rois[0][0], meta, extra_rois=rois[1:])
    except SegError as exc:
        log.error("seg_failed", label=label.value, series_uid=series_uid, error=str(exc), destinations=dests)
        return
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    key = RtStructKey(series_uid, model.name, model.version, fingerprint, kind="seg")
    path = spool.add_outbox(job.id, job.study_instance_uid, series_uid, meta.sop_instance_uid, buf.getvalue(), dests,
                            time.time(), key=key)
    log.info("seg_written", label=label.value, series_uid=series_uid, sop_uid=meta.sop_instance_uid, path=str(path),
             destinations=dests, frames=int(dataset.NumberOfFrames))


def reuse_seg(spool: Spool, job: Job, label: Label, datasets: list[Dataset], fingerprint: str,
              prior: RtStructRecord, model: Routable, target: SegTarget) -> None:
    """With a reused RTSTRUCT (*prior*): queue its SEG again, or make the SEG from the RTSTRUCT's contours.

    The SEG is missing when ``seg`` was added to a destination after the RTSTRUCT was made, or
    the node stopped between the two; reading the RTSTRUCT back gives exactly its voxels.
    """
    series_uid, dests = str(datasets[0].SeriesInstanceUID), target.destinations
    made = [r for r in spool.rtstructs_for(series_uid, fingerprint, kind="seg")
            if (r.model, r.model_version) == (prior.model, prior.model_version)]
    if made:
        spool.requeue_rtstruct(job.id, job.study_instance_uid, series_uid, made[0], dests, time.time())
        log.info("seg_reused", label=label.value, series_uid=series_uid, sop_uid=made[0].sop_instance_uid,
                 destinations=dests)
        return
    try:
        volume = build_volume(datasets)
        rt = dcmread(prior.path)
        rois = [(spec, read_roi_mask(rt, volume, spec.name)) for spec in rtstruct_specs(rt)]
    except (OSError, AttributeError, ValueError, SeriesError, RtStructError) as exc:
        log.error("seg_failed", label=label.value, series_uid=series_uid, error=str(exc), destinations=dests)
        return
    queue_seg(spool, job, label, datasets, fingerprint, volume, model, [r for r in rois if r[1].any()], target)


def rtstruct_rois(rtstruct: Dataset, mask: np.ndarray[Any, Any], extra: Sequence[tuple[RoiSpec, np.ndarray[Any, Any]]]
                  ) -> Rois:
    """The structures of an RTSTRUCT just built as SEG segments: its first ROI as written (QA note included), then the extras."""
    return [(rtstruct_specs(rtstruct)[0], mask), *extra]


def rtstruct_specs(rtstruct: Dataset) -> list[RoiSpec]:
    """Name, colour, generation and description of each ROI of an RTSTRUCT, in ROI order (PS3.3 C.8.8.5, C.8.8.6)."""
    colors = {int(c.ReferencedROINumber): tuple(int(v) for v in c.ROIDisplayColor)
              for c in rtstruct.ROIContourSequence}
    return [RoiSpec(name=str(item.ROIName), color=colors.get(int(item.ROINumber), (255, 0, 0)),  # type: ignore[arg-type]
                    generation_description=str(item.get("ROIGenerationDescription", "")),
                    description=str(item.get("ROIDescription", "") or ""))
            for item in rtstruct.StructureSetROISequence]
