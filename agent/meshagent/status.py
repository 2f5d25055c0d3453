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


def agent_status(agent):
    """A Deferred reply: the loop's own parts are taken now, on the loop;
    the BPF maps are counted in the agent's reader thread (a whole-map walk
    never holds up forwarding) and the reply is sent when that is done."""
    from meshagent.control import Deferred

    plan = agent.plan.to_dict()
    now = {
        **agent.snapshot(),
        "backend": plan["backend"],
        "backend_reason": plan["backend_reason"],
        "plan": plan,
        "iptables_flavour": agent.probe.iptables_flavour,
        "kernel": agent.probe.kernel,
        "refused": agent.probe.refused,
        **agent.forwarder.snapshot(),
        "pods": agent.pods.snapshot(),
        "busy_pods": sorted(agent.pods.busy),  # attach or detach under way
    }
    loaded, backends = agent.loaded, dict(agent.backends)

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

    agent.reader.submit(walk, done)
    return reply
