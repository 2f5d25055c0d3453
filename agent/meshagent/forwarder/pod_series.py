"""Per-pod counters that outlive their pod only so long: the metrics'
series of a pod that is gone (detached, its last forwarded connection
closed) are dropped after KEEP_SECONDS, long enough for any scrape to see
their final values. Without it every pod a node ever had kept its series
for the agent's lifetime: with pod churn, an unbounded /metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

KEEP_SECONDS = 300.0  # a few scrape intervals, whatever the scraper's


class PodSeries:
    """Prunes Counters keyed by tuples whose first element is a pod name."""

    def __init__(self, *counters: Counter, keep: float = KEEP_SECONDS) -> None:
        self.counters = counters
        self.keep = keep
        self.gone_since: dict[str, float] = {}

    def prune(self, live: Iterable[str], now: float) -> list[str]:
        """live: the pods still attached or with a connection open. Returns
        the pods whose series were dropped."""
        live = set(live)
        named = {key[0] for counter in self.counters for key in counter}
        for pod in list(self.gone_since):
            if pod in live or pod not in named:
                del self.gone_since[pod]  # back (attached again), or nothing left
        dropped = []
        for pod in named - live:
            since = self.gone_since.setdefault(pod, now)
            if now - since >= self.keep:
                for counter in self.counters:
                    for key in [key for key in counter if key[0] == pod]:
                        del counter[key]
                del self.gone_since[pod]
                dropped.append(pod)
        return dropped
