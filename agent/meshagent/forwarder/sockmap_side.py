"""One socket of a spliced pair (forwarder/sockmap_relay.py), and what
tcp_info and SIOCOUTQ tell about it."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Protocol


class Pair(Protocol):
    """What a Side tells its pair (sockmap_relay.SockmapRelay)."""

    def on_events(self, side: Side, events: int) -> None: ...


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
        "cookie",
        "eof",
        "fin_sent_on",
        "handed_off",
        "out_blocked",
        "peer",
        "pending",
        "r_held",
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
        self.out_blocked = False  # the last send of pending to peer said EAGAIN
        self.r_held = -1  # R when Python read what it holds (no redirect may follow)

    def on_events(self, events: int) -> None:
        """The loop's handler for this socket (a bound method: no closure)."""
        self.relay.on_events(self, events)

    # -- handed to a successor agent (agent/takeover.py) -------------------
    STATE = ("cookie", "active", "read_total", "sent_y", "handed_off", "eof", "fin_sent_on",
             "y_base", "base", "throttled")  # fmt: skip

    def export(self) -> dict:
        """The hand-off's state (the bytes held go as a blob)."""
        return {key: getattr(self, key) for key in self.STATE}

    def restore(self, saved: dict, pending: bytes) -> None:
        for key in self.STATE:
            setattr(self, key, saved.get(key, -1 if key == "base" else 0))
        self.pending = bytearray(pending) if pending else b""

    @property
    def y_stored(self) -> bool:
        """A Y entry exists in the map for this socket."""
        return self.sent_y != 0 or self.y_base > 0

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
