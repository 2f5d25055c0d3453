"""A small single-threaded epoll loop: fd handlers and timers.

The forwarder, the listeners and the control API all live on it, so no
state is shared between threads: work that blocks (iptables) runs in a
host/worker.py thread, which hands its result back with post().
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshagent import log

Handler = Callable[[int], None]


@dataclass(order=True)
class Timer:
    deadline: float
    seq: int
    fn: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.masks: dict[int, int] = {}
        self.timers: list[Timer] = []
        self._seq = itertools.count()
        self.running = False
        self.errors = 0
        self.dispatched = 0  # handler calls: a loop that spins shows here
        # fds removed while a batch of events is handled: the batch's later
        # events for them are the old file's, even if the number is reused
        self._gone: set[int] = set()
        # post(): other threads hand the loop work through an eventfd
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add(self._wake, select.EPOLLIN, self._run_posted)

    def add(self, fd: int, mask: int, handler: Handler) -> None:
        """Watch fd; an fd already watched gets the new mask and handler."""
        if fd in self.handlers:
            self.modify(fd, mask)
        else:
            self.epoll.register(fd, mask)
            self.masks[fd] = mask
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        if self.masks.get(fd) != mask:
            self.epoll.modify(fd, mask)
            self.masks[fd] = mask

    def remove(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is None:
            return
        self.masks.pop(fd, None)
        self._gone.add(fd)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def forget(self, fd: int) -> None:
        """remove() for an fd its caller closes next, and the only one open
        on its file: closing it takes it out of the epoll set (one system
        call fewer per socket)."""
        if self.handlers.pop(fd, None) is None:
            return
        self.masks.pop(fd, None)
        self._gone.add(fd)

    def post(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop soon; the one method safe from any thread."""
        self._posted.append(fn)
        os.eventfd_write(self._wake, 1)

    def run_posted(self) -> None:
        """Run what other threads posted, now (at shutdown, after the loop)."""
        self._run_posted(0)

    def _run_posted(self, _events: int) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._posted:
            self._guarded(self._posted.popleft())

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, next(self._seq), fn)
        heapq.heappush(self.timers, timer)
        return timer

    def _run_timers(self) -> float:
        now = time.monotonic()
        while self.timers and self.timers[0].deadline <= now:
            timer = heapq.heappop(self.timers)
            if not timer.cancelled:
                self._guarded(timer.fn)
        if not self.timers:
            return 1.0
        return max(0.0, min(1.0, self.timers[0].deadline - time.monotonic()))

    def run(self) -> None:
        self.running = True
        while self.running:
            timeout = self._run_timers()
            if not self.running:  # a timer stopped the loop: no last wait
                break
            batch = self.epoll.poll(timeout, 512)
            self._gone.clear()
            for fd, events in batch:
                if fd in self._gone:
                    # Removed by an earlier handler of this batch, maybe
                    # closed and its number given to a new socket: this
                    # event was the old file's (a spurious hang-up here
                    # reset a new connection under load). Level-triggered:
                    # a new registration hears of its own state next poll.
                    continue
                handler = self.handlers.get(fd)
                if handler is not None:
                    self.dispatched += 1
                    self._guarded(handler, events)

    def _guarded(self, fn: Callable, *args: int) -> None:
        """A bug in one connection's handler must not stop the agent: log it
        (with the traceback) and carry on with everything else."""
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            log.get().exception("internal error in an event handler", extra={"reason": "bug"})

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.remove(self._wake)
        os.close(self._wake)
        self.epoll.close()
