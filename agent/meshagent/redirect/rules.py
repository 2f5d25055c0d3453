"""iptables rules for the fallback backend, rendered as iptables-restore
text by pure functions (compared with golden files in tests/unit).

One chain, MESHAGENT_OUTPUT, in the nat table, jumped to from OUTPUT for
TCP; RETURN for the forwarder's own sockets (by its cgroup: a pod can set
a mark, see own_cgroup.py), loopback, excluded ports and networks;
REDIRECT of the rest to the forwarder's listener port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

CHAIN = "MESHAGENT_OUTPUT"
JUMP = f"-p tcp -j {CHAIN}"  # as iptables-save prints the rule after "-A OUTPUT "


@dataclass(frozen=True)
class RuleConfig:
    port: int
    skip_cgroup: str  # the agent's cgroup v2 path (own_cgroup.py); "" only to tear down
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()


def render_rules(
    cfg: RuleConfig, family: int, jump_present: bool = False, draining: bool = False
) -> str:
    """The whole attach, for iptables-restore --noflush. Declaring the chain
    flushes it if it exists, so applying twice gives the same rules; the jump
    is added only when it is not there yet.

    draining (detach while connections are open): new connections RETURN
    first, but the REDIRECT rule stays, because removing it makes the kernel
    drop the NAT of connections it already redirected (measured on 6.x);
    the chain goes once the pod's last forwarded connection has closed."""
    if not cfg.skip_cgroup.startswith("/"):
        raise ValueError("render_rules needs the agent's cgroup (RuleConfig.skip_cgroup)")
    loopback = "127.0.0.0/8" if family == 4 else "::1/128"
    lines = ["*nat", f":{CHAIN} - [0:0]"]
    if not jump_present:
        lines.append(f"-A OUTPUT {JUMP}")
    if draining:
        lines.append(f"-A {CHAIN} -j RETURN")
    lines += [
        f"-A {CHAIN} -m cgroup --path {cfg.skip_cgroup} -j RETURN",
        f"-A {CHAIN} -o lo -j RETURN",
        f"-A {CHAIN} -d {loopback} -j RETURN",
    ]
    lines += [f"-A {CHAIN} -p tcp --dport {port} -j RETURN" for port in cfg.exclude_ports]
    for cidr in cfg.exclude_cidrs:
        if ipaddress.ip_network(cidr).version == family:
            lines.append(f"-A {CHAIN} -d {cidr} -j RETURN")
    lines += [f"-A {CHAIN} -p tcp -j REDIRECT --to-ports {cfg.port}", "COMMIT", ""]
    return "\n".join(lines)


def render_teardown(jumps: int, chain_present: bool) -> str:
    """Remove exactly what attach added: each jump from OUTPUT, then the
    chain. Nothing else in the table is named."""
    lines = ["*nat"]
    lines += [f"-D OUTPUT {JUMP}"] * jumps
    if chain_present:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    lines += ["COMMIT", ""]
    return "\n".join(lines)


def parse_state(save_text: str) -> tuple[int, bool]:
    """From iptables-save -t nat output: (jumps to our chain, chain exists)."""
    jumps = 0
    chain = False
    for line in save_text.splitlines():
        if line.startswith(f":{CHAIN} "):
            chain = True
        elif line.strip() == f"-A OUTPUT {JUMP}":
            jumps += 1
    return jumps, chain
