"""The splice path: splice(2) through a pipe per direction (HAProxy's
splice mode); the Relay and its state machine are the copy path's."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket

from meshagent.forwarder.copy import CopyPath, Leg, Relay
from meshagent.modes import DataPathMode

F_SETPIPE_SZ = 1031
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class SpliceLeg(Leg):
    """One direction through a pipe with splice(2): the payload stays in the
    kernel; Python moves it in large chunks (HAProxy's splice mode)."""

    __slots__ = ("pipe_full", "pipe_r", "pipe_w", "queued")
    PIPE_SIZE = 1024 * 1024

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        super().__init__(src, dst)
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, self.PIPE_SIZE)
        except OSError:
            pass  # the default pipe size still works
        self.queued = 0  # bytes in the pipe
        self.pipe_full = False  # the last splice into it found no room

    def limit(self, buffer: int) -> None:
        """The pipe holds at most about buffer (budget.py): a smaller pipe
        where its bytes fit, and no read while buffer waits in it."""
        super().limit(buffer)
        with contextlib.suppress(OSError):  # EBUSY: what it holds does not fit yet
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, max(buffer, 4096))

    def wants_read(self) -> bool:
        return not self.eof and not self.pipe_full and self.queued < self.high

    @property
    def waiting(self) -> int:
        return self.queued

    def read(self) -> None:
        try:
            moved = self._splice_in()
        except BlockingIOError:
            # A readable socket and EAGAIN: the pipe is full, by its slots
            # (one per segment) long before its bytes. Stop reading until the
            # writer drains it, or epoll wakes us again at once, forever.
            self.pipe_full = self.queued > 0
            self.flush()
            return
        if moved == 0:
            self.eof = True
        else:
            self.nbytes += moved
            self.queued += moved
        self.flush()

    def _splice_in(self) -> int:
        """Bytes from the socket into the pipe; 0 at the end of the stream."""
        return os.splice(self.src.fileno(), self.pipe_w, self.most, flags=SPLICE_FLAGS)

    def flush(self) -> None:
        while self.queued:
            try:
                moved = os.splice(self.pipe_r, self.dst.fileno(), self.queued, flags=SPLICE_FLAGS)
            except BlockingIOError:
                break
            self.queued -= moved
            self.pipe_full = False
        self._maybe_shut()

    def export(self) -> tuple[dict, list[int], bytes]:
        """The bytes in flight stay in the pipe: it goes over by fd."""
        state = {"nbytes": self.nbytes, "eof": self.eof, "shut": self.shut,
                 "queued": self.queued, "pipe_full": self.pipe_full}  # fmt: skip
        return state, [self.pipe_r, self.pipe_w], b""

    def restore(self, state: dict, fds: list[int], data: bytes) -> None:
        self.close()  # the pipe made for it: the predecessor's, with its bytes, instead
        self.pipe_r, self.pipe_w = fds
        self.nbytes, self.eof, self.shut = state["nbytes"], state["eof"], state["shut"]
        self.queued, self.pipe_full = state["queued"], state["pipe_full"]

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class SplicePath(CopyPath):
    mode = DataPathMode.SPLICE
    leg = SpliceLeg
    fds_per_connection = 6  # two sockets and a pipe (two ends) per direction

    def restore(self, client, upstream, state: dict, fds: list[int], blobs: list[bytes],
                on_done) -> Relay:  # fmt: skip
        """A mesh hop in the kernel's TLS goes on with TLS's half-close."""
        from meshagent.mesh.ktls import TlsSpliceLeg, ulp

        leg = TlsSpliceLeg if ulp(upstream) == b"tls" else self.leg
        return Relay.restore(self.loop, client, upstream, self._counted(on_done), leg, self.mode,
                             state, fds, blobs)  # fmt: skip
