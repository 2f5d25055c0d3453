"""Redirect backends: how an attached pod's connects reach its forwarder.

`ebpf` (cgroup connect hooks, one map entry per pod) and `iptables` (nat
OUTPUT REDIRECT rules inside the pod's netns) share one interface; the
forwarder asks the pod's backend where each accepted connection was going.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# (accepted socket, client ip, client port) -> original (ip, port), or None
OrigLookup = Callable[[socket.socket, str, int], "tuple[str, int] | None"]
BACKENDS = ("ebpf", "iptables")


@dataclass(frozen=True)
class PodHandle:
    name: str
    netns_name: str
    netns_cookie: int
    pod_id: int


class Backend(Protocol):
    name: str

    def attach(self, pod: PodHandle) -> None: ...

    def detach(self, pod: PodHandle, open_connections: bool = False) -> bool:
        """Stop steering new connections; True if `remove` is owed once the
        pod's open connections have closed."""
        ...

    def remove(self, pod: str, netns_name: str, quiet: bool = False) -> None: ...

    def attached(self) -> set[str]: ...

    def lookup(self, pod: PodHandle) -> OrigLookup: ...
