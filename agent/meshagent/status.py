"""What `meshagent status` reports: one dict put together from each part's
own snapshot() (agent, plan, probe, BPF side, backends, forwarder, pods);
nothing here reads another part's internals."""

from __future__ import annotations

from meshagent.bpf.programs import PROGRAMS_BY_NAME


def _hooks(programs: list[str], backends: dict) -> list[str]:
    """The kernel features in use, in words."""
    used = [f"{name} ({PROGRAMS_BY_NAME[name].file})" for name in programs]
    for backend in backends.values():
        flavour = backend.get("flavour")
        if flavour:
            used.append(f"iptables-{flavour} (nat REDIRECT, SO_ORIGINAL_DST)")
    return used


def agent_status(agent) -> dict:
    plan = agent.plan.to_dict()
    bpf = agent.loaded.snapshot() if agent.loaded is not None else {}
    backends = {name.value: backend.snapshot() for name, backend in agent.backends.items()}
    forwarder = agent.forwarder.snapshot()
    programs = bpf.get("programs", [])
    return {
        **agent.snapshot(),
        "backend": plan["backend"],
        "backend_reason": plan["backend_reason"],
        "backends": sorted(backends),
        "plan": plan,
        "iptables_flavour": agent.probe.iptables_flavour,
        "kernel": agent.probe.kernel,
        "refused": agent.probe.refused,
        "kernel_features": _hooks(programs, backends),
        **forwarder,
        "pods": agent.pods.snapshot(),
        "decisions": bpf.get("decisions", {}),
        "live_steered": bpf.get("live_steered", 0),
        "map_entries": bpf.get("map_entries", {}),
    }
