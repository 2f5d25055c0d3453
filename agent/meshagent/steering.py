"""What the forwarder and the redirect backends share about an attached pod:
its handle, where an accepted connection was going, and the pod's redirect
as the forwarder uses it (`Steering`). Below both: it imports neither.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


class AppSocket(NamedTuple):
    """The pod's own socket of a steered connection, where sock_ops put it
    into mesh_apphash (the sk_msg path): its tuple key and its cookie."""

    key: bytes
    cookie: int


class Orig(NamedTuple):
    """Where an accepted connection was going, and its pod socket if known."""

    ip: str
    port: int
    app: AppSocket | None = None


class Steering(Protocol):
    """One attached pod's redirect, as the forwarder uses it."""

    def orig_dst(self, sock: socket.socket, ip: str, port: int) -> Orig | None:
        """Where the accepted connection from (ip, port) was going."""
        ...

    def prepare_upstream(self, sock: socket.socket, replies: bool = False) -> None:
        """Make the forwarder's upstream socket pass the redirect (before
        connect). replies: its server's replies may go straight into the
        pod's socket (the sockmap path with sk_msg; redirect/ebpf.py)."""
        ...


@dataclass
class PodHandle:
    """A pod as the backends see it. Its identity is the netns file's
    (device, inode), which every kernel has; the netns cookie (5.14+) is
    read only when a backend asks for it (the ebpf maps are keyed by it)."""

    name: str
    netns_name: str
    netns_fd: int
    pod_id: int
    # The forwarder's listening sockets in the pod and their port (the
    # agent's --port, unless the pod held that one when it was attached).
    listeners: list = field(default_factory=list, repr=False)
    port: int = 0
    mode: str = "forward"  # modes.PodMode: kernel: its connects go direct (redirect/ebpf.py)
    _cookie: int | None = field(default=None, repr=False)

    _id: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def netns_id(self) -> tuple[int, int]:
        if self._id is None:
            st = os.fstat(self.netns_fd)
            self._id = (st.st_dev, st.st_ino)
        return self._id

    @property
    def netns_cookie(self) -> int:
        if self._cookie is None:
            from meshagent.host import netns

            self._cookie = netns.cookie(self.netns_fd)
        return self._cookie
