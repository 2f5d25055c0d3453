"""The capabilities `meshagent run` needs, and which of them it lacks.

Measured here: the agent runs with exactly these two (everything else
dropped from the bounding set), for both backends and every data path.
"""

from __future__ import annotations

from pathlib import Path

NEEDED = {
    12: ("cap_net_admin", "network BPF programs and their cgroup links, iptables"),
    21: ("cap_sys_admin", "entering pod network namespaces (setns), loading BPF"),
}


def effective() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def missing(caps: int | None = None) -> list[str]:
    """'cap_x (why)' for each needed capability not in caps (default: ours)."""
    caps = effective() if caps is None else caps
    return [f"{name} ({why})" for bit, (name, why) in NEEDED.items() if not caps >> bit & 1]
