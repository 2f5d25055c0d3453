"""The sockmap data path: the kernel splices a forwarded connection's two
sockets; Python only hands off the bytes that arrived before the splice and
keeps the lifetimes (half-close, reset, close).

The pieces: SockmapPath here (the sockets' entry into the sockhash, the
choice between copy first, splice and copy, the periodic recheck);
forwarder/copy_first.py (a connection starts on the copy relay and moves
once it carried enough); forwarder/sockmap_relay.py (a spliced pair and
the ordered hand-off); forwarder/sockmap_maps.py (the maps, by fd).
"""

from __future__ import annotations

import enum
import select
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from meshagent import log
from meshagent.bpf import abi
from meshagent.forwarder.copy import CopyPath
from meshagent.forwarder.copy_first import UPGRADE_BYTES, UPGRADE_READS, CopiedPair, CopyFirst
from meshagent.forwarder.datapath import Connection, DataPath, Done
from meshagent.forwarder.sockmap_maps import SockmapMaps
from meshagent.forwarder.sockmap_relay import BLOCKED, SockmapRelay, Untracked
from meshagent.host.loop import Loop
from meshagent.host.sockets import socket_cookie
from meshagent.modes import DataPathMode
from meshagent.steering import AppSocket

SO_SNDBUFFORCE = 32

__all__ = ["BLOCKED", "UPGRADE_BYTES", "UPGRADE_READS", "Accepted", "CopyFirst", "SockmapPath",
           "SockmapRelay", "Start"]  # fmt: skip


class Start(enum.Enum):
    """How a connection the sockmap path accepted goes on at join()."""

    LATER = "later"  # on the copy relay first, moved once it carried enough (CopyFirst)
    SPLICE = "splice"  # the accepted socket is in the sockhash: splice once both are
    COPY = "copy"  # the accepted socket could not enter the sockhash: copy the pair


@dataclass(slots=True)
class Accepted:
    """What SockmapPath.accepted() hands join() and abandon()."""

    start: Start
    cookie: int = 0  # SPLICE: the accepted socket's, in the sockhash
    app: AppSocket | None = None  # the pod's own socket for sk_msg (LATER, SPLICE)


class SockmapPath(DataPath):
    """Owns the sockmap side: the cookies of its sockets, the batched map
    deletes, and the periodic recheck after a failed redirect. A pair that
    cannot be spliced (a socket no longer ESTABLISHED, a full peer map) is
    handed to the fallback path, never failed."""

    mode = DataPathMode.SOCKMAP

    def __init__(
        self, loop: Loop, maps: SockmapMaps, fallback: CopyPath, sndbuf: int = 0, msg: bool = False,
        copy_first: bool = True, wake: bool = True, replies: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(loop)
        self.maps = maps
        self.msg = msg  # use sk_msg where sock_ops gave the pod's socket
        self.replies = replies  # ... and a same-node server's replies into it (sk_msg.c)
        self.copy_first = copy_first  # start on copy, move after UPGRADE_READS/BYTES
        self.fallback = fallback
        self.sndbuf = sndbuf
        self.relays: set[SockmapRelay] = set()
        # Sockets in the sockhash whose pair the copy relay carries (the
        # verdict passes their bytes, and may have to drop one: _reset_lost).
        self.copied: dict[int, Connection] = {}
        self._failures_seen = 0
        self._lost_seen = 0
        self.last_refusal = ""  # why the sockhash last refused a socket
        # The verdict names sockets it held bytes back on (back-pressure).
        # One reader only: a path that does not read (the start self-test's,
        # maybe beside a running agent's during a takeover) rechecks its
        # pairs at every tick() instead.
        self.wake = wake
        if wake:
            loop.add(maps.wake_fd, select.EPOLLIN, self._woken)

    def _woken(self, _events: int) -> None:
        for cookie in self.maps.woken():
            side = self.maps.watched.get(cookie)
            if side is not None:
                side.relay.throttled(side)

    def _throttled(self, relay: SockmapRelay) -> None:
        self.stats.throttles += 1
        self.on_throttle(relay.owner)

    def enter(self, sock: socket.socket, deep: bool = True) -> int | None:
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

    def accepted(self, client: socket.socket, app: AppSocket | None = None) -> Accepted:
        app = app if self.msg else None
        if self.copy_first:
            return Accepted(Start.LATER, app=app)
        cookie = self.enter(client)
        if cookie is None:
            return Accepted(Start.COPY)
        return Accepted(Start.SPLICE, cookie, app)

    def replies_direct(self, state: Accepted) -> bool:
        return self.msg and self.replies and state.app is not None

    def selected(self, on: bool) -> None:
        self.maps.msg_on(on and self.msg)

    def abandon(self, state: Accepted) -> None:
        if state.start is Start.SPLICE:
            self.maps.forget(state.cookie)

    def join(self, client, upstream, state: Accepted, on_done: Done) -> Connection:
        if state.start is Start.LATER:
            return CopyFirst(self, client, upstream, state.app, self._counted(on_done))
        if state.start is Start.COPY:
            return self._copy(client, upstream, [], on_done)
        cookie = self.enter(upstream)
        if cookie is None:
            return self._copy(client, upstream, [state.cookie], on_done)
        relay = self.spliced(client, upstream, (state.cookie, cookie), state.app,
                             self._counted(on_done))  # fmt: skip
        try:
            relay.start()
        except OSError:  # the peer map is full even after a flush: copy this pair
            self.relays.discard(relay)
            self.stats.connections_active -= 1
            return self._copy(client, upstream, [state.cookie, cookie], on_done)
        return relay

    def spliced(self, client, upstream, cookies: tuple[int, int], app: AppSocket | None,
                on_done: Done) -> SockmapRelay:  # fmt: skip
        """A SockmapRelay for two sockets in the sockhash, not yet started;
        rechecked by tick() until it ends."""
        relay = SockmapRelay(self.loop, self.maps, client, cookies[0], upstream, cookies[1],
                             self._untrack(on_done), self._stalled, app,
                             self._throttled)  # fmt: skip
        relay.sndbuf = self.sndbuf
        self.relays.add(relay)
        return relay

    def _stalled(self, conn: Connection, detail: str) -> None:
        self.stats.stalls += 1
        self.on_stall(conn, detail)

    def _untrack(self, on_done: Done) -> Done:
        return Untracked(self.relays, on_done)

    def _copy(self, client, upstream, cookies: list[int], on_done: Done) -> CopiedPair:
        """Sockets left in the sockhash without a peer are fine: the verdict
        passes their bytes on, and their entries go once they are closed."""
        self.stats.fallbacks += 1

        relay = self.fallback.carry(CopiedPair, client, upstream,
                                    self._forgetting(cookies, on_done))  # fmt: skip
        relay.cookies = tuple(cookies)
        self.copying(relay, cookies)
        return relay

    def copying(self, pair: Connection, cookies: Iterable[int]) -> None:
        """The copy relay carries these sockets of the sockhash."""
        for cookie in cookies:
            self.copied[cookie] = pair

    def forget(self, cookies: Iterable[int]) -> None:
        """Sockets that entered the sockhash and are closed now."""
        for cookie in cookies:
            self.copied.pop(cookie, None)
            self.maps.forget(cookie)

    def _forgetting(self, cookies: list[int], on_done: Done) -> Done:
        def done(conn, reason) -> None:
            self.forget(cookies)
            on_done(conn, reason)

        return done

    def restore(self, client, upstream, state: dict, fds: list[int], blobs: list[bytes],
                on_done: Done) -> Connection:  # fmt: skip
        if state["kind"] == "relay":  # a pair this path copied
            cookies = state.get("cookies", [])
            self.maps.entered += len(cookies)
            pair = self.fallback.restore(client, upstream, state, fds, blobs,
                                         self._forgetting(cookies, on_done))  # fmt: skip
            self.copying(pair, cookies)
            return pair
        self.maps.entered += 2
        relay = SockmapRelay.restore(
            self.loop, self.maps, client, upstream, self._counted(self._untrack(on_done)),
            self._stalled, state, blobs, self._throttled,
        )  # fmt: skip
        relay.sndbuf = self.sndbuf
        if not relay.closed:
            self.relays.add(relay)
        return relay

    def map_entries(self) -> dict[str, int]:
        return {abi.SOCKHASH.name: self.maps.entered}

    def snapshot(self) -> dict:
        held = [relay.held for relay in self.relays if relay.throttling]
        return {**super().snapshot(), "msg": self.msg, "last_refusal": self.last_refusal,
                "budget_bytes": self.maps.budget, "throttled_connections": len(held),
                "held_bytes": sum(held), "handoff_bypasses": self.maps.bypasses,
                "disorders": dict(self.maps.disorders)}  # fmt: skip

    def tick(self) -> None:
        """Delete finished connections' entries; if a verdict redirect failed
        since the last look, recheck every spliced pair."""
        self.maps.flush()
        lost = self.maps.overlaps_lost()
        if lost != self._lost_seen:
            self._lost_seen = lost
            self._reset_lost()
        failures = self.maps.redirect_failures()
        if failures != self._failures_seen or not self.wake:
            self._failures_seen = failures
            for relay in list(self.relays):
                relay.recheck()

    def _reset_lost(self) -> None:
        """Reset the connections a segment of which the verdict dropped (its
        bytes already delivered could not be cut off; the verdict drops all
        that follows, so the pod saw a whole prefix): a reset, never a
        stream with a hole."""
        reason = ("sockmap: a retransmitted segment repeated bytes already delivered that"
                  " could not be cut off (on this kernel, or for want of memory)")  # fmt: skip
        for relay in list(self.relays):
            if any(self.maps.lost(side.cookie) for side in (relay.client, relay.upstream)):
                _said(reason, relay.client.sock, relay.upstream.sock)
                relay.reset(reason)
        for cookie, pair in list(self.copied.items()):
            if not pair.closed and self.maps.lost(cookie):
                _said(reason, pair.client, pair.upstream)
                pair.reset(reason)


def _said(reason: str, client: socket.socket, upstream: socket.socket) -> None:
    """Log a reset the pod will see, naming the connection (pod address and
    port, original destination)."""
    try:
        pod, dest = client.getpeername(), upstream.getpeername()
        where = f"{pod[0]}:{pod[1]} -> {dest[0]}:{dest[1]}"
    except OSError:
        where = "a closed connection"
    log.get().warning("connection reset", extra={"reason": f"{where}: {reason}"})
