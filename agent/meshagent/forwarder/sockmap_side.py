"""One socket of a spliced pair (forwarder/sockmap_relay.py), and what
tcp_info and SIOCOUTQ tell about it."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
from typing import Protocol


class Pair(Protocol):
    """What a Side tells its pair (sockmap_relay.SockmapRelay)."""

    def on_events(self, side: Side, events: int) -> None: ...


SO_RCVBUFFORCE = 33
SO_MEMINFO = 55
# The receive buffer a held-back socket shrinks to while Python carries
# (Side.narrow_window): below copy.CHUNK, so one peek takes all it holds.
NARROW_FLOOR = 128 * 1024


def tcp_counts(sock: socket.socket) -> tuple[int, int]:
    """(bytes_acked, bytes_received) from tcp_info; both count SYN/FIN."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
    return struct.unpack_from("=QQ", raw, 120)


def unsent(sock: socket.socket) -> int:
    """Bytes in the send queue not yet acked (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class Side:
    """One socket of the pair and the direction that reads from it."""

    __slots__ = (
        "active",
        "base",
        "behind",
        "cookie",
        "eof",
        "fin_sent_on",
        "handed_off",
        "out_blocked",
        "peer",
        "pending",
        "rcvbuf",
        "rcvbuf_now",
        "read_total",
        "registered",
        "relay",
        "sent_y",
        "sock",
        "throttled",
        "y_base",
    )

    def __init__(self, sock: socket.socket, cookie: int, active: bool) -> None:
        self.sock = sock
        self.cookie = cookie
        self.active = active  # connect()ed by us: its bytes_acked counts a SYN
        self.peer: Side = self
        self.pending: bytes | bytearray = b""  # read from sock, not yet sent to peer
        self.registered = False  # in the loop's epoll
        self.relay: Pair | None = None
        self.read_total = 0
        self.sent_y = 0  # -1: BLOCKED stored (bytes held at the move not yet sent)
        self.y_base = 0  # added to Y in the map: bytes carried before the sockmap (sk_msg's P)
        self.handed_off = False
        self.eof = False  # sock's peer sent FIN
        self.fin_sent_on = False  # we shut down peer's write side for it
        # Back-pressure (bpf/skb_verdict.c): B, the peer's stream length when
        # splicing began plus what Python sent it since; -1: no budget (the
        # verdict never redirects from this socket, or an old agent's pair).
        self.base = -1
        self.throttled = False  # the kernel held bytes back; Python carries them
        self.out_blocked = False  # the last send to peer was short (its buffer is full)
        self.behind = False  # the peer's psock queue holds redirected bytes ours would overtake
        self.rcvbuf = 0  # sock's SO_RCVBUF before a hold-back narrowed it (0: not narrowed)
        self.rcvbuf_now = 0

    def on_events(self, events: int) -> None:
        """The loop's handler for this socket (a bound method: no closure)."""
        self.relay.on_events(self, events)

    # -- handed to a successor agent (agent/takeover.py) -------------------
    STATE = ("cookie", "active", "read_total", "sent_y", "handed_off", "eof", "fin_sent_on",
             "y_base", "base", "throttled", "rcvbuf", "rcvbuf_now")  # fmt: skip

    def export(self) -> dict:
        """The hand-off's state (the bytes held go as a blob)."""
        return {key: getattr(self, key) for key in self.STATE}

    def restore(self, saved: dict, pending: bytes) -> None:
        for key in self.STATE:
            setattr(self, key, saved.get(key, -1 if key == "base" else 0))
        self.pending = bytearray(pending) if pending else b""

    @property
    def waits_for_peer(self) -> bool:
        """Bytes wait (in pending, or in sock's queue) until the peer can
        take them: no EPOLLIN meanwhile (it is level-triggered)."""
        return bool(self.pending) or self.out_blocked or self.behind

    @property
    def y_stored(self) -> bool:
        """A Y entry exists in the map for this socket."""
        return self.sent_y != 0 or self.y_base > 0

    def narrow_window(self) -> None:
        """A hold-back began, or Python is behind the writer in a hand-off
        (a peek came back full): from now on sock's receive buffer shrinks by
        the memory each take frees (shrink_window), so taking bytes does not
        reopen sock's window. Otherwise a writer that never pauses refills
        the queue as fast as Python empties it, the queue never empties, and
        splicing never resumes. The room left (buffer minus memory held)
        never shrinks, so whatever the window already offered still fits:
        nothing is dropped. (Shrinking by the bytes taken did drop: a
        partly read skb frees its memory only when it is all read.)"""
        if not self.rcvbuf:
            with contextlib.suppress(OSError):
                self.rcvbuf = self.rcvbuf_now = self.sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVBUF
                )

    def rmem(self) -> int:
        """The receive memory sock holds (SO_MEMINFO), passed skbs included."""
        return struct.unpack_from("I", self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[0]

    def shrink_window(self, freed: int) -> None:
        """A take during a hold-back freed `freed` bytes of receive memory."""
        if self.rcvbuf and freed > 0 and self.rcvbuf_now > NARROW_FLOOR:
            self.rcvbuf_now = max(NARROW_FLOOR, self.rcvbuf_now - freed)
            self._set_rcvbuf(self.rcvbuf_now)

    def widen_window(self, size: int) -> None:
        """Spliced again: sock's buffer goes to `size` (or stays larger), from now on fixed (a
        buffer set by hand is no longer grown by the kernel). A spliced
        socket's queue is empty, so the buffer only sets the window its
        writer may fill; but at the next hold-back all of that lands in the
        queue, and Python carries it: the smaller, the more the kernel
        carries of a transfer whose reader is slower than its writer."""
        if self.rcvbuf:
            # never below where narrowing got to: the window offered at that
            # size may still be filling, and less room would drop segments
            self._set_rcvbuf(max(size, self.rcvbuf_now))
            self.rcvbuf = self.rcvbuf_now = 0

    def _set_rcvbuf(self, size: int) -> None:
        with contextlib.suppress(OSError):  # the kernel doubles what it is given
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size // 2)

    def data_received(self) -> int:
        return tcp_counts(self.sock)[1] - (1 if self.eof else 0)

    def data_sent(self) -> int:
        acked = tcp_counts(self.sock)[0] - (1 if self.active else 0)
        return acked + unsent(self.sock)

    def stream(self) -> tuple[int, int]:
        """(bytes_acked as the kernel counts it, that plus the bytes queued
        unacked): what the verdict's budget compares with (no SYN/FIN fix-up:
        B absorbs it)."""
        for _ in range(8):  # an ACK between the two reads would make it short
            acked = tcp_counts(self.sock)[0]
            queued = unsent(self.sock)
            if tcp_counts(self.sock)[0] == acked:
                break
        return acked, acked + queued
