"""The mesh file: which nodes form the mesh, and which pod addresses each
holds (standalone; on Kubernetes the API says it). Given to `meshagent
run --mesh FILE`; the trust domain names every identity.

    trustDomain: mesh.example
    nodes:
      - name: node-a
        podCIDRs: [10.244.1.0/24, "fd6d:6573:6801::/64"]
      - name: node-b
        podCIDRs: [10.244.2.0/24, "fd6d:6573:6802::/64"]

A connection from an attached pod to an address in another node's pod
CIDRs goes to that node over mutual TLS; to this node's own pods, or to
anything outside the mesh, as before.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.mesh.identity import SpiffeId, check_segment, check_trust_domain, standalone_pod_id

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class MeshNode:
    name: str
    pod_cidrs: tuple[Network, ...]

    def holds(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr.version == net.version and addr in net for net in self.pod_cidrs)


@dataclass
class MeshView:
    """The mesh as this node sees it."""

    trust_domain: str
    me: str
    nodes: dict[str, MeshNode] = field(default_factory=dict)
    source: str = ""

    def node_of(self, ip: str) -> MeshNode | None:
        """The node whose pod CIDRs hold ip (the longest prefix), or None."""
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return None
        best: tuple[int, MeshNode] | None = None
        for node in self.nodes.values():
            for net in node.pod_cidrs:
                fits = addr.version == net.version and addr in net
                if fits and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, node)
        return best[1] if best else None

    def remote(self, ip: str) -> MeshNode | None:
        """The other node that holds ip, or None (this node's own, or unmeshed)."""
        node = self.node_of(ip)
        return node if node is not None and node.name != self.me else None

    def holds(self, node: MeshNode, ip: str) -> bool:
        """ip is one of node's pod addresses."""
        return node.holds(ip)

    def workload(self, pod: str) -> str:
        """The identity this node asserts for its pod (by name)."""
        return str(standalone_pod_id(self.trust_domain, self.me, pod))

    def check_source(self, peer_node: str, peer_ip: str, claimed: SpiffeId) -> str | None:
        """Why peer_node may not assert claimed for a connection from
        peer_ip, or None: standalone, a node asserts only its own pods."""
        if claimed.node != peer_node:
            return f"node {peer_node} asserted {claimed}, a workload it does not hold"
        return None

    def mode(self, pod: str) -> str:
        """A pod's inbound mode: standalone, the agent's pod records say it."""
        return "permissive"

    def to_dict(self) -> dict:
        return {
            "trust_domain": self.trust_domain,
            "node": self.me,
            "source": self.source,
            "nodes": {n.name: [str(c) for c in n.pod_cidrs] for n in self.nodes.values()},
        }


def load(path: Path, me: str) -> MeshView:
    """Read and check a mesh file; a MeshError names the file and the entry."""
    import yaml

    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MeshError(f"mesh file {where}: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise MeshError(
            f"mesh file {where}{line}: not YAML ({getattr(exc, 'problem', exc)})"
        ) from None
    return parse(doc, me, where)


def parse(doc: object, me: str, where: str = "mesh file") -> MeshView:
    if not isinstance(doc, dict):
        raise MeshError(f"{where}: expected a mapping with trustDomain and nodes")
    unknown = set(doc) - {"trustDomain", "nodes"}
    if unknown:
        raise MeshError(f"{where}: unknown key {sorted(unknown)[0]!r} (trustDomain, nodes)")
    try:
        domain = check_trust_domain(str(doc.get("trustDomain", "")))
    except MeshError as exc:
        raise MeshError(f"{where}: trustDomain: {exc}") from None
    entries = doc.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise MeshError(f"{where}: nodes: a list of {{name, podCIDRs}}, at least one")
    view = MeshView(domain, me, source=where)
    owner: dict[Network, str] = {}
    for i, entry in enumerate(entries):
        at = f"{where}: nodes[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "podCIDRs", "address"}:
            raise MeshError(f"{at}: expected name, podCIDRs (and address)")
        try:
            name = check_segment(str(entry.get("name", "")), "node name")
        except MeshError as exc:
            raise MeshError(f"{at}: {exc}") from None
        if name in view.nodes:
            raise MeshError(f"{at}: node {name} is listed twice")
        cidrs = entry.get("podCIDRs")
        if not isinstance(cidrs, list) or not cidrs:
            raise MeshError(f"{at} ({name}): podCIDRs: a list of networks")
        nets = []
        for cidr in cidrs:
            try:
                net = ipaddress.ip_network(str(cidr), strict=True)
            except ValueError as exc:
                raise MeshError(f"{at} ({name}): podCIDRs: {exc}") from None
            for other, holder in owner.items():
                if net.version == other.version and net.overlaps(other):
                    raise MeshError(f"{at} ({name}): {net} overlaps {other} of node {holder}")
            owner[net] = name
            nets.append(net)
        view.nodes[name] = MeshNode(name, tuple(nets))
    if me not in view.nodes:
        raise MeshError(
            f"{where}: this node, {me!r}, is not listed (nodes: {', '.join(view.nodes)});"
            " give its name with --node-name"
        )
    return view
