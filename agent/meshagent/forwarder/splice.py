"""The splice path: splice(2) through a pipe per direction (HAProxy's
splice mode); the Relay and its state machine are the copy path's."""

from __future__ import annotations

import contextlib
import errno
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


SOL_TLS = 282
TCP_ULP = 31
TLS_SET_RECORD_TYPE, TLS_GET_RECORD_TYPE = 1, 2  # cmsg types at SOL_TLS
ALERT = 21  # the record type
CLOSE_NOTIFY = b"\x01\x00"  # warning, close_notify


class TlsSpliceLeg(SpliceLeg):
    """A SpliceLeg to or from a socket whose TLS the kernel does, with TLS's
    own half-close, as the OpenSSL hop (hop.py) has it: a close_notify alert
    before our FIN; the peer's FIN without its close_notify is a cut
    stream, and resets the other side. splice(2) stops at a record that is
    not data (EINVAL); recvmsg then reads it with its type."""

    __slots__ = ("notified", "notify_sent", "tls_dst", "tls_src")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        super().__init__(src, dst)
        self.tls_src = ulp(src) == b"tls"
        self.tls_dst = ulp(dst) == b"tls"
        self.notified = False  # the peer's close_notify came
        self.notify_sent = False  # ours went

    def _splice_in(self) -> int:
        if not self.tls_src:
            return super()._splice_in()
        try:
            moved = super()._splice_in()
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            moved = None
        if moved is None:  # a record that is not data
            data, ancdata, _flags, _addr = self.src.recvmsg(64, socket.CMSG_SPACE(1))
            kind = next((d[0] for lvl, typ, d in ancdata
                         if lvl == SOL_TLS and typ == TLS_GET_RECORD_TYPE and d), None)  # fmt: skip
            if kind == ALERT and data[:2] == CLOSE_NOTIFY:
                self.notified = True
                return 0
            raise ConnectionResetError(
                errno.ECONNRESET, f"the peer sent a TLS record of type {kind} ({data[:2].hex()})"
            )
        if moved == 0 and not self.notified:
            raise ConnectionResetError(
                errno.ECONNRESET, "the peer's stream ended without close_notify"
            )
        return moved

    def _maybe_shut(self) -> None:
        if self.tls_dst and self.eof and not self.waiting and not self.shut:
            # One small record into a send buffer just drained: a second at
            # most, rather than a half-close the peer would take for a cut.
            with contextlib.suppress(OSError):
                self.dst.settimeout(1.0)
                try:
                    self.dst.sendmsg(
                        [CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([ALERT]))]
                    )
                    self.notify_sent = True
                finally:
                    self.dst.setblocking(False)
        super()._maybe_shut()

    def export(self) -> tuple[dict, list[int], bytes]:
        state, fds, data = super().export()
        return {**state, "notified": self.notified, "notify_sent": self.notify_sent}, fds, data

    def restore(self, state: dict, fds: list[int], data: bytes) -> None:
        super().restore(state, fds, data)
        self.notified = bool(state.get("notified"))
        self.notify_sent = bool(state.get("notify_sent"))


def ulp(sock: socket.socket) -> bytes:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16).rstrip(b"\0")
    except OSError:
        return b""


class SplicePath(CopyPath):
    mode = DataPathMode.SPLICE
    leg = SpliceLeg
    fds_per_connection = 6  # two sockets and a pipe (two ends) per direction

    def restore(self, client, upstream, state: dict, fds: list[int], blobs: list[bytes],
                on_done) -> Relay:  # fmt: skip
        """A mesh hop in the kernel's TLS goes on with TLS's half-close."""
        leg = TlsSpliceLeg if ulp(upstream) == b"tls" else self.leg
        return Relay.restore(self.loop, client, upstream, self._counted(on_done), leg, self.mode,
                             state, fds, blobs)  # fmt: skip
