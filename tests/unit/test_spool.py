"""Spool: durable files, the index, duplicates, unsafe UIDs, reconcile, jobs and outbox."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dmg_node.fsutil import TMP_SUFFIX
from dmg_node.records import InstanceRecord, JobState, OutboxState
from dmg_node.storage.spool import Spool, safe_component


def _rec(sop: str = "1.2.3.4", series: str = "1.2.3", study: str = "1.2", t: float = 100.0) -> InstanceRecord:
    return InstanceRecord(sop, series, study, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "SCANNER", t,
                          "MR", "3", "T2 TSE")


def test_store_writes_file_and_index(tmp_path: Path) -> None:
    """A stored instance is a file with exactly the given bytes and one index row."""
    sp = Spool(tmp_path)
    out = sp.store(b"abc", _rec())
    assert out.stored and not out.duplicate and out.path.read_bytes() == b"abc"
    assert out.path == tmp_path.resolve() / "studies" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert sp.instance_count() == 1
    assert sp.series_files("1.2") == {"1.2.3": [out.path]}
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))


def test_duplicate_replace_and_keep_first(tmp_path: Path) -> None:
    """The later copy wins by default; keep_first keeps the stored bytes; both index once."""
    sp = Spool(tmp_path)
    sp.store(b"first", _rec())
    out = sp.store(b"second", _rec())
    assert out.duplicate and out.stored and out.path.read_bytes() == b"second"
    out = sp.store(b"third", _rec(), keep_first=True)
    assert out.duplicate and not out.stored and out.path.read_bytes() == b"second"
    assert sp.instance_count() == 1


def test_duplicate_under_other_series_moves_file(tmp_path: Path) -> None:
    """A SOP UID re-sent under another series leaves one file, at the new place."""
    sp = Spool(tmp_path)
    old = sp.store(b"a", _rec(series="1.2.3")).path
    new = sp.store(b"b", _rec(series="1.2.9")).path
    assert not old.exists() and new.read_bytes() == b"b" and sp.instance_count() == 1


@pytest.mark.parametrize("uid", ["../../etc", "1.2/../../x", "abc", "1." * 40, "", "1.2\x00.3"])
def test_unsafe_uids_stay_inside_spool(tmp_path: Path, uid: str) -> None:
    """UIDs that are not valid DICOM UIDs are stored under a hashed name inside the spool."""
    sp = Spool(tmp_path / "spool")
    out = sp.store(b"x", _rec(sop=uid or "9", series=uid, study=uid))
    assert tmp_path.resolve() / "spool" / "studies" in out.path.parents
    assert safe_component(uid).startswith("x") and "/" not in safe_component(uid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


def test_write_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing raises OSError, leaves no file, no temp file and no index row."""
    sp = Spool(tmp_path)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        sp.store(b"abc", _rec())
    monkeypatch.undo()
    assert sp.instance_count() == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith("index.sqlite3")] == []


def test_reconcile_reindexes_lost_files_and_drops_temps(tmp_path: Path) -> None:
    """After a crash, files the index lost are indexed again and torn temp files are removed."""
    from tests.support import mr_dataset

    sp = Spool(tmp_path)
    ds = mr_dataset("1.2", "1.2.3", 0)
    lost = sp.instance_path("1.2", "1.2.3", ds.SOPInstanceUID)
    lost.parent.mkdir(parents=True)
    ds.save_as(lost, enforce_file_format=True)
    torn = lost.parent / f".x.dcm.abc{TMP_SUFFIX}"
    torn.write_bytes(b"half")
    job = sp.enqueue("1.2", 1.0, 2.0)
    assert sp.claim_job(3.0) is not None
    counts = sp.reconcile()
    assert counts == {"temp_removed": 1, "reindexed": 1, "unreadable": 0, "jobs_requeued": 1}
    assert not torn.exists() and sp.instance_count() == 1
    claimed = sp.claim_job(4.0)
    assert claimed is not None and claimed.id == job and claimed.attempts == 2


def test_job_lifecycle_and_summary(tmp_path: Path) -> None:
    """A study is waiting until queued; its job moves pending -> running -> done in the summary."""
    sp = Spool(tmp_path)
    sp.store(b"a", _rec(t=10.0))
    assert sp.summary()[0]["state"] == "waiting"
    assert sp.studies()[0].covered_until is None
    jid = sp.enqueue("1.2", 10.0, 80.0)
    assert sp.studies()[0].active_job
    job = sp.claim_job(81.0)
    assert job is not None and job.id == jid and job.attempts == 1
    assert sp.summary()[0]["state"] == "running"
    sp.finish_job(jid, JobState.DONE, 90.0)
    summary = sp.summary()[0]
    assert summary["state"] == "done" and summary["series"][0]["instances"] == 1
    assert sp.claim_job(91.0) is None
    # a late instance re-opens the study
    out = sp.store(b"b", _rec(sop="1.2.3.5", t=95.0))
    assert out.reopened and sp.summary()[0]["state"] == "waiting"


def test_outbox_retry_and_sent(tmp_path: Path) -> None:
    """Outbox items are durable files, due by time, and leave the queue only when sent."""
    sp = Spool(tmp_path)
    path = sp.add_outbox(1, "1.2", "1.2.3", "1.2.9", b"RT", ["tps", "archive"], now=0.0)
    assert path.read_bytes() == b"RT"
    items = sp.due_outbox(0.0)
    assert {i.destination for i in items} == {"tps", "archive"}
    tps = next(i for i in items if i.destination == "tps")
    sp.outbox_result(tps.id, OutboxState.PENDING, "no-response", "timeout", now=1.0, next_try_at=50.0)
    assert [i.destination for i in sp.due_outbox(10.0)] == ["archive"]
    assert [i.destination for i in sp.due_outbox(60.0, destination="tps")] == ["tps"]
    sp.outbox_result(tps.id, OutboxState.SENT, "0x0000", None, now=61.0, next_try_at=61.0)
    assert [i.destination for i in sp.due_outbox(100.0)] == ["archive"]
    # queuing the same RTSTRUCT again (a re-run job) does not duplicate rows
    sp.add_outbox(1, "1.2", "1.2.3", "1.2.9", b"RT", ["tps", "archive"], now=0.0)
    assert len(sp.outbox()) == 2


def test_retention_keeps_anything_unsent(tmp_path: Path) -> None:
    """Only studies processed and acknowledged more than N days ago are expired; delete removes their files."""
    sp = Spool(tmp_path)
    day = 86400.0
    for study, sop in (("1.1", "1.1.1.1"), ("1.2", "1.2.1.1"), ("1.3", "1.3.1.1")):
        sp.store(b"x", _rec(sop=sop, series=study + ".1", study=study, t=0.0))
        jid = sp.enqueue(study, 0.0, 1.0)
        sp.claim_job(1.0)
        sp.finish_job(jid, JobState.DONE, 2.0)
    sp.add_outbox(1, "1.1", "1.1.1", "9.1", b"RT", ["tps"], now=2.0)
    [item] = sp.due_outbox(3.0, destination="tps")
    sp.outbox_result(item.id, OutboxState.SENT, "0x0000", None, now=3.0, next_try_at=3.0)
    sp.add_outbox(2, "1.2", "1.2.1", "9.2", b"RT", ["tps"], now=2.0)  # never acknowledged
    assert sorted(sp.expired_studies(now=2.5 * day, days=2)) == ["1.1", "1.3"]
    assert sp.expired_studies(now=1.0 * day, days=2) == []
    assert sp.delete_study("1.1") == 2
    assert sp.instance_count() == 2 and sp.series_files("1.1") == {}
    assert (tmp_path / "outbox").is_dir() and not (tmp_path / "studies" / "1.1").exists()


def test_version_1_index_is_upgraded_in_place(tmp_path: Path) -> None:
    """An index written before the rtstructs table (schema 1) opens, gains the table, keeps its rows."""
    import sqlite3

    from dmg_node.storage import spool as spool_mod

    sp = Spool(tmp_path)
    sp.store(b"abc", _rec())
    sp.close()
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    db.execute("DROP TABLE rtstructs")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    sp = Spool(tmp_path)
    assert sp.instance_count() == 1 and sp.rtstructs_for("1.2.3", "f") == []
    assert sp._query("SELECT value FROM meta WHERE key = 'schema_version'") == [(str(spool_mod.SCHEMA_VERSION),)]


def test_rtstruct_recorded_with_its_outbox_rows_and_requeued_once(tmp_path: Path) -> None:
    """add_outbox with a key records the RTSTRUCT; requeue_rtstruct adds only missing destinations."""
    from dmg_node.records import RtStructKey

    sp = Spool(tmp_path)
    key = RtStructKey("1.2.3", "demo-t2", "0.2.0", "f" * 64)
    sp.add_outbox(1, "1.2", "1.2.3", "9.9", b"RT", ["tps"], now=0.0, key=key)
    [rec] = sp.rtstructs_for("1.2.3", "f" * 64)
    assert (rec.model, rec.model_version, rec.sop_instance_uid) == ("demo-t2", "0.2.0", "9.9")
    assert sp.rtstructs_for("1.2.3", "other") == []
    sp.requeue_rtstruct(2, "1.2", "1.2.3", rec, ["tps", "archive"], now=1.0)
    rows = sorted((r["sop_instance_uid"], r["destination"], r["job_id"]) for r in sp.outbox())
    assert rows == [("9.9", "archive", 2), ("9.9", "tps", 1)]
    assert sp.pending_outbox() == {"archive": 1, "tps": 1}
    assert sp.delete_study("1.2") == 1 and sp.rtstructs_for("1.2.3", "f" * 64) == []


def test_requeue_job_does_not_count_the_attempt(tmp_path: Path) -> None:
    """A job stopped by a node stop goes back to pending with its attempt uncounted."""
    sp = Spool(tmp_path)
    job_id = sp.enqueue("1.2", 1.0, 2.0)
    job = sp.claim_job(3.0)
    assert job is not None and job.attempts == 1
    sp.requeue_job(job_id, 4.0, "node stopping")
    [row] = sp.jobs()
    assert (row["state"], row["attempts"], row["error"]) == ("pending", 0, "node stopping")


def test_series_jobs_cover_their_series_and_leave_the_study_waiting(tmp_path: Path) -> None:
    """A series job records its series as covered, carries them to claim_job, and leaves the study rule open."""
    sp = Spool(tmp_path)
    sp.store(b"a", _rec(sop="1.2.3.1", series="1.2.3", t=100.0))
    sp.store(b"b", _rec(sop="1.2.3.2", series="1.2.3", t=101.0))
    sp.store(b"c", _rec(sop="1.2.4.1", series="1.2.4", t=130.0))
    assert sorted((r.series_instance_uid, r.last_received_at, r.covered_until) for r in sp.series_rows()) == [
        ("1.2.3", 101.0, None), ("1.2.4", 130.0, None)]
    jid = sp.enqueue("1.2", 101.0, 140.0, series=(("1.2.3", 101.0),))
    job = sp.claim_job(141.0)
    assert job is not None and job.id == jid and job.series_uids == ("1.2.3",)
    [study] = sp.studies()
    assert study.covered_until is None and study.active_job
    assert {r.series_instance_uid: r.covered_until for r in sp.series_rows()} == {"1.2.3": 101.0, "1.2.4": None}
    sp.finish_job(jid, JobState.DONE, 142.0)
    sp.enqueue("1.2", 130.0, 200.0)  # the study rule: the final pass covers every series
    job = sp.claim_job(201.0)
    assert job is not None and job.series_uids == ()
    assert sp.series_rows() == []  # the study is covered: nothing waits any more


def test_version_2_index_gains_the_series_columns(tmp_path: Path) -> None:
    """An index from before series-level completion (schema 2) gains series.covered_until and jobs.series_uids."""
    import sqlite3

    sp = Spool(tmp_path)
    sp.store(b"abc", _rec())
    sp.close()
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    for table, column in (("series", "covered_until"), ("jobs", "series_uids")):  # the version-2 tables
        kept = ", ".join(r[1] for r in db.execute(f"PRAGMA table_info({table})") if r[1] != column)
        db.execute(f"CREATE TABLE old AS SELECT {kept} FROM {table}")
        db.execute(f"DROP TABLE {table}")
        db.execute(f"ALTER TABLE old RENAME TO {table}")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    sp = Spool(tmp_path)
    assert [r.covered_until for r in sp.series_rows()] == [None]
    assert "series_uids" in {r[1] for r in sp._query("PRAGMA table_info(jobs)")}


def test_a_lock_left_by_a_dead_nodes_workers_is_waited_for_and_a_live_node_refuses(tmp_path: Path) -> None:
    """node.lock held by a process while the pid in it is dead (the receive workers of a killed
    node): claim_ownership waits for the lock; while that pid is alive it refuses at once."""
    import subprocess
    import sys
    import time as _time

    from dmg_node.errors import SpoolError
    from dmg_node.storage.spool import OWNER_LOCK

    spool = Spool(tmp_path / "spool")
    holder_code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                   "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, sys.argv[2].encode()); "
                   "print('held', flush=True); time.sleep(float(sys.argv[3]))")
    lock = str(spool.root / OWNER_LOCK)
    holder = subprocess.Popen([sys.executable, "-c", holder_code, lock, "999999999\n", "1.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = _time.monotonic()
        spool.claim_ownership()  # the pid in the file is gone: wait for the holder to exit
        assert 0.5 < _time.monotonic() - t0 < 10
    finally:
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    spool.close()

    other = Spool(tmp_path / "spool")
    live = subprocess.Popen([sys.executable, "-c", holder_code, lock, "1\n", "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout is not None and live.stdout.readline().strip() == "held"
        t0 = _time.monotonic()
        with pytest.raises(SpoolError, match=r"in use by another dmg-node \(pid 1\)"):
            other.claim_ownership()
        assert _time.monotonic() - t0 < 2
    finally:
        live.kill()
        live.wait(10)
        if live.stdout is not None:
            live.stdout.close()
    other.close()
