"""Kubernetes pods on this node: the records the chained CNI plugin
(meshagent-cni) writes at ADD, and the kubelet's cgroup layout for pods
that started before the plugin was installed.

A Kubernetes pod is named NAMESPACE/NAME. Its record, state_dir/cni/
NAMESPACE_NAME.json (or HASH.json when that is too long a file name), says which sandbox (container id) and network
namespace the runtime made for it, its UID and addresses, and whether the
plugin's configuration attaches every pod (else the agent decides, from
the pod's labels).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshagent.errors import MeshError

# DNS-1123 label (namespaces) and subdomain (pod names), as the API server checks them.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
NAMESPACE_RE = re.compile(_LABEL)
POD_NAME_RE = re.compile(rf"{_LABEL}(\.{_LABEL})*")
UID_RE = re.compile(r"[0-9a-fA-F-]{1,64}")
CNI_DIR = "cni"
NAME_MAX = 255  # a file name's limit (a namespace and a name may be 63 + 253)


def split_name(full: str) -> tuple[str, str]:
    """NAMESPACE/NAME -> (namespace, name), checked as the API server would."""
    namespace, sep, name = (full or "").partition("/")
    if not sep or not NAMESPACE_RE.fullmatch(namespace) or len(namespace) > 63:
        raise MeshError(f"pod {full!r}: use NAMESPACE/NAME (namespace: a DNS-1123 label)")
    if not POD_NAME_RE.fullmatch(name) or len(name) > 253:
        raise MeshError(f"pod {full!r}: the name is not a DNS-1123 subdomain")
    return namespace, name


def is_kube_name(name: str) -> bool:
    return "/" in (name or "")


@dataclass(frozen=True)
class CniRecord:
    namespace: str
    name: str
    uid: str
    container_id: str
    netns: str  # the path the runtime gave (CNI_NETNS)
    ifname: str
    ips: list[str] = field(default_factory=list)
    attach: bool = False  # the plugin's config attaches every pod
    added: float = 0.0

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict:
        return asdict(self)


class CniStore:
    """state_dir/cni/NAMESPACE_NAME.json (the '_' cannot occur in either
    part); a name too long for that is HASH.json (no '_': the two never
    meet), with the full name inside as always."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / CNI_DIR

    def path(self, full: str) -> Path:
        namespace, name = split_name(full)
        file_name = f"{namespace}_{name}.json"
        if len(file_name.encode()) > NAME_MAX:
            file_name = hashlib.sha256(full.encode()).hexdigest() + ".json"
        return self.dir / file_name

    def get(self, full: str) -> CniRecord | None:
        path = self.path(full)
        try:
            data = json.loads(path.read_text())
            record = CniRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise MeshError(f"pod {full}: its CNI record {path} is unreadable ({exc})") from None
        if record.full_name != full:
            raise MeshError(f"pod {full}: its CNI record {path} names {record.full_name}")
        return record

    def save(self, record: CniRecord) -> None:
        from meshagent.state import write_json

        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(self.path(record.full_name), record.to_dict())

    def drop(self, full: str, container_id: str | None = None) -> bool:
        """Remove the record (of that sandbox only, when container_id is
        given: a late DEL of an old sandbox leaves the new one's)."""
        record = self.get(full)
        if record is None:
            return False
        if container_id is not None and record.container_id != container_id:
            return False
        self.path(full).unlink(missing_ok=True)
        return True

    def all(self) -> list[CniRecord]:
        out = []
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.json")):
            namespace, sep, name = path.stem.partition("_")
            try:
                if not sep:  # HASH.json: the name is inside
                    namespace, name = split_name(self._full_name_in(path))
                record = self.get(f"{namespace}/{name}")
            except MeshError:
                continue
            if record is not None and self.path(record.full_name) == path:
                out.append(record)
        return out

    @staticmethod
    def _full_name_in(path: Path) -> str:
        try:
            data = json.loads(path.read_text())
            return f"{data['namespace']}/{data['name']}"
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise MeshError(f"CNI record {path} is unreadable ({exc})") from None


def new_record(**fields) -> CniRecord:
    return CniRecord(added=time.time(), **fields)


# -- the kubelet's cgroup layout -------------------------------------------
def cgroup_roots() -> list[Path]:
    """Where to look for the kubelet's layout: the cgroup v2 mount, then
    the v1 hierarchies (a hybrid host's runc puts pods in both)."""
    v2, v1 = [], []
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    v2.append(Path(parts[1]))
                elif len(parts) >= 4 and parts[2] == "cgroup" and "pids" in parts[3].split(","):
                    v1.append(Path(parts[1]))
    except OSError:
        pass
    return v2 + v1


KUBEPODS = ("kubepods", "kubepods.slice")  # the kubelet's root (cgroupfs, systemd driver)
QOS = ("besteffort", "burstable", "kubepods-besteffort.slice", "kubepods-burstable.slice")
KUBEPODS_DEPTH = 2  # below the mount: /kubepods, or under a --cgroup-root (a test's cgroup)
POD_PROCS_MAX = 4096  # processes looked at in one pod's cgroup
POD_CGROUPS_MAX = 256  # ... and cgroups


def find_pod_cgroup(uid: str) -> Path | None:
    for mount in cgroup_roots():
        found = cgroup_of_uid(mount, uid)
        if found is not None:
            return found
    return None


def _owned_dirs(directory: Path, owner: int) -> list[os.DirEntry]:
    """The subdirectories of directory that owner owns (no symlinks)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == owner:
                out.append(entry)
        except OSError:
            continue
    return out


def kubepods_roots(mount: Path, owner: int = 0, max_depth: int = KUBEPODS_DEPTH) -> list[Path]:
    """The kubelet's kubepods* directories at most max_depth below the
    mount, reached only through directories root owns: a user's delegated
    subtree (owned by the user) is never searched."""
    roots: list[Path] = []
    level = [mount]
    for _depth in range(max_depth):
        below: list[Path] = []
        for directory in level:
            for entry in _owned_dirs(directory, owner):
                (roots if entry.name in KUBEPODS else below).append(Path(entry.path))
        level = below
    return roots


def cgroup_of_uid(mount: Path, uid: str, owner: int = 0) -> Path | None:
    """The pod's cgroup: `pod<UID>` (cgroupfs driver) or `*-pod<UID with
    _>.slice` (systemd driver), where the kubelet puts it and nowhere else:
    right under a kubepods* root or under its QoS class; never below a pod
    (a pod cannot plant another pod's cgroup inside its own)."""
    if not UID_RE.fullmatch(uid or ""):
        return None
    names = {f"pod{uid}", f"pod{uid.replace('-', '_')}"}

    def is_pod(name: str) -> bool:
        stem = name.removesuffix(".slice")
        return stem in names or any(stem.endswith("-" + n) for n in names)

    for root in kubepods_roots(mount, owner):
        for entry in _owned_dirs(root, owner):
            if is_pod(entry.name):
                return Path(entry.path)
            if entry.name in QOS:
                for pod in _owned_dirs(Path(entry.path), owner):
                    if is_pod(pod.name):
                        return Path(pod.path)
    return None


def netns_of_cgroup(cgroup_dir: Path) -> str:
    """/proc/PID/ns/net of the pod: every process in its cgroup and below
    (the sandbox's pause process, each container's) must be in one network
    namespace, and not the node's; else a MeshError says why (a decoy
    process in a private netns is never taken for the pod)."""
    home = os.stat("/proc/self/ns/net")
    seen: dict[tuple[int, int], str] = {}
    procs = cgroups = 0
    for dirpath, _dirs, files in os.walk(cgroup_dir):
        cgroups += 1
        if cgroups > POD_CGROUPS_MAX:
            raise MeshError(f"its cgroup {cgroup_dir} has over {POD_CGROUPS_MAX} cgroups")
        if "cgroup.procs" not in files:
            continue
        try:
            pids = Path(dirpath, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            procs += 1
            if procs > POD_PROCS_MAX:
                raise MeshError(f"its cgroup {cgroup_dir} has over {POD_PROCS_MAX} processes")
            path = f"/proc/{pid}/ns/net"
            try:
                st = os.stat(path)
            except OSError:
                continue  # exited meanwhile
            seen.setdefault((st.st_dev, st.st_ino), path)
    if not seen:
        raise MeshError(f"no process in its cgroup {cgroup_dir} names its netns")
    if len(seen) > 1:
        raise MeshError(
            f"the processes in its cgroup {cgroup_dir} are in {len(seen)} network namespaces"
            " (one in a private netns?): not attached; give --netns PATH"
        )
    [(key, path)] = seen.items()
    if key == (home.st_dev, home.st_ino):
        raise MeshError(
            f"the processes in its cgroup {cgroup_dir} are in the node's own network"
            " namespace (a hostNetwork pod?): not attached"
        )
    return path
