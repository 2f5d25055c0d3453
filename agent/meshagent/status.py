"""What `meshagent status` reports: one dict put together from each part's
own snapshot() (the agent's facts, plan, probe, BPF side, backends,
forwarder, pods, Kubernetes); nothing here reads another part's internals."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from meshagent.api import Deferred, Request
from meshagent.bpf.programs import PROGRAMS_BY_NAME

if TYPE_CHECKING:
    from meshagent.attachments import Attachments
    from meshagent.bpf.loader import Loaded
    from meshagent.datapath_control import DataPathControl
    from meshagent.forwarder import Forwarder
    from meshagent.host.loop import Loop
    from meshagent.host.worker import Worker
    from meshagent.kernel import Probe
    from meshagent.plan import Plan
    from meshagent.trace_feed import TraceFeed


@dataclass
class AgentFacts:
    """What the agent was started with and what its start found."""

    cgroup: Path
    port: int
    exclude_ports: tuple = ()
    exclude_cidrs: tuple = ()
    without: tuple = ()
    metrics_addr: str | None = None
    started: float = field(default_factory=time.time)
    adopted: list[str] = field(default_factory=list)  # pods taken over from an earlier agent
    took_over: dict = field(default_factory=dict)  # --takeover: what the predecessor handed over

    def snapshot(self) -> dict:
        return {
            "pid": os.getpid(),
            "cgroup": str(self.cgroup),
            "port": self.port,
            "exclude_ports": list(self.exclude_ports),
            "exclude_cidrs": list(self.exclude_cidrs),
            "without": list(self.without),
            "uptime_seconds": round(time.time() - self.started, 1),
            **own_footprint(),
            "metrics_addr": self.metrics_addr,
            "adopted_pods": self.adopted,
            "took_over": self.took_over,
        }


@dataclass
class Status:
    """The `status` request: the loop's own parts are taken at once, on the
    loop; the BPF maps are counted in the reader thread (a whole-map walk
    never holds up forwarding) and the reply is sent when that is done."""

    facts: AgentFacts
    loop: Loop
    plan: Plan
    probe: Probe
    loaded: Loaded | None
    backends: dict
    forwarder: Forwarder
    pods: Attachments
    datapath: DataPathControl
    trace: TraceFeed
    kube: object  # kube/autoattach.py KubePods
    watch: object | None  # kube/watch.py ApiWatch, when configured
    reader: Worker

    def __call__(self, _request: Request) -> Deferred:
        plan = self.plan.to_dict()
        now = {
            **self.facts.snapshot(),
            "datapath_reason": self.datapath.reason,
            "loop_errors": self.loop.errors,
            "loop_dispatched": self.loop.dispatched,
            "tracing": self.trace.active,
            "kube": {
                **self.kube.snapshot(),
                **({"api": self.watch.snapshot()} if self.watch is not None else {}),
            },
            "backend": plan["backend"],
            "backend_reason": plan["backend_reason"],
            "plan": plan,
            "iptables_flavour": self.probe.iptables_flavour,
            "kernel": self.probe.kernel,
            "refused": self.probe.refused,
            **self.forwarder.snapshot(),
            "pods": self.pods.snapshot(),
            "busy_pods": sorted(self.pods.busy),  # attach or detach under way
        }
        policy = getattr(self.forwarder, "policy", None)
        if policy is not None:
            now["policy"] = policy.summary()
        loaded, backends = self.loaded, dict(self.backends)

        def walk() -> tuple[dict, dict]:
            bpf = loaded.snapshot() if loaded is not None else {}
            return bpf, {name.value: backend.snapshot() for name, backend in backends.items()}

        reply = Deferred()

        def done(result, error: BaseException | None) -> None:
            if error is not None:
                reply.fail(error, "status")
                return
            bpf, snaps = result
            programs = bpf.get("programs", [])
            reply.resolve(
                {
                    **now,
                    "backends": sorted(snaps),
                    "backend_state": snaps,  # e.g. ebpf: entries in mesh_pods
                    "kernel_features": _hooks(programs, snaps),
                    "decisions": bpf.get("decisions", {}),
                    "live_steered": bpf.get("live_steered", 0),
                    "map_entries": bpf.get("map_entries", {}),
                }
            )

        self.reader.submit(walk, done)
        return reply


def _hooks(programs: list[str], backends: dict) -> list[str]:
    """The kernel features in use, in words."""
    used = [f"{name} ({PROGRAMS_BY_NAME[name].file})" for name in programs]
    for backend in backends.values():
        flavour = backend.get("flavour")
        if flavour:
            used.append(f"iptables-{flavour} (nat REDIRECT, SO_ORIGINAL_DST)")
    return used


def own_footprint() -> dict:
    """The agent's own RSS and open fds."""
    from meshagent.metrics import open_fds

    with open("/proc/self/statm", "rb") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_bytes": rss, "open_fds": open_fds()}
