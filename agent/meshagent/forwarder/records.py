"""What the forwarder keeps per pod and per connection."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from meshagent.forwarder.datapath import DataPath
from meshagent.host.loop import Timer
from meshagent.redirect import OrigLookup


@dataclass
class PodStats:
    connections_total: int = 0
    connections_active: int = 0
    bytes_out: int = 0  # pod -> destination
    bytes_in: int = 0  # destination -> pod
    no_orig_dst: int = 0
    refused_loopback: int = 0  # a direct connection to the listener (would loop)
    upstream_errors: int = 0
    resets: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PodSlot:
    """One attached pod as the forwarder sees it."""

    name: str
    netns_fd: int
    lookup: OrigLookup  # the pod's redirect backend: where was it going?
    prepare: Callable[[socket.socket], None]  # the backend's mark on our upstream socket
    listeners: list[socket.socket] = field(default_factory=list)
    stats: PodStats = field(default_factory=PodStats)


@dataclass
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Pending:
    """A steered connection whose upstream connect is in flight."""

    slot: PodSlot
    record: ConnRecord
    client: socket.socket
    timer: Timer
    path: DataPath
    state: Any  # what path.accepted() returned
