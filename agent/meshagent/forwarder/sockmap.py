"""The sockmap data path: the kernel splices a forwarded connection's two
sockets; Python only hands off the bytes that arrived before the splice and
keeps the lifetimes (half-close, reset, close).

The ordered hand-off (see bpf/skb_verdict.c and shared KERNEL-NOTES):
per socket S, X = bytes the verdict passed to S's own queue (BPF writes),
Y = bytes Python read from S and fully sent on (Python writes). The verdict
redirects only while its X-before-add equals Y, so bytes Python forwards
are never overtaken. Python drains S until X == Y, read after storing Y;
then the kernel carries the rest and Python watches S only for RDHUP/ERR.

With sk_msg (bpf/sk_msg.c), where sock_ops put the pod's own socket A into
mesh_apphash: A's sends go straight into the upstream socket's send queue,
in A's own context, once Python has sent on all A passed before (A's P
equals the accepted socket's Y). The accepted socket then has no peer:
whatever still reaches it, Python carries (it stays watched for EPOLLIN).
Replies are spliced upstream -> accepted socket as without sk_msg.

Short connections never pay for any of this: a connection starts on the
copy relay and moves to the sockmap (CopyFirst) only after UPGRADE_READS
reads or UPGRADE_BYTES bytes, before either side's EOF. A connection that
carries one request and one reply costs no map work at all. Before a
socket enters, Python reads it to a segment boundary: the kernel passes a
queued segment to the verdict whole, also one recv() has read part of, and
that part would be redirected a second time (measured on 6.18). Bytes
queued after that pass the verdict in order on the first recv() after the
insert. Bytes Python still holds at the move go on as the relay's pending
bytes, and Y stays BLOCKED (no redirect) until they are sent.
(Replies put straight into A's receive queue were faster, but a redirect
into a queue goes through the psock worker, and nothing tells Python when
the worker is done: A's FIN could overtake the last bytes. The 200-
connection digest test caught exactly that.)
"""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import struct
import termios
import time
from collections.abc import Callable

from meshagent.bpf import abi
from meshagent.forwarder.copy import Relay, recv_scratch, reset_close
from meshagent.forwarder.datapath import DataPath, Done
from meshagent.forwarder.sockmap_maps import SockmapMaps
from meshagent.host.loop import Loop, Timer
from meshagent.host.sockets import socket_cookie
from meshagent.modes import DataPathMode
from meshagent.redirect import AppSocket

SO_SNDBUFFORCE = 32
UPGRADE_READS = 32  # reads (both ways) before a connection moves to the sockmap
UPGRADE_BYTES = 64 * 1024  # or bytes, whichever comes first
DRAIN_READS = 16  # at most this many reads (4 MiB) to a segment boundary per try
BLOCKED = (1 << 64) - 1  # a Y no X can equal: bytes held before the move wait
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
RECHECK_FIRST = 0.0005
RECHECK_MAX = 0.05
STALL_SECONDS = 5.0


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
        "cookie",
        "eof",
        "fin_sent_on",
        "handed_off",
        "peer",
        "pending",
        "read_total",
        "registered",
        "relay",
        "sent_y",
        "sock",
        "y_base",
    )

    def __init__(self, sock: socket.socket, cookie: int, active: bool) -> None:
        self.sock = sock
        self.cookie = cookie
        self.active = active  # connect()ed by us: its bytes_acked counts a SYN
        self.peer: Side = self
        self.pending: bytes | bytearray = b""  # read from sock, not yet sent to peer
        self.registered = False  # in the loop's epoll
        self.relay: SockmapRelay | None = None
        self.read_total = 0
        self.sent_y = 0  # -1: BLOCKED stored (bytes held at the move not yet sent)
        self.y_base = 0  # added to Y in the map: bytes carried before the sockmap (sk_msg's P)
        self.handed_off = False
        self.eof = False  # sock's peer sent FIN
        self.fin_sent_on = False  # we shut down peer's write side for it

    def on_events(self, events: int) -> None:
        """The loop's handler for this socket (a bound method: no closure)."""
        self.relay._on_events(self, events)

    @property
    def y_stored(self) -> bool:
        """A Y entry exists in the map for this socket."""
        return self.sent_y != 0 or self.y_base > 0

    def data_received(self) -> int:
        return tcp_counts(self.sock)[1] - (1 if self.eof else 0)

    def data_sent(self) -> int:
        acked = tcp_counts(self.sock)[0] - (1 if self.active else 0)
        return acked + unsent(self.sock)


class SockmapRelay:
    """Both sockets are already in the sockhash (X = Y = 0 made first)."""

    mode = DataPathMode.SOCKMAP
    # Thousands live at once: no per-instance dict (memory per connection).
    __slots__ = ("_final", "app", "backoff", "client", "closed", "closed_by", "loop", "maps",
                 "on_done", "on_stall", "progress_at", "stalled", "timer",
                 "upstream")  # fmt: skip

    def __init__(
        self,
        loop: Loop,
        maps: SockmapMaps,
        client: socket.socket,
        client_cookie: int,
        upstream: socket.socket,
        upstream_cookie: int,
        on_done: Done,
        on_stall: Callable[[SockmapRelay], None],
        app: AppSocket | None = None,
    ) -> None:
        self.loop = loop
        self.app = app  # the sk_msg path: the pod's own socket
        self.maps = maps
        self.client = Side(client, client_cookie, active=False)
        self.upstream = Side(upstream, upstream_cookie, active=True)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.client.relay = self.upstream.relay = self
        self.on_done = on_done
        self.on_stall = on_stall
        self.closed = False
        self._final = (0, 0)
        self.timer: Timer | None = None
        self.backoff = RECHECK_FIRST
        self.progress_at = time.monotonic()
        self.stalled = False
        self.closed_by: str | None = None  # "pod" or "upstream": whose FIN came first

    def _eof(self, side: Side) -> None:
        side.eof = True
        if self.closed_by is None:
            self.closed_by = "pod" if side is self.client else "upstream"

    def start(self) -> None:
        """Set the peers (the kernel may redirect from now on) and begin.
        Raises OSError when the peer map is full even after a flush: the
        caller then copies this pair in userspace."""
        for side in (self.client, self.upstream):
            if side.pending:  # held at the move: no redirect before they are sent
                side.sent_y = -1
                self.maps.store_y(side.cookie, BLOCKED)
        if self.app is not None:
            if self.client.y_base and not self.client.pending:
                # before any target: P counted what Python carried
                self.maps.store_y(self.client.cookie, self.client.y_base)
            self.maps.set_msg(self.client.cookie, self.upstream.cookie, *self.app)
        else:
            self.maps.set_peers(self.client.cookie, self.upstream.cookie)
        for side in (self.client, self.upstream):
            self._register(side)
        self._progress()

    @property
    def bytes_out(self) -> int:
        if self.closed:
            return self._final[0]
        if self.app is None:
            return self._bytes(self.client)
        try:  # A's redirected sends never pass the accepted socket
            fin = 1 if self.client.fin_sent_on else 0
            return max(0, self.upstream.data_sent() - fin)
        except OSError:
            return 0

    @property
    def bytes_in(self) -> int:
        return self._bytes(self.upstream) if not self.closed else self._final[1]

    @staticmethod
    def _bytes(side: Side) -> int:
        try:
            return side.data_received()
        except OSError:
            return 0

    @property
    def handoff_bytes(self) -> int:
        """Bytes Python carried during the hand-off, both directions."""
        return self.client.read_total + self.upstream.read_total

    # -- events ------------------------------------------------------------
    def _mask(self, side: Side) -> int:
        mask = 0
        if (not side.handed_off or self._carries(side)) and not side.pending:
            mask |= EPOLLIN
        if side.peer.pending:
            mask |= EPOLLOUT
        if not side.eof:
            mask |= EPOLLRDHUP
        return mask

    def _carries(self, side: Side) -> bool:
        """With sk_msg, the accepted socket has no peer: Python carries
        whatever reaches it, so it stays watched for EPOLLIN."""
        return self.app is not None and side is self.client

    def _register(self, side: Side) -> None:
        self.loop.add(side.sock.fileno(), self._mask(side), side.on_events)
        side.registered = True

    def _on_events(self, side: Side, events: int) -> None:
        if self.closed:
            return
        if events & EPOLLERR:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.abort(side, OSError(err, "socket error"))
            return
        if events & EPOLLHUP and not side.peer.fin_sent_on:
            # Closed both ways though we never shut its write side: a reset.
            # Its error may be gone already: a pod's redirected sendmsg
            # (sk_msg) that met the reset took it (sock_error clears it).
            self.abort(side, ConnectionResetError(errno.ECONNRESET, "reset by peer"))
            return
        if events & EPOLLIN:
            side.handed_off = False  # bytes Python must carry (sk_msg: the accepted socket)
        if events & EPOLLRDHUP:
            self._eof(side)
        if events & EPOLLHUP:
            self._eof(side)
            # Closed both ways: level-triggered HUP would spin; timers finish it.
            self._unregister(side)
        self._progress()

    def _unregister(self, side: Side) -> None:
        if side.registered:
            side.registered = False
            self.loop.remove(side.sock.fileno())

    # -- the state machine -------------------------------------------------
    def _progress(self) -> None:
        if self.closed:
            return
        try:
            waiting = False
            for side in (self.client, self.upstream):
                if not side.handed_off:
                    waiting |= self._drain(side)
                if side.eof and side.handed_off and not side.fin_sent_on:
                    waiting |= not self._forward_fin(side)
        except OSError as exc:
            self.abort(self.client, exc)
            return
        if self.client.fin_sent_on and self.upstream.fin_sent_on:
            self.finish(None)
            return
        for side in (self.client, self.upstream):
            if side.registered:
                self.loop.modify(side.sock.fileno(), self._mask(side))
        if waiting:
            self._recheck_later()
        else:
            self.backoff = RECHECK_FIRST

    def _drain(self, side: Side) -> bool:
        """Forward what the verdict passed to side's queue. True while the
        hand-off is incomplete and nothing but time will move it on.

        recv() comes before the X == Y test: bytes queued before the socket
        entered the sockhash only pass through the verdict on the first
        recv() after it (measured on 6.x), so X alone cannot see them."""
        while True:
            if side.pending:
                try:
                    sent = side.peer.sock.send(side.pending)
                except BlockingIOError:
                    return False  # EPOLLOUT on the peer wakes us
                del side.pending[:sent]
                if side.pending:
                    return False
                side.pending = b""
            if side.sent_y != side.read_total:
                self._store_y(side)
            data = recv_scratch(side.sock)
            if data:
                side.read_total += len(data)
                if not side.pending:
                    side.pending = bytearray()  # made only when bytes wait
                side.pending += data
                self.progress_at = time.monotonic()
                continue
            if data is not None:  # EOF (an empty view)
                self._eof(side)
            if self.maps.x(side.cookie) == side.sent_y:
                side.handed_off = True  # X == Y, read after the Y store
                self.progress_at = time.monotonic()
                return False
            return self._waiting(side)  # a claim in flight: X briefly > Y

    def _store_y(self, side: Side) -> None:
        blocked = side.sent_y < 0
        side.sent_y = side.read_total  # all read was fully sent on
        y = side.sent_y + side.y_base
        if y or not blocked:
            self.maps.store_y(side.cookie, y)
        else:  # BLOCKED, and nothing read since the move: a missing Y reads as 0
            self.maps.clear_y(side.cookie)

    def _waiting(self, side: Side) -> bool:
        if not self.stalled and time.monotonic() - self.progress_at > STALL_SECONDS:
            self.stalled = True
            self.on_stall(self)
        return True

    def _forward_fin(self, side: Side) -> bool:
        """Propagate side's EOF once its peer has sent all side received."""
        peer = side.peer
        if peer.data_sent() < side.data_received():
            return False
        side.fin_sent_on = True
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return True

    def _recheck_later(self) -> None:
        if self.timer is not None and not self.timer.cancelled:
            return

        def fire() -> None:
            self.timer = None
            self._progress()

        self.timer = self.loop.call_later(self.backoff, fire)
        self.backoff = min(self.backoff * 2, RECHECK_MAX)

    def recheck(self) -> None:
        """Called by the forwarder's sweep when a redirect failed somewhere:
        a kept claim means bytes wait in a queue Python must read."""
        for side in (self.client, self.upstream):
            if side.handed_off and self.maps.x(side.cookie) != side.sent_y:
                side.handed_off = False
        self._progress()

    # -- handed to a successor agent (agent/takeover.py) -------------------
    SIDE_STATE = ("cookie", "active", "read_total", "sent_y", "handed_off", "eof", "fin_sent_on",
                  "y_base")  # fmt: skip

    def export(self) -> tuple[dict, list[int], list[bytes]]:
        """The kernel keeps splicing meanwhile: only the hand-off's state
        and the bytes Python holds go over."""
        state = {
            "kind": "sockmap",
            "closed_by": self.closed_by,
            "app": [self.app.key.hex(), self.app.cookie] if self.app is not None else None,
            "client": {k: getattr(self.client, k) for k in self.SIDE_STATE},
            "upstream": {k: getattr(self.upstream, k) for k in self.SIDE_STATE},
        }
        fds = [self.client.sock.fileno(), self.upstream.sock.fileno()]
        return state, fds, [bytes(self.client.pending), bytes(self.upstream.pending)]

    def suspend(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for side in (self.client, self.upstream):
            self.loop.remove(side.sock.fileno())

    def resume(self) -> None:
        for side in (self.client, self.upstream):
            if side.registered:
                self.loop.add(side.sock.fileno(), self._mask(side), side.on_events)
        self._progress()

    @classmethod
    def restore(
        cls, loop: Loop, maps: SockmapMaps, client, upstream, on_done: Done,
        on_stall: Callable[[SockmapRelay], None], state: dict, blobs: list[bytes],
    ) -> SockmapRelay:  # fmt: skip
        """A pair taken over: both sockets are in the (pinned) sockhash and
        their peers are set; pick the hand-off up where it was."""
        app = state.get("app")
        relay = cls(loop, maps, client, state["client"]["cookie"], upstream,
                    state["upstream"]["cookie"], on_done, on_stall,
                    AppSocket(bytes.fromhex(app[0]), app[1]) if app else None)  # fmt: skip
        for side, saved, pending in ((relay.client, state["client"], blobs[0]),
                                     (relay.upstream, state["upstream"], blobs[1])):  # fmt: skip
            for key in cls.SIDE_STATE:
                setattr(side, key, saved.get(key, 0))
            side.pending = bytearray(pending) if pending else b""
        relay.closed_by = state["closed_by"]
        for side in (relay.client, relay.upstream):
            relay._register(side)
        loop.call_later(0, relay._progress)  # no I/O until the loop runs (after the handover)
        return relay

    # -- endings -----------------------------------------------------------
    def _cleanup(self) -> None:
        self._final = (self._bytes(self.client), self._bytes(self.upstream))
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for side in (self.client, self.upstream):
            self._unregister(side)

    def abort(self, failed: Side, exc: OSError) -> None:
        """An error on one side: reset both, remove the map entries."""
        which = "pod" if failed is self.client else "upstream"
        self.reset(f"{which} {type(exc).__name__}: {exc.strerror or exc}")

    def reset(self, reason: str) -> None:
        """End both sides with an RST (the kernel may still hold spliced
        bytes in flight: a clean FIN would pass a cut stream for a whole one)."""
        if self.closed:
            return
        self._cleanup()
        for side in (self.client, self.upstream):
            reset_close(side.sock)
            self.maps.forget(side.cookie, y_stored=side.y_stored)
        self.on_done(self, reason)

    def finish(self, reason: str | None) -> None:
        if self.closed:
            return
        self._cleanup()
        for side in (self.client, self.upstream):
            side.sock.close()  # leaves the sockhash with the socket
            self.maps.forget(side.cookie, y_stored=side.y_stored)
        self.on_done(self, reason)


class CopyFirst:
    """A sockmap connection that starts on the copy relay and moves to the
    sockmap once it has carried enough to be worth the map work (a short
    connection never does). The forwarder holds this object for the whole
    life of the connection; after the move it passes everything to the
    SockmapRelay."""

    __slots__ = ("app", "client", "copy", "inner", "on_done", "path", "reads", "upstream")

    def __init__(self, path: SockmapPath, client, upstream, app: AppSocket | None,
                 on_done: Done) -> None:  # fmt: skip
        self.path, self.client, self.upstream, self.app = path, client, upstream, app
        self.on_done = on_done
        self.inner: SockmapRelay | Relay | None = None
        self.reads = 0
        self.copy = _CopyPhase(self, path.loop, client, upstream, self._copied)

    @property
    def now(self):
        return self.inner if self.inner is not None else self.copy

    @property
    def mode(self) -> DataPathMode:
        """sockmap, unless a socket would not enter and it stayed on copy."""
        return DataPathMode.COPY if self.inner is self.copy else DataPathMode.SOCKMAP

    closed = property(lambda self: self.now.closed)
    closed_by = property(lambda self: self.now.closed_by)
    bytes_out = property(lambda self: self.now.bytes_out)
    bytes_in = property(lambda self: self.now.bytes_in)
    handoff_bytes = property(lambda self: self.now.handoff_bytes)

    def finish(self, reason: str | None) -> None:
        self.now.finish(reason)

    def reset(self, reason: str) -> None:
        self.now.reset(reason)

    def export(self):
        return self.now.export()

    def suspend(self) -> None:
        self.now.suspend()

    def resume(self) -> None:
        self.now.resume()

    def _copied(self, conn, reason: str | None) -> None:
        self.on_done(self, reason)

    def worth_moving(self) -> bool:
        """After a copy-phase event: carried enough to move, and no EOF yet?"""
        copy = self.copy
        if self.inner is not None or copy.closed or copy.out.eof or copy.back.eof:
            return False
        return self.reads >= UPGRADE_READS or copy.out.nbytes + copy.back.nbytes >= UPGRADE_BYTES

    def _to_boundary(self) -> bool:
        """Read each socket whose last read filled the buffer until a short
        one: that read ate every segment it touched, so all queued from now
        on is whole. The bytes go on as copied bytes (sent or held). False
        when a read met EOF or an error, or DRAIN_READS did not reach it."""
        copy = self.copy
        for leg, sock in ((copy.out, self.client), (copy.back, self.upstream)):
            for _ in range(DRAIN_READS):
                if not leg.full or leg.eof:
                    break
                try:
                    leg.read()
                except OSError as exc:
                    copy.abort(sock, exc)
                    return False
            if leg.full or leg.eof:
                return False
        return True

    def move(self) -> None:
        """Off the copy relay, into the sockhash, on as a SockmapRelay that
        first sends what copy still held. If a socket will not enter (no
        longer ESTABLISHED), stay on copy."""
        path, copy = self.path, self.copy
        copy.suspend()
        if not self._to_boundary():
            if not copy.closed:  # EOF, or still not at a boundary: copy goes on
                copy.resume()
                Relay._update(copy)
            return
        cookies = []
        for sock in (self.client, self.upstream):
            # With sk_msg nothing reaches the upstream's egress through the
            # psock worker: its send buffer can stay the kernel's.
            deep = self.app is None or sock is self.client
            cookie = path._enter(sock, deep)
            if cookie is None:
                break
            cookies.append(cookie)
        if len(cookies) < 2:  # entered ones pass everything on: copy goes on
            path.stats.fallbacks += 1
            copy.cookies = tuple(cookies)
            self.inner = copy
            copy.resume()
            return
        relay = SockmapRelay(path.loop, path.maps, self.client, cookies[0], self.upstream,
                             cookies[1], _Untracked(path.relays, self._copied), path._stalled,
                             self.app)  # fmt: skip
        relay.client.pending = copy.out.buf or b""  # read from the pod, not yet sent on
        relay.upstream.pending = copy.back.buf or b""
        if self.app is not None:  # P counts from A's start: so must its Y
            relay.client.y_base = copy.out.nbytes  # what copy read (sent or held)
        self.inner = relay
        path.relays.add(relay)
        try:
            relay.start()
        except OSError as exc:  # the peer map is full even after a flush
            relay.reset(f"sockmap: {exc.strerror or exc}")


class _CopyPhase(Relay):
    """The copy relay of a CopyFirst: counts reads and asks to move."""

    __slots__ = ("owner",)

    def __init__(self, owner: CopyFirst, loop, client, upstream, on_done: Done) -> None:
        self.owner = owner
        super().__init__(loop, client, upstream, on_done)

    def _update(self) -> None:
        self.owner.reads += 1
        super()._update()
        if self.owner.worth_moving():
            self.owner.move()

    def finish(self, reason: str | None) -> None:
        super().finish(reason)
        self.owner.path._forget_all(self.cookies)

    def reset(self, reason: str) -> None:
        if not self.closed:
            self.owner.path._forget_all(self.cookies)
        super().reset(reason)


class SockmapPath(DataPath):
    """Owns the sockmap side: the cookies of its sockets, the batched map
    deletes, and the periodic recheck after a failed redirect. A pair that
    cannot be spliced (a socket no longer ESTABLISHED, a full peer map) is
    handed to the fallback path, never failed."""

    mode = DataPathMode.SOCKMAP

    def __init__(
        self, loop: Loop, maps: SockmapMaps, fallback: DataPath, sndbuf: int = 0, msg: bool = False,
        copy_first: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(loop)
        self.maps = maps
        self.msg = msg  # use sk_msg where sock_ops gave the pod's socket
        self.copy_first = copy_first  # start on copy, move after UPGRADE_READS/BYTES
        self.fallback = fallback
        self.sndbuf = sndbuf
        self.relays: set[SockmapRelay] = set()
        self._failures_seen = 0
        self.last_refusal = ""  # why the sockhash last refused a socket

    def _enter(self, sock: socket.socket, deep: bool = True) -> int | None:
        """Into the sockhash before anything reads from it; None if it cannot.
        deep: the psock worker may send to it (its send buffer is raised)."""
        cookie = socket_cookie(sock)
        if self.sndbuf and deep:
            # The kernel's redirect sends from a worker that, when the send
            # buffer is full, retries only a jiffy later: a deep send buffer
            # keeps it from stalling (bulk throughput 0.4x -> ~0.85x direct).
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self.sndbuf)
        try:
            self.maps.insert(sock, cookie)
        except OSError as exc:
            self.last_refusal = exc.strerror or str(exc)
            return None
        return cookie

    def accepted(self, client: socket.socket, app: AppSocket | None = None):
        if self.copy_first:
            return _Later(app if self.msg else None)
        cookie = self._enter(client)
        if app is not None and self.msg and cookie is not None:
            return (cookie, app)
        return cookie

    def selected(self, on: bool) -> None:
        self.maps.msg_on(on and self.msg)

    def abandon(self, state) -> None:
        if isinstance(state, _Later):
            return
        cookie, _app = state if isinstance(state, tuple) else (state, None)
        if cookie is not None:
            self.maps.forget(cookie)

    def join(self, client, upstream, state, on_done: Done):
        if isinstance(state, _Later):
            return CopyFirst(self, client, upstream, state.app, self._counted(on_done))
        state, app = state if isinstance(state, tuple) else (state, None)
        cookies = [state]
        if state is not None:
            cookies.append(self._enter(upstream))
        if None in cookies:
            return self._copy(client, upstream, cookies, on_done)
        relay = SockmapRelay(
            self.loop, self.maps, client, cookies[0], upstream, cookies[1],
            self._counted(self._untrack(on_done)), self._stalled, app,
        )  # fmt: skip
        try:
            self.relays.add(relay)
            relay.start()
        except OSError:  # the peer map is full even after a flush: copy this pair
            self.relays.discard(relay)
            self.stats.connections_active -= 1
            return self._copy(client, upstream, cookies, on_done)
        return relay

    def _stalled(self, relay: SockmapRelay) -> None:
        self.stats.stalls += 1
        self.on_stall(relay)

    def _untrack(self, on_done: Done) -> Done:
        return _Untracked(self.relays, on_done)

    def _copy(self, client, upstream, cookies: list[int | None], on_done: Done):
        """Sockets left in the sockhash without a peer are fine: the verdict
        passes their bytes on, and their entries go once they are closed."""
        self.stats.fallbacks += 1

        relay = self.fallback.join(client, upstream, None, self._forgetting(cookies, on_done))
        relay.cookies = tuple(c for c in cookies if c is not None)
        return relay

    def _forget_all(self, cookies) -> None:
        for cookie in cookies:
            self.maps.forget(cookie)

    def _forgetting(self, cookies, on_done: Done) -> Done:
        def done(conn, reason) -> None:
            for cookie in cookies:
                if cookie is not None:
                    self.maps.forget(cookie)
            on_done(conn, reason)

        return done

    def restore(self, client, upstream, state: dict, fds: list[int], blobs: list[bytes],
                on_done: Done):  # fmt: skip
        if state["kind"] == "relay":  # a pair this path copied
            cookies = state.get("cookies", [])
            self.maps.entered += len(cookies)
            return self.fallback.restore(client, upstream, state, fds, blobs,
                                         self._forgetting(cookies, on_done))  # fmt: skip
        self.maps.entered += 2
        relay = SockmapRelay.restore(
            self.loop, self.maps, client, upstream, self._counted(self._untrack(on_done)),
            self._stalled, state, blobs,
        )  # fmt: skip
        if not relay.closed:
            self.relays.add(relay)
        return relay

    def map_entries(self) -> dict[str, int]:
        return {abi.SOCKHASH.name: self.maps.entered}

    def snapshot(self) -> dict:
        return {**super().snapshot(), "msg": self.msg, "last_refusal": self.last_refusal}

    def tick(self) -> None:
        """Delete finished connections' entries; if a verdict redirect failed
        since the last look, recheck every spliced pair."""
        self.maps.flush()
        failures = self.maps.redirect_failures()
        if failures != self._failures_seen:
            self._failures_seen = failures
            for relay in list(self.relays):
                relay.recheck()


class _Later:
    """What accepted() hands join() for a connection that starts on copy."""

    __slots__ = ("app",)

    def __init__(self, app: AppSocket | None) -> None:
        self.app = app


class _Untracked:
    """A finished pair leaves the path's set, then its end passes on (two
    slots per connection, smaller than a closure)."""

    __slots__ = ("relays", "then")

    def __init__(self, relays: set, then: Done) -> None:
        self.relays, self.then = relays, then

    def __call__(self, relay, reason: str | None) -> None:
        self.relays.discard(relay)
        self.then(relay, reason)
