"""Idle links on the client's side: TLS connections to another node whose
last stream ended cleanly (mesh/hop.py, reuse), kept for the next
connection from the same pod to the same destination pod.

A link waits at most IDLE seconds (shorter than the server's
hop.IDLE_TIMEOUT, so the server never ends a link the client is about to
use), and at most PER_KEY links wait per pod and destination (the most
recently used goes first). Anything the server sends to an idle link (its
close_notify, a FIN, a reset) ends it. A pod that goes, a takeover and a
stop end its links with a close_notify.
"""

from __future__ import annotations

import contextlib
import select
from dataclasses import dataclass

from meshagent.host.loop import Loop, Timer
from meshagent.mesh.hop import Link

IDLE = 20.0
PER_KEY = 16

Key = tuple[int, str]  # (the client pod's id, the destination pod's address)


@dataclass
class _Parked:
    link: Link
    timer: Timer


class LinkPool:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.idle: dict[Key, list[_Parked]] = {}
        self.taken = 0  # streams that went on an idle link
        self.ended = 0  # idle links ended (by the server, their age, a pod's end)

    def __len__(self) -> int:
        return sum(len(parked) for parked in self.idle.values())

    def snapshot(self) -> dict:
        return {"idle": len(self), "taken": self.taken, "ended": self.ended}

    def park(self, key: Key, link: Link) -> None:
        parked = self.idle.setdefault(key, [])
        if link.after or len(parked) >= PER_KEY:
            self._close(link)  # bytes past a stream's end from a server: no link to trust
            return
        entry = _Parked(link, self.loop.call_later(IDLE, lambda: self._drop(key, entry)))
        parked.append(entry)
        self.loop.add(link.wire.fileno(), select.EPOLLIN, lambda _ev: self._drop(key, entry))

    def take(self, key: Key) -> Link | None:
        parked = self.idle.get(key)
        if not parked:
            return None
        entry = parked[-1]  # the most recently used
        self._unpark(key, entry)
        self.taken += 1
        return entry.link

    def drop_pod(self, pod_id: int) -> None:
        for key in [key for key in self.idle if key[0] == pod_id]:
            for entry in list(self.idle.get(key, ())):
                self._drop(key, entry)

    def close(self) -> None:
        for key in list(self.idle):
            for entry in list(self.idle.get(key, ())):
                self._drop(key, entry)

    def _drop(self, key: Key, entry: _Parked) -> None:
        if entry not in self.idle.get(key, []):
            return
        self._unpark(key, entry)
        self.ended += 1
        self._close(entry.link)

    def _unpark(self, key: Key, entry: _Parked) -> None:
        parked = self.idle[key]
        parked.remove(entry)
        if not parked:
            del self.idle[key]
        entry.timer.cancel()
        with contextlib.suppress(KeyError, OSError, ValueError):
            self.loop.remove(entry.link.wire.fileno())

    @staticmethod
    def _close(link: Link) -> None:
        link.close()
