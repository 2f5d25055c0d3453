"""What `meshagent status` reports, assembled from a running agent."""

from __future__ import annotations

import os
import time

from meshagent import names


def _features(agent) -> list[str]:
    used = []
    if "ebpf" in agent.backends:
        used += ["cgroup/connect4", "cgroup/connect6", "sock_ops", "bpf_get_netns_cookie",
                 "bpf_sk_lookup_tcp (fail-open)", "bpf_link"]  # fmt: skip
        if not agent.datapath.getpeername_error:
            used.append("cgroup/getpeername4/6 (apps see the original peer)")
    if agent.forwarder.maps is not None:
        used += ["sockhash", "sk_skb stream verdict"]
    if "iptables" in agent.backends:
        used.append(f"iptables-{agent.probe.iptables_flavour} (nat REDIRECT, SO_ORIGINAL_DST)")
    return used


def agent_status(agent) -> dict:
    forwarder = agent.forwarder
    pods = []
    for name, entry in sorted(agent.attached.items()):
        slot = forwarder.pods[name]
        stats = slot.stats.to_dict()
        live_out, live_in = forwarder.live_bytes(name)
        stats["bytes_out"] += live_out
        stats["bytes_in"] += live_in
        pods.append(
            {
                "name": name,
                "backend": entry.backend,
                "netns": entry.handle.netns_name,
                "netns_cookie": entry.handle.netns_cookie,
                "attached_since": entry.since,
                "listeners": [f"127.0.0.1:{agent.cfg.port}", f"[::1]:{agent.cfg.port}"],
                **stats,
            }
        )
    datapath = agent.datapath
    map_entries = {}
    if datapath is not None:
        wanted = [names.MAP_SOCKHASH, names.MAP_PEER, names.MAP_PASSED, names.MAP_SENT]
        if "ebpf" in agent.backends:
            wanted.insert(0, names.MAP_ORIG_TUP)
        map_entries = {name: datapath.map_fd(name).count() for name in wanted}
    return {
        "pid": os.getpid(),
        "backend": agent.default_backend,
        "backend_reason": agent.backend_reason,
        "backends": sorted(agent.backends),
        "iptables_flavour": agent.probe.iptables_flavour,
        "datapath": forwarder.mode,
        "datapath_reason": agent.datapath_reason,
        "datapaths": {k: v.to_dict() for k, v in forwarder.paths.items()},
        "cgroup": str(agent.cgroup_path),
        "port": agent.cfg.port,
        "exclude_ports": list(agent.cfg.exclude_ports),
        "exclude_cidrs": list(agent.cfg.exclude_cidrs),
        "kernel": agent.probe.kernel,
        "kernel_features": _features(agent),
        "without": list(agent.cfg.without),
        "uptime_seconds": round(time.time() - agent.started, 1),
        "pods": pods,
        "decisions": datapath.metrics() if datapath is not None else {},
        "live_steered": datapath.live_connections() if "ebpf" in agent.backends else 0,
        "map_entries": map_entries,
        "loop_errors": agent.loop.errors,
    }
