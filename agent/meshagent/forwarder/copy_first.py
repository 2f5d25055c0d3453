"""Copy first: short connections never pay for the sockmap.

A sockmap connection starts on the copy relay and moves to the sockmap
(a SockmapRelay) only after UPGRADE_READS reads or UPGRADE_BYTES bytes,
before either side's EOF. A connection that carries one request and one
reply costs no map work at all. Before a socket enters, Python reads it to
a segment boundary: the kernel passes a queued segment to the verdict
whole, also one recv() has read part of, and that part would be redirected
a second time (measured on 6.18). Bytes queued after that pass the verdict
in order on the first recv() after the insert. Bytes Python still holds at
the move go on as the relay's pending bytes, and Y stays BLOCKED (no
redirect) until they are sent.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Protocol

from meshagent.forwarder.copy import Relay
from meshagent.forwarder.datapath import Connection, DataPathStats, Done, Exported
from meshagent.forwarder.sockmap_relay import SockmapRelay
from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode
from meshagent.steering import AppSocket


class SplicingPath(Protocol):
    """What a CopyFirst needs of its path (sockmap.SockmapPath)."""

    loop: Loop
    stats: DataPathStats

    def enter(self, sock: socket.socket, deep: bool = True) -> int | None: ...

    def spliced(self, client, upstream, cookies: tuple[int, int], app: AppSocket | None,
                on_done: Done) -> SockmapRelay: ...  # fmt: skip

    def forget(self, cookies: Iterable[int]) -> None: ...

    def copying(self, pair: Connection, cookies: Iterable[int]) -> None: ...


UPGRADE_READS = 32  # reads (both ways) before a connection moves to the sockmap
UPGRADE_BYTES = 64 * 1024  # or bytes, whichever comes first
DRAIN_READS = 16  # at most this many reads (4 MiB) to a segment boundary per try


class CopyFirst:
    """A sockmap connection that starts on the copy relay and moves to the
    sockmap once it has carried enough to be worth the map work (a short
    connection never does). The forwarder holds this object for the whole
    life of the connection; after the move it passes everything to the
    SockmapRelay."""

    __slots__ = ("app", "buffer", "client", "copy", "inner", "now", "on_done", "path", "reads",
                 "upstream")  # fmt: skip

    def __init__(self, path: SplicingPath, client, upstream, app: AppSocket | None,
                 on_done: Done) -> None:  # fmt: skip
        self.path, self.client, self.upstream, self.app = path, client, upstream, app
        self.on_done = on_done
        self.inner: SockmapRelay | Relay | None = None
        self.reads = 0
        self.buffer = 0  # the forwarder's limit (budget.py), for the relay it moves to
        self.copy = _CopyPhase(self, path.loop, client, upstream, self._copied)
        # What carries it now: inner once it moved, else copy (a slot, not a
        # property: the forwarder asks it several times per connection).
        self.now: Connection = self.copy

    @property
    def settled(self) -> bool:
        """It moved (or a socket would not enter and it stays on copy)."""
        return self.inner is not None

    @property
    def mode(self) -> DataPathMode:
        """sockmap, unless a socket would not enter and it stayed on copy."""
        return DataPathMode.COPY if self.inner is self.copy else DataPathMode.SOCKMAP

    closed = property(lambda self: self.now.closed)
    closed_by = property(lambda self: self.now.closed_by)
    bytes_out = property(lambda self: self.now.bytes_out)
    bytes_in = property(lambda self: self.now.bytes_in)
    handoff_bytes = property(lambda self: self.now.handoff_bytes)

    def limit(self, buffer: int, sockets: bool = True) -> None:
        self.buffer = buffer
        self.now.limit(buffer, sockets)

    def holds(self) -> int:
        return self.now.holds()

    def finish(self, reason: str | None) -> None:
        self.now.finish(reason)

    def reset(self, reason: str) -> None:
        self.now.reset(reason)

    def export(self) -> Exported:
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
                copy.rearm()
            return
        cookies = []
        for sock in (self.client, self.upstream):
            # With sk_msg nothing reaches the upstream's egress through the
            # psock worker: its send buffer can stay the kernel's.
            cookie = path.enter(sock, deep=self.app is None or sock is self.client)
            if cookie is None:
                break
            cookies.append(cookie)
        if len(cookies) < 2:  # entered ones pass everything on: copy goes on
            path.stats.fallbacks += 1
            copy.cookies = tuple(cookies)
            path.copying(copy, cookies)
            self.inner = self.now = copy
            copy.resume()
            return
        relay = path.spliced(self.client, self.upstream, (cookies[0], cookies[1]), self.app,
                             self._copied)  # fmt: skip
        relay.client.pending = copy.out.buf or b""  # read from the pod, not yet sent on
        relay.upstream.pending = copy.back.buf or b""
        if self.app is not None:  # P counts from A's start: so must its Y
            relay.client.y_base = copy.out.nbytes  # what copy read (sent or held)
        relay.owner = self
        self.inner = self.now = relay
        if self.buffer:  # enter() gave the sockets the path's own send buffer
            relay.limit(self.buffer)
        try:
            relay.start()
        except OSError as exc:  # the peer map is full even after a flush
            relay.reset(f"sockmap: {exc.strerror or exc}")


class CopiedPair(Relay):
    """A sockmap pair the copy relay carries: the cookies of its sockets
    that entered the sockhash go with it to a successor (export)."""

    __slots__ = ("cookies",)

    def __init__(self, *args, **kwargs) -> None:  # Relay's
        self.cookies: tuple[int, ...] = ()
        super().__init__(*args, **kwargs)

    def export(self) -> Exported:
        state, fds, blobs = super().export()
        state["cookies"] = list(self.cookies)
        return state, fds, blobs


class _CopyPhase(CopiedPair):
    """The copy relay of a CopyFirst: counts reads and asks to move."""

    __slots__ = ("owner",)

    def __init__(self, owner: CopyFirst, loop, client, upstream, on_done: Done) -> None:
        self.owner = owner
        super().__init__(loop, client, upstream, on_done)

    def _update(self) -> None:
        owner = self.owner
        owner.reads += 1
        CopiedPair._update(self)  # rearm(), one call fewer: every event
        if owner.worth_moving():
            owner.move()

    def rearm(self) -> None:
        """What the copy relay does after an event (end once both
        directions are done, else watch what each socket waits for), with
        no read counted and no move: after a move that could not happen."""
        super()._update()

    def finish(self, reason: str | None) -> None:
        super().finish(reason)
        self.owner.path.forget(self.cookies)

    def reset(self, reason: str) -> None:
        if not self.closed:
            self.owner.path.forget(self.cookies)
        super().reset(reason)
