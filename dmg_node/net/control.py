"""The control channel between the receive supervisor and one receive worker process.

A ``SOCK_SEQPACKET`` Unix socket pair: every message is one packet (no framing to get wrong), a
pickled tuple whose first item names it, optionally carrying file descriptors (``SCM_RIGHTS``: the
supervisor hands each accepted TCP connection to a worker this way). Both ends are our own
processes, started by the supervisor; nothing from the network is ever unpickled.
"""

from __future__ import annotations

import pickle
import socket
import threading
from typing import Any

#: The largest message (a pickled Settings is a few kB; a batch of metric events less).
MAX_MESSAGE = 1 << 20
#: File descriptors one message may carry.
MAX_FDS = 4


class ChannelClosed(Exception):
    """The other end has gone (exited, killed or closed its end)."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair: (supervisor's end, worker's end). The worker's end is inheritable."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


class Channel:
    """One end of the pair: :meth:`send` from any thread, :meth:`recv` from one thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: tuple[Any, ...], fds: tuple[int, ...] = ()) -> None:
        """Send *message* (and *fds*, duplicated into the receiver); ChannelClosed when the peer is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"control message {message[0]!r} is {len(data)} bytes; the limit is {MAX_MESSAGE}")
        try:
            with self._send_lock:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                else:
                    self.sock.sendall(data)
        except OSError as exc:  # EPIPE, ECONNRESET, EBADF after close
            raise ChannelClosed(str(exc)) from exc

    def recv(self) -> tuple[tuple[Any, ...], list[int]]:
        """The next message and the descriptors that came with it (the caller owns them)."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        if not data:
            for fd in fds:
                socket.close(fd)
            raise ChannelClosed("end of channel")
        message = pickle.loads(data)
        if not isinstance(message, tuple) or not message:
            raise ValueError(f"malformed control message: {type(message).__name__}")
        return message, fds

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
