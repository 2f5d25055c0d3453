"""What forwarded connections may hold, node-wide and per pod.

Two budgets share one rule (Shares): the forwarder's fds, and the bytes its
connections may hold in memory (--memory-max). Each attached pod is sure of
half the budget split evenly among the pods; the other half is lent to pods
past their share while any is left. So a pod alone may use it all, and a pod
that takes all it can never leaves another without its share.

Bytes are reserved, not measured: every connection gets a buffer size b
(a power of two between BUFFER_MIN and BUFFER_MAX) that bounds what it can
hold, and reserves COST_FACTOR * b. b sets SO_RCVBUF and SO_SNDBUF of both
of the forwarder's sockets (4b in the kernel), and what the path holds
itself: copy reads at most b at a time and stops reading at b waiting (2b
a direction); splice's pipes and the sockmap's send buffers take b each
(the verdict holds back what would not fit T's send buffer). A pod's new
connections get the largest b that would let all its connections have it
within what it may hold; when even BUFFER_MIN does not fit, its new
connections wait in its listener's backlog, as for fds. When a pod's room
shrinks (more pods attached, more connections of its own), its larger
connections are clamped to the new size; what they reserved is given back
once the kernel holds no more than the new size for them (measured each
tick with SO_MEMINFO), so the bytes really held never exceed the budget.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

BUFFER_MIN = 16 << 10
BUFFER_MAX = 4 << 20
COST_FACTOR = 8  # bytes a connection with buffer size b may hold: 8b
FEW = 32  # a pod's first connections are sized as if it would have this many
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")  # rmem_alloc rcvbuf wmem_alloc sndbuf fwd_alloc wmem_queued ...
AGENT_RESERVE = 64 << 20  # the agent's own memory, out of a cgroup limit


def cost(buffer: int) -> int:
    return COST_FACTOR * buffer


class Members(dict):
    """The attached pods (pod_id -> slot), counting its changes: Shares
    keeps what the pods hold within their shares up to date between them,
    rather than summing over every pod for every connection (75 us per
    connection with 100 pods, measured)."""

    version = 0

    def __setitem__(self, key, value) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.version += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)


@dataclass
class Shares:
    """A budget of some unit shared fairly by the attached pods. `pods` in
    the methods below: the attached pods' ids (a Members table, or any
    collection: then everything is counted again)."""

    budget: int
    used: int = 0
    by_pod: dict[int, int] = field(default_factory=dict)
    # For the Members table last asked about (its id and version): its
    # pods, their share, and what they hold within it (kept up by hold()).
    _key: tuple[int, int, int] | None = field(default=None, repr=False)
    _attached: frozenset[int] = field(default=frozenset(), repr=False)
    _share: int = field(default=0, repr=False)
    _capped: int = field(default=0, repr=False)

    def hold(self, pod_id: int, amount: int) -> None:
        self.used += amount
        old = self.by_pod.get(pod_id, 0)
        mine = old + amount
        if mine:
            self.by_pod[pod_id] = mine
        else:
            self.by_pod.pop(pod_id, None)
        if self._key is not None and pod_id in self._attached:
            self._capped += min(mine, self._share) - min(old, self._share)

    def _within(self, pods: Iterable[int]) -> int:
        """What the pods hold within their shares (and sets _attached and
        _share for them)."""
        version = getattr(pods, "version", None)
        key = (id(pods), version, self.budget) if version is not None else None
        if key is None or key != self._key:
            self._attached = frozenset(pods)
            self._share = self.share(len(self._attached))
            self._capped = sum(min(self.mine(p), self._share) for p in self._attached)
            self._key = key
        return self._capped

    def mine(self, pod_id: int) -> int:
        return self.by_pod.get(pod_id, 0)

    def share(self, pods: int) -> int:
        """What each of `pods` attached pods is sure to get."""
        return (self.budget // 2) // max(1, pods)

    def lent(self, pods: Iterable[int]) -> int:
        """Held past the pods' shares (a detached pod's all count)."""
        return self.used - self._within(pods)

    def room(self, pod_id: int, pods: Iterable[int]) -> int:
        """What the pod may take now: what is left of its share, and of
        what may be lent, within the budget."""
        lent = self.lent(pods)
        share = self._share
        pool = self.budget - share * len(self._attached) - lent
        own = max(0, share - self.mine(pod_id))
        return max(0, min(self.budget - self.used, own + max(0, pool)))

    def over(self, pods: Iterable[int]) -> int:
        """How far the pods past their shares are beyond what may be lent
        (after more pods attached, or a smaller budget taken over)."""
        lent = self.lent(pods)
        pool = self.budget - self._share * len(self._attached)
        return max(0, lent - pool, self.used - self.budget)


def buffer_for(connections: int, holds: int, room: int) -> int | None:
    """The buffer size of a pod's next connection: the largest b that all
    its connections (this one too, and at least FEW) could have within
    what it holds and may still take, and that fits what it may take now.
    None: not even BUFFER_MIN fits (the forwarder then clamps the pod's
    larger connections to make room)."""
    b = BUFFER_MAX
    while b > BUFFER_MIN:
        if cost(b) <= room and max(connections + 1, FEW) * cost(b) <= holds + room:
            return b
        b //= 2
    return BUFFER_MIN if cost(BUFFER_MIN) <= room else None


def tier(connections: int, bytes_: int) -> int:
    """The largest buffer size that `connections` connections can all have
    within bytes_ (BUFFER_MIN at least)."""
    b = BUFFER_MAX
    while b > BUFFER_MIN and connections * cost(b) > bytes_:
        b //= 2
    return b


def set_buffers(sock: socket.socket, buffer: int) -> None:
    """Fix sock's receive and send buffers at buffer bytes each (the kernel
    doubles what it is given; no autotuning past it)."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, buffer // 2)
        except PermissionError:  # no CAP_NET_ADMIN: within the sysctl maximum
            sock.setsockopt(socket.SOL_SOCKET, plain, buffer // 2)


def kernel_holds(sock: socket.socket) -> int:
    """Bytes the kernel holds for sock: its receive queue (and, for a
    spliced socket, what its verdict took off it and not yet sent) and its
    send queue."""
    try:
        info = _MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))
    except OSError:
        return 0
    return info[0] + info[5]


def memory_max_auto() -> tuple[int, str]:
    """--memory-max when not given: 3/4 of the agent's memory cgroup limit
    less AGENT_RESERVE where it has one (the DaemonSet sets one), else an
    eighth of the node's memory. (bytes, where it came from)"""
    limit = cgroup_memory_limit()
    if limit is not None:
        return max(BUFFER_MIN * COST_FACTOR, limit * 3 // 4 - AGENT_RESERVE), "cgroup limit"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 8, "node memory / 8"


def cgroup_memory_limit(proc: Path = Path("/proc/self/cgroup"),
                        mounts: Path = Path("/proc/mounts")) -> int | None:  # fmt: skip
    """This process's memory cgroup limit (v2 memory.max, or v1
    memory.limit_in_bytes), None when it has none or it cannot be read."""
    try:
        lines = proc.read_text().splitlines()
        table = mounts.read_text().splitlines()
    except OSError:
        return None
    v2_root = v1_root = None
    for line in table:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup2" and v2_root is None:
            v2_root = Path(parts[1])
        elif len(parts) >= 4 and parts[2] == "cgroup" and "memory" in parts[3].split(","):
            v1_root = Path(parts[1])
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if v1_root is not None and "memory" in controllers.split(","):
            return _smallest(v1_root, path, "memory.limit_in_bytes")
        if v1_root is None and hid == "0" and v2_root is not None:
            return _smallest(v2_root, path, "memory.max")
    return None


def _smallest(root: Path, path: str, name: str) -> int | None:
    """The smallest limit on the cgroup at path and its ancestors (a
    container's may sit on its pod's cgroup)."""
    found = None
    here = root / path.strip("/")
    while True:
        try:
            text = (here / name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) < 1 << 60:  # v1's "no limit" is a huge number
            found = int(text) if found is None else min(found, int(text))
        if here == root or root not in here.parents:
            return found
        here = here.parent
