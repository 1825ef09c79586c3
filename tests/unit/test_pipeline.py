"""The node's per-study pipeline in process: incomplete series are held, one RTSTRUCT per
(series instances, model version) whatever reruns and reprocessing happen, a stop ends a job at
a series boundary (issue 19 items 9, 10 and 12)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from dmg_node import config
from dmg_node.classify import Label
from dmg_node.errors import JobInterrupted
from dmg_node.pipeline import Pipeline
from dmg_node.records import Job, JobState, instance_record
from dmg_node.segment.routing import ModelSet
from dmg_node.storage.spool import Spool
from dmg_node.volume import Volume
from tests.support import LOCALHOST, mr_dataset

FLAIR_PHYSICS = dict(ScanningSequence=["SE", "IR"], RepetitionTime=9000, EchoTime=120, InversionTime=2500)


@dataclass
class CubeModel:
    """A stand-in model that contours a small cube in the middle of any volume."""

    sequence: str
    name: str = "cube"
    version: str = "1.0"
    max_spacing_mm: float | None = None
    device: str = "cpu"

    def predict(self, volume: Volume) -> np.ndarray[Any, Any]:
        mask = np.zeros(volume.array.shape, dtype=bool)
        k, j, i = (s // 2 for s in mask.shape)
        mask[k - 1:k + 2, j - 4:j + 4, i - 4:i + 4] = True
        return mask


def _pipeline(tmp_path: Path, version: str = "1.0") -> Pipeline:
    settings = config.from_dict({
        "node": {"host": LOCALHOST, "port": 11112},
        "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 0},
        "models": {"dir": str(tmp_path / "models")},
        "destinations": [{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": 104}],
    })
    models = {Label.T2: ModelSet([CubeModel("t2", version=version)]),
              Label.FLAIR: ModelSet([CubeModel("flair", version=version)])}
    return Pipeline(settings, Spool(settings.storage.root, fsync=False), models)


def _series(study: str, n: int, **extra: Any) -> list[Dataset]:
    series = generate_uid()
    out = []
    for i in range(n):
        ds = mr_dataset(study, series, i, rows=32, cols=32, description=str(extra.pop("description", "")) or "AX")
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


def _store(spool: Spool, datasets: list[Dataset]) -> None:
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        spool.store(buf.getvalue(), instance_record(ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                                    calling_aet="SCANNER", received_at=1.0))


def _job(spool: Spool, study: str) -> Job:
    spool.enqueue(study, 1.0, 2.0)
    job = spool.claim_job(3.0)
    assert job is not None
    return job


def _sent_sops(spool: Spool) -> set[str]:
    return {r["sop_instance_uid"] for r in spool.outbox(1000)}


def test_rerun_after_a_crash_reuses_the_rtstruct(tmp_path: Path) -> None:
    """Item 9: the job runs again after a crash past rtstruct_written: the same RTSTRUCT (same SOP
    Instance UID) is queued again, no second one is made."""
    p = _pipeline(tmp_path)
    study = generate_uid()
    _store(p.spool, _series(study, 8))
    job = _job(p.spool, study)
    first = p.run(job)
    assert len(first) == 1 and _sent_sops(p.spool) == {first[0].sop_instance_uid}
    p.spool.reconcile()  # a kill -9 left the job running: the next start requeues it ...
    again = p.spool.claim_job(4.0)
    assert again is not None and again.id == job.id
    with capture_logs() as logs:
        assert p.run(again) == []  # ... and its rerun makes nothing new
    assert [e["sop_uid"] for e in logs if e["event"] == "rtstruct_reused"] == [first[0].sop_instance_uid]
    assert _sent_sops(p.spool) == {first[0].sop_instance_uid} and len(p.spool.outbox(1000)) == 1


def test_new_model_version_makes_a_new_rtstruct(tmp_path: Path) -> None:
    """Item 9: the key is (series, model version): a new model version contours the series again."""
    p = _pipeline(tmp_path)
    study = generate_uid()
    _store(p.spool, _series(study, 8))
    job = _job(p.spool, study)
    p.run(job)
    p.spool.finish_job(job.id, JobState.DONE, 5.0)
    newer = Pipeline(p.settings, p.spool, {Label.T2: ModelSet([CubeModel("t2", version="2.0")])})
    assert len(newer.run(_job(p.spool, study))) == 1 and len(_sent_sops(p.spool)) == 2


def test_incomplete_series_held_then_only_it_is_contoured(tmp_path: Path) -> None:
    """Item 10: a FLAIR with 6 of its 12 declared images is held as incomplete (T2 contoured); when
    the rest arrives and the study is reprocessed only the FLAIR gets an RTSTRUCT."""
    p = _pipeline(tmp_path)
    study = generate_uid()
    _store(p.spool, _series(study, 8, description="T2 AX"))
    flair = _series(study, 12, description="FLAIR AX", ImagesInAcquisition=12, **FLAIR_PHYSICS)
    _store(p.spool, flair[:6])
    with capture_logs() as logs:
        out = p.run(_job(p.spool, study))
    assert [o.label for o in out] == [Label.T2]
    [held] = [e for e in logs if e["event"] == "series_incomplete"]
    assert held["reason"] == "6 of 12 images (Images in Acquisition (0020,1002))"
    rows = {s["series_instance_uid"]: s for st in p.spool.summary() for s in st["series"]}
    assert rows[str(flair[0].SeriesInstanceUID)]["reason"].startswith("incomplete: 6 of 12 images")
    _store(p.spool, flair[6:])
    with capture_logs() as logs:
        again = p.run(_job(p.spool, study))
    assert [o.label for o in again] == [Label.FLAIR]
    assert [e["label"] for e in logs if e["event"] == "rtstruct_reused"] == ["t2"]
    assert len(_sent_sops(p.spool)) == 2


def test_gap_in_slice_positions_is_incomplete_not_rejected(tmp_path: Path) -> None:
    """Item 10: slices missing from the middle of a series give reason "incomplete: missing slice positions"."""
    p = _pipeline(tmp_path)
    study = generate_uid()
    series = _series(study, 12)
    _store(p.spool, series[:4] + series[7:])
    assert p.run(_job(p.spool, study)) == []
    [row] = [s for st in p.spool.summary() for s in st["series"]]
    assert row["reason"].startswith("incomplete: missing slice positions: 1 gap(s) up to 16 mm")


def test_stopping_ends_the_job_at_a_series_boundary(tmp_path: Path) -> None:
    """Item 12 / issue 21 item 3: a stop is seen before the next series starts; nothing is contoured."""
    p = _pipeline(tmp_path)
    study = generate_uid()
    _store(p.spool, _series(study, 8))
    with pytest.raises(JobInterrupted, match="node stopping before the t2 series"):
        p.run(_job(p.spool, study), stopping=lambda: True)
    assert p.spool.outbox() == []


@dataclass
class CornerModel(CubeModel):
    """A stand-in model that contours a cube in a corner: discordant with CubeModel's."""

    def predict(self, volume: Volume) -> np.ndarray[Any, Any]:
        mask = np.zeros(volume.array.shape, dtype=bool)
        mask[1:4, 2:10, 2:10] = True
        return mask


def test_series_job_contours_only_its_series_and_later_qa_flags_the_sent_one(tmp_path: Path) -> None:
    """Issue 21 item 4: a series job contours only its series; the FLAIR's job later compares the FLAIR
    with the T2 already sent, flags the FLAIR's own RTSTRUCT and records the late discordance of the T2."""
    p = _pipeline(tmp_path)
    p.models[Label.FLAIR] = ModelSet([CornerModel("flair")])
    study = generate_uid()
    t2 = _series(study, 8, description="T2 AX")
    flair = _series(study, 8, description="FLAIR AX", **FLAIR_PHYSICS)
    _store(p.spool, t2)
    _store(p.spool, flair[:3])  # still arriving
    t2_uid, flair_uid = str(t2[0].SeriesInstanceUID), str(flair[0].SeriesInstanceUID)
    p.spool.enqueue(study, 1.0, 2.0, series=((t2_uid, 1.0),))
    job = p.spool.claim_job(3.0)
    assert job is not None
    with capture_logs() as logs:
        [first] = p.run(job)
    assert first.label is Label.T2 and first.qa_flags == ()  # QA'd with what exists so far: itself
    assert not [e for e in logs if e["event"] == "series_segmented" and e["label"] == "flair"]
    p.spool.finish_job(job.id, JobState.DONE, 4.0)
    _store(p.spool, flair[3:])
    p.spool.enqueue(study, 1.0, 5.0, series=((flair_uid, 1.0),))
    job = p.spool.claim_job(6.0)
    assert job is not None
    with capture_logs() as logs:
        [second] = p.run(job)
    assert second.label is Label.FLAIR and "discordant" in second.qa_flags
    [late] = [e for e in logs if e["event"] == "contour_discordant_late"]
    assert late["series_uid"] == t2_uid and late["sop_uid"] == first.sop_instance_uid
    rows = {s["series_instance_uid"]: s for st in p.spool.summary() for s in st["series"]}
    assert rows[t2_uid]["reason"].startswith("sent before the QA across sequences, which flags it: QA FLAG: T2")
    p.spool.finish_job(job.id, JobState.DONE, 7.0)
    with capture_logs() as logs:  # the study rule's final pass: both reused, nothing new is made
        assert p.run(_job(p.spool, study)) == []
    assert sorted(e["label"] for e in logs if e["event"] == "rtstruct_reused") == ["flair", "t2"]
    assert len(_sent_sops(p.spool)) == 2
