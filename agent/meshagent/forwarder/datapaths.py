"""The three data paths and their counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# In the order `auto` prefers them.
MODES = ("sockmap", "splice", "copy")


@dataclass
class DatapathStats:
    connections_total: int = 0  # finished connections carried by this path
    connections_active: int = 0
    bytes: int = 0  # both directions, finished connections
    handoff_bytes: int = 0  # sockmap: bytes Python carried before the kernel took over
    stalls: int = 0  # sockmap: hand-offs that made no progress for 5 s
    fallbacks: int = 0  # sockmap: pairs copied because a socket could not enter

    def to_dict(self) -> dict:
        return asdict(self)
