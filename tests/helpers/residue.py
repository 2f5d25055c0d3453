"""What a test could leave behind on this machine: the autouse no_residue
fixture (tests/conftest.py) compares these before and after every test."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path


def residue() -> set[str]:
    """What a test could leave behind on this machine, by the tests' own
    prefixes: netns, links, cgroups, pinned BPF objects, processes naming a
    sandbox; and, not tagged, so checked as "new since the test began":
    our iptables chain in the host's namespace, listeners on the
    forwarder's port in the host's namespace, and namespace or BPF fds held
    by this test process."""
    from meshagent.host import cgroup

    found: set[str] = set()
    for kind, path, prefix in (
        ("netns", Path("/run/netns"), "mt"),
        ("link", Path("/sys/class/net"), "mt"),
    ):
        if path.is_dir():
            found |= {f"{kind} {name}" for name in os.listdir(path) if name.startswith(prefix)}
    try:
        root = cgroup.cgroup2_mount()
        found |= {f"cgroup {p.name}" for p in root.iterdir()  # meshagent-: an agent's own
                  if p.name.startswith(("meshtest-", "meshagent-meshtest-"))}  # fmt: skip
    except Exception:
        pass
    for line in Path("/proc/mounts").read_text().splitlines():  # runc's v1 cgroups (hybrid)
        fields = line.split()
        if fields[2] == "cgroup" and Path(fields[1]).is_dir():
            found |= {f"cgroup v1 {p}" for p in Path(fields[1]).iterdir()
                      if p.name.startswith("meshtest-")}  # fmt: skip
    pinned = Path("/sys/fs/bpf/meshagent")
    if pinned.is_dir():
        found |= {f"pinned {pinned / p.name}" for p in pinned.iterdir()}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for tag in re.findall(r"meshtest-([0-9a-f]{6})", cmdline):
                found.add(f"process {proc.name} of meshtest-{tag}: {cmdline[:80]}")
    return found


def untagged_residue() -> set[str]:
    from meshagent.config import AgentConfig
    from meshagent.redirect.rules import CHAIN

    found: set[str] = set()
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
                 "ip6tables-nft-save"):  # fmt: skip
        try:
            out = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True,
                                 timeout=20).stdout  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if CHAIN in out:
            found.add(f"iptables chain {CHAIN} in the host's namespace ({tool})")
    netns_dir = Path("/run/netns")  # the runtime's pod namespaces (tests/helpers/cri.py)
    if netns_dir.is_dir():
        found |= {f"netns {p}" for p in os.listdir(netns_dir) if p.startswith("cni-")}
    if Path("/run/containerd").exists():
        found.add("/run/containerd (the test node's shims)")
    port = f"{AgentConfig().port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1].endswith(f":{port}"):
                found.add(f"a listener on the forwarder's port in the host's namespace ({table})")
    own = os.readlink("/proc/self/ns/net")  # host/netns.py keeps one per thread, by design
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        held = target.startswith(("net:[", "/run/netns/", "anon_inode:bpf")) or "/ns/net" in target
        if held and target != own:
            found.add(f"this test process holds fd {fd.name}: {target}")
    return found
