"""Durable file writes: an unnamed (or temp) file in the target folder, fsync, link (or rename)
into place, fsync the folder.

A reader (or a restarted node) sees either the old file or the complete new one, never a torn
one; after :func:`atomic_write` returns, the bytes survive a power cut (POSIX link/rename + fsync).
Where the file system supports it (Linux ``O_TMPFILE``: ext4, xfs, btrfs, tmpfs) the file has no
name until it is complete and synced, so a crash leaves nothing behind, and one folder entry is
written instead of two (create + rename): +5 % images/s for the SCP here (docs/benchmarks.md).
Elsewhere a ``.part`` temp file is created beside the target and renamed.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

TMP_SUFFIX = ".part"


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create *path* and missing parents, fsyncing each new entry's parent."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def atomic_write(path: Path, data: bytes | memoryview, *, sync: bool = True) -> None:
    """Write *data* to *path* atomically and (with *sync*) durably.

    Parameters
    ----------
    path
        Final file name; its folder is created if missing.
    data
        The bytes to write.
    sync
        fsync the file and the folder before returning (turn off only for scratch files).

    Raises
    ------
    OSError
        On any write error (e.g. ENOSPC); the temp file is removed and *path* is untouched.
    """
    ensure_dir(path.parent)
    if _write_unnamed(path, data, sync):
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# open(2) answers these when the file system has no O_TMPFILE.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}


def _write_unnamed(path: Path, data: bytes | memoryview, sync: bool) -> bool:
    """:func:`atomic_write` through an ``O_TMPFILE`` file linked in once synced (Linux, open(2)).

    Returns False, having written nothing, where the file system (or a missing ``/proc``) does
    not allow it; raises OSError on a real write error (the unnamed file then vanishes).
    """
    if not hasattr(os, "O_TMPFILE"):
        return False
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o640)
        except OSError as exc:
            if exc.errno in _NO_TMPFILE:
                return False
            raise
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
            source = f"/proc/self/fd/{fd}"
            try:
                # follow_symlinks with a dir fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW),
                # which links the open file itself rather than the /proc symlink.
                os.link(source, path.name, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=True)
            except FileExistsError:
                # Replacing an existing file: link under a temp name, then rename over it.
                tmp = f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
                os.link(source, tmp, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=True)
                try:
                    os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
                except BaseException:
                    os.unlink(tmp, dir_fd=folder)
                    raise
            except FileNotFoundError:
                return False  # no /proc: the unnamed file goes away when closed
        finally:
            os.close(fd)
        if sync:
            os.fsync(folder)
    finally:
        os.close(folder)
    return True
