"""A received C-STORE data set written to a spool temp file as its fragments arrive (PS3.8 E.2).

pynetdicom assembles a data set in a ``BytesIO`` up to its last fragment, so each association
could hold up to ``node.max_instance_mb`` (1024) in memory. pynetdicom's own remedy
(``_config.STORE_RECV_CHUNKED_DATASET``) is process-wide, writes every data set, small ones
included, to the system temp folder (another file system than the spool: a copy, not a rename),
flushes after each fragment and leaves the file behind when the association aborts.

This module keeps pynetdicom's hook (a message's ``_data_set_file``, which ``decode_msg`` writes
the data fragments to and ``message_to_primitive`` hands to the request as ``_dataset_file``)
and differs in what it writes and where: :mod:`dmg_node.net.dimse_guard` calls
:func:`spill` once a data set passes ``node.spool_in_memory_mb``; the file, in the spool's own
``incoming`` folder, starts with the Part 10 header built from the command set's UIDs (the SCP
refuses a data set whose UIDs differ), then the bytes received so far, then each fragment as it
arrives. The SCP reads the index attributes from the file, and :meth:`dmg_node.storage.spool.Spool.store_file`
fsyncs it and renames it into place. Whatever happens otherwise (a refusal, an abort half-way,
an association that ends first) :meth:`StreamedDataSet.discard` removes it, at the latest when
the object is collected; the spool clears ``incoming`` when it starts.
"""

from __future__ import annotations

import os
import uuid
import weakref
from io import BytesIO
from pathlib import Path
from typing import Any

from dmg_node.net.part10 import file_header

#: The temp files' suffix in ``storage.root/incoming``.
SUFFIX = ".incoming"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class StreamedDataSet:
    """A Part 10 file being written in the spool's ``incoming`` folder, header first.

    Has what pynetdicom's ``decode_msg`` calls on a ``_data_set_file``: ``write`` (one
    ``os.write`` per fragment, no buffering) and ``file.flush`` (nothing to flush).

    Attributes
    ----------
    path
        The temp file.
    header
        The preamble and File Meta group at its start (:func:`dmg_node.net.part10.file_header`).
    size
        Bytes written so far, header included.
    error
        The write error that ended it, if any (then the file is removed).
    """

    def __init__(self, folder: Path, header: bytes) -> None:
        self.path = folder / f"{uuid.uuid4().hex}{SUFFIX}"
        self.header = header
        self.size = 0
        #: the first write error; the file is gone then
        self.error: OSError | None = None
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        try:
            self._write(header)
        except BaseException:
            self.discard()
            raise

    @property
    def name(self) -> str:
        """The temp file's path (pynetdicom's storage service unlinks it after the handler)."""
        return str(self.path)

    @property
    def file(self) -> StreamedDataSet:
        return self

    def flush(self) -> None:
        """Nothing: every write went straight to the file."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append *data* (a fragment's value, without its message control header).

        A write error (a full disk) is kept in :attr:`error`, the file removed and later
        fragments dropped, so that the request can be answered 0xA700 when it is complete.
        """
        if self.error is None:
            try:
                self._write(data)
            except OSError as exc:
                self.error = exc
                self.discard()
        return len(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd is None:
            raise OSError("streamed data set already closed")
        view = memoryview(data)
        total = len(view)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += total

    def close(self) -> None:
        """Close the file; it stays until :meth:`discard` or a rename into the spool."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def data_set_offset(self) -> int:
        """Where the data set starts in the file (the header's length)."""
        return len(self.header)

    def discard(self) -> None:
        """Close and remove the temp file (nothing if it was renamed away already)."""
        self.close()
        self._finalizer()


def header_for(assoc: Any, message: Any, sop_class_uid: str | None, sop_instance_uid: str | None) -> bytes | None:
    """The Part 10 header for *message* (a C-STORE-RQ whose command set is complete), or None.

    None when a UID is missing or not ASCII or the presentation context is not accepted: the
    data set then stays in memory, as before (the request is refused anyway).
    """
    if sop_class_uid is None or sop_instance_uid is None:
        return None
    cx = getattr(assoc, "_accepted_cx", {}).get(message.context_id)
    if cx is None or not cx.transfer_syntax:
        return None
    try:
        return file_header(sop_class_uid, sop_instance_uid, str(cx.transfer_syntax[0]))
    except UnicodeEncodeError:
        return None


def spill(message: Any, folder: Path, header: bytes) -> StreamedDataSet:
    """Move *message*'s data set received so far into a new :class:`StreamedDataSet`.

    After this pynetdicom's ``decode_msg`` writes the next fragments to the file.

    Raises
    ------
    OSError
        The file could not be created or written (the data set then stays in memory).
    """
    streamed = StreamedDataSet(folder, header)
    try:
        with message.data_set.getbuffer() as received:
            streamed._write(received)
    except BaseException:
        streamed.discard()
        raise
    message.data_set = BytesIO()
    message._data_set_file = streamed
    message._data_set_path = streamed.path
    return streamed


def of_request(request: Any) -> StreamedDataSet | None:
    """The :class:`StreamedDataSet` a C-STORE request's data set went to, if any."""
    found = getattr(request, "_dataset_file", None)
    return found if isinstance(found, StreamedDataSet) else None
