"""Quiet-period study completion: which studies become jobs now. Pure (the clock is passed in).

A study is complete when no instance of it has arrived for ``quiet_seconds``; the clock is per
study and counts instances from any association and any caller. The decision reads only what the
SQLite index holds (:class:`dmg_node.records.StudyRow`), so a restart loses nothing: a study that
was waiting is still waiting, and one that was complete but not yet queued is queued. A restart
restarts the quiet period of every waiting study (``not_before``): the downtime is not silence.

Series-level completion (``assembly.completion = "series"``, :func:`due_series`) adds a shorter
clock per series: a series quiet for ``series_quiet_seconds`` becomes a job for just that series
(with any other series of the study ready at the same time) while the study is still arriving;
the pipeline then holds it if its headers show missing instances
(:func:`dmg_node.completeness.incompleteness`) until more arrive. The study rule still closes the
study after ``quiet_seconds`` (the final pass: the contour QA across every sequence).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dmg_node.config import LatePolicy
from dmg_node.records import SeriesRow, StudyRow


@dataclass(frozen=True)
class Decision:
    """Queue *study_instance_uid* as a job covering instances received up to *covered_until*."""

    study_instance_uid: str
    covered_until: float
    late: bool  # the study had been queued before: this job reprocesses it


def due_studies(
    studies: Iterable[StudyRow], now: float, quiet_seconds: float, late_policy: LatePolicy, *,
    not_before: float = 0.0,
) -> list[Decision]:
    """Return the studies that are complete and need a (new) job.

    Parameters
    ----------
    studies
        Every study in the index.
    now
        Current time (epoch seconds, the same clock as ``received_at``).
    quiet_seconds
        How long a study must be silent to count as complete.
    late_policy
        What an instance arriving after the study was queued does: ``reprocess`` queues the study
        again after a new quiet period, ``ignore`` stores it and queues nothing.

    Returns
    -------
    list of Decision
        Oldest first. A study with a pending or running job is never queued twice.
    """
    out: list[Decision] = []
    for s in sorted(studies, key=lambda r: r.last_received_at):
        if s.active_job or now - max(s.last_received_at, not_before) < quiet_seconds:
            continue
        if s.covered_until is None:
            out.append(Decision(s.study_instance_uid, s.last_received_at, late=False))
        elif s.last_received_at > s.covered_until and late_policy is LatePolicy.REPROCESS:
            out.append(Decision(s.study_instance_uid, s.last_received_at, late=True))
    return out


@dataclass(frozen=True)
class SeriesDecision:
    """Queue a job for *study_instance_uid* processing only *series*: (series UID, covered_until) pairs."""

    study_instance_uid: str
    series: tuple[tuple[str, float], ...]
    late: bool  # one of the series had been covered before: more instances arrived since

    @property
    def covered_until(self) -> float:
        """The newest instance the job covers."""
        return max(until for _uid, until in self.series)


def due_series(
    series: Iterable[SeriesRow], studies: Iterable[StudyRow], now: float, series_quiet_seconds: float,
    late_policy: LatePolicy, *, not_before: float = 0.0,
) -> list[SeriesDecision]:
    """Return, per study, the series that are quiet and not yet covered (series-level completion).

    Parameters
    ----------
    series
        The series of the studies still arriving (:meth:`dmg_node.storage.spool.Spool.series_rows`).
    studies
        Every study in the index: a study with a pending or running job gets no other job, and
        under ``ignore`` a study already queued by the study rule gets no series job.
    now
        Current time (epoch seconds, the same clock as ``received_at``).
    series_quiet_seconds
        How long a series must be silent to count as complete.
    late_policy
        As for :func:`due_studies`, applied to the study.
    not_before
        The node's start: its downtime is not silence.

    Returns
    -------
    list of SeriesDecision
        One per study with ready series, oldest first (by the newest instance covered); series in UID order.
    """
    by_study = {s.study_instance_uid: s for s in studies}
    ready: dict[str, list[SeriesRow]] = {}
    for row in series:
        study = by_study.get(row.study_instance_uid)
        if study is None or study.active_job:
            continue
        if study.covered_until is not None and late_policy is LatePolicy.IGNORE:
            continue
        if now - max(row.last_received_at, not_before) < series_quiet_seconds:
            continue
        if row.covered_until is not None and row.last_received_at <= row.covered_until:
            continue
        ready.setdefault(row.study_instance_uid, []).append(row)
    out = [
        SeriesDecision(uid, tuple((r.series_instance_uid, r.last_received_at)
                                  for r in sorted(rows, key=lambda r: r.series_instance_uid)),
                       late=any(r.covered_until is not None for r in rows))
        for uid, rows in ready.items()
    ]
    return sorted(out, key=lambda d: d.covered_until)
