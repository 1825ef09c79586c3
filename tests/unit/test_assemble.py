"""Quiet-period completion decisions (pure)."""

from __future__ import annotations

from dmg_node.assemble import LatePolicy, due_series, due_studies
from dmg_node.records import SeriesRow, StudyRow


def _row(uid: str, last: float, covered: float | None = None, active: bool = False) -> StudyRow:
    return StudyRow(uid, 0.0, last, covered, active)


def test_waits_for_quiet_period() -> None:
    """A study is due only once quiet_seconds have passed since its last instance."""
    assert due_studies([_row("a", 100.0)], 159.9, 60, LatePolicy.REPROCESS) == []
    [d] = due_studies([_row("a", 100.0)], 160.0, 60, LatePolicy.REPROCESS)
    assert d.study_instance_uid == "a" and d.covered_until == 100.0 and not d.late


def test_clock_is_per_study_and_oldest_first() -> None:
    """Each study has its own clock; due studies come oldest first."""
    rows = [_row("new", 150.0), _row("old", 50.0), _row("mid", 90.0)]
    assert [d.study_instance_uid for d in due_studies(rows, 155.0, 60, LatePolicy.REPROCESS)] == ["old", "mid"]


def test_never_twice_while_active() -> None:
    """A study with a pending or running job is not queued again."""
    assert due_studies([_row("a", 0.0, None, active=True)], 1000, 60, LatePolicy.REPROCESS) == []


def test_covered_study_is_not_requeued() -> None:
    """A study whose job covered its last instance is done."""
    assert due_studies([_row("a", 100.0, covered=100.0)], 1000, 60, LatePolicy.REPROCESS) == []


def test_late_arrival_reprocess_or_ignore() -> None:
    """A late instance re-queues the study after a new quiet period under reprocess, never under ignore."""
    row = _row("a", 300.0, covered=100.0)
    assert due_studies([row], 330.0, 60, LatePolicy.REPROCESS) == []
    [d] = due_studies([row], 360.0, 60, LatePolicy.REPROCESS)
    assert d.late and d.covered_until == 300.0
    assert due_studies([row], 10_000.0, 60, LatePolicy.IGNORE) == []


def test_zero_quiet_period() -> None:
    """quiet_seconds = 0 queues a study at once."""
    assert len(due_studies([_row("a", 5.0)], 5.0, 0, LatePolicy.REPROCESS)) == 1


def test_restart_restarts_the_quiet_period() -> None:
    """Issue 19 item 10: after a restart at t=500 a study last heard at t=100 waits until 560, not at once."""
    rows = [_row("a", 100.0)]
    assert due_studies(rows, 501.0, 60, LatePolicy.REPROCESS, not_before=500.0) == []
    assert due_studies(rows, 559.9, 60, LatePolicy.REPROCESS, not_before=500.0) == []
    [d] = due_studies(rows, 560.0, 60, LatePolicy.REPROCESS, not_before=500.0)
    assert d.covered_until == 100.0 and not d.late


def _series(uid: str, study: str, last: float, covered: float | None = None) -> SeriesRow:
    return SeriesRow(uid, study, last, covered)


def test_series_due_while_study_still_arriving() -> None:
    """Series mode: a T2 quiet for series_quiet_seconds is due although the study's FLAIR is still arriving."""
    rows = [_series("t2", "a", 100.0), _series("flair", "a", 125.0)]
    assert due_series(rows, [_row("a", 125.0)], 109.9, 10, LatePolicy.REPROCESS) == []
    [d] = due_series(rows, [_row("a", 125.0)], 126.0, 10, LatePolicy.REPROCESS)
    assert d.study_instance_uid == "a" and d.series == (("t2", 100.0),) and not d.late
    assert due_studies([_row("a", 125.0)], 126.0, 60, LatePolicy.REPROCESS) == []  # the study rule still waits


def test_ready_series_of_a_study_share_one_job() -> None:
    """Series of one study that are ready together make one decision covering its newest instance."""
    rows = [_series("s2", "a", 100.0), _series("s1", "a", 90.0), _series("x", "b", 95.0)]
    decisions = due_series(rows, [_row("a", 100.0), _row("b", 95.0)], 200.0, 10, LatePolicy.REPROCESS)
    assert [(d.study_instance_uid, d.series, d.covered_until) for d in decisions] == [
        ("b", (("x", 95.0),), 95.0), ("a", (("s1", 90.0), ("s2", 100.0)), 100.0)]


def test_covered_series_wait_for_new_instances() -> None:
    """A covered series is due again only once newer instances (e.g. the rest of a held series) are quiet."""
    study = [_row("a", 300.0)]
    assert due_series([_series("t2", "a", 100.0, covered=100.0)], study, 1000, 10, LatePolicy.REPROCESS) == []
    late = [_series("t2", "a", 300.0, covered=100.0)]
    assert due_series(late, study, 305.0, 10, LatePolicy.REPROCESS) == []
    [d] = due_series(late, study, 310.0, 10, LatePolicy.REPROCESS)
    assert d.late and d.series == (("t2", 300.0),)


def test_series_rule_respects_active_jobs_ignore_and_restart() -> None:
    """No series job beside an active job, none for a study queued under ignore, and a restart restarts the clock."""
    rows = [_series("t2", "a", 100.0)]
    assert due_series(rows, [_row("a", 100.0, active=True)], 1000, 10, LatePolicy.REPROCESS) == []
    assert due_series(rows, [_row("a", 100.0, covered=50.0)], 1000, 10, LatePolicy.IGNORE) == []
    assert len(due_series(rows, [_row("a", 100.0, covered=50.0)], 1000, 10, LatePolicy.REPROCESS)) == 1
    assert due_series(rows, [_row("a", 100.0)], 505.0, 10, LatePolicy.REPROCESS, not_before=500.0) == []
    assert len(due_series(rows, [_row("a", 100.0)], 510.0, 10, LatePolicy.REPROCESS, not_before=500.0)) == 1
    assert due_series(rows, [], 1000, 10, LatePolicy.REPROCESS) == []  # the study row is gone (deleted)
