"""The standalone runtime: a pod is a named netns on the node bridge.

Links, addresses and routes go through pyroute2 only.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.host import cgroup, netns
from meshagent.pods.model import (
    NodeConfig,
    Pod,
    allocate,
    host_veth_name,
    validate_name,
)
from meshagent.pods.store import PodStore

IFA_F_NODAD = 0x02


def _netlink_error(exc: Exception, what: str) -> MeshError:
    code = getattr(exc, "code", None)
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    return MeshError(f"{what}: {reason}")


def _node_ipr(node_netns: str = ""):
    """Netlink in the node's netns (the bridge's), or in ours."""
    from pyroute2 import IPRoute

    if node_netns and not netns.exists(node_netns):
        raise MeshError(f"node network namespace {node_netns} does not exist")
    return IPRoute(netns=node_netns) if node_netns else IPRoute()


def _ensure_bridge(node: NodeConfig) -> bool:
    """Make the node bridge with the gateways if absent; True if made now."""
    net4_len = int(node.cidr4.split("/")[1])
    net6_len = int(node.cidr6.split("/")[1])
    with _node_ipr(node.node_netns) as ipr:
        if ipr.link_lookup(ifname=node.bridge):
            return False
        try:
            ipr.link("add", ifname=node.bridge, kind="bridge")
            index = ipr.link_lookup(ifname=node.bridge)[0]
            ipr.addr("add", index=index, address=node.gateway4, prefixlen=net4_len)
            ipr.addr(
                "add", index=index, address=node.gateway6, prefixlen=net6_len, flags=IFA_F_NODAD
            )
            ipr.link("set", index=index, state="up")
        except Exception as exc:
            _delete_link(node.bridge, node.node_netns)
            raise _netlink_error(exc, f"bridge {node.bridge}") from None
    return True


def _delete_link(ifname: str, node_netns: str = "") -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    if node_netns and not netns.exists(node_netns):
        return  # the node's namespace went, and its links with it
    with _node_ipr(node_netns) as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise


def _setup_pod_side(pod: Pod, node: NodeConfig) -> None:
    from pyroute2 import IPRoute

    net4_len = int(node.cidr4.split("/")[1])
    net6_len = int(node.cidr6.split("/")[1])
    with IPRoute(netns=pod.netns, flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=pod.ip4, prefixlen=net4_len)
        ipr.addr("add", index=eth0, address=pod.ip6, prefixlen=net6_len, flags=IFA_F_NODAD)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=node.gateway4)
        ipr.route("add", dst="::/0", gateway=node.gateway6)


def create_pod(
    store: PodStore,
    name: str,
    ip: str | None = None,
    node: NodeConfig | None = None,
    mtls: str = "permissive",
    labels: dict[str, str] | None = None,
) -> Pod:
    """Make the pod: netns, veth to the bridge, dual-stack addresses, default
    routes, a cgroup; for a strict pod, the rules that let only the mesh in
    (before anything runs in it). Undoes everything it made if any step fails."""
    from pyroute2 import netns as pyr_netns

    from meshagent.mesh.strict import MtlsMode

    validate_name(name)
    try:
        mode = MtlsMode(mtls)
    except ValueError:
        raise MeshError(f"--mtls {mtls!r}: permissive or strict") from None
    with store.locked(), ExitStack() as undo:
        if store.find(name) is not None:
            raise MeshError(f"pod {name} already exists")
        current = store.node()
        if current is not None and node is not None and node != current:
            raise MeshError(
                f"this node's pods already use {current.bridge} {current.cidr4} {current.cidr6}"
                f" cgroup {current.cgroup_parent}: delete all pods to change it"
            )
        node = current or node or NodeConfig()
        ns_name = node.netns_prefix + name
        if netns.exists(ns_name):
            raise MeshError(f"pod {name}: network namespace {ns_name} already exists")
        pods, problems = store.scan()
        if problems:
            raise MeshError(
                f"{problems[0]}: fix or remove that record first (`meshagent pod list`)"
            )
        ip4, ip6 = allocate(node, {p.ip4 for p in pods}, ip)
        cg_root = cgroup.cgroup2_mount()
        pod = Pod(
            name=name,
            netns=ns_name,
            ip4=ip4,
            ip6=ip6,
            host_veth=host_veth_name(ns_name),
            cgroup=f"{node.cgroup_parent.strip('/')}/{name}",
            bridge=node.bridge,
            mtls=mode.value,
            labels=dict(labels or {}),
        )
        if current is None:
            made: dict = {"bridge": False, "cgroups": []}
            undo.callback(_unmake_node, node, made)
            made["bridge"] = _ensure_bridge(node)
            _make_parents(cg_root, node, made["cgroups"])
            store.save_node(node, made)
            undo.callback(store.drop_node)
        try:
            pyr_netns.create(ns_name)
            undo.callback(pyr_netns.remove, ns_name)
            with _node_ipr(node.node_netns) as ipr:
                ipr.link(
                    "add",
                    ifname=pod.host_veth,
                    kind="veth",
                    peer={"ifname": "eth0", "net_ns_fd": ns_name},
                )
                undo.callback(_delete_link, pod.host_veth, node.node_netns)
                index = ipr.link_lookup(ifname=pod.host_veth)[0]
                bridge = ipr.link_lookup(ifname=node.bridge)[0]
                ipr.link("set", index=index, master=bridge, state="up")
            _setup_pod_side(pod, node)
            if mode is MtlsMode.STRICT:
                from meshagent.mesh import strict

                strict.apply(ns_name, True, what=f"pod {name}")
        except MeshError:
            raise
        except Exception as exc:
            raise _netlink_error(exc, f"pod {name}") from None
        cg_path = cgroup.create(cg_root / pod.cgroup)
        undo.callback(cgroup.remove, cg_path)
        store.save(pod)
        undo.pop_all()
        return pod


def delete_pod(store: PodStore, name: str) -> Pod:
    """Kill the pod's processes, remove its cgroup, netns, veth and record;
    the bridge and node record go with the last pod."""
    from pyroute2 import netns as pyr_netns

    with store.locked():
        pod = store.get(name)
        cgroup.remove(cgroup.resolve(pod.cgroup, must_exist=False))
        if netns.exists(pod.netns):
            pyr_netns.remove(pod.netns)
        node = store.node()
        _delete_link(pod.host_veth, node.node_netns if node else "")
        store.drop(name)
        if not store.all() and not store.problems():  # the node's parts go with the last pod
            node = store.node()
            if node is not None:
                _unmake_node(node, store.node_made())
            store.drop_node()
    if not store.all() and not store.problems():
        store.cleanup_dirs()
    return pod


def _make_parents(root: Path, node: NodeConfig, made: list[str]) -> None:
    """Create the pod cgroup parent, noting each level made here (outermost first)."""
    parts = node.cgroup_parent.strip("/").split("/")
    for depth in range(1, len(parts) + 1):
        rel = "/".join(parts[:depth])
        if not (root / rel).exists():
            (root / rel).mkdir()
            made.append(rel)


def _unmake_node(node: NodeConfig, made: dict) -> None:
    """Remove the bridge and cgroup levels the first pod made, nothing else."""
    if made.get("bridge"):
        _delete_link(node.bridge, node.node_netns)
    root = cgroup.cgroup2_mount()
    for rel in reversed(made.get("cgroups", [])):
        try:
            (root / rel).rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            break


def enter_fn(pod: Pod) -> Callable[[], None]:
    """A preexec_fn: join the pod's cgroup and network namespace."""
    cg_procs = str(cgroup.cgroup2_mount() / pod.cgroup / "cgroup.procs")
    ns_path = str(netns.path(pod.netns))

    def enter() -> None:
        with open(cg_procs, "w") as procs:
            procs.write("0\n")
        fd = os.open(ns_path, os.O_RDONLY)
        netns.setns(fd)
        os.close(fd)

    return enter


def popen(pod: Pod, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start argv inside the pod (its netns and cgroup)."""
    if not netns.exists(pod.netns):
        raise MeshError(f"pod {pod.name}: network namespace {pod.netns} is gone")
    try:
        return subprocess.Popen(list(argv), preexec_fn=enter_fn(pod), **kwargs)
    except FileNotFoundError:
        raise MeshError(f"pod {pod.name}: command not found: {argv[0]}") from None
