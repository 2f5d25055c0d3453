"""A spliced pair: the kernel splices a forwarded connection's two sockets;
Python only hands off the bytes that arrived before the splice and keeps
the lifetimes (half-close, reset, close).

The ordered hand-off (see bpf/skb_verdict.c and shared KERNEL-NOTES):
per socket S, X = bytes the verdict passed to S's own queue (BPF writes),
Y = bytes Python read from S and fully sent on (Python writes). The verdict
redirects only while its X-before-add equals Y, so bytes Python forwards
are never overtaken. Python drains S until X == Y, read after storing Y;
then the kernel carries the rest and Python watches S only for RDHUP/ERR.

Back-pressure (bpf/skb_verdict.c, mesh_redir in bpf/include/maps.h): the
verdict redirects from a socket S only while the bytes on their way to its
peer T's other end stay under the budget; past it, it passes and names S in
mesh_wake (SockmapPath reads it and calls throttled()). Python then carries
S's passed bytes like any hand-off, but sends T nothing while T's psock
queue still holds redirected bytes (they would be overtaken); T's send
buffer (set near the budget, SockmapPath.enter) bounds what Python puts in
it, and Python holds at most one read, so S's receive queue fills and S's
window closes: the server's send blocks.

With sk_msg (bpf/sk_msg.c), where sock_ops put the pod's own socket A into
mesh_apphash: A's sends go straight into the upstream socket's send queue,
in A's own context, once Python has sent on all A passed before (A's P
equals the accepted socket's Y). The accepted socket then has no peer:
whatever still reaches it, Python carries (it stays watched for EPOLLIN).
Replies are spliced upstream -> accepted socket as without sk_msg.
(Replies put straight into A's receive queue were faster, but a redirect
into a queue goes through the psock worker, and nothing tells Python when
the worker is done: A's FIN could overtake the last bytes. The 200-
connection digest test caught exactly that.)
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Callable

from meshagent import log
from meshagent.forwarder.budget import SO_SNDBUFFORCE, kernel_holds, set_buffers
from meshagent.forwarder.copy import CHUNK, orderly_close, recv_scratch, reset_close
from meshagent.forwarder.datapath import Connection, Done, Exported
from meshagent.forwarder.sockmap_maps import SockmapMaps
from meshagent.forwarder.sockmap_side import Side, unsent
from meshagent.host.loop import Loop, Timer
from meshagent.modes import DataPathMode
from meshagent.steering import AppSocket

BLOCKED = (1 << 64) - 1  # a Y no X can equal: bytes held before the move wait
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
RECHECK_FIRST = 0.0005
RECHECK_MAX = 0.05
STALL_SECONDS = 5.0


class SockmapRelay:
    """Both sockets are already in the sockhash (X = Y = 0 made first)."""

    mode = DataPathMode.SOCKMAP
    settled = True
    # Thousands live at once: no per-instance dict (memory per connection).
    __slots__ = ("_final", "app", "backoff", "client", "closed", "closed_by", "loop", "maps",
                 "most", "on_done", "on_stall", "on_throttle", "owner", "progress_at",
                 "reply_key", "sndbuf", "stalled", "suspended", "timer", "upstream")  # fmt: skip

    def __init__(
        self,
        loop: Loop,
        maps: SockmapMaps,
        client: socket.socket,
        client_cookie: int,
        upstream: socket.socket,
        upstream_cookie: int,
        on_done: Done,
        on_stall: Callable[[Connection, str], None],
        app: AppSocket | None = None,
        on_throttle: Callable[[SockmapRelay], None] | None = None,
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
        self.on_throttle = on_throttle
        # The connection the forwarder knows this pair as: itself, or the
        # CopyFirst it moved out of (a stall is then logged with its pod).
        self.owner: Connection = self
        self.closed = False
        self.suspended = False  # handed to a successor (it may still come back)
        self._final = (0, 0)
        self.timer: Timer | None = None
        self.backoff = RECHECK_FIRST
        self.progress_at = time.monotonic()
        self.stalled = False
        self.closed_by: str | None = None  # "pod" or "upstream": whose FIN came first
        self.most = CHUNK  # bytes one hand-off read takes at most
        self.sndbuf = 0  # --sockmap-sndbuf (SockmapPath sets it): a smaller one stays
        # mesh_reply's key where the server's replies may go straight into
        # the pod's socket (sk_msg.c, mesh_reply_msg); None: they never do.
        self.reply_key: bytes | None = None

    def limit(self, buffer: int, sockets: bool = True) -> None:
        """Hold at most budget.cost(buffer): both sockets' buffers (the send
        buffer also bounds what the verdict redirects: mesh_over_budget) and
        the hand-off's reads. The buffers are set again even when they are
        already (sockets=False): entering the sockhash gave them the path's
        own send buffer."""
        for side in (self.client, self.upstream):
            set_buffers(side.sock, buffer)
            if self.sndbuf and 2 * self.sndbuf < buffer:  # the kernel doubles it
                side.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self.sndbuf)
        self.most = min(CHUNK, buffer)

    def holds(self) -> int:
        """Bytes this pair holds now: the kernel's (a redirected skb is its
        source socket's until sent) and the hand-off's."""
        return sum(kernel_holds(side.sock) + len(side.pending)
                   for side in (self.client, self.upstream))  # fmt: skip

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
        try:
            for side in self._redirecting():
                self._budget(side)
            if self.app is not None:
                if self.client.y_base and not self.client.pending:
                    # before any target: P counted what Python carried
                    self.maps.store_y(self.client.cookie, self.client.y_base)
                self.maps.set_msg(self.client.cookie, self.upstream.cookie, *self.app)
                self.reply_key = self.maps.set_reply(self.upstream.sock, self.app.cookie)
            else:
                self.maps.set_peers(self.client.cookie, self.upstream.cookie)
        except OSError:  # a map is full: no peer, no redirect, no budgets
            for side in self._redirecting():
                self.maps.clear_base(side.cookie)
                self.maps.watched.pop(side.cookie, None)
                side.base = -1
            raise
        for side in (self.client, self.upstream):
            self._register(side)
        self._progress()

    def _redirecting(self) -> tuple[Side, ...]:
        """The sockets the verdict redirects from: with sk_msg the accepted
        socket has no peer (Python carries what reaches it)."""
        return (self.upstream,) if self.app is not None else (self.client, self.upstream)

    def _budget(self, side: Side) -> None:
        """B for side, before its peer is set (R is 0): the verdict holds
        back what would take its peer's unacked bytes past the budget."""
        side.base = side.peer.stream()[1]
        self.maps.start_budget(side.cookie, side.base)
        self.maps.watched[side.cookie] = side

    def throttled(self, side: Side) -> None:
        """The verdict held bytes back on side (mesh_wake): carry them."""
        if self.closed or self.suspended or side.throttled:
            return
        side.throttled = True
        side.handed_off = False
        if self.on_throttle is not None:
            self.on_throttle(self)
        self._progress()

    def _in_order(self, side: Side) -> bool:
        """May Python send what it holds from side to side's peer now? Not
        while redirected bytes still wait in the peer's psock queue (R + B
        beyond what entered the peer's stream).

        Also checks the two facts the order rests on, and says when one
        fails (each a block that may arrive out of place, open under [L]):
        no redirect since Python read what it holds (R unchanged: the
        verdict redirects only once Python has sent all it read), and
        nothing in the peer's stream that neither the verdict redirected nor
        Python sent (the stream is not past R + B)."""
        redirected = self.maps.redirected(side.cookie)
        into = side.peer.stream()[1]
        if side.r_held >= 0 and redirected != side.r_held:
            self._disorder(side, "redirected_while_held",
                           f"R {side.r_held} when read, {redirected} now")  # fmt: skip
            side.r_held = redirected  # said once
        if redirected + side.base > into:
            return False
        if redirected + side.base < into:
            self._disorder(side, "stream_ahead",
                           f"R {redirected} + B {side.base} < {into} in the peer's stream")  # fmt: skip
            side.base = into - redirected  # said once
        return True

    def _disorder(self, side: Side, kind: str, detail: str) -> None:
        counts = self.maps.disorders
        counts[kind] = counts.get(kind, 0) + 1
        try:
            local, peer = side.sock.getsockname(), side.sock.getpeername()
            where = f"{local[0]}:{local[1]} <-> {peer[0]}:{peer[1]}"
        except OSError:
            where = "closed socket"
        log.get().warning(
            "sockmap: hand-off order check failed",
            extra={"reason": f"{kind}: {'pod' if side is self.client else 'upstream'} socket"
                   f" {where} (cookie {side.cookie}), read {side.read_total},"
                   f" sent on {max(side.sent_y, 0)}, holding {len(side.pending)}; {detail}"},
        )  # fmt: skip

    @property
    def throttling(self) -> bool:
        """The kernel holds bytes back on one of the sockets (back-pressure)."""
        return self.client.throttled or self.upstream.throttled

    @property
    def held(self) -> int:
        """Bytes the kernel held back that Python has not sent on yet."""
        total = 0
        for side in (self.client, self.upstream):
            if side.throttled:
                total += max(0, self.maps.x(side.cookie) - max(side.sent_y, 0))
        return total

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
        if self.closed:
            return self._final[1]
        ingress = self.maps.reply_ingress(self.reply_key) if self.reply_key else 0
        return self._bytes(self.upstream) + ingress

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
        if side.peer.pending and side.peer.out_blocked:
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

    def on_events(self, side: Side, events: int) -> None:
        """The loop's handler for side's socket (through Side.on_events)."""
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

    def _unregister(self, side: Side, closing: bool = False) -> None:
        """closing: the socket is closed next, which takes it out of the
        epoll set (forget, not remove)."""
        if side.registered:
            side.registered = False
            (self.loop.forget if closing else self.loop.remove)(side.sock.fileno())

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
                if side.base >= 0 and not self._in_order(side):
                    side.out_blocked = False
                    self._waiting_order(side)
                    return True  # the psock worker is on it: the timer rechecks
                try:
                    sent = side.peer.sock.send(side.pending)
                except BlockingIOError:
                    side.out_blocked = True
                    return False  # EPOLLOUT on the peer wakes us
                if side.base >= 0:
                    side.base += sent
                del side.pending[:sent]
                if side.pending:  # the peer's send buffer is full (it bounds what we carry)
                    side.out_blocked = True
                    return False  # EPOLLOUT on the peer wakes us
                side.out_blocked = False
                side.pending = b""
            if side.sent_y != side.read_total:
                self._store_y(side)
            data = recv_scratch(side.sock, self.most)
            if data:
                side.read_total += len(data)
                if not side.pending:
                    side.pending = bytearray()  # made only when bytes wait
                    if side.base >= 0:  # the verdict has no more to redirect before these
                        side.r_held = self.maps.redirected(side.cookie)
                side.pending += data
                self.progress_at = time.monotonic()
                continue
            if data is not None:  # EOF (an empty view)
                self._eof(side)
            x = self.maps.x(side.cookie)
            if x == side.sent_y:
                side.handed_off = True  # X == Y, read after the Y store
                side.throttled = False
                self.progress_at = time.monotonic()
                return False
            if x < side.sent_y and side.y_base == 0:
                self._bypassed(side, x)
            return self._waiting(side)  # a claim in flight: X briefly > Y

    def _bypassed(self, side: Side, x: int) -> None:
        """Python has read more from side than the verdict ever passed to it
        (X < Y): a byte reached recv() without the verdict. Counted, and said
        the 1st, 2nd, 4th, 8th... time: a suspect for the rare out-of-place
        block after a hold-back, open under [L]."""
        self.maps.bypasses += 1
        if self.maps.bypasses & (self.maps.bypasses - 1):
            return
        log.get().warning(
            "sockmap: read bytes the verdict never saw",
            extra={"reason": f"socket cookie {side.cookie}: read and sent {side.sent_y},"
                   f" passed {x}"},
        )  # fmt: skip

    def _store_y(self, side: Side) -> None:
        if side.base >= 0:  # B first: the Y lets the verdict redirect again
            self.maps.store_base(side.cookie, side.base)
        blocked = side.sent_y < 0
        side.sent_y = side.read_total  # all read was fully sent on
        y = side.sent_y + side.y_base
        if y or not blocked:
            self.maps.store_y(side.cookie, y)
        else:  # BLOCKED, and nothing read since the move: a missing Y reads as 0
            self.maps.clear_y(side.cookie)

    def _waiting(self, side: Side) -> bool:
        if not self.stalled and time.monotonic() - self.progress_at > STALL_SECONDS:
            self._stall(side, "passed bytes not yet readable")
        return True

    def _waiting_order(self, side: Side) -> None:
        """Python holds bytes that must follow redirected ones still on their
        way into the peer. A stall only when the peer's send queue is empty
        all the same (its reader is not the one holding them up)."""
        if self.stalled or time.monotonic() - self.progress_at <= STALL_SECONDS:
            return
        try:
            idle = unsent(side.peer.sock) == 0
        except OSError:
            return
        if idle:
            self._stall(side, "redirected bytes never reached the peer's stream")

    def _stall(self, side: Side, what: str) -> None:
        """Say once what this pair waits for, with the counts the hand-off
        rests on (a stall is a defect: its numbers say which)."""
        self.stalled = True
        maps = self.maps
        try:
            acked, into = side.peer.stream()
            stream = f"{into} ({into - acked} unacked)"
        except OSError:
            stream = "unknown (closed)"
        which = "pod" if side is self.client else "upstream"
        self.on_stall(self.owner, (
            f"{what}: {which} socket (cookie {side.cookie}) X {maps.x(side.cookie)}"
            f" Y {max(side.sent_y, 0) + side.y_base} R {maps.redirected(side.cookie)}"
            f" B {side.base}, its peer's stream {stream}, holding {len(side.pending)},"
            f" throttled {side.throttled}, for {time.monotonic() - self.progress_at:.1f} s"
        ))  # fmt: skip

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
    def export(self) -> Exported:
        """The kernel keeps splicing meanwhile: only the hand-off's state
        and the bytes Python holds go over."""
        state = {
            "kind": "sockmap",
            "closed_by": self.closed_by,
            "app": [self.app.key.hex(), self.app.cookie] if self.app is not None else None,
            # mesh_reply's key: the successor counts (and at the end drops)
            # the replies that go straight into the pod's socket.
            "reply_key": self.reply_key.hex() if self.reply_key is not None else None,
            "client": self.client.export(),
            "upstream": self.upstream.export(),
        }
        fds = [self.client.sock.fileno(), self.upstream.sock.fileno()]
        return state, fds, [bytes(self.client.pending), bytes(self.upstream.pending)]

    def suspend(self) -> None:
        self.suspended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for side in (self.client, self.upstream):
            self.loop.remove(side.sock.fileno())

    def resume(self) -> None:
        self.suspended = False
        for side in (self.client, self.upstream):
            if side.registered:
                self.loop.add(side.sock.fileno(), self._mask(side), side.on_events)
        self.recheck()  # a wake-up may have come while suspended

    @classmethod
    def restore(
        cls, loop: Loop, maps: SockmapMaps, client, upstream, on_done: Done,
        on_stall: Callable[[Connection, str], None], state: dict, blobs: list[bytes],
        on_throttle: Callable[[SockmapRelay], None] | None = None,
    ) -> SockmapRelay:  # fmt: skip
        """A pair taken over: both sockets are in the (pinned) sockhash and
        their peers are set; pick the hand-off up where it was."""
        app = state.get("app")
        relay = cls(loop, maps, client, state["client"]["cookie"], upstream,
                    state["upstream"]["cookie"], on_done, on_stall,
                    AppSocket(bytes.fromhex(app[0]), app[1]) if app else None,
                    on_throttle)  # fmt: skip
        for side, saved, pending in ((relay.client, state["client"], blobs[0]),
                                     (relay.upstream, state["upstream"], blobs[1])):  # fmt: skip
            side.restore(saved, pending)
        relay.closed_by = state["closed_by"]
        reply_key = state.get("reply_key")  # an older agent's: none
        relay.reply_key = bytes.fromhex(reply_key) if reply_key else None
        for side in relay._redirecting():
            # A pair from an agent without budgets stays without one: what
            # its psock queues hold is unknown, so B cannot be lined up.
            if side.base >= 0:
                maps.watched[side.cookie] = side
        for side in (relay.client, relay.upstream):
            relay._register(side)
        # No I/O until the loop runs (after the handover); a wake-up the old
        # agent read and left is found by the recheck.
        loop.call_later(0, relay.recheck)
        return relay

    # -- endings -----------------------------------------------------------
    def _cleanup(self) -> None:
        self._final = (self.bytes_out, self.bytes_in)
        if self.reply_key is not None:
            self.maps.reply_ingress(self.reply_key, self.app.cookie, forget=True)
            self.reply_key = None
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for side in (self.client, self.upstream):
            self._unregister(side, closing=True)
            self.maps.watched.pop(side.cookie, None)

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
            self.maps.forget(side.cookie, y_stored=side.y_stored, budgeted=side.base >= 0)
        self.on_done(self, reason)

    def finish(self, reason: str | None) -> None:
        if self.closed:
            return
        self._cleanup()
        for side in (self.client, self.upstream):
            orderly_close(side.sock)  # leaves the sockhash with the socket
            self.maps.forget(side.cookie, y_stored=side.y_stored, budgeted=side.base >= 0)
        self.on_done(self, reason)


class Untracked:
    """A finished pair leaves the path's set, then its end passes on (two
    slots per connection, smaller than a closure)."""

    __slots__ = ("relays", "then")

    def __init__(self, relays: set, then: Done) -> None:
        self.relays, self.then = relays, then

    def __call__(self, relay, reason: str | None) -> None:
        self.relays.discard(relay)
        self.then(relay, reason)
