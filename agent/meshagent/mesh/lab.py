"""Nodes of a mesh on one machine (`meshagent demo --nodes 2`, the tests):
each node a network namespace holding its pod bridge, the nodes joined by
a veth "wire" with a route to each other's pod networks. What a Lab makes,
remove() takes away, and only that.

    node-a netns                         node-b netns
    bridge (pods of a)  --  wire veth  --  bridge (pods of b)
      10.X.1.0/24         10.X.0.1/.2        10.X.2.0/24
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass, field

from meshagent.errors import MeshError
from meshagent.host import netns


@dataclass
class LabNode:
    name: str  # the node's name in the mesh
    netns: str  # its network namespace (holds the bridge)
    bridge: str
    cidr4: str
    cidr6: str
    wire4: str  # its end of the wire
    wire6: str

    def mesh_entry(self) -> dict:
        return {"name": self.name, "podCIDRs": [self.cidr4, self.cidr6]}


@dataclass
class Lab:
    """Two nodes, tag-named so that labs never collide: netns {tag}-a and
    {tag}-b, wire ends {tag}w0 / {tag}w1."""

    tag: str
    octet: int  # 10.<octet>.0.0/16 holds the wire and both pod networks
    nodes: list[LabNode] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # netns made here

    @classmethod
    def plan(cls, tag: str, octet: int, names: tuple[str, str] = ("node-a", "node-b")) -> Lab:
        if not 0 < octet < 255:
            raise MeshError(f"lab network 10.{octet}.0.0/16: the octet must be 1-254")
        lab = cls(tag, octet)
        for i, name in enumerate(names, start=1):
            lab.nodes.append(
                LabNode(
                    name=name,
                    netns=f"{tag}-{name[-1]}",
                    bridge=f"{tag}b{i}",
                    cidr4=f"10.{octet}.{i}.0/24",
                    cidr6=f"fd6d:{octet:x}:{i}::/64",
                    wire4=f"10.{octet}.0.{i}",
                    wire6=f"fd6d:{octet:x}::{i}",
                )
            )
        return lab

    def mesh_file(self, trust_domain: str) -> dict:
        return {"trustDomain": trust_domain, "nodes": [n.mesh_entry() for n in self.nodes]}

    def create(self) -> None:
        """The nodes' namespaces, forwarding on, the wire and the routes;
        everything made so far is removed if a step fails."""
        from pyroute2 import IPRoute
        from pyroute2 import netns as pyr_netns

        try:
            for node in self.nodes:
                if netns.exists(node.netns):
                    raise MeshError(f"network namespace {node.netns} exists already")
                pyr_netns.create(node.netns)
                self.made.append(node.netns)
                fd = netns.open_fd(node.netns)
                try:
                    with netns.entered(fd):
                        for knob in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
                            with open(f"/proc/sys/net/{knob}", "w") as f:
                                f.write("1")
                finally:
                    import os

                    os.close(fd)
            a, b = self.nodes
            ends = (f"{self.tag}w0", f"{self.tag}w1")
            with IPRoute(netns=a.netns) as ipr:
                ipr.link("add", ifname=ends[0], kind="veth",
                         peer={"ifname": ends[1], "net_ns_fd": b.netns})  # fmt: skip
            for node, end, other in ((a, ends[0], b), (b, ends[1], a)):
                with IPRoute(netns=node.netns) as ipr:
                    lo = ipr.link_lookup(ifname="lo")[0]
                    ipr.link("set", index=lo, state="up")
                    index = ipr.link_lookup(ifname=end)[0]
                    ipr.addr("add", index=index, address=node.wire4, prefixlen=24)
                    ipr.addr("add", index=index, address=node.wire6, prefixlen=64, flags=0x02)
                    ipr.link("set", index=index, state="up")
                    ipr.route("add", dst=other.cidr4, gateway=other.wire4)
                    ipr.route("add", dst=other.cidr6, gateway=other.wire6)
        except Exception as exc:
            self.remove()
            if isinstance(exc, MeshError):
                raise
            raise MeshError(f"two-node lab: {exc}") from None

    @property
    def wire(self) -> str:
        """The wire's end in the first node's netns (for a capture)."""
        return f"{self.tag}w0"

    def remove(self) -> None:
        """The namespaces made here (the wire and bridges go with them)."""
        from pyroute2 import netns as pyr_netns

        for name in reversed(self.made):
            with contextlib.suppress(OSError, FileNotFoundError):
                pyr_netns.remove(name)
        self.made.clear()


def free_octet(used: set[int] | None = None) -> int:
    """A 10.X/16 no interface of this machine's namespace has an address in."""
    from pyroute2 import IPRoute

    taken = set(used or ())
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            addr = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if addr in ipaddress.ip_network("10.0.0.0/8"):
                taken.add(int(str(addr).split(".")[1]))
    for octet in range(200, 250):
        if octet not in taken:
            return octet
    raise MeshError("no free 10.X.0.0/16 for the lab between 10.200 and 10.249")
