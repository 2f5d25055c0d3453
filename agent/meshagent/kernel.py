"""What this kernel and machine offer the agent: hooks, headers, mounts."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from meshagent.errors import MeshError

# The first kernel with each feature the eBPF backend uses.
MIN_KERNEL = {
    "cgroup_sock_addr": (4, 17),
    "sock_ops": (4, 13),
    "netns_cookie": (5, 7),  # bpf_get_netns_cookie in sock_addr programs
    "sk_lookup_in_sock_addr": (5, 2),
    "bpf_link": (5, 7),  # BPF_LINK_CREATE for cgroups
    "sockops_netns_cookie": (5, 15),
    "so_netns_cookie": (5, 14),
}

_PROGRAM_NEEDS = {
    "mesh_connect4": ("cgroup_sock_addr", "netns_cookie", "sk_lookup_in_sock_addr"),
    "mesh_connect6": ("cgroup_sock_addr", "netns_cookie", "sk_lookup_in_sock_addr"),
    "mesh_sockops": ("sock_ops", "sockops_netns_cookie"),
}


def version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    if not match:
        return (0, 0)
    return int(match.group(1)), int(match.group(2))


def _fmt(ver: tuple[int, int]) -> str:
    return f"{ver[0]}.{ver[1]}"


def headers_path() -> Path:
    source = os.environ.get("BCC_KERNEL_SOURCE")
    if source:
        return Path(source)
    return Path("/lib/modules") / platform.release() / "build"


def has_headers() -> bool:
    path = headers_path()
    return (path / "include").is_dir() or (path / "Makefile").exists()


def bpffs_mounted() -> bool:
    try:
        with open("/proc/mounts") as mounts:
            return any(line.split()[2:3] == ["bpf"] for line in mounts)
    except OSError:
        return False


def feature_hint(prog: str) -> str:
    needs = _PROGRAM_NEEDS.get(prog, ())
    parts = [f"{need} needs {_fmt(MIN_KERNEL[need])}+" for need in needs]
    return f"kernel {platform.release()}: " + ", ".join(parts)


def missing_features() -> list[str]:
    current = version()
    return [name for name, need in MIN_KERNEL.items() if current < need]


def require_for_ebpf() -> None:
    """Refuse early, with the fix, what would fail later inside BCC."""
    missing = missing_features()
    if missing:
        needs = ", ".join(f"{name} ({_fmt(MIN_KERNEL[name])}+)" for name in missing)
        raise MeshError(f"kernel {platform.release()} lacks what the eBPF backend needs: {needs}")
    if not has_headers():
        raise MeshError(
            f"kernel headers for {platform.release()} not found at {headers_path()}:"
            " run scripts/bootstrap (installs linux-headers-amd64 and links them)"
        )
    if not Path("/sys/kernel/btf/vmlinux").exists():
        # BCC does not need BTF for these programs; say so only in the probe.
        pass


@dataclass(frozen=True)
class Probe:
    kernel: str
    cgroup2: str | None
    headers: str | None
    bpffs: bool
    btf: bool
    features: dict[str, bool]

    def to_dict(self) -> dict:
        return asdict(self)


def probe() -> Probe:
    from meshagent import cgroup

    try:
        cg2: str | None = str(cgroup.cgroup2_mount())
    except MeshError:
        cg2 = None
    current = version()
    return Probe(
        kernel=platform.release(),
        cgroup2=cg2,
        headers=str(headers_path()) if has_headers() else None,
        bpffs=bpffs_mounted(),
        btf=Path("/sys/kernel/btf/vmlinux").exists(),
        features={name: current >= need for name, need in MIN_KERNEL.items()},
    )
