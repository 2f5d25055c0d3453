"""Strict pods: only the mesh reaches them. Rules in the pod's own netns
(filter INPUT, both families) let in the hop's port, the pod's own
loopback (where the forwarder delivers, with the client's address) and
replies to the pod's own connections; every other TCP connection to the
pod is reset. The rules are made with the pod (before anything in it
runs) and stay while no agent runs: strict fails closed. A permissive
pod has none: without an agent it is reached in plaintext, as before.
"""

from __future__ import annotations

import os
import socket
import subprocess
from enum import StrEnum

from meshagent.errors import MeshError
from meshagent.host import netns

CHAIN = "MESHAGENT-STRICT"
HOP_PORT = 15008


class MtlsMode(StrEnum):
    PERMISSIVE = "permissive"  # plaintext from outside the mesh still reaches the pod
    STRICT = "strict"  # only the mesh does


def render(on: bool, jumps: int, chain: bool, node: tuple[str, ...] = ()) -> str:
    """iptables-restore --noflush text: the chain and its one jump (on), or
    neither (off). jumps, chain: what is there now. node: the node's own
    addresses toward the pod (Kubernetes: the kubelet's probes come from
    there), let in as plaintext."""
    lines = ["*filter"]
    if on or chain:
        lines.append(f":{CHAIN} - [0:0]")  # declared: flushed
    for _ in range(jumps):
        lines.append(f"-D INPUT -j {CHAIN}")
    if on:
        lines += [
            f"-I INPUT 1 -j {CHAIN}",
            f"-A {CHAIN} -i lo -j RETURN",
            f"-A {CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
            f"-A {CHAIN} -p tcp --dport {HOP_PORT} -j RETURN",
            *(f"-A {CHAIN} -s {addr} -j RETURN" for addr in node),
            f"-A {CHAIN} -p tcp -j REJECT --reject-with tcp-reset",
        ]
    elif chain:
        lines.append(f"-X {CHAIN}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _state(save_text: str) -> tuple[int, bool]:
    jumps = sum(1 for line in save_text.splitlines() if line.strip() == f"-A INPUT -j {CHAIN}")
    return jumps, f":{CHAIN} " in save_text


def apply(netns_name: str, on: bool, flavour: str | None = None, what: str = "pod") -> None:
    """Make (on) or remove the rules in a pod's netns; idempotent."""
    try:
        fd = os.open(netns.path(netns_name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not on:
            return  # the netns went, and its rules with it
        raise MeshError(f"{what}: network namespace {netns_name} is gone") from None
    try:
        apply_fd(fd, on, flavour, what)
    finally:
        os.close(fd)


def apply_fd(fd: int, on: bool, flavour: str | None = None, what: str = "pod",
             allow_node: bool = False, gateways: dict[int, list[str]] | None = None) -> None:  # fmt: skip
    """apply, in the netns open as fd; allow_node: let in the pod's
    gateways (its node's addresses), as for the kubelet's probes: given
    (the CNI plugin has them from prevResult), else read in the netns."""
    from meshagent.redirect.iptables import Tools, detect_flavour

    tools = Tools.of(flavour or detect_flavour()[0])
    with netns.entered(fd):
        if not (allow_node and on):
            gateways = {}
        elif gateways is None:
            gateways = _gateways()
        for family, save, restore in ((4, tools.save4, tools.restore4),
                                      (6, tools.save6, tools.restore6)):  # fmt: skip
            now = _run([save, "-t", "filter"], None, what)
            text = render(on, *_state(now), node=tuple(gateways.get(family, ())))
            _run([restore, "--noflush", "-w", "5"], text, what)


def _gateways() -> dict[int, list[str]]:
    """The gateways of this netns's default routes, by IP version."""
    from pyroute2 import IPRoute

    out: dict[int, list[str]] = {4: [], 6: []}
    with IPRoute() as ipr:
        for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
            for route in ipr.get_default_routes(family=family):
                gateway = route.get_attr("RTA_GATEWAY")
                if gateway and gateway not in out[version]:
                    out[version].append(gateway)
    return out


def present(netns_name: str, flavour: str | None = None) -> bool:
    from meshagent.redirect.iptables import Tools, detect_flavour

    tools = Tools.of(flavour or detect_flavour()[0])
    fd = os.open(netns.path(netns_name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with netns.entered(fd):
            return _state(_run([tools.save4, "-t", "filter"], None, netns_name))[0] > 0
    finally:
        os.close(fd)


def _run(argv: list[str], text: str | None, what: str) -> str:
    try:
        proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MeshError(f"{what}: {argv[0]}: {exc}") from None
    if proc.returncode != 0:
        raise MeshError(
            f"{what}: {os.path.basename(argv[0])} failed: {' '.join(proc.stderr.split())[:300]}"
        )
    return proc.stdout
