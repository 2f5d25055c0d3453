"""What the forwarder keeps per pod and per connection."""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from meshagent.forwarder.datapath import DataPath
from meshagent.host.loop import Timer
from meshagent.steering import Steering


@dataclass
class PodStats:
    connections_total: int = 0
    connections_active: int = 0
    bytes_out: int = 0  # pod -> destination
    bytes_in: int = 0  # destination -> pod
    no_orig_dst: int = 0
    refused_loopback: int = 0  # a direct connection to the listener (would loop)
    paused: int = 0  # times the forwarder had no room for its new connections
    fds_in_use: int = 0  # held by its forwarded connections (its share: Forwarder._no_room)
    memory_reserved: int = 0  # bytes its connections may hold (forwarder/budget.py)
    upstream_errors: int = 0
    resets: int = 0
    inbound_total: int = 0  # hops taken from other nodes' pods (mesh/node.py)
    denied_policy: int = 0  # connections a policy refused (forwarder, hop inbound)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PodSlot:
    """One attached pod as the forwarder sees it."""

    name: str
    pod_id: int  # the attachment's own id (a pod re-attached gets a new one)
    netns_fd: int
    steering: Steering  # the pod's redirect: where was it going, our upstream's pass
    paused: bool = False  # no room for its new connections (they wait in its backlog)
    buffer: int = 0  # the buffer size its next connection gets (forwarder/budget.py)
    waiting: str | None = None  # why, while paused
    backoff: float = 0.05  # how long the next pause lasts
    listeners: list[socket.socket] = field(default_factory=list)
    stats: PodStats = field(default_factory=PodStats)
    # The buffer size the listeners give the sockets they accept (they
    # inherit it), and the listeners (by fd) whose queue has been empty
    # since it was set: what they accept now was made with it.
    listen_buffer: int = 0
    listen_drained: set[int] = field(default_factory=set)
    listen_misses: int = 0  # connections since, of another size than listen_buffer


@dataclass(slots=True)
class ConnRecord:
    pod: str
    client: str
    orig_dst: str
    started: float
    state: str = "connecting"
    bytes_out: int = 0
    bytes_in: int = 0
    ended: float | None = None
    reason: str | None = None
    datapath: str = "copy"
    fds: int = 0  # what it holds: 2 sockets, and 4 pipe ends with splice
    buffer: int = 0  # its buffer size: it may hold budget.cost(buffer) bytes
    reserved: int = 0  # bytes of the memory budget it holds (more while it shrinks)
    # Across nodes (mesh/node.py): direction, the other node, the peer's
    # verified identity, the client workload's; None on this node.
    mtls: dict | None = None
    closed_by: str | None = None  # whose end closed first: pod or upstream (None: neither)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["closed_by"] is None:  # a handover to an older agent takes the rest
            del out["closed_by"]
        return out


@dataclass
class Pending:
    """A steered connection whose upstream connect is in flight."""

    slot: PodSlot
    record: ConnRecord
    client: socket.socket
    timer: Timer | None  # None when the connect completed at once
    path: DataPath
    state: Any  # what path.accepted() returned
