"""Tests for dmg_node.rtstruct.seg (mask -> DICOM SEG), destinations.formats and the pipeline's SEG output."""

from __future__ import annotations

import datetime
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    EnhancedMRImageStorage,
    ImplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)
from structlog.testing import capture_logs

from dmg_node import config
from dmg_node.classify import Label
from dmg_node.config import OutputFormat
from dmg_node.errors import ConfigError, SegError
from dmg_node.pipeline import Pipeline
from dmg_node.rtstruct import SegMeta, build_seg, read_roi_mask
from dmg_node.segment.routing import ModelSet
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume, build_volume
from tests.support import LOCALHOST
from tests.unit.test_pipeline import CubeModel, _job, _series, _store
from tests.unit.test_rtstruct import (
    GEOMETRIES,
    ROI,
    ROOT,
    make_enhanced,
    make_series,
    tumour,
)

SEG_META = SegMeta(
    sop_instance_uid=f"{ROOT}.9.5", series_instance_uid=f"{ROOT}.9.6",
    created=datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
    algorithm_name="dmg-t2", algorithm_version="1.0.0", series_number=9022,
)


def round_trip(seg: Dataset) -> Dataset:
    """*seg* written as Part 10 bytes and read back by pydicom (what a receiver gets)."""
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def frames_by_source(seg: Dataset) -> dict[tuple[str, int | None, int], npt.NDArray[np.bool_]]:
    """pydicom only: each stored frame by (source SOP Instance UID, source frame number, segment number)."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        (source,) = group.DerivationImageSequence[0].SourceImageSequence
        number = int(source.ReferencedFrameNumber) if "ReferencedFrameNumber" in source else None
        ident = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence  # shared: one segment
        segment = int(ident[0].ReferencedSegmentNumber)
        out[(str(source.ReferencedSOPInstanceUID), number, segment)] = frame.astype(bool)
    return out


def mask_from_seg(seg: Dataset, volume: Volume, segment: int = 1) -> npt.NDArray[np.bool_]:
    """The segment's mask on *volume*'s grid, from the frames' source references (pydicom only)."""
    frames = frames_by_source(seg)
    mask = np.zeros(volume.array.shape, dtype=bool)
    for k, uid in enumerate(volume.sop_instance_uids):
        number = volume.frame_numbers[k] if volume.frame_numbers is not None else None
        if (uid, number, segment) in frames:
            mask[k] = frames[(uid, number, segment)]
    return mask


@pytest.mark.parametrize("name", ["axial", "oblique", "sagittal", "non_square"])
def test_frames_match_the_mask_and_reference_their_slices(name: str) -> None:
    """Each stored frame is the mask of the slice it references (datasets given out of slice order), placed at that slice's position."""
    series = make_series(GEOMETRIES[name])  # reverse slice order
    volume = build_volume(series)
    mask = tumour(volume.array.shape, hole=True)
    seg = round_trip(build_seg(series, volume, mask, ROI, SEG_META))
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(mask.any(axis=(1, 2))))  # empty slices are left out
    assert np.array_equal(mask_from_seg(seg, volume), mask)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    for group in seg.PerFrameFunctionalGroupsSequence:
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in by_uid[uid].ImagePositionPatient], atol=1e-4)
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    assert referenced <= set(volume.sop_instance_uids)
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid


def test_highdicom_reads_back_the_same_mask() -> None:
    """highdicom's own reader, asked per source instance in slice order, gives the mask back."""
    series = make_series(GEOMETRIES["oblique"])
    volume = build_volume(series)
    mask = tumour(volume.array.shape, hole=True)
    seg = hd.seg.Segmentation.from_dataset(round_trip(build_seg(series, volume, mask, ROI, SEG_META)))
    back = seg.get_pixels_by_source_instance(list(volume.sop_instance_uids), segment_numbers=[1],
                                             combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(back.astype(bool), mask)


def test_enhanced_mr_frames_reference_their_source_frames() -> None:
    """For a multi-frame source (frames stored in reverse slice order) each frame names the instance and its frame number."""
    source = make_enhanced(GEOMETRIES["oblique"])
    volume = build_volume([source])
    mask = tumour(volume.array.shape, hole=True)
    seg = round_trip(build_seg([source], volume, mask, ROI, SEG_META))
    for group in seg.PerFrameFunctionalGroupsSequence:
        (ref,) = group.DerivationImageSequence[0].SourceImageSequence
        assert ref.ReferencedSOPClassUID == EnhancedMRImageStorage and ref.ReferencedSOPInstanceUID == f"{ROOT}.20"
    assert np.array_equal(mask_from_seg(seg, volume), mask)
    back = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_frame(
        f"{ROOT}.20", list(volume.frame_numbers or ()), segment_numbers=[1], combine_segments=True,
        assert_missing_frames_are_empty=True)
    assert np.array_equal(back.astype(bool), mask)


def test_required_content() -> None:
    """Labelled like the ROI, AUTOMATIC with the model's name and version, UNAPPROVED wording, time from meta, Implicit VR."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    seg = round_trip(build_seg(series, volume, tumour(volume.array.shape), ROI, SEG_META))
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == ROI.name and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == "dmg-t2"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("dmg-t2", "1.0.0")
    assert "SegmentDescription" not in segment
    assert "UNAPPROVED" in seg.SeriesDescription and "UNAPPROVED" in seg.ContentDescription
    assert seg.SeriesNumber == 9022 and seg.InstanceNumber == 1 and seg.ContentLabel == "DMG_AI"
    assert (seg.SOPInstanceUID, seg.SeriesInstanceUID) == (SEG_META.sop_instance_uid, SEG_META.series_instance_uid)
    assert (seg.ContentDate, seg.ContentTime[:6]) == ("20260304", "050607")
    assert (seg.InstanceCreationDate, seg.InstanceCreationTime) == ("20260304", "050607")
    assert seg.TimezoneOffsetFromUTC == "+0100"
    assert seg.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert (seg.PatientID, seg.StudyInstanceUID, seg.AccessionNumber) == ("PID-1", series[0].StudyInstanceUID, "ACC1")
    assert seg.DeviceSerialNumber == "DMG_NODE"


def test_qa_note_and_extra_segments() -> None:
    """A flagged ROI's QA note becomes Segment Description; extra ROIs (the consensus) are segments 2, 3, ..."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    mask = tumour(volume.array.shape)
    core = mask & (np.indices(mask.shape)[2] > 35)
    flagged = replace(ROI, description="QA FLAG: discordant with flair (Dice 0.41)")
    extra = replace(ROI, name="GTV_DMG_AI_CONSENSUS", color=(0, 255, 0))
    seg = round_trip(build_seg(series, volume, mask, flagged, SEG_META, extra_rois=[(extra, core)]))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [ROI.name, "GTV_DMG_AI_CONSENSUS"]
    assert seg.SegmentSequence[0].SegmentDescription == flagged.description
    assert np.array_equal(mask_from_seg(seg, volume, 1), mask) and np.array_equal(mask_from_seg(seg, volume, 2), core)


def test_bad_input_raises_seg_error() -> None:
    """An empty mask, a mask of the wrong shape or a source that is not the volume's series is a SegError."""
    series = make_series(GEOMETRIES["axial"])
    volume = build_volume(series)
    with pytest.raises(SegError, match="empty"):
        build_seg(series, volume, np.zeros(volume.array.shape, dtype=bool), ROI, SEG_META)
    with pytest.raises(SegError, match="shape"):
        build_seg(series, volume, np.ones((2, 2, 2), dtype=bool), ROI, SEG_META)
    with pytest.raises(SegError, match="instance"):
        build_seg(series[1:], volume, tumour(volume.array.shape), ROI, SEG_META)


BARE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
        "AccessionNumber", "ReferringPhysicianName", "SliceThickness")


def bare_series() -> list[Dataset]:
    """An axial series without its Type 2 patient and study attributes and Slice Thickness (seen in anonymised data)."""
    series = make_series(GEOMETRIES["axial"])
    for ds in series:
        for keyword in BARE:
            delattr(ds, keyword)
    return series


def test_source_without_type2_attributes_still_gives_a_seg() -> None:
    """highdicom needs them present: they go in empty (Slice Thickness: the slice spacing) and the source is untouched."""
    series = bare_series()
    volume = build_volume(series)
    seg = round_trip(build_seg(series, volume, tumour(volume.array.shape), ROI, SEG_META))
    assert seg.PatientID == "" and seg.StudyDate == ""
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == 3.0
    assert not any(keyword in ds for ds in series for keyword in BARE) and all("PixelData" in ds for ds in series)


def test_long_source_decimal_strings_are_fitted() -> None:
    """Positions the source wrote with full float precision are cut to 16 characters (DS, PS3.5 6.2)."""
    source = make_enhanced(GEOMETRIES["oblique"])  # its positions are unrounded floats
    volume = build_volume([source])
    seg = round_trip(build_seg([source], volume, tumour(volume.array.shape), ROI, SEG_META))
    values = [v for elem in seg.iterall() if elem.VR == "DS" and elem.value not in (None, "")
              for v in (elem.value if elem.VM > 1 else [elem.value])]
    assert values and all(len(str(v)) <= 16 for v in values)


# -- destinations.formats ---------------------------------------------------------------------

def _dest(**kw: Any) -> dict[str, Any]:
    return {"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": 104, **kw}


def test_formats_default_to_rtstruct_and_take_seg() -> None:
    """A destination without formats gets the RTSTRUCT only; ["rtstruct", "seg"] gets both."""
    settings = config.from_dict({"destinations": [_dest(), _dest(name="pacs", formats=["rtstruct", "seg"])]})
    tps, pacs = settings.destinations
    assert tps.formats == (OutputFormat.RTSTRUCT,) and not tps.wants(OutputFormat.SEG)
    assert pacs.wants(OutputFormat.RTSTRUCT) and pacs.wants(OutputFormat.SEG)


@pytest.mark.parametrize(("formats", "message"), [
    (["nifti"], "must be one of rtstruct, seg"),
    ([], "must list rtstruct and/or seg"),
    (["seg", "seg"], "each once"),
    ("seg", "must be an array"),
])
def test_bad_formats_are_a_config_error(formats: Any, message: str) -> None:
    """Only "rtstruct" and "seg", each once, in a non-empty array; the error names the key."""
    with pytest.raises(ConfigError, match=message) as err:
        config.from_dict({"destinations": [_dest(formats=formats)]})
    assert "formats" in str(err.value)


# -- the pipeline ------------------------------------------------------------------------------

def _pipeline(tmp_path: Path, pacs_formats: list[str]) -> Pipeline:
    settings = config.from_dict({
        "node": {"host": LOCALHOST, "port": 11112},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "models": {"dir": str(tmp_path / "models")},
        "destinations": [_dest(), _dest(name="pacs", ae_title="PACS", formats=pacs_formats)],
    })
    return Pipeline(settings, Spool(settings.storage.root, fsync=False), {Label.T2: ModelSet([CubeModel("t2")])})


def _outbox(spool: Spool) -> dict[str, set[str]]:
    """SOP Class of each queued object per destination."""
    out: dict[str, set[str]] = {}
    for item in spool.due_outbox(1e12, limit=1000):
        out.setdefault(item.destination, set()).add(str(pydicom.dcmread(item.path).SOPClassUID))
    return out


def test_pipeline_queues_each_format_to_the_destinations_that_want_it(tmp_path: Path) -> None:
    """The RTSTRUCT goes to both destinations, the SEG (same mask as the RTSTRUCT) only to the one with "seg"."""
    p = _pipeline(tmp_path, ["rtstruct", "seg"])
    study = generate_uid()
    series = _series(study, 8, description="T2 TSE AX")
    _store(p.spool, series)
    with capture_logs() as logs:
        (out,) = p.run(_job(p.spool, study))
    rt_class = "1.2.840.10008.5.1.4.1.1.481.3"
    assert _outbox(p.spool) == {"tps": {rt_class}, "pacs": {rt_class, SegmentationStorage}}
    (written,) = [e for e in logs if e["event"] == "seg_written"]
    assert written["destinations"] == ["pacs"]
    seg = pydicom.dcmread(written["path"])
    rt = pydicom.dcmread(next(i.path for i in p.spool.due_outbox(1e12, limit=1000)
                              if i.sop_instance_uid == out.sop_instance_uid))
    volume = build_volume([pydicom.dcmread(f) for f in p.spool.series_files(study)[out.series_instance_uid]])
    assert np.array_equal(mask_from_seg(seg, volume), read_roi_mask(rt, volume, "GTV_DMG_AI_T2"))
    assert "UNAPPROVED" in seg.SeriesDescription and seg.SeriesNumber == rt.SeriesNumber + 20
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "cube"


def test_no_seg_destination_builds_no_seg(tmp_path: Path) -> None:
    """With no destination asking for "seg", no SEG is built and both get the RTSTRUCT only."""
    p = _pipeline(tmp_path, ["rtstruct"])
    study = generate_uid()
    _store(p.spool, _series(study, 8, description="T2 TSE AX"))
    with capture_logs() as logs:
        p.run(_job(p.spool, study))
    assert not [e for e in logs if e["event"].startswith("seg_")]
    assert set(_outbox(p.spool)) == {"tps", "pacs"} and SegmentationStorage not in _outbox(p.spool)["pacs"]


def test_rerun_reuses_the_seg_and_a_late_seg_is_made_from_the_rtstruct(tmp_path: Path) -> None:
    """Exactly once: a rerun queues the same SEG again; "seg" added after the RTSTRUCT was made gives a SEG of its voxels."""
    p = _pipeline(tmp_path, ["rtstruct"])
    study = generate_uid()
    _store(p.spool, _series(study, 8, description="T2 TSE AX"))
    job = _job(p.spool, study)
    p.run(job)
    later = config.from_dict({**_raw(p), "destinations": [_dest(), _dest(name="pacs", ae_title="PACS",
                                                                        formats=["seg"])]})
    p.configure(later)
    with capture_logs() as logs:
        assert p.run(job) == []  # the RTSTRUCT is reused, the SEG made from it
    (written,) = [e for e in logs if e["event"] == "seg_written"]
    rows = p.spool.outbox(1000)
    assert {r["destination"] for r in rows if r["sop_instance_uid"] == written["sop_uid"]} == {"pacs"}
    with capture_logs() as logs:
        assert p.run(job) == []
    assert [e["sop_uid"] for e in logs if e["event"] == "seg_reused"] == [written["sop_uid"]]
    assert not [e for e in logs if e["event"] == "seg_written"] and len(p.spool.outbox(1000)) == len(rows)


def _raw(p: Pipeline) -> dict[str, Any]:
    s = p.settings
    return {"node": {"host": LOCALHOST, "port": 11112},
            "storage": {"root": str(s.storage.root), "min_free_mb": 0}, "models": {"dir": str(s.models.dir)}}


def test_series_highdicom_cannot_encode_is_logged_and_the_rtstruct_still_goes(tmp_path: Path, monkeypatch: Any) -> None:
    """A SEG that cannot be built is a seg_failed error line; the RTSTRUCT is queued to every destination that wants it."""
    from dmg_node import seg_output

    def refuse(*_a: Any, **_k: Any) -> Dataset:
        raise SegError("highdicom cannot encode this series as a SEG: ValueError: test")

    monkeypatch.setattr(seg_output, "build_seg", refuse)
    p = _pipeline(tmp_path, ["rtstruct", "seg"])
    study = generate_uid()
    _store(p.spool, _series(study, 8, description="T2 TSE AX"))
    with capture_logs() as logs:
        assert len(p.run(_job(p.spool, study))) == 1
    assert [e["event"] for e in logs if e["event"].startswith("seg_")] == ["seg_failed"]
    rt_class = "1.2.840.10008.5.1.4.1.1.481.3"
    assert _outbox(p.spool) == {"tps": {rt_class}, "pacs": {rt_class}}


def test_spool_keeps_seg_and_rtstruct_records_apart(tmp_path: Path) -> None:
    """The same key with kind "seg" is its own record (one of each per key); delete_study removes both files, sent or not."""
    from dmg_node.records import RtStructKey

    sp = Spool(tmp_path)
    key = RtStructKey("1.2.3", "demo-t2", "0.2.0", "f" * 64)
    rt_path = sp.add_outbox(1, "1.2", "1.2.3", "9.1", b"RT", [], now=0.0, key=key)  # no destination wants it
    seg_path = sp.add_outbox(1, "1.2", "1.2.3", "9.2", b"SEG", ["pacs"], now=0.0, key=replace(key, kind="seg"))
    assert [r.sop_instance_uid for r in sp.rtstructs_for("1.2.3", "f" * 64)] == ["9.1"]
    assert [r.sop_instance_uid for r in sp.rtstructs_for("1.2.3", "f" * 64, kind="seg")] == ["9.2"]
    assert [(r["sop_instance_uid"], r["destination"]) for r in sp.outbox()] == [("9.2", "pacs")]
    assert sp.delete_study("1.2") == 2 and not rt_path.exists() and not seg_path.exists()
    assert sp.rtstructs_for("1.2.3", "f" * 64, kind="seg") == []
