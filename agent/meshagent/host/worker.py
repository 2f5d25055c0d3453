"""A thread for work that blocks (iptables subprocesses, whole-map walks),
so the loop keeps forwarding meanwhile. Jobs run one at a time in the order
submitted; each one's `done` runs back on the loop with the result or the
exception. Jobs must not touch the loop's objects."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from meshagent.host.loop import Loop

Done = Callable[[Any, BaseException | None], None]


class Worker:
    def __init__(self, loop: Loop, name: str) -> None:
        self.loop = loop
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], Any], done: Done) -> None:
        self.jobs.put((job, done))

    def _run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # handed to done on the loop, which decides
                result, error = None, exc
            self.loop.post(lambda d=done, r=result, e=error: d(r, e))

    def close(self, timeout: float = 60.0) -> None:
        """Let the queued jobs finish, end the thread, and run their `done`s
        (the loop has stopped by now: they run here, on its thread)."""
        self.jobs.put(None)
        self.thread.join(timeout)
        self.loop.run_posted()
