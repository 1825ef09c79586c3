"""Quiet-period study completion: which studies become jobs now. Pure (the clock is passed in).

A study is complete when no instance of it has arrived for ``quiet_seconds``; the clock is per
study and counts instances from any association and any caller. The decision reads only what the
SQLite index holds (:class:`dmg_node.records.StudyRow`), so a restart loses nothing: a study that
was waiting is still waiting, and one that was complete but not yet queued is queued. A restart
restarts the quiet period of every waiting study (``not_before``): the downtime is not silence.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dmg_node.config import LatePolicy
from dmg_node.records import StudyRow


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
