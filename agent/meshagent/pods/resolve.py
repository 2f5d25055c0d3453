"""From a pod's name to its network namespace, whichever runtime made it.

- `web`: a standalone pod (pods/standalone.py), netns /run/netns/mesh-web;
- `default/web`: a Kubernetes pod: its CNI record (pods/kubelet.py), else the
  kubelet's cgroup layout (the pod's UID, known from the API watch, names
  its cgroup; a process there names the netns);
- either name with an explicit `--netns PATH` or `--pid PID`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.host import netns as host_netns
from meshagent.pods.kubelet import (
    CniStore,
    find_pod_cgroup,
    is_kube_name,
    netns_of_cgroup,
    split_name,
)
from meshagent.pods.model import validate_name
from meshagent.pods.store import PodStore


@dataclass(frozen=True)
class PodRef:
    name: str
    netns: str  # a name under /run/netns, or an absolute path
    # Where the netns came from: standalone, cni, cgroup, netns or pid; kept
    # in attached.json so a restarted agent finds it again the same way.
    source: str
    uid: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Resolver:
    def __init__(self, store: PodStore, uid_of: Callable[[str], str | None] | None = None) -> None:
        self.store = store
        self.cni = CniStore(store.state_dir)
        self.uid_of = uid_of or (lambda _name: None)  # the API watch's view, when there is one

    def get(self, name: str, netns: str | None = None, pid: int | None = None) -> PodRef:
        ref = self._find(name, netns, pid)
        if ref.source != "standalone":
            not_the_hosts(ref)
        return ref

    def _find(self, name: str, netns: str | None, pid: int | None) -> PodRef:
        check_name(name)
        if netns and pid:
            raise MeshError(f"pod {name}: give --netns or --pid, not both")
        if netns:
            return PodRef(name, check_netns_path(name, netns), "netns")
        if pid is not None:
            return PodRef(name, netns_of_pid(name, pid), "pid")
        if not is_kube_name(name):
            return PodRef(name, self.store.get(name).netns, "standalone")
        record = self.cni.get(name)
        if record is not None:
            if not os.path.exists(record.netns):
                raise MeshError(
                    f"pod {name}: its sandbox's network namespace {record.netns} is gone"
                )
            return PodRef(name, record.netns, "cni", record.uid)
        uid = self.uid_of(name)
        if not uid:
            raise MeshError(
                f"pod {name}: no CNI record and no UID from the API server for it;"
                " give --netns PATH or --pid PID"
            )
        cgroup_dir = find_pod_cgroup(uid)
        if cgroup_dir is None:
            raise MeshError(f"pod {name}: no cgroup pod{uid} under the kubelet's kubepods roots")
        try:
            path = netns_of_cgroup(cgroup_dir)
        except MeshError as exc:
            raise MeshError(f"pod {name}: {exc}") from None
        return PodRef(name, path, "cgroup", uid)

    def again(self, name: str, source: str, netns: str) -> PodRef:
        """A recorded pod (state.PodRecord), found the way it was found. A
        pod found by its cgroup is found again by the recorded path (one of
        its processes' /proc/PID/ns/net) while it exists: a successor or a
        restarted agent has no UID from the API server yet. The caller
        checks that the namespace is still the recorded one (netns_id)."""
        if source in ("netns", "pid", "cgroup"):
            if os.path.exists(netns):
                ref = PodRef(name, netns, source)
                not_the_hosts(ref)
                return ref
            if source != "cgroup":
                raise MeshError(f"pod {name}: its network namespace {netns} is gone")
        return self.get(name)


def check_name(name: str) -> str:
    if is_kube_name(name):
        split_name(name)
    else:
        validate_name(name)
    return name


def not_the_hosts(ref: PodRef) -> None:
    """A pod in the agent's own netns (hostNetwork, or a wrong path) is
    never attached: that would steer the node's own connections."""
    try:
        st = os.stat(host_netns.path(ref.netns))
        home = os.stat("/proc/self/ns/net")
    except OSError as exc:
        raise MeshError(f"pod {ref.name}: network namespace {ref.netns}: {exc.strerror}") from None
    if (st.st_dev, st.st_ino) == (home.st_dev, home.st_ino):
        raise MeshError(
            f"pod {ref.name}: {ref.netns} is the node's own network namespace"
            " (a hostNetwork pod?): not attached"
        )


def check_netns_path(name: str, path: str) -> str:
    """An absolute path of a network namespace file (nsfs), or a name under /run/netns."""
    full = Path(path) if path.startswith("/") else host_netns.path(path)
    try:
        st = os.stat(full)
        home = os.stat("/proc/self/ns/net")
    except OSError as exc:
        raise MeshError(f"pod {name}: --netns {path}: {exc.strerror}") from None
    if st.st_dev != home.st_dev:
        raise MeshError(f"pod {name}: --netns {path}: not a network namespace file")
    return str(full)


def netns_of_pid(name: str, pid: int) -> str:
    if pid <= 0:
        raise MeshError(f"pod {name}: --pid {pid}: not a process id")
    path = f"/proc/{pid}/ns/net"
    if not os.path.exists(path):
        raise MeshError(f"pod {name}: --pid {pid}: no such process")
    return path
