"""Tests for dmg_node.segment.qa and the contour QA in the pipeline: crafted masks on synthetic grids.

The study: a head (an ellipsoid, 70 x 85 x 65 mm semi-axes, LPS, centred at the origin) holding a
lesion of radius 12 mm at (0, 10, -20) mm, seen by three series on different grids in one Frame
of Reference: an axial 2D T2 (1.875 mm pixels, 5 mm slices), an oblique 3D T1C (1.5 mm) and a
sagittal 2D FLAIR (1.8 mm pixels, 4 mm slices). Fake models contour a sphere in patient
coordinates, so a "displaced" model is one whose sphere sits elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from structlog.testing import capture_logs

from dmg_node.classify import Label
from dmg_node.cli import _format_status
from dmg_node.config import QaPolicy, QaSettings, RtStructSettings, Settings, from_dict
from dmg_node.errors import ConfigError
from dmg_node.pipeline import Pipeline, contour_series
from dmg_node.records import instance_record
from dmg_node.segment.qa import (
    FlagCode,
    QaInput,
    Region,
    check_study,
    consensus,
    count_components,
    head_region,
)
from dmg_node.segment.routing import ModelSet
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume

QA = QaSettings()
HEAD_AXES = np.array([70.0, 85.0, 65.0])
LESION, LESION_R = np.array([0.0, 10.0, -20.0]), 12.0
# 35 mm in front of the lesion (LPS: -y is anterior), like the T1C contours in front of the pons.
DISPLACED = LESION + np.array([0.0, -35.0, 0.0])
FOR_UID = "1.2.826.0.1.3680043.8.498.4242.1"


def _rotation(deg_x: float, deg_z: float) -> npt.NDArray[np.float64]:
    a, b = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    out: npt.NDArray[np.float64] = rz @ rx
    return out


@dataclass(frozen=True)
class Grid:
    """A series grid: in-plane axes (columns of *axes*: row direction, column direction, normal), spacing, size."""

    axes: npt.NDArray[np.float64]
    spacing: tuple[float, float, float]  # along i (columns), j (rows), k (slices)
    shape: tuple[int, int, int]  # (slices, rows, columns)

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """Centred on the origin of patient coordinates."""
        affine = np.eye(4)
        affine[:3, :3] = self.axes * np.asarray(self.spacing)
        centre_ijk = (np.asarray(self.shape[::-1], dtype=np.float64) - 1) / 2
        affine[:3, 3] = -affine[:3, :3] @ centre_ijk
        return affine

    def points(self) -> npt.NDArray[np.float64]:
        """Patient coordinates of every voxel centre, shape (slices, rows, columns, 3)."""
        k, j, i = np.indices(self.shape, dtype=np.float64)
        ijk = np.stack([i, j, k], axis=-1)
        out: npt.NDArray[np.float64] = ijk @ self.affine[:3, :3].T + self.affine[:3, 3]
        return out

    def sphere(self, centre: npt.ArrayLike, radius: float) -> npt.NDArray[np.bool_]:
        out: npt.NDArray[np.bool_] = np.linalg.norm(self.points() - np.asarray(centre), axis=-1) <= radius
        return out


GRIDS = {
    "t2": Grid(np.eye(3), (1.875, 1.875, 5.0), (34, 104, 88)),
    "t1c": Grid(_rotation(12.0, 8.0), (1.5, 1.5, 1.5), (110, 130, 115)),
    "flair": Grid(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]).T, (1.8, 1.8, 4.0), (38, 80, 100)),
}


def _inputs(centres: dict[str, Any], radius: float = LESION_R, for_uids: dict[str, str] | None = None,
            head: bool = False) -> list[QaInput]:
    out = []
    for seq, centre in centres.items():
        grid = GRIDS[seq]
        mask = grid.sphere(centre, radius) if centre is not None else np.zeros(grid.shape, dtype=bool)
        region = Region(mask, grid.affine)
        out.append(QaInput(seq, region, (for_uids or {}).get(seq, FOR_UID),
                           head_region(_volume(seq), QA.head_margin_mm) if head else None))
    return out


def _head_image(grid: Grid, lesion_bright: bool = True) -> npt.NDArray[np.float32]:
    """A bright ellipsoidal head on a dark background (the lesion brighter still)."""
    points = grid.points()
    head = np.sum((points / HEAD_AXES) ** 2, axis=-1) <= 1.0
    image = np.where(head, 600.0, 20.0)
    if lesion_bright:
        image = np.where(np.linalg.norm(points - LESION, axis=-1) <= LESION_R, 1100.0, image)
    rng = np.random.default_rng(0)
    out: npt.NDArray[np.float32] = (image + rng.normal(0, 15, image.shape)).clip(0, 4095).astype(np.float32)
    return out


def _volume(seq: str) -> Volume:
    grid = GRIDS[seq]
    n = grid.shape[0]
    return Volume(_head_image(grid), grid.affine, f"1.2.3.{seq}", FOR_UID, tuple(f"1.2.3.{seq}.{k}" for k in range(n)),
                  str(MRImageStorage))


# -- the checks on their own ---------------------------------------------------------------------


def test_displaced_t1c_is_flagged_and_t2_flair_are_not() -> None:
    """A T1C contour 35 mm in front of the T2/FLAIR lesion is discordant (0 % inside them); T2 and FLAIR agree."""
    checks = check_study(_inputs({"t2": LESION, "flair": LESION, "t1c": DISPLACED}, radius=9.0), QA)
    t1c = checks["t1c"]
    assert [f.code for f in t1c.flags] == [FlagCode.DISCORDANT]
    assert t1c.inside_others == 0.0 and max(t1c.dice.values()) == 0.0
    assert t1c.note().startswith("QA FLAG: T1C disagrees with T2/FLAIR")
    assert not checks["t2"].flagged and not checks["flair"].flagged
    assert checks["t2"].dice["flair"] > 0.8


def test_agreeing_contours_on_different_grids_are_not_flagged() -> None:
    """Three contours of one lesion on axial, oblique and sagittal grids (shifted by 2 mm) pass; Dice > 0.75."""
    checks = check_study(_inputs({"t2": LESION, "t1c": LESION + [2.0, 0, 0], "flair": LESION - [0, 0, 2.0]}), QA)
    for seq, check in checks.items():
        assert not check.flagged, (seq, check.flags)
        assert check.inside_others is not None and check.inside_others > 0.85
        assert min(check.dice.values()) > 0.75
        assert 6.0 < check.volume_ml < 8.5  # a 12 mm sphere is 7.2 ml
        assert check.components == 1


def test_two_disagreeing_contours_are_both_flagged() -> None:
    """With only two sequences that disagree there is no telling which is right: both are flagged."""
    checks = check_study(_inputs({"t2": LESION, "t1c": DISPLACED}), QA)
    assert checks["t2"].flagged and checks["t1c"].flagged


def test_small_contour_inside_a_large_one_is_flagged_by_dice() -> None:
    """A T1C contour wholly inside the lesion but far too small (Dice < min_dice) is discordant despite 100 % inside."""
    inputs = _inputs({"t2": LESION, "flair": LESION})
    t1c = GRIDS["t1c"]
    inputs.append(QaInput("t1c", Region(t1c.sphere(LESION, 5.0), t1c.affine), FOR_UID))
    check = check_study(inputs, QA)["t1c"]
    assert check.inside_others == 1.0 and max(check.dice.values()) < QA.min_dice
    assert [f.code for f in check.flags] == [FlagCode.DISCORDANT]
    assert not check_study(inputs, replace(QA, min_dice=0.0))["t1c"].flagged


def test_other_frame_of_reference_is_not_compared() -> None:
    """Contours in different Frames of Reference are not compared (their coordinates are unrelated)."""
    checks = check_study(_inputs({"t2": LESION, "t1c": DISPLACED}, for_uids={"t1c": "1.2.3.999"}), QA)
    assert not checks["t1c"].flagged and checks["t1c"].inside_others is None and not checks["t1c"].dice


def test_empty_contour_is_flagged_when_another_sequence_found_a_tumour() -> None:
    """An empty T1C contour is discordant when T2 found 7 ml; an empty study is not flagged at all."""
    checks = check_study(_inputs({"t2": LESION, "t1c": None}), QA)
    assert [f.code for f in checks["t1c"].flags] == [FlagCode.DISCORDANT]
    assert "T1C empty; T2 found 7." in checks["t1c"].flags[0].text
    assert not any(c.flagged for c in check_study(_inputs({"t2": None, "t1c": None}), QA).values())


def test_contour_outside_the_head_is_flagged() -> None:
    """A contour straddling the vertex (half in the air above the head) is flagged; the lesion is not."""
    vertex = np.array([0.0, 0.0, 65.0])
    [inside] = _inputs({"t2": LESION}, head=True)
    [outside] = _inputs({"t2": vertex}, radius=8.0, head=True)
    assert check_study([inside], QA)["t2"].outside_head == 0.0
    check = check_study([outside], QA)["t2"]
    assert check.outside_head is not None and check.outside_head >= 0.4
    assert FlagCode.OUTSIDE_HEAD in [f.code for f in check.flags]


def test_head_region_is_the_head_less_the_margin() -> None:
    """head_region keeps points deeper than the margin inside the head and drops those nearer its surface."""
    region = head_region(_volume("t1c"), 10.0)
    assert region is not None
    deep, shallow = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 50.0]]), np.array([[0.0, 0.0, 60.0], [0.0, 80.0, 0.0]])
    assert region.contains(deep).all() and not region.contains(shallow).any()
    blank = replace(_volume("t2"), array=np.zeros(GRIDS["t2"].shape, dtype=np.float32))
    assert head_region(blank, 10.0) is None


def test_head_region_does_not_end_at_the_edge_of_a_partial_slab() -> None:
    """A slab that stops 20 mm below the vertex (its top cuts through the head): its top edge is not the head's surface."""
    grid = Grid(np.eye(3), (1.875, 1.875, 5.0), (17, 104, 88))  # z from -40 to +40 mm
    volume = Volume(_head_image(grid), grid.affine, "1.2.3.slab", FOR_UID, tuple(f"1.2.3.slab.{k}" for k in range(17)),
                    str(MRImageStorage))
    region = head_region(volume, 3.0)
    assert region is not None
    assert region.contains(np.array([[0.0, 0.0, 39.0], [0.0, 0.0, -39.0], [0.0, 0.0, 0.0]])).all()
    assert not region.contains(np.array([[0.0, 84.0, 0.0], [69.0, 0.0, 0.0]])).any()


@pytest.mark.parametrize(("radius", "flagged"), [(4.0, True), (12.0, False), (34.0, True)])
def test_implausible_volume_is_flagged(radius: float, flagged: bool) -> None:
    """0.27 ml and 165 ml contours are flagged (limits 0.5-150 ml); 7.2 ml is not."""
    [item] = _inputs({"t1c": LESION}, radius=radius)
    check = check_study([item], QA)["t1c"]
    assert (FlagCode.IMPLAUSIBLE_VOLUME in [f.code for f in check.flags]) is flagged, check


def test_too_many_components_are_flagged() -> None:
    """Four separate blobs exceed max_components = 3; three do not."""
    grid = GRIDS["t1c"]
    blobs = [grid.sphere(LESION + [dx, 0.0, 0.0], 4.0) for dx in (-30.0, -10.0, 10.0, 30.0)]
    four, three = np.any(blobs, axis=0), np.any(blobs[:3], axis=0)
    assert count_components(four) == 4
    check = check_study([QaInput("t1c", Region(four, grid.affine), FOR_UID)], QA)["t1c"]
    assert [f.code for f in check.flags] == [FlagCode.TOO_MANY_COMPONENTS]
    assert not check_study([QaInput("t1c", Region(three, grid.affine), FOR_UID)], QA)["t1c"].flagged


def test_consensus_keeps_voxels_where_two_sequences_agree() -> None:
    """On the T2 grid, the consensus of T2, FLAIR and a displaced T1C is the T2/FLAIR lesion, not the T1C blob."""
    inputs = _inputs({"t2": LESION, "flair": LESION + [0, 0, 3.0], "t1c": DISPLACED}, radius=10.0)
    target = inputs[0]
    mask = consensus(target, inputs)
    grid = GRIDS["t2"]
    assert mask.shape == grid.shape and mask.any()
    assert not (mask & grid.sphere(DISPLACED, 10.0)).any()
    assert (mask & ~target.contour.mask).sum() == 0  # T1C never overlaps, so the consensus lies within T2
    assert mask.sum() > 0.6 * target.contour.mask.sum()


def test_note_fits_a_long_string_value() -> None:
    """The ROI note is at most 64 characters (LO) and falls back to flag codes when the texts are too long."""
    grid = GRIDS["t1c"]
    blobs = np.any([grid.sphere(LESION + [dx, 0.0, 0.0], 2.0) for dx in (-30.0, -10.0, 10.0, 30.0)], axis=0)
    inputs = [QaInput("t1c", Region(blobs, grid.affine), FOR_UID), *_inputs({"t2": LESION})]
    check = check_study(inputs, QA)["t1c"]
    assert len(check.flags) == 3
    note = check.note(64)
    assert len(note) <= 64 and note.startswith("QA FLAG: discordant")
    assert len(check.note()) > 64


def test_qa_config_is_validated() -> None:
    """qa.* keys are range-checked; consensus_on names a sequence or is empty; min_ml <= max_ml."""
    assert from_dict({"qa": {"flagged": "hold", "consensus_on": "t2"}}).qa.flagged is QaPolicy.HOLD
    for raw, needle in [({"flagged": "drop"}, "qa.flagged"), ({"consensus_on": "t1"}, "qa.consensus_on"),
                        ({"min_dice": 1.5}, "qa.min_dice"), ({"min_ml": 200.0}, "qa.min_ml")]:
        with pytest.raises(ConfigError, match=needle):
            from_dict({"qa": raw})


# -- in the pipeline -------------------------------------------------------------------------------

_PHYSICS: dict[str, dict[str, Any]] = {  # as the phantoms write them (dmg_node/phantoms/phantom.py)
    "t2": {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"], "RepetitionTime": 5000.0, "EchoTime": 100.0,
           "SeriesDescription": "T2 TSE AX", "MRAcquisitionType": "2D"},
    "flair": {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR",
              "RepetitionTime": 9000.0, "EchoTime": 120.0, "InversionTime": 2500.0,
              "SeriesDescription": "T2 FLAIR SAG", "MRAcquisitionType": "2D"},
    "t1c": {"ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR",
            "RepetitionTime": 2000.0, "EchoTime": 3.0, "InversionTime": 900.0, "MRAcquisitionType": "3D",
            "SeriesDescription": "T1 MPRAGE POST GD", "ContrastBolusAgent": "Gadobutrol"},
}


def _series(seq: str, study_uid: str, number: int) -> list[Dataset]:
    """Classic MR Image Storage slices of *seq*'s grid showing the head and lesion."""
    grid = GRIDS[seq]
    affine, pixels = grid.affine, _head_image(grid, lesion_bright=seq != "t1c").astype(np.uint16)
    series_uid = generate_uid(entropy_srcs=[study_uid, seq])
    out = []
    for k in range(grid.shape[0]):
        ds = Dataset()
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, sop_uid, "MR"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, FOR_UID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "QA^TEST", "QA-1", "20150101", "M"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "S1", "ACC1"
        ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "", ""
        ds.SeriesNumber, ds.InstanceNumber = number, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]
        for keyword, value in _PHYSICS[seq].items():
            setattr(ds, keyword, value)
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*grid.axes[:, 0], *grid.axes[:, 1])]
        ds.ImagePositionPatient = [round(float(v), 6) for v in affine[:3, :3] @ [0, 0, k] + affine[:3, 3]]
        ds.PixelSpacing = [grid.spacing[1], grid.spacing[0]]
        ds.SliceThickness = grid.spacing[2]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = grid.shape[1], grid.shape[2], 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels[k].tobytes()
        out.append(ds)
    return out


@dataclass
class SphereModel:
    """A fake model (routing.Routable) contouring a sphere in patient coordinates."""

    sequence: str
    centre: npt.NDArray[np.float64]
    radius: float = LESION_R
    name: str = "sphere"
    version: str = "0.0.1"
    device: str = "cpu"
    max_spacing_mm: float | None = None

    def predict(self, volume: Volume) -> npt.NDArray[np.bool_]:
        k, j, i = np.indices(volume.array.shape, dtype=np.float64)
        points = volume.index_to_patient(np.stack([i, j, k], axis=-1))
        out: npt.NDArray[np.bool_] = np.linalg.norm(points - self.centre, axis=-1) <= self.radius
        return out


def _models(t1c_centre: npt.NDArray[np.float64], t1c_radius: float = 9.0) -> dict[Label, ModelSet]:
    centres = {"t2": LESION, "flair": LESION + [0.0, 0.0, 2.0], "t1c": t1c_centre}
    return {Label(seq): ModelSet([SphereModel(seq, np.asarray(c, dtype=np.float64),
                                              t1c_radius if seq == "t1c" else LESION_R)])
            for seq, c in centres.items()}


@pytest.fixture()
def study(tmp_path: Path) -> Iterator[tuple[Spool, str]]:
    """A spool holding the three-series study."""
    spool = Spool(tmp_path / "spool", fsync=False)
    study_uid = generate_uid(entropy_srcs=["qa-study"])
    for number, seq in enumerate(("t2", "flair", "t1c"), start=2):
        for ds in _series(seq, study_uid, number):
            path = tmp_path / "tmp.dcm"
            ds.save_as(path, enforce_file_format=True)
            spool.store(path.read_bytes(), instance_record(ds, transfer_syntax_uid=ExplicitVRLittleEndian,
                                                           calling_aet="TEST", received_at=time.time()))
    try:
        yield spool, study_uid
    finally:
        spool.close()


def _run(spool: Spool, study_uid: str, settings: Settings, t1c_centre: npt.NDArray[np.float64],
         t1c_radius: float = 9.0) -> Any:
    spool.enqueue(study_uid, time.time(), time.time())
    job = spool.claim_job(time.time())
    assert job is not None
    with capture_logs() as logs:
        outputs = Pipeline(settings, spool, _models(t1c_centre, t1c_radius)).run(job)
    return outputs, logs


def _settings(**qa: Any) -> Settings:
    return from_dict({"destinations": [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 11113}],
                      "qa": qa})


def _outbox_files(spool: Spool) -> dict[str, Dataset]:
    """The queued RTSTRUCTs by the name of their first ROI."""
    due = spool.due_outbox(time.time() + 1)
    assert len({item.sop_instance_uid for item in due}) == len(due)  # one destination
    out = {}
    for item in due:
        ds = pydicom.dcmread(item.path)
        out[str(ds.StructureSetROISequence[0].ROIName)] = ds
    return out


def test_pipeline_sends_the_displaced_t1c_with_a_qa_note_and_logs_it(study: tuple[Spool, str]) -> None:
    """Policy send: all three RTSTRUCTs are queued; the displaced T1C's carries "QA FLAG", is logged and shown in status."""
    spool, study_uid = study
    outputs, logs = _run(spool, study_uid, _settings(), DISPLACED)
    flags = {o.label.value: o.qa_flags for o in outputs}
    assert flags == {"t2": (), "flair": (), "t1c": ("discordant",)}
    discordant = [e for e in logs if e["event"] == "contour_discordant"]
    assert len(discordant) == 1 and discordant[0]["label"] == "t1c" and discordant[0]["inside_others"] == 0.0
    assert discordant[0]["log_level"] == "warning" and "dice_t2" in discordant[0]
    files = _outbox_files(spool)
    t1c, t2 = files["GTV_DMG_AI_T1C"], files["GTV_DMG_AI_T2"]
    assert str(t1c.StructureSetROISequence[0].ROIDescription).startswith("QA FLAG: T1C disagrees with T2/FLAIR")
    assert "QA FLAG" in str(t1c.SeriesDescription) and "QA FLAG: T1C" in str(t1c.StructureSetDescription)
    assert "ROIDescription" not in t2.StructureSetROISequence[0] and "QA FLAG" not in str(t2.SeriesDescription)
    text = _format_status({"node": None, "studies": spool.summary(), "outbox": spool.outbox()}, _settings())
    [line] = [line for line in text.splitlines() if "QA FLAG" in line]
    assert "t1c" in line and "queued, QA FLAG: T1C disagrees" in line


def test_pipeline_sends_agreeing_contours_without_flags(study: tuple[Spool, str]) -> None:
    """A T1C on the lesion: three RTSTRUCTs, no flag, no discordant or implausible event."""
    spool, study_uid = study
    outputs, logs = _run(spool, study_uid, _settings(), LESION)
    assert sorted(o.label.value for o in outputs) == ["flair", "t1c", "t2"] and not any(o.qa_flags for o in outputs)
    assert not [e for e in logs if e["event"] in ("contour_discordant", "contour_implausible", "contour_held")]
    assert len([e for e in logs if e["event"] == "contour_checked"]) == 3


def test_pipeline_holds_a_flagged_contour(study: tuple[Spool, str]) -> None:
    """Policy hold: the displaced T1C is not queued, contour_held is logged and status says held."""
    spool, study_uid = study
    outputs, logs = _run(spool, study_uid, _settings(flagged="hold"), DISPLACED)
    assert sorted(o.label.value for o in outputs) == ["flair", "t2"]
    assert sorted(_outbox_files(spool)) == ["GTV_DMG_AI_FLAIR", "GTV_DMG_AI_T2"]
    [held] = [e for e in logs if e["event"] == "contour_held"]
    assert held["label"] == "t1c" and held["flags"] == ["discordant"]
    report = {"node": None, "studies": spool.summary(), "outbox": spool.outbox()}
    [series] = [s for s in report["studies"][0]["series"] if s["label"] == "t1c"]
    assert series["reason"].startswith("held, QA FLAG: T1C disagrees")


@pytest.mark.parametrize("policy", ["send", "hold"])
def test_pipeline_reports_an_empty_contour_the_others_contradict(study: tuple[Spool, str], policy: str) -> None:
    """T1C finds nothing while T2/FLAIR found 7 ml: nothing is sent for it, and status says why."""
    spool, study_uid = study
    outputs, logs = _run(spool, study_uid, _settings(flagged=policy), LESION, t1c_radius=0.0)
    assert sorted(o.label.value for o in outputs) == ["flair", "t2"]
    assert not [e for e in logs if e["event"] == "contour_held"]
    [series] = [s for s in spool.summary()[0]["series"] if s["label"] == "t1c"]
    assert series["reason"].startswith("nothing found, QA FLAG: T1C empty; ")
    assert "T2 found 7." in series["reason"] and "FLAIR found 7." in series["reason"]




def test_offline_contour_series_applies_the_plausibility_checks() -> None:
    """contour_series (the CLI's segment) with QA settings flags a 165 ml contour and writes the note; without, it does not."""
    datasets = _series("t1c", generate_uid(), 3)
    model = ModelSet([SphereModel("t1c", LESION, 34.0)])
    contour = contour_series(datasets, Label.T1C, model, RtStructSettings(), QA)
    assert contour.qa is not None and [f.code for f in contour.qa.flags] == [FlagCode.IMPLAUSIBLE_VOLUME]
    assert contour.dataset is not None
    assert str(contour.dataset.StructureSetROISequence[0].ROIDescription).startswith("QA FLAG: 16")
    plain = contour_series(datasets, Label.T1C, model, RtStructSettings())
    assert plain.qa is None and plain.dataset is not None and "QA FLAG" not in str(plain.dataset.SeriesDescription)
