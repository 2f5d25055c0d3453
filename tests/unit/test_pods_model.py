from __future__ import annotations

import pytest

from meshagent.errors import MeshError
from meshagent.pods.model import NodeConfig, allocate, host_veth_name, validate_name


@pytest.mark.parametrize("name", ["client", "a", "web-1", "x" * 40])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Client", "-a", "a-", "a_b", "a.b", "x" * 41, "a b"])
def test_bad_names(name):
    with pytest.raises(MeshError, match="pod name"):
        validate_name(name)


def test_host_veth_names_fit_and_differ():
    names = {host_veth_name(f"mesh-pod-{i}") for i in range(500)}
    assert len(names) == 500
    assert all(len(n) <= 15 and n.startswith("mesh") for n in names)


def test_allocation_skips_gateway_and_used_and_pairs_ipv6():
    node = NodeConfig(cidr4="10.9.0.0/24", cidr6="fd00:1::/64")
    assert allocate(node, set()) == ("10.9.0.2", "fd00:1::2")
    assert allocate(node, {"10.9.0.2", "10.9.0.3"}) == ("10.9.0.4", "fd00:1::4")
    assert allocate(node, set(), "10.9.0.77") == ("10.9.0.77", "fd00:1::4d")


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ("10.9.0.1", "reserved"),
        ("10.9.0.0", "reserved"),
        ("10.9.0.255", "reserved"),
        ("10.9.1.5", "not in the pod network"),
        ("fd00:1::5", "not in the pod network"),
        ("10.9.0.300", "not an IP address"),
        ("10.9.0.5", "already used"),
    ],
)
def test_bad_wanted_address(wanted, message):
    node = NodeConfig(cidr4="10.9.0.0/24", cidr6="fd00:1::/64")
    with pytest.raises(MeshError, match=message):
        allocate(node, {"10.9.0.5"}, wanted)


def test_exhausted_network():
    node = NodeConfig(cidr4="10.9.0.0/29", cidr6="fd00:1::/64")
    used: set[str] = set()
    for _ in range(5):
        used.add(allocate(node, used)[0])
    with pytest.raises(MeshError, match="exhausted"):
        allocate(node, used)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bridge": "a-name-longer-than-15"}, "bridge"),
        ({"cidr4": "10.0.0.0/30"}, "too small"),
        ({"cidr4": "fd00::/64"}, "not IPv4"),
        ({"cidr6": "10.0.0.0/24"}, "not IPv6"),
        ({"cidr4": "10.0.0.1/24"}, "host bits"),
        ({"cgroup_parent": "/"}, "cgroup parent"),
        ({"netns_prefix": "Bad/"}, "netns prefix"),
    ],
)
def test_bad_node_config(kwargs, message):
    with pytest.raises(MeshError, match=message):
        NodeConfig(**kwargs)


def test_a_pod_found_by_its_cgroup_is_found_again_by_its_recorded_path(tmp_path):
    """A successor (or a restarted agent) has no UID from the API server yet:
    a cgroup-found pod is found again by the recorded /proc/PID/ns/net while
    it exists, and only else through the CNI record or the API's UID."""
    from meshagent.pods.resolve import Resolver
    from meshagent.pods.store import PodStore

    resolver = Resolver(PodStore(tmp_path))
    with pytest.raises(MeshError, match="node's own network namespace"):
        resolver.again("shop/web", "cgroup", "/proc/self/ns/net")  # the path is used
    with pytest.raises(MeshError, match="no CNI record and no UID"):
        resolver.again("shop/web", "cgroup", str(tmp_path / "gone"))
    with pytest.raises(MeshError, match="is gone"):
        resolver.again("shop/web", "pid", str(tmp_path / "gone"))
