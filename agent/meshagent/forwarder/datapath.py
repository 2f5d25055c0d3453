"""The data path interface: how the bytes of a forwarded connection move
once both sockets exist. copy, splice and sockmap implement it; the
forwarder and the self-test use only this interface.

For each connection the forwarder calls accepted() right after accept
(before anything reads from the socket: the sockmap path puts it into the
sockhash there), then join() once the upstream is connected, or
abandon() if it never was. join() returns a Connection; it may be one of
another path (a sockmap pair that cannot be spliced is copied).
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode

# What a connection hands a successor agent: (state, fds, byte blobs).
Exported = tuple[dict, list[int], list[bytes]]


@runtime_checkable
class Connection(Protocol):
    """One forwarded connection, whichever path carries it: all the
    forwarder, the handover (agent/takeover.py) and the self-test use."""

    @property
    def mode(self) -> DataPathMode: ...  # the path carrying it now

    @property
    def settled(self) -> bool: ...  # its path no longer changes (copy first: it moved)

    @property
    def closed(self) -> bool: ...

    @property
    def closed_by(self) -> str | None: ...  # "pod" or "upstream": whose FIN came first

    @property
    def bytes_out(self) -> int: ...  # pod -> destination

    @property
    def bytes_in(self) -> int: ...  # destination -> pod

    @property
    def handoff_bytes(self) -> int: ...  # sockmap: bytes Python carried

    def finish(self, reason: str | None) -> None: ...

    def reset(self, reason: str) -> None: ...  # both sides get an RST

    # -- the memory budget (forwarder/budget.py) ---------------------------
    # hold at most budget.cost(buffer); sockets=False: the sockets' buffers are
    # set already (at accept, before connect), only the path's own part is left
    def limit(self, buffer: int, sockets: bool = True) -> None: ...

    def holds(self) -> int: ...  # bytes it holds now, the kernel's and its own

    # -- handed to a successor agent (agent/takeover.py) -------------------
    def export(self) -> Exported: ...  # what the path's restore() takes back

    def suspend(self) -> None: ...  # no more events here (a successor holds it)

    def resume(self) -> None: ...  # the successor failed: carry on as before


Done = Callable[[Connection, "str | None"], None]


@dataclass
class DataPathStats:
    connections_total: int = 0  # finished connections carried by this path
    connections_active: int = 0
    bytes: int = 0  # both directions, finished connections
    handoff_bytes: int = 0  # sockmap: bytes Python carried before the kernel took over
    stalls: int = 0  # sockmap: hand-offs that made no progress for 5 s
    fallbacks: int = 0  # sockmap: pairs copied because a socket could not enter
    throttles: int = 0  # sockmap: times the kernel held bytes back (budget reached)

    def to_dict(self) -> dict:
        return asdict(self)


class DataPath(ABC):
    mode: ClassVar[DataPathMode]
    fds_per_connection: ClassVar[int] = 2  # the client and upstream sockets

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.stats = DataPathStats()
        self.on_stall: Callable[[Connection, str], None] = lambda _conn, _detail: None
        self.on_throttle: Callable[[Connection], None] = lambda _conn: None

    def accepted(self, client: socket.socket, app: Any = None) -> Any:
        """Called right after accept; what it returns goes to join()/abandon().
        app: the pod's own socket (steering.AppSocket) where sock_ops put it
        into mesh_apphash, else None."""
        return None

    def replies_direct(self, state: Any) -> bool:
        """May the server's replies on this connection go straight into the
        pod's socket (the sockmap path's sk_msg, maps.h mesh_reply)?"""
        return False

    def selected(self, on: bool) -> None:  # noqa: B027 (most paths keep nothing)
        """New connections now take this path (on) or another one (off)."""

    @abstractmethod
    def join(
        self, client: socket.socket, upstream: socket.socket, state: Any, on_done: Done
    ) -> Connection:
        """Carry the bytes both ways until both sides are done; on_done may
        run before this returns (a connection that ended at once)."""

    @abstractmethod
    def restore(
        self, client: socket.socket, upstream: socket.socket, state: dict, fds: list[int],
        blobs: list[bytes], on_done: Done,
    ) -> Connection:  # fmt: skip
        """A connection a predecessor agent handed over (its export())."""

    def abandon(self, state: Any) -> None:  # noqa: B027 (most paths keep nothing)
        """The upstream never connected: forget what accepted() made."""

    def tick(self) -> None:  # noqa: B027 (most paths have no upkeep)
        """Once a second, from the agent's loop."""

    def snapshot(self) -> dict:
        return self.stats.to_dict()

    def map_entries(self) -> dict[str, int]:
        """{BPF map name: entries} for maps only this path's bookkeeping can
        count cheaply (a sockhash has no batch lookup)."""
        return {}

    def _counted(self, on_done: Done) -> Done:
        """on_done, after this path's counters took the connection's end."""
        self.stats.connections_active += 1
        return Counted(self.stats, on_done)


class Counted:
    """Counts a connection's end in its path's stats, then passes it on (an
    object of two slots per connection, smaller than a closure)."""

    __slots__ = ("stats", "then")

    def __init__(self, stats: DataPathStats, then: Done) -> None:
        self.stats, self.then = stats, then

    def __call__(self, conn: Connection, reason: str | None) -> None:
        stats = self.stats
        stats.connections_active -= 1
        stats.connections_total += 1
        stats.bytes += conn.bytes_out + conn.bytes_in
        stats.handoff_bytes += conn.handoff_bytes
        self.then(conn, reason)
