"""What this kernel and machine offer the agent, how each fact was found,
and which redirect backend and data path `auto` picks from them."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from meshagent.errors import MeshError

# The first kernel with each feature; used when bpftool cannot probe.
MIN_KERNEL = {
    "cgroup_sock_addr": (4, 17),
    "sock_ops": (4, 13),
    "netns_cookie": (5, 7),  # bpf_get_netns_cookie in sock_addr programs
    "bpf_link": (5, 7),  # BPF_LINK_CREATE for cgroups
    "sockhash": (4, 18),
    "sk_skb_verdict": (4, 14),
    "ringbuf": (5, 8),
}
FEATURES = (
    "cgroup2",
    "cgroup_sock_addr",
    "netns_cookie",
    "sock_ops",
    "bpf_link",
    "sockhash",
    "sk_skb_verdict",
    "ringbuf",
    "btf",
    "kernel_headers",
    "bcc",
    "iptables",
    "splice",
)
EBPF_NEEDS = ("cgroup2", "cgroup_sock_addr", "netns_cookie", "sock_ops", "bpf_link",
              "kernel_headers", "bcc")  # fmt: skip
SOCKMAP_NEEDS = ("sockhash", "sk_skb_verdict", "kernel_headers", "bcc")


def version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def headers_path() -> Path:
    source = os.environ.get("BCC_KERNEL_SOURCE")
    if source:
        return Path(source)
    return Path("/lib/modules") / platform.release() / "build"


def has_headers() -> bool:
    path = headers_path()
    return (path / "include").is_dir() or (path / "Makefile").exists()


def require_headers() -> None:
    if not has_headers():
        raise MeshError(
            f"kernel headers for {platform.release()} not found at {headers_path()}:"
            " run scripts/bootstrap (installs linux-headers-amd64 and links them)"
        )


@dataclass(frozen=True)
class Feature:
    ok: bool
    how: str


@dataclass
class Probe:
    kernel: str
    features: dict[str, Feature]
    without: tuple[str, ...] = ()
    iptables_flavour: str | None = None
    notes: list[str] = field(default_factory=list)

    def has(self, *names: str) -> bool:
        return all(self.features[name].ok for name in names)

    def missing(self, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if not self.features[name].ok]

    def pick_backend(self) -> tuple[str | None, str]:
        lacking = self.missing(EBPF_NEEDS)
        if not lacking:
            return "ebpf", "the kernel has cgroup sock_addr hooks with the netns cookie"
        if self.features["iptables"].ok:
            return "iptables", f"ebpf lacks {', '.join(lacking)}"
        return None, f"ebpf lacks {', '.join(lacking)} and iptables is missing"

    def pick_datapath(self) -> tuple[str, str]:
        lacking = self.missing(SOCKMAP_NEEDS)
        if not lacking:
            return "sockmap", "sockhash and sk_skb verdict available (self-tested at start)"
        if self.features["splice"].ok:
            return "splice", f"sockmap lacks {', '.join(lacking)}"
        return "copy", "neither sockmap nor splice available"

    def to_dict(self) -> dict:
        backend, backend_why = self.pick_backend()
        datapath, datapath_why = self.pick_datapath()
        return {
            "kernel": self.kernel,
            "features": {k: {"ok": v.ok, "how": v.how} for k, v in self.features.items()},
            "without": list(self.without),
            "iptables_flavour": self.iptables_flavour,
            "auto": {
                "backend": backend,
                "backend_reason": backend_why,
                "datapath": datapath,
                "datapath_reason": datapath_why,
            },
        }


def _bpftool_probe() -> dict | None:
    tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not os.path.exists(tool):
        return None
    try:
        out = subprocess.run(
            [tool, "-j", "feature", "probe", "kernel"], capture_output=True, text=True, timeout=30
        ).stdout
        return json.loads(out)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _by_version(name: str) -> Feature:
    need = MIN_KERNEL[name]
    ok = version() >= need
    return Feature(ok, f"kernel {platform.release()} {'>=' if ok else '<'} {need[0]}.{need[1]}")


def check_feature_names(without: tuple[str, ...]) -> None:
    unknown = [name for name in without if name not in FEATURES]
    if unknown:
        raise MeshError(f"--without {unknown[0]}: unknown feature (one of {', '.join(FEATURES)})")


def probe(without: tuple[str, ...] = (), iptables: str | None = None) -> Probe:
    """Probe every feature; `without` turns features off (to prove fallbacks)."""
    check_feature_names(without)
    from meshagent import cgroup

    features: dict[str, Feature] = {}
    try:
        features["cgroup2"] = Feature(True, f"cgroup2 mounted at {cgroup.cgroup2_mount()}")
    except MeshError:
        features["cgroup2"] = Feature(False, "no cgroup2 entry in /proc/mounts")
    bpftool = _bpftool_probe()
    if bpftool is not None:
        progs, maps = bpftool["program_types"], bpftool["map_types"]
        helpers = bpftool["helpers"].get("cgroup_sock_addr_available_helpers", [])

        def prog(key: str) -> Feature:
            return Feature(bool(progs.get(f"have_{key}_prog_type")), f"bpftool: {key} program type")

        def bpfmap(key: str) -> Feature:
            return Feature(bool(maps.get(f"have_{key}_map_type")), f"bpftool: {key} map type")

        features["cgroup_sock_addr"] = prog("cgroup_sock_addr")
        features["netns_cookie"] = Feature(
            "bpf_get_netns_cookie" in helpers, "bpftool: bpf_get_netns_cookie in sock_addr helpers"
        )
        features["sock_ops"] = prog("sock_ops")
        features["sockhash"] = bpfmap("sockhash")
        features["sk_skb_verdict"] = prog("sk_skb")
        features["ringbuf"] = bpfmap("ringbuf")
    else:
        for name in ("cgroup_sock_addr", "netns_cookie", "sock_ops", "sockhash",
                     "sk_skb_verdict", "ringbuf"):  # fmt: skip
            features[name] = _by_version(name)
    features["bpf_link"] = _by_version("bpf_link")
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    features["btf"] = Feature(btf, "/sys/kernel/btf/vmlinux " + ("present" if btf else "missing"))
    features["kernel_headers"] = Feature(
        has_headers(), f"{headers_path()} " + ("found" if has_headers() else "missing")
    )
    bcc = importlib.util.find_spec("bcc") is not None
    features["bcc"] = Feature(bcc, "python3-bpfcc " + ("importable" if bcc else "not installed"))
    flavour = None
    try:
        from meshagent.redirect.iptables import detect_flavour

        flavour, how = detect_flavour(iptables)
        features["iptables"] = Feature(True, f"{flavour}: {how}")
    except MeshError as exc:
        features["iptables"] = Feature(False, str(exc))
    features["splice"] = Feature(hasattr(os, "splice"), "os.splice (Linux splice(2))")
    for name in without:
        features[name] = Feature(False, "turned off with --without")
    return Probe(platform.release(), features, tuple(without), flavour)
