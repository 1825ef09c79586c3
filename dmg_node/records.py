"""Small shared records that cross stages: what the index holds about instances, studies, jobs
and outbox items. Plain frozen dataclasses and enums; no I/O, so any stage may import them
without importing the spool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dmg_node.errors import SpoolError


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps about one received instance."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    received_at: float
    modality: str = ""
    series_number: str = ""
    series_description: str = ""


REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def instance_record(ds: Any, *, transfer_syntax_uid: str, calling_aet: str, received_at: float) -> InstanceRecord:
    """The index record of a dataset (drop folder) or of the SCP's :func:`dmg_node.net.part10.header_values`.

    Raises
    ------
    SpoolError
        Study, Series or SOP Instance UID is missing (PS3.3 C.7.2.1, C.7.3.1, C.12.1: Type 1).
    Exception
        Whatever pydicom raises decoding a malformed element: callers treat that as undecodable.
    """
    uids = {k: str(ds.get(k, "") or "").strip() for k in (*REQUIRED_UIDS, "SOPClassUID")}
    missing = [k for k in REQUIRED_UIDS if not uids[k]]
    if missing:
        raise SpoolError(f"missing {', '.join(missing)}")
    return InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"], sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax_uid, calling_aet=calling_aet, received_at=received_at,
        modality=str(ds.get("Modality", "") or ""), series_number=str(ds.get("SeriesNumber", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
    )


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`Spool.store` did: ``stored`` is False when a duplicate was kept out."""

    path: Path
    stored: bool
    duplicate: bool
    reopened: bool  # the study had been queued before: this instance arrived late


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    first_received_at: float
    last_received_at: float
    covered_until: float | None
    active_job: bool


@dataclass(frozen=True)
class SeriesRow:
    """One series as series-level completion sees it (``assembly.completion = "series"``)."""

    series_instance_uid: str
    study_instance_uid: str
    last_received_at: float
    covered_until: float | None  # last_received_at seen by the newest job that covered it; None = never


@dataclass(frozen=True)
class Job:
    id: int
    study_instance_uid: str
    state: JobState
    attempts: int
    covered_until: float
    series_uids: tuple[str, ...] = ()  # series mode: only these series; empty = the whole study


@dataclass(frozen=True)
class OutboxItem:
    id: int
    job_id: int
    study_instance_uid: str
    source_series_uid: str
    sop_instance_uid: str
    path: Path
    destination: str
    attempts: int
    created_at: float


@dataclass(frozen=True)
class RtStructKey:
    """What one RTSTRUCT (or SEG) was made from: the source series, exactly which instances, and the model.

    One RTSTRUCT (and one SEG) per key reaches each destination, whatever restarts or reprocessing happen.
    """

    source_series_uid: str
    model: str
    model_version: str
    fingerprint: str  # sha256 of the sorted SOP Instance UIDs of the series
    kind: str = "rtstruct"  # or "seg": each output format is made once per key


@dataclass(frozen=True)
class RtStructRecord:
    """An RTSTRUCT already made for a key: its SOP Instance UID and outbox file."""

    model: str
    model_version: str
    sop_instance_uid: str
    path: Path


def series_fingerprint(datasets: Sequence[Any]) -> str:
    """sha256 of the series' sorted SOP Instance UIDs: what an RTSTRUCT was made from."""
    uids = sorted(str(ds.get("SOPInstanceUID", "")) for ds in datasets)
    return hashlib.sha256("\n".join(uids).encode("utf-8", "surrogateescape")).hexdigest()
