"""The userspace copy path: both directions of one forwarded connection.
The Relay here also carries the splice path (forwarder/splice.py).

Back-pressure: a direction stops reading when HIGH bytes wait for its peer
(less for a connection with a small buffer size: forwarder/budget.py).
Half-close is propagated with shutdown(SHUT_WR) once a direction's bytes are
all sent; an error or reset on one side resets the other (SO_LINGER 0).
Both sockets of a forwarded connection carry SO_LINGER {1,0} from the start
(forwarder/core.py): a close the forwarder did not decide (SIGKILL, the OOM
killer, a crash) reaches the peers as a reset, never as a FIN of a cut
stream. Only an orderly close clears it first (orderly_close).
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

from meshagent.forwarder.budget import kernel_holds, set_buffers
from meshagent.forwarder.datapath import DataPath, Done, Exported
from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode

CHUNK = 256 * 1024
# One receive buffer for the whole (single-threaded) loop: recv(n) would
# allocate, and for n above malloc's mmap threshold mmap and unmap, n bytes
# on every call, also on the many that return nothing.
_SCRATCH = memoryview(bytearray(CHUNK))


def recv_scratch(sock: socket.socket, most: int = CHUNK) -> memoryview | None:
    """Receive up to most bytes into the shared buffer: a view of the bytes
    (empty at EOF), valid until the next call; None when nothing is there
    (EAGAIN)."""
    try:
        got = sock.recv_into(_SCRATCH, most)
    except BlockingIOError:
        return None
    return _SCRATCH[:got]


HIGH = 1024 * 1024

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLL_BAD = select.EPOLLERR | select.EPOLLHUP

LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def linger_reset(sock: socket.socket) -> None:
    """From now on any close of sock, also the kernel's when this process
    dies, sends an RST (accepted sockets inherit it from their listener)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def _close_lingering(sock: socket.socket, linger: bytes) -> None:
    try:  # not contextlib.suppress: three calls fewer, twice per connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    except OSError:
        pass
    sock.close()


def writable_now(sock: socket.socket) -> int:
    """The socket's connect ended (connected or failed), asked without
    waiting: its poll events (POLLOUT alone: connected), 0 while it goes on."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


def orderly_close(sock: socket.socket) -> None:
    """Close with a FIN: the forwarder decided this end (linger_reset off)."""
    _close_lingering(sock, _LINGER_OFF)


def reset_close(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN."""
    _close_lingering(sock, LINGER_RESET)


class Leg:
    """One direction: bytes read from src, written to dst."""

    __slots__ = ("buf", "dst", "eof", "full", "high", "most", "nbytes", "shut", "src", "twin")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.buf = bytearray()
        self.eof = False
        self.shut = False
        self.nbytes = 0
        # The last read filled the buffer: it may have stopped inside a
        # segment (a short read ate every segment it touched).
        self.full = False
        self.twin: Leg | None = None  # the other direction, set by the Relay
        self.high = HIGH  # reading stops while this much waits
        self.most = CHUNK  # bytes one read takes at most

    def limit(self, buffer: int) -> None:
        """Hold at most about 2 * buffer (budget.py): read at most buffer at a
        time, and none while buffer waits."""
        self.high, self.most = min(HIGH, buffer), min(CHUNK, buffer)

    def wants_read(self) -> bool:
        return not self.eof and len(self.buf) < self.high

    @property
    def waiting(self) -> int:
        """Bytes read and not yet written on."""
        return len(self.buf)

    def close(self) -> None:
        pass

    # -- handed to a successor agent (agent/takeover.py) -------------------
    def export(self) -> tuple[dict, list[int], bytes]:
        """(state, fds, bytes read and not yet written)."""
        return {"nbytes": self.nbytes, "eof": self.eof, "shut": self.shut}, [], bytes(self.buf)

    def restore(self, state: dict, fds: list[int], data: bytes) -> None:
        self.nbytes, self.eof, self.shut = state["nbytes"], state["eof"], state["shut"]
        self.buf = bytearray(data)

    def read(self) -> None:
        try:  # recv_scratch(), inline: every event of every connection
            got = self.src.recv_into(_SCRATCH, self.most)
        except BlockingIOError:
            self.full = False
            return
        self.full = got == self.most
        if not got:
            self.eof = True
            self._maybe_shut()
            return
        self.nbytes += got
        data = _SCRATCH[:got]
        if self.buf:
            self.buf += data
            return
        try:
            sent = self.dst.send(data)
        except BlockingIOError:
            sent = 0
        if sent < got:
            self.buf += data[sent:]

    def flush(self) -> None:
        if self.buf:
            try:
                sent = self.dst.send(self.buf)
            except BlockingIOError:
                sent = 0
            del self.buf[:sent]
        self._maybe_shut()

    def _maybe_shut(self) -> None:
        """Pass the half-close on once everything read has been written."""
        if self.eof and not self.shut and not self.waiting:
            self.shut = True
            if self.twin is not None and self.twin.shut:
                return  # the last direction: the relay closes both next, close() sends the FIN
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class Relay:
    """Copies both ways between client and upstream until both are done,
    one Leg per direction (a Leg copies, a SpliceLeg splices)."""

    handoff_bytes = 0
    settled = True
    # Thousands live at once: no per-instance dict (memory per connection).
    __slots__ = ("back", "cfd", "client", "closed", "closed_by", "loop", "mode", "on_done",
                 "out", "ufd", "upstream")  # fmt: skip

    def __init__(
        self,
        loop: Loop,
        client: socket.socket,
        upstream: socket.socket,
        on_done: Done,
        leg: type[Leg] = Leg,
        mode: DataPathMode = DataPathMode.COPY,
    ) -> None:
        self.mode = mode
        self.closed_by: str | None = None  # "pod" or "upstream": whose FIN came first
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.on_done = on_done
        self.out = leg(client, upstream)  # pod -> destination
        self.back = leg(upstream, client)  # destination -> pod
        self.out.twin, self.back.twin = self.back, self.out
        self.closed = False
        self.cfd, self.ufd = client.fileno(), upstream.fileno()  # theirs while open
        for sock in (client, upstream):
            loop.add(sock.fileno(), self._mask(sock), self._handler(sock))

    def limit(self, buffer: int, sockets: bool = True) -> None:
        """Hold at most budget.cost(buffer) bytes, kernel and Python."""
        for sock in (self.client, self.upstream) if sockets else ():
            set_buffers(sock, buffer)
        self.out.limit(buffer)
        self.back.limit(buffer)

    def holds(self) -> int:
        """Bytes this connection holds now (the kernel's and its own)."""
        return (kernel_holds(self.client) + kernel_holds(self.upstream) + self.out.waiting
                + self.back.waiting)  # fmt: skip

    @property
    def bytes_out(self) -> int:
        return self.out.nbytes

    @property
    def bytes_in(self) -> int:
        return self.back.nbytes

    def _mask(self, sock: socket.socket) -> int:
        reading = self.out if sock is self.client else self.back
        writing = self.back if sock is self.client else self.out
        mask = 0
        if reading.wants_read():
            mask |= EPOLLIN
        if writing.waiting:
            mask |= EPOLLOUT
        return mask

    def _handler(self, sock: socket.socket) -> Callable[[int], None]:
        reading = self.out if sock is self.client else self.back
        writing = self.back if sock is self.client else self.out

        def handle(events: int) -> None:
            if self.closed:
                return
            try:
                if events & (EPOLLIN | EPOLL_BAD) and reading.wants_read():
                    reading.read()
                    if reading.eof and self.closed_by is None:
                        self.closed_by = "pod" if sock is self.client else "upstream"
                if events & EPOLLOUT or writing.waiting:
                    writing.flush()
                if events & select.EPOLLERR:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "socket error")
                if events & select.EPOLLHUP and reading.eof:
                    # Closed both ways: nothing more can be delivered to it.
                    if writing.waiting:
                        raise ConnectionResetError("peer hung up with data pending")
                    writing.eof = writing.shut = True
                    reading.twin = None  # not a clean end: its own FIN goes by shutdown
            except BlockingIOError:
                pass
            except OSError as exc:
                self.abort(sock, exc)
                return
            self._update()

        return handle

    def _update(self) -> None:
        """After an event: end once both directions are done, else watch
        what each socket waits for (_mask, inline: every event)."""
        out, back = self.out, self.back
        if out.shut and back.shut:
            self.finish(None)
            return
        modify = self.loop.modify
        modify(self.cfd, (EPOLLIN if out.wants_read() else 0) | (EPOLLOUT if back.waiting else 0))
        modify(self.ufd, (EPOLLIN if back.wants_read() else 0) | (EPOLLOUT if out.waiting else 0))

    def abort(self, failed: socket.socket, exc: OSError) -> None:
        """An error on one side: reset the other side too."""
        side = "pod" if failed is self.client else "upstream"
        self.reset(f"{side} {type(exc).__name__}: {exc.strerror or exc}")

    def reset(self, reason: str) -> None:
        """End both sides with an RST: a peer must never take a cut stream
        for a complete one."""
        if self.closed:
            return
        self._unregister()
        reset_close(self.upstream)
        reset_close(self.client)
        self.closed = True
        self.on_done(self, reason)

    def finish(self, reason: str | None) -> None:
        self._unregister()
        orderly_close(self.client)
        orderly_close(self.upstream)
        self.closed = True
        self.on_done(self, reason)

    def _unregister(self) -> None:
        """Before both sockets are closed (closing takes them out of the
        epoll set: forget, not remove)."""
        for sock in (self.client, self.upstream):
            if sock.fileno() >= 0:
                self.loop.forget(sock.fileno())
        self.out.close()
        self.back.close()

    # -- handed to a successor agent (agent/takeover.py) -------------------
    def export(self) -> Exported:
        """(state, fds, byte blobs): the sockets, each direction's state and
        what it read and has not yet written (splice: its pipe, by fd)."""
        out_state, out_fds, out_data = self.out.export()
        back_state, back_fds, back_data = self.back.export()
        state = {"kind": "relay", "closed_by": self.closed_by, "out": out_state,
                 "back": back_state, "fds_out": len(out_fds)}  # fmt: skip
        fds = [self.client.fileno(), self.upstream.fileno(), *out_fds, *back_fds]
        return state, fds, [out_data, back_data]

    def suspend(self) -> None:
        """No more events here (a successor holds the sockets now)."""
        for sock in (self.client, self.upstream):
            self.loop.remove(sock.fileno())

    def resume(self) -> None:
        """The successor failed: carry on as before."""
        for sock in (self.client, self.upstream):
            self.loop.add(sock.fileno(), self._mask(sock), self._handler(sock))

    @classmethod
    def restore(
        cls, loop: Loop, client, upstream, on_done: Done, leg: type[Leg], mode: DataPathMode,
        state: dict, fds: list[int], blobs: list[bytes],
    ) -> Relay:  # fmt: skip
        """A relay taken over from a predecessor, where it left off."""
        relay = cls(loop, client, upstream, on_done, leg, mode)
        split = state["fds_out"]
        relay.out.restore(state["out"], fds[:split], blobs[0])
        relay.back.restore(state["back"], fds[split:], blobs[1])
        relay.closed_by = state["closed_by"]
        loop.call_later(0, relay._kick)  # no I/O until the loop runs (after the handover)
        return relay

    def _kick(self) -> None:
        """Write what a predecessor had read, pass a half-close on."""
        if self.closed:
            return
        try:
            self.out.flush()
            self.back.flush()
        except OSError as exc:
            self.abort(self.client, exc)
            return
        self._update()


R = TypeVar("R", bound=Relay)


class CopyPath(DataPath):
    mode = DataPathMode.COPY
    leg: type[Leg] = Leg

    def join(self, client, upstream, state, on_done: Done) -> Relay:
        return self.carry(Relay, client, upstream, on_done)

    def carry(self, relay: type[R], client, upstream, on_done: Done) -> R:
        """join(), by a Relay subclass of the caller's (the sockmap path's
        CopiedPair)."""
        return relay(self.loop, client, upstream, self._counted(on_done), self.leg, self.mode)

    def restore(self, client, upstream, state: dict, fds: list[int], blobs: list[bytes],
                on_done: Done) -> Relay:  # fmt: skip
        return Relay.restore(self.loop, client, upstream, self._counted(on_done), self.leg,
                             self.mode, state, fds, blobs)  # fmt: skip
