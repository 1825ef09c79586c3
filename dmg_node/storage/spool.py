"""Durable instance files plus the embedded SQLite index (instances, series, studies, jobs, outbox).

Files are the truth: every instance is written as a DICOM Part 10 file with
:func:`dmg_node.fsutil.atomic_write` *before* it is indexed, and :meth:`Spool.reconcile` re-indexes
any file the index lost (a crash between rename and commit, or a WAL commit lost to a power cut:
the index runs with ``synchronous=NORMAL``). Layout under ``storage.root``::

    index.sqlite3                      the index (WAL mode)
    node.lock                          flock of the running node, with its pid
    studies/<study>/<series>/<sop>.dcm  one file per instance, bytes as received
    outbox/<job>/<sop>.dcm             RTSTRUCTs waiting for their destinations
    incoming/<random>.incoming         large data sets still arriving (dmg_node.net.streamed)

UIDs become path components only when they are valid DICOM UIDs (PS3.5 9.1); anything else
(``../``, letters, over 64 characters) is stored under a hashed name, so no input can write outside
the spool. The true UIDs are kept in the index.

One module because it is one class over one SQLite connection and one lock: every method is one
short transaction that orders a file write before its index row, and splitting it by table would
hand the connection, the lock and that ordering rule around.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dmg_node.errors import SpoolError
from dmg_node.fsutil import TMP_SUFFIX, atomic_write, ensure_dir, fsync_dir
from dmg_node.records import (
    InstanceRecord,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    RtStructKey,
    RtStructRecord,
    SeriesRow,
    StoreOutcome,
    StudyRow,
)

log = structlog.get_logger(__name__)

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
SCHEMA_VERSION = 3
# Version 2 added ``rtstructs``; its CREATE TABLE IF NOT EXISTS upgrades a version-1 index in place.
# Version 3 added ``series.covered_until`` and ``jobs.series_uids`` (series-level completion);
# :meth:`Spool._migrate` adds the columns to an older index in place.
_ADDED_COLUMNS = (("series", "covered_until", "REAL"), ("jobs", "series_uids", "TEXT"))
#: Held (flock) by the node that owns the spool; see :meth:`Spool.claim_ownership`.
OWNER_LOCK = "node.lock"
#: How long a starting node waits for the receive workers of a node that is gone to exit.
ORPHAN_WAIT_SECONDS = 10.0
#: The SQLite index under ``storage.root``; its presence is what makes a folder a spool.
INDEX_FILE = "index.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    covered_until REAL             -- last_received_at seen by the newest job; NULL = never queued
);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    series_number TEXT NOT NULL DEFAULT '',
    series_description TEXT NOT NULL DEFAULT '',
    label TEXT,                    -- t1c/t2/flair/none once classified
    reason TEXT,                   -- why that label, or why the series was rejected
    -- covered_until: its last received_at seen by the newest job; NULL = never
    covered_until REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_instance_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,            -- relative to the spool root
    size INTEGER NOT NULL,
    calling_aet TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,           -- pending, running, done, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    covered_until REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    error TEXT,
    -- series_uids: series mode: the series it processes, one per line; NULL = all
    series_uids TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    source_series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,           -- pending, sent, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_error TEXT,
    next_try_at REAL NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE TABLE IF NOT EXISTS rtstructs (  -- one RTSTRUCT per (series, its instances, model version)
    source_series_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,     -- sha256 of the sorted SOP Instance UIDs it was built from
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (source_series_uid, model, model_version, fingerprint)
);
CREATE TABLE IF NOT EXISTS segs (  -- the same for DICOM SEGs (no version bump: an older node ignores it)
    source_series_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (source_series_uid, model, model_version, fingerprint)
);
"""
# The table that makes each kind of output exactly-once (RtStructKey.kind).
_MADE_TABLES = {"rtstruct": "rtstructs", "seg": "segs"}


def _index_rows(db: sqlite3.Connection, rec: InstanceRecord, rel: str, size: int) -> None:
    """The instance's row, and its series' row if new (inside the caller's transaction)."""
    db.execute(
        "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
        (rec.sop_instance_uid, rec.series_instance_uid, rec.study_instance_uid, rec.sop_class_uid,
         rec.transfer_syntax_uid, rel, size, rec.calling_aet, rec.received_at),
    )
    db.execute(
        "INSERT OR IGNORE INTO series (series_instance_uid, study_instance_uid, modality, series_number,"
        " series_description) VALUES (?,?,?,?,?)",
        (rec.series_instance_uid, rec.study_instance_uid, rec.modality, rec.series_number, rec.series_description),
    )


def _pid_alive(pid: str) -> bool:
    """Whether process *pid* (as written in ``node.lock``) exists; True when unknown."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def safe_component(uid: str) -> str:
    """Return *uid* if it is a valid DICOM UID, else a stable hashed stand-in (never a path trick)."""
    if len(uid) <= 64 and _UID_RE.fullmatch(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class Spool:
    """The spool folder and its index. Thread-safe: one connection behind a lock."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        try:
            (self.root / "studies").mkdir(parents=True, exist_ok=True)
            (self.root / "outbox").mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / INDEX_FILE, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open spool at {self.root}: {exc}") from exc
        self._lock = threading.Lock()
        self._owner_fd: int | None = None

    def _migrate(self) -> None:
        """Bring an older index up to :data:`SCHEMA_VERSION` in place (tables were added by _SCHEMA)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        found = int(row[0]) if row and str(row[0]).isdigit() else 0
        if found > SCHEMA_VERSION:
            raise SpoolError(f"spool index schema version {found} is newer than this dmg-node's {SCHEMA_VERSION}")
        for table, column, kind in _ADDED_COLUMNS:
            if column not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        if found < SCHEMA_VERSION:
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            log.info("spool_index_migrated", from_version=found, to_version=SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # releases the lock
            self._owner_fd = None

    def claim_ownership(self) -> None:
        """Take the spool for this process (``node.lock``, an exclusive ``flock``) or fail.

        Two nodes on one spool would both reconcile it, both run its jobs and both send the
        RTSTRUCTs. The lock goes with the process (also on ``kill -9``), so a stale file never
        blocks a restart. ``dmg-node status`` only reads and takes no lock.

        Raises
        ------
        SpoolError
            Another process holds the spool; the message gives its pid.
        """
        path = self.root / OWNER_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + ORPHAN_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                os.lseek(fd, 0, os.SEEK_SET)
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                # The receive workers of a node share its lock (dmg_node.net.pool): when the node
                # itself is gone (kill -9), they are aborting and about to exit; wait for them.
                if _pid_alive(holder) or time.monotonic() > deadline:
                    os.close(fd)
                    raise SpoolError(f"spool {self.root} is in use by another dmg-node (pid {holder}); "
                                     "run one node per storage.root") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._owner_fd = fd

    @property
    def owner_fd(self) -> int | None:
        """The descriptor holding ``node.lock`` (None before :meth:`claim_ownership`): receive
        workers inherit it, so the spool stays locked until the last of them has exited."""
        return self._owner_fd

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; any SQLite failure (e.g. SQLITE_FULL on a full disk) is a SpoolError.

        COMMIT is inside the try: a failed COMMIT must not leave the transaction open, or every
        later BEGIN fails even after space returns. SQLite may already have rolled back itself
        (SQLITE_FULL, SQLITE_IOERR), hence the ``in_transaction`` check.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise SpoolError(f"spool index write failed: {exc}") from exc

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- receiving ---------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.root / "studies" / safe_component(study_uid) / safe_component(series_uid)
            / f"{safe_component(sop_uid)}.dcm"
        )

    @property
    def incoming(self) -> Path:
        """The folder of data sets still arriving, on the spool's file system (renamed, not copied)."""
        return self.root / "incoming"

    def store_file(self, temp: Path, size: int, rec: InstanceRecord, *, keep_first: bool = False) -> StoreOutcome:
        """:meth:`store` for a complete Part 10 file already written to :attr:`incoming`.

        The file is fsynced and renamed into place (then its folder fsynced) before it is indexed;
        on a duplicate kept first, or any error, *temp* is left for the caller to remove.

        Raises
        ------
        OSError, SpoolError
            As :meth:`store`.
        """

        def move(path: Path) -> None:
            if self.fsync:
                fd = os.open(temp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            ensure_dir(path.parent)
            os.replace(temp, path)
            if self.fsync:
                fsync_dir(path.parent)

        return self._store(move, size, rec, keep_first)

    def store(self, data: bytes | memoryview, rec: InstanceRecord, *, keep_first: bool = False) -> StoreOutcome:
        """Write one instance durably, then index it.

        Parameters
        ----------
        data
            The complete Part 10 file (preamble, meta, dataset as received).
        rec
            Its UIDs and provenance.
        keep_first
            On a duplicate SOP Instance UID keep the stored copy (``duplicate_policy = keep_first``);
            by default the later copy replaces it.

        Raises
        ------
        OSError
            The file could not be written (e.g. ENOSPC); nothing was indexed.
        SpoolError
            The index could not record it (e.g. SQLITE_FULL): a new file is removed again (a
            re-sent copy that replaced the indexed file of the same instance stays).
        """
        return self._store(lambda path: atomic_write(path, data, sync=self.fsync), len(data), rec, keep_first)

    def _store(self, write: Callable[[Path], None], size: int, rec: InstanceRecord,
               keep_first: bool) -> StoreOutcome:
        path = self.instance_path(rec.study_instance_uid, rec.series_instance_uid, rec.sop_instance_uid)
        existing = self._query(
            "SELECT path FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)
        )
        duplicate = bool(existing)
        if duplicate and keep_first:
            return StoreOutcome(path=self.root / existing[0][0], stored=False, duplicate=True, reopened=False)
        write(path)
        rel = str(path.relative_to(self.root))
        moved = duplicate and existing[0][0] != rel
        try:
            with self._tx() as db:
                _index_rows(db, rec, rel, size)
                row = db.execute(
                    "SELECT covered_until FROM studies WHERE study_instance_uid = ?",
                    (rec.study_instance_uid,),
                ).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at) VALUES (?,?,?)",
                        (rec.study_instance_uid, rec.received_at, rec.received_at),
                    )
                else:
                    db.execute(
                        "UPDATE studies SET last_received_at = MAX(last_received_at, ?) WHERE study_instance_uid = ?",
                        (rec.received_at, rec.study_instance_uid),
                    )
        except SpoolError:
            # The sender is answered a failure and will resend: leave no unindexed file behind.
            # A copy at the same path replaced the indexed bytes of the same instance: keep it.
            if not duplicate or moved:
                path.unlink(missing_ok=True)
            raise
        if moved:
            # Same SOP Instance UID under another study/series: the later copy wins. The old file
            # goes only now that the index points at the new one (before, a failed commit lost both).
            (self.root / existing[0][0]).unlink(missing_ok=True)
        processed = row is not None and row[0] is not None
        return StoreOutcome(path=path, stored=True, duplicate=duplicate, reopened=processed)

    def reconcile(self) -> dict[str, int]:
        """Start-up check: drop torn temp files, index files the index lost, requeue running work.

        Returns
        -------
        dict
            Counts: ``temp_removed``, ``reindexed``, ``unreadable``, ``jobs_requeued``.
        """
        counts = {"temp_removed": 0, "reindexed": 0, "unreadable": 0, "jobs_requeued": 0}
        known = {r[0] for r in self._query("SELECT path FROM instances")}
        studies = self.root / "studies"
        for dirpath, _dirs, files in os.walk(studies):
            for name in files:
                full = Path(dirpath) / name
                if name.endswith(TMP_SUFFIX):
                    full.unlink(missing_ok=True)
                    counts["temp_removed"] += 1
                    continue
                rel = str(full.relative_to(self.root))
                if rel in known:
                    continue
                try:
                    ds = dcmread(full, stop_before_pixels=True)
                    rec = InstanceRecord(
                        sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                        study_instance_uid=str(ds.StudyInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_aet="(reindexed)",
                        received_at=full.stat().st_mtime, modality=str(ds.get("Modality", "")),
                        series_number=str(ds.get("SeriesNumber", "")),
                        series_description=str(ds.get("SeriesDescription", "")),
                    )
                except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
                    log.error("spool_file_unreadable", path=rel, error=str(exc))
                    counts["unreadable"] += 1
                    continue
                self._index_existing(rec, rel, full.stat().st_size)
                counts["reindexed"] += 1
        for outbox_tmp in (self.root / "outbox").rglob(f"*{TMP_SUFFIX}"):
            outbox_tmp.unlink(missing_ok=True)
            counts["temp_removed"] += 1
        for arriving in self.incoming.iterdir() if self.incoming.is_dir() else ():
            arriving.unlink(missing_ok=True)  # data sets cut off by the last stop: never answered Success
            counts["temp_removed"] += 1
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = 'pending' WHERE state = 'running'")
            counts["jobs_requeued"] = cur.rowcount
        return counts

    def _index_existing(self, rec: InstanceRecord, rel: str, size: int) -> None:
        with self._tx() as db:
            _index_rows(db, rec, rel, size)
            db.execute(
                "INSERT INTO studies (study_instance_uid, first_received_at, last_received_at) VALUES (?,?,?)"
                " ON CONFLICT(study_instance_uid) DO UPDATE SET"
                " last_received_at = MAX(last_received_at, excluded.last_received_at)",
                (rec.study_instance_uid, rec.received_at, rec.received_at),
            )

    # -- assembly and jobs ---------------------------------------------------------------------

    def studies(self) -> list[StudyRow]:
        rows = self._query(
            "SELECT s.study_instance_uid, s.first_received_at, s.last_received_at, s.covered_until,"
            " EXISTS (SELECT 1 FROM jobs j WHERE j.study_instance_uid = s.study_instance_uid"
            "         AND j.state IN ('pending', 'running'))"
            " FROM studies s"
        )
        return [StudyRow(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def series_rows(self) -> list[SeriesRow]:
        """The series of every study still waiting for its (next) study job, for series-level completion."""
        rows = self._query(
            "SELECT se.series_instance_uid, se.study_instance_uid, MAX(i.received_at), se.covered_until"
            " FROM studies st JOIN series se ON se.study_instance_uid = st.study_instance_uid"
            " JOIN instances i ON i.series_instance_uid = se.series_instance_uid"
            " WHERE st.covered_until IS NULL OR st.last_received_at > st.covered_until"
            " GROUP BY se.series_instance_uid"
        )
        return [SeriesRow(r[0], r[1], r[2], r[3]) for r in rows]

    def enqueue(self, study_uid: str, covered_until: float, now: float,
                series: tuple[tuple[str, float], ...] = ()) -> int:
        """Create a pending job for *study_uid* covering instances received up to *covered_until*.

        With *series* ((series UID, its covered_until) pairs, series-level completion) the job
        processes only those series and the study itself stays waiting for its study job.
        """
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (study_instance_uid, state, covered_until, created_at, updated_at, series_uids)"
                " VALUES (?, 'pending', ?, ?, ?, ?)",
                (study_uid, covered_until, now, now, "\n".join(uid for uid, _ in series) if series else None),
            )
            if series:
                db.executemany("UPDATE series SET covered_until = ? WHERE series_instance_uid = ?",
                               [(until, uid) for uid, until in series])
            else:
                db.execute(
                    "UPDATE studies SET covered_until = ? WHERE study_instance_uid = ?", (covered_until, study_uid)
                )
                db.execute("UPDATE series SET covered_until = ? WHERE study_instance_uid = ?",
                           (covered_until, study_uid))
            return int(cur.lastrowid or 0)

    def claim_job(self, now: float) -> Job | None:
        """Take the oldest pending job, mark it running and count the attempt."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, study_instance_uid, attempts, covered_until, series_uids FROM jobs WHERE state = 'pending'"
                " ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                (now, row[0]),
            )
        return Job(id=row[0], study_instance_uid=row[1], state=JobState.RUNNING, attempts=row[2] + 1,
                   covered_until=row[3], series_uids=tuple(row[4].split("\n")) if row[4] else ())

    def finish_job(self, job_id: int, state: JobState, now: float, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, updated_at = ?, error = ? WHERE id = ?",
                       (str(state), now, error, job_id))

    def requeue_job(self, job_id: int, now: float, reason: str) -> None:
        """Put a running job back to pending without counting the attempt (stopping, or inference away)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'pending', attempts = MAX(attempts - 1, 0), updated_at = ?, error = ?"
                       " WHERE id = ? AND state = 'running'", (now, reason, job_id))

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT id, study_instance_uid, state, attempts, created_at, updated_at, error FROM jobs"
            " ORDER BY id DESC LIMIT ?", (limit,)
        )
        keys = ("id", "study_instance_uid", "state", "attempts", "created_at", "updated_at", "error")
        return [dict(zip(keys, r)) for r in rows]

    def series_files(self, study_uid: str) -> dict[str, list[Path]]:
        """Files of each series of a study, by SeriesInstanceUID."""
        out: dict[str, list[Path]] = {}
        for series_uid, rel in self._query(
            "SELECT series_instance_uid, path FROM instances WHERE study_instance_uid = ? ORDER BY path",
            (study_uid,),
        ):
            out.setdefault(series_uid, []).append(self.root / rel)
        return out

    def set_series_result(self, series_uid: str, label: str | None, reason: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET label = ?, reason = ? WHERE series_instance_uid = ?",
                       (label, reason, series_uid))

    # -- outbox --------------------------------------------------------------------------------

    def add_outbox(self, job_id: int, study_uid: str, source_series_uid: str, sop_uid: str, data: bytes,
                   destinations: list[str], now: float, *, key: RtStructKey | None = None) -> Path:
        """Write an RTSTRUCT durably and queue it for each destination (idempotent per SOP UID).

        With *key*, the RTSTRUCT is recorded as made from it in the same transaction as its outbox
        rows: a job that reruns after a crash finds it (:meth:`rtstructs_for`) and never makes a
        second one with another SOP Instance UID (issue 19 item 9).
        """
        path = self.root / "outbox" / str(job_id) / f"{safe_component(sop_uid)}.dcm"
        atomic_write(path, data, sync=self.fsync)
        rel = str(path.relative_to(self.root))
        with self._tx() as db:
            self._queue(db, job_id, study_uid, source_series_uid, sop_uid, rel, destinations, now)
            if key is not None:
                db.execute(
                    f"INSERT OR REPLACE INTO {_MADE_TABLES[key.kind]} VALUES (?,?,?,?,?,?,?,?,?)",
                    (key.source_series_uid, key.model, key.model_version, key.fingerprint, study_uid, sop_uid, rel,
                     job_id, now),
                )
        return path

    @staticmethod
    def _queue(db: sqlite3.Connection, job_id: int, study_uid: str, source_series_uid: str, sop_uid: str,
               rel: str, destinations: list[str], now: float) -> None:
        for dest in destinations:
            db.execute(
                "INSERT OR IGNORE INTO outbox (job_id, study_instance_uid, source_series_uid, sop_instance_uid,"
                " path, destination, state, next_try_at, created_at) VALUES (?,?,?,?,?,?,'pending',?,?)",
                (job_id, study_uid, source_series_uid, sop_uid, rel, dest, now, now),
            )

    def rtstructs_for(self, source_series_uid: str, fingerprint: str, kind: str = "rtstruct") -> list[RtStructRecord]:
        """RTSTRUCTs (or with *kind* ``"seg"``, SEGs) already made from exactly these instances of the series
        (any model), whose file exists."""
        rows = self._query(
            f"SELECT model, model_version, sop_instance_uid, path FROM {_MADE_TABLES[kind]}"
            " WHERE source_series_uid = ? AND fingerprint = ? ORDER BY created_at",
            (source_series_uid, fingerprint),
        )
        return [RtStructRecord(r[0], r[1], r[2], self.root / r[3]) for r in rows if (self.root / r[3]).is_file()]

    def requeue_rtstruct(self, job_id: int, study_uid: str, source_series_uid: str, rec: RtStructRecord,
                         destinations: list[str], now: float) -> None:
        """Queue an existing RTSTRUCT for any destination that does not have it yet (same SOP Instance UID)."""
        with self._tx() as db:
            self._queue(db, job_id, study_uid, source_series_uid, rec.sop_instance_uid,
                        str(rec.path.relative_to(self.root)), destinations, now)

    def due_outbox(self, now: float, destination: str | None = None, limit: int = 20) -> list[OutboxItem]:
        sql = ("SELECT id, job_id, study_instance_uid, source_series_uid, sop_instance_uid, path, destination,"
               " attempts, created_at FROM outbox WHERE state = 'pending' AND next_try_at <= ?")
        args: tuple[Any, ...] = (now,)
        if destination is not None:
            sql += " AND destination = ?"
            args += (destination,)
        rows = self._query(sql + " ORDER BY next_try_at, id LIMIT ?", args + (limit,))
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], self.root / r[5], r[6], r[7], r[8]) for r in rows]

    def next_outbox_time(self) -> float | None:
        row = self._query("SELECT MIN(next_try_at) FROM outbox WHERE state = 'pending'")
        return None if row[0][0] is None else float(row[0][0])

    def outbox_result(self, item_id: int, state: OutboxState, status: str, error: str | None,
                      now: float, next_try_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
                " next_try_at = ?, sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END WHERE id = ?",
                (str(state), status, error, next_try_at, str(state), now, item_id),
            )

    def pending_outbox(self) -> dict[str, int]:
        """RTSTRUCTs not yet acknowledged, per destination."""
        rows = self._query("SELECT destination, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY destination")
        return {str(r[0]): int(r[1]) for r in rows}

    def outbox(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT id, job_id, sop_instance_uid, destination, state, attempts, last_status, last_error,"
            " next_try_at, sent_at FROM outbox ORDER BY id DESC LIMIT ?", (limit,)
        )
        keys = ("id", "job_id", "sop_instance_uid", "destination", "state", "attempts", "last_status",
                "last_error", "next_try_at", "sent_at")
        return [dict(zip(keys, r)) for r in rows]

    # -- retention -----------------------------------------------------------------------------

    def expired_studies(self, now: float, days: float) -> list[str]:
        """Studies whose newest job is done, fully covered, and every RTSTRUCT of which was
        acknowledged more than *days* ago. Anything unsent, failed, waiting or running is kept."""
        cutoff = now - days * 86400
        rows = self._query(
            "SELECT s.study_instance_uid FROM studies s"
            " JOIN jobs j ON j.id = (SELECT MAX(id) FROM jobs WHERE study_instance_uid = s.study_instance_uid)"
            " WHERE j.state = 'done' AND j.updated_at < ? AND s.last_received_at <= s.covered_until"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_instance_uid = s.study_instance_uid"
            "                 AND (o.state != 'sent' OR o.sent_at >= ?))",
            (cutoff, cutoff),
        )
        return [r[0] for r in rows]

    def delete_study(self, study_uid: str) -> int:
        """Delete a study's files and rows (instances, series, jobs, outbox); returns files removed."""
        paths = [r[0] for r in self._query("SELECT path FROM instances WHERE study_instance_uid = ?", (study_uid,))]
        paths += [r[0] for r in self._query("SELECT DISTINCT path FROM outbox WHERE study_instance_uid = ?",
                                            (study_uid,))]
        # an RTSTRUCT or SEG no destination was sent (formats) has no outbox row, only its record
        paths += [r[0] for r in self._query("SELECT path FROM rtstructs WHERE study_instance_uid = ? UNION"
                                            " SELECT path FROM segs WHERE study_instance_uid = ?", (study_uid, study_uid))]
        paths = list(dict.fromkeys(paths))
        with self._tx() as db:
            for table in ("instances", "series", "outbox", "rtstructs", "segs", "jobs", "studies"):
                db.execute(f"DELETE FROM {table} WHERE study_instance_uid = ?", (study_uid,))  # noqa: S608
        removed = 0
        keep = {self.root, self.root / "studies", self.root / "outbox"}
        for rel in paths:
            full = self.root / rel
            if full.exists():
                full.unlink()
                removed += 1
            for parent in (full.parent, full.parent.parent):
                if parent not in keep and parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
        return removed

    # -- status --------------------------------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """Studies with their series, instance counts, labels and newest job state (for ``status``)."""
        studies: dict[str, dict[str, Any]] = {}
        for uid, first, last, covered, job_state, job_id, attempts, error in self._query(
            "SELECT s.study_instance_uid, s.first_received_at, s.last_received_at, s.covered_until,"
            " j.state, j.id, j.attempts, j.error FROM studies s"
            " LEFT JOIN jobs j ON j.id = (SELECT MAX(id) FROM jobs WHERE study_instance_uid = s.study_instance_uid)"
            " ORDER BY s.last_received_at"
        ):
            state = "waiting" if covered is None or last > covered else (job_state or "waiting")
            studies[uid] = {
                "study_instance_uid": uid, "first_received_at": first, "last_received_at": last,
                "state": state, "job_id": job_id, "attempts": attempts or 0, "error": error, "series": [],
            }
        for series_uid, study_uid, modality, number, desc, label, reason, n in self._query(
            "SELECT se.series_instance_uid, se.study_instance_uid, se.modality, se.series_number,"
            " se.series_description, se.label, se.reason, COUNT(i.sop_instance_uid) FROM series se"
            " LEFT JOIN instances i ON i.series_instance_uid = se.series_instance_uid"
            " GROUP BY se.series_instance_uid ORDER BY se.series_number"
        ):
            if study_uid in studies:
                studies[study_uid]["series"].append({
                    "series_instance_uid": series_uid, "modality": modality, "series_number": number,
                    "series_description": desc, "instances": n, "label": label, "reason": reason,
                })
        return list(studies.values())

    def instance_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM instances")[0][0])

    def state_counts(self) -> dict[str, dict[str, int]]:
        """Jobs by state and outbox items by ``destination/state`` (the status page and metrics)."""
        jobs = {str(s): int(n) for s, n in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        outbox = {f"{d}/{s}": int(n) for d, s, n in self._query(
            "SELECT destination, state, COUNT(*) FROM outbox GROUP BY destination, state")}
        return {"jobs": jobs, "outbox": outbox}

    def outbox_source(self, item_id: int) -> tuple[Path, str, str] | None:
        """An outbox item's RTSTRUCT file, study and source series UIDs (None if no such item)."""
        rows = self._query("SELECT path, study_instance_uid, source_series_uid FROM outbox WHERE id = ?", (item_id,))
        return (self.root / rows[0][0], str(rows[0][1]), str(rows[0][2])) if rows else None
