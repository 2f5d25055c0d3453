"""Pod and node records, address allocation and validation (pure)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field

from meshagent.errors import MeshError

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NAME_MAX = 40  # leaves room for the netns prefix and stays readable


@dataclass(frozen=True)
class NodeConfig:
    """The node's pod network; fixed by the first pod, kept in node.json."""

    bridge: str = "mesh0"
    cidr4: str = "10.244.0.0/24"
    cidr6: str = "fd6d:6573:6800::/64"
    cgroup_parent: str = "meshagent/pods"
    netns_prefix: str = "mesh-"  # netns of pod NAME: <prefix>NAME
    # Where the bridge and the pods' host-side veths live: a named netns
    # (a node of a two-node mesh on one machine), or "" for the caller's own.
    node_netns: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9][-a-z0-9]{0,15}", self.netns_prefix):
            raise MeshError(f"netns prefix {self.netns_prefix!r}: 1-16 of a-z, 0-9, '-'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.bridge):
            raise MeshError(f"bridge {self.bridge!r}: 1-15 letters, digits, '_', '.', '-'")
        net4 = _network(self.cidr4, 4, "pod network")
        net6 = _network(self.cidr6, 6, "pod IPv6 network")
        if net4.prefixlen > 29:
            raise MeshError(f"pod network {self.cidr4}: too small (at most /29)")
        if net6.prefixlen > 120:
            raise MeshError(f"pod IPv6 network {self.cidr6}: too small (at most /120)")
        if self.node_netns and not re.fullmatch(
            r"[A-Za-z0-9][-A-Za-z0-9_.]{0,63}", self.node_netns
        ):
            raise MeshError(f"node netns {self.node_netns!r}: a network namespace's name")
        if not self.cgroup_parent.strip("/"):
            raise MeshError("cgroup parent must not be the cgroup root")

    @property
    def gateway4(self) -> str:
        return str(ipaddress.ip_network(self.cidr4)[1])

    @property
    def gateway6(self) -> str:
        return str(ipaddress.ip_network(self.cidr6)[1])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Pod:
    name: str
    netns: str
    ip4: str
    ip6: str
    host_veth: str
    cgroup: str  # relative to the cgroup v2 mount
    bridge: str
    # Inbound across the mesh (mesh/strict.py): "strict" pods take only the
    # mesh's connections (their rules are made with them), "permissive" any.
    mtls: str = "permissive"
    # What policies select it by (policy/model.py), as Kubernetes labels.
    labels: dict[str, str] = dc_field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
        ):
            raise MeshError(f"pod {self.name}: labels: a mapping of strings")

    def to_dict(self) -> dict:
        out = asdict(self)
        if not out["labels"]:  # what an agent before labels can read
            del out["labels"]
        return out


def parse_labels(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """KEY=VALUE strings (--label) as a dict; MeshError naming a bad one."""
    from meshagent.policy.model import LABEL_KEY_RE, LABEL_VALUE_RE

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
            raise MeshError(f"--label {item!r}: KEY=VALUE, as Kubernetes labels (app=web)")
        out[key] = value
    return out


def _network(text: str, version: int, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise MeshError(f"{what} {text!r}: {exc}") from None
    if net.version != version:
        raise MeshError(f"{what} {text!r}: not IPv{version}")
    return net


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or "") or len(name) > NAME_MAX:
        raise MeshError(
            f"pod name {name!r}: use 1-{NAME_MAX} lowercase letters, digits and '-',"
            " starting and ending with a letter or digit"
        )
    return name


def host_veth_name(netns: str) -> str:
    """A stable host-side veth name within the 15-character limit, derived
    from the pod's netns name (unique on the machine)."""
    import hashlib

    return "mesh" + hashlib.sha1(netns.encode()).hexdigest()[:10]


def allocate(node: NodeConfig, used4: set[str], wanted: str | None = None) -> tuple[str, str]:
    """Pick the pod's IPv4 (lowest free, or the wanted one) and the IPv6 with
    the same host index in the IPv6 network."""
    net4 = ipaddress.ip_network(node.cidr4)
    net6 = ipaddress.ip_network(node.cidr6)
    gateway = net4[1]
    if wanted is not None:
        try:
            ip = ipaddress.ip_address(wanted)
        except ValueError:
            raise MeshError(f"--ip {wanted!r}: not an IP address") from None
        if ip.version != 4 or ip not in net4:
            raise MeshError(f"--ip {wanted}: not in the pod network {node.cidr4}")
        if ip in (net4.network_address, net4.broadcast_address, gateway):
            raise MeshError(
                f"--ip {wanted}: reserved in {node.cidr4} (network, gateway or broadcast)"
            )
        if str(ip) in used4:
            raise MeshError(f"--ip {wanted}: already used by another pod")
    else:
        ip = next((h for h in net4.hosts() if h != gateway and str(h) not in used4), None)
        if ip is None:
            raise MeshError(
                f"pod network {node.cidr4} is exhausted: delete a pod or use a larger --pod-cidr"
            )
    index = int(ip) - int(net4.network_address)
    return str(ip), str(net6.network_address + index)


def check_record(pod: Pod, node: NodeConfig | None) -> None:
    """A record read from disk names only what this project made for that
    pod on this node: its own netns, cgroup, veth and addresses. Anything
    else (say a netns path that leads to the host's) is refused."""
    validate_name(pod.name)
    if node is None:
        raise MeshError(f"pod {pod.name}: a record without the node's (node.json is missing)")
    expected = {
        "netns": node.netns_prefix + pod.name,
        "cgroup": f"{node.cgroup_parent.strip('/')}/{pod.name}",
        "host_veth": host_veth_name(node.netns_prefix + pod.name),
        "bridge": node.bridge,
    }
    for field, value in expected.items():
        if getattr(pod, field) != value:
            raise MeshError(
                f"pod {pod.name}: its record names {field} {getattr(pod, field)!r},"
                f" not this node's {value!r}"
            )
    for address, cidr in ((pod.ip4, node.cidr4), (pod.ip6, node.cidr6)):
        try:
            inside = ipaddress.ip_address(address) in ipaddress.ip_network(cidr)
        except ValueError:
            inside = False
        if not inside:
            raise MeshError(f"pod {pod.name}: its record's address {address!r} is not in {cidr}")
