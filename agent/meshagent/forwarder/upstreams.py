"""Upstream sockets made inside a pod's netns ahead of need, in batches.

A forwarded connection connects upstream from inside the pod, so its socket
must be made there: a setns in and a setns back, about 5 us of the agent's
CPU per connection ([P] part 1). A pod that opens connections quickly gets
them made in batches instead (two setns per batch), each already set up as
every upstream socket is (TCP_NODELAY, reset on a crash). The batch grows
while the pod keeps emptying its pool within BUSY seconds of the last
refill, up to BATCH_MAX, and falls back to one socket when it does not.

A spare socket is an fd and an unconnected socket's few hundred bytes of
kernel memory: a pool is closed once IDLE seconds pass without a take
(tick), and the spares count against the forwarder's fd budget (it sheds
them before it pauses a pod for fds).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshagent.forwarder.copy import linger_reset
from meshagent.host import netns

BATCH_MAX = 8
BUSY = 0.5  # seconds: a pool emptied this soon after its refill doubles its batch
IDLE = 2.0  # seconds without a take: the pool's spares are closed
KIND = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(slots=True)
class Pool:
    spares: list[socket.socket] = field(default_factory=list)
    batch: int = 1  # how many the next refill makes
    refilled: float = -BUSY - 1.0
    taken: float = 0.0


class Upstreams:
    """Spare upstream sockets by (pod id, address family)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.pools: dict[tuple[int, int], Pool] = {}
        self.spare = 0  # spare sockets over every pool (fds)
        self.made = 0  # sockets made so far
        self.batches = 0  # setns pairs that made them
        self.clock = clock

    def take(self, pod_id: int, netns_fd: int, family: int, room: int) -> socket.socket:
        """An upstream socket inside the pod's netns, non-blocking, with
        TCP_NODELAY and SO_LINGER {1,0}. room: fds the pool may hold besides
        the one it returns. Raises OSError or MeshError (setns) when none can
        be made."""
        now = self.clock()
        key = (pod_id, family)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool()
        pool.taken = now
        if not pool.spares:
            if now - pool.refilled <= BUSY:
                pool.batch = min(pool.batch * 2, BATCH_MAX)
            else:
                pool.batch = 1
            # The one taken is in the fd budget already (its connection
            # holds it); room is what the spares may add.
            made = netns.sockets_in(netns_fd, family, KIND, max(1, min(pool.batch, room + 1)))
            self.batches += 1
            self.made += len(made)
            try:
                for sock in made:
                    sock.setsockopt(*_NODELAY)
                    linger_reset(sock)
            except OSError:
                for sock in made:
                    sock.close()
                raise
            pool.spares = made
            pool.refilled = now
            self.spare += len(made)
        self.spare -= 1
        return pool.spares.pop()

    def drop_pod(self, pod_id: int) -> None:
        """The pod is gone (or detached): its spares are closed."""
        for family in (socket.AF_INET, socket.AF_INET6):
            pool = self.pools.pop((pod_id, family), None)
            if pool is not None:
                self._close(pool)

    def shed(self) -> int:
        """Close every spare (the fd budget needs them); how many."""
        count = self.spare
        for pool in self.pools.values():
            self._close(pool)
        return count

    def tick(self) -> None:
        """Pools not taken from for IDLE seconds are closed."""
        now = self.clock()
        for key, pool in list(self.pools.items()):
            if now - pool.taken > IDLE:
                self._close(pool)
                del self.pools[key]

    def close(self) -> None:
        self.shed()
        self.pools.clear()

    def _close(self, pool: Pool) -> None:
        for sock in pool.spares:
            sock.close()  # never connected: no RST, nothing sent
        self.spare -= len(pool.spares)
        pool.spares = []
        pool.batch = 1

    def snapshot(self) -> dict:
        return {"spare": self.spare, "made": self.made, "batches": self.batches}
