"""atomic_write: complete files or nothing, through O_TMPFILE where the file system has it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from dmg_node.fsutil import TMP_SUFFIX, atomic_write


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_new_and_replaced_files_have_the_bytes_and_mode(tmp_path: Path, where: str) -> None:
    """A new file and a replaced one hold exactly the bytes written, mode 0640, and nothing else
    is left in the folder (tmpfs and the test's own file system)."""
    if where != "tmp_path" and not Path(where).is_dir():
        pytest.skip(f"{where} does not exist on this machine")
    base = tmp_path if where == "tmp_path" else Path(where) / f"dmg-fsutil-{os.getpid()}"
    try:
        target = base / "a" / "f.dcm"
        atomic_write(target, b"first")
        atomic_write(target, b"second, longer")
        assert target.read_bytes() == b"second, longer" and target.stat().st_mode & 0o777 == 0o640
        assert _entries(target.parent) == ["f.dcm"]
    finally:
        if where != "tmp_path":
            for p in sorted(base.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            base.rmdir()


def test_write_error_leaves_no_file_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC in the middle of the write raises and leaves neither the target nor a temp file."""
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "f.dcm", b"abc")
    monkeypatch.undo()
    assert _entries(tmp_path) == []


def test_without_o_tmpfile_a_part_file_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where open(O_TMPFILE) is refused (EOPNOTSUPP, or EISDIR on old kernels), the classic temp file
    + rename path writes the file; no temp file stays."""
    real_open = os.open
    seen: list[int] = []

    def no_tmpfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if hasattr(os, "O_TMPFILE") and flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    atomic_write(tmp_path / "f.dcm", b"classic")
    monkeypatch.undo()
    assert (tmp_path / "f.dcm").read_bytes() == b"classic"
    assert any(f & os.O_EXCL for f in seen) and not list(tmp_path.glob(f"*{TMP_SUFFIX}"))


def test_without_proc_the_unnamed_file_is_dropped_and_the_classic_path_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No /proc to link the unnamed file from: it is discarded and the temp file path is taken."""
    def no_proc(*args: Any, **kwargs: Any) -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/self/fd/3")

    monkeypatch.setattr(os, "link", no_proc)
    atomic_write(tmp_path / "f.dcm", b"fallback")
    monkeypatch.undo()
    assert (tmp_path / "f.dcm").read_bytes() == b"fallback" and _entries(tmp_path) == ["f.dcm"]
