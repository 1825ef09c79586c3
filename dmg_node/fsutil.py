"""Durable file writes: temp file in the target folder, fsync, rename, fsync the folder.

A reader (or a restarted node) sees either the old file or the complete new one, never a torn
one; after :func:`atomic_write` returns, the bytes survive a power cut (POSIX rename + fsync).
"""

from __future__ import annotations

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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
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
