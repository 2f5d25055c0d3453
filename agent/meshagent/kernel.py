"""What this machine offers the agent, and how each fact was found.

probe() gathers the facts (the kernel's by bpf(2), see bpf/features.py;
the host's: cgroup2, headers, BCC, iptables, splice); evaluate() turns raw
facts into a Probe without touching the machine, so the unit tests can run
the plan over other kernels' facts. What to do with a Probe is decided
only in meshagent.plan.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshagent.bpf.programs import KERNEL_FEATURES, Program
from meshagent.errors import MeshError

HOST_FEATURES = ("cgroup2", "btf", "tcp_sock_btf", "kernel_headers", "bcc", "iptables", "splice")
FEATURES = (*HOST_FEATURES, *(feature.name for feature in KERNEL_FEATURES))


@dataclass(frozen=True)
class Feature:
    ok: bool
    how: str


@dataclass(frozen=True)
class Probe:
    kernel: str
    features: dict[str, Feature]
    without: tuple[str, ...] = ()
    iptables_flavour: str | None = None
    refused: dict[str, str] = field(default_factory=dict)  # program -> the kernel's reason
    raw: dict = field(default_factory=dict)  # the kernel facts as probed

    def has(self, *names: str) -> bool:
        return all(self.features[name].ok for name in names)

    def missing(self, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if not self.features[name].ok]

    def program_problem(self, program: Program) -> str | None:
        """Why program cannot run here, or None."""
        if program.name in self.refused:
            return self.refused[program.name]
        lacking = self.missing(program.needs)
        if lacking:
            return f"{program.name} needs {', '.join(lacking)}"
        return None

    def with_refused(self, refused: dict[str, str]) -> Probe:
        """The same facts plus programs the kernel refused at load."""
        return replace(self, refused={**self.refused, **refused})

    def to_dict(self) -> dict:
        return {
            "kernel": self.kernel,
            "features": {k: {"ok": v.ok, "how": v.how} for k, v in self.features.items()},
            "without": list(self.without),
            "iptables_flavour": self.iptables_flavour,
            "refused": dict(self.refused),
            "raw": self.raw,
        }


def check_feature_names(without: tuple[str, ...]) -> None:
    unknown = [name for name in without if name not in FEATURES]
    if unknown:
        raise MeshError(f"--without {unknown[0]}: unknown feature (one of {', '.join(FEATURES)})")


def evaluate(
    raw: dict,
    host: dict[str, Feature],
    without: tuple[str, ...] = (),
    iptables_flavour: str | None = None,
) -> Probe:
    """A Probe from raw kernel facts and host facts (pure)."""
    from meshagent.bpf.features import features as kernel_features

    check_feature_names(without)
    features = dict(host)
    for name, (ok, how) in kernel_features(raw).items():
        features[name] = Feature(ok, how)
    for name in without:
        features[name] = Feature(False, "turned off with --without")
    return Probe(raw.get("kernel", "?"), features, tuple(without), iptables_flavour, raw=raw)


def probe(without: tuple[str, ...] = (), iptables: str | None = None) -> Probe:
    """Probe this machine; `without` turns features off (to prove fallbacks)."""
    check_feature_names(without)
    from meshagent.bpf import features as kernel_facts
    from meshagent.bpf.source import has_headers, headers_path
    from meshagent.host import cgroup

    host: dict[str, Feature] = {}
    try:
        host["cgroup2"] = Feature(True, f"cgroup2 mounted at {cgroup.cgroup2_mount()}")
    except MeshError:
        host["cgroup2"] = Feature(False, "no cgroup2 entry in /proc/mounts")
    btf = Path("/sys/kernel/btf/vmlinux").exists()
    host["btf"] = Feature(btf, "/sys/kernel/btf/vmlinux " + ("present" if btf else "missing"))
    from meshagent.bpf import btf as kernel_btf

    try:
        acked = kernel_btf.tcp_sock_offsets()["bytes_acked"]
        host["tcp_sock_btf"] = Feature(True, f"tcp_sock.bytes_acked at byte {acked} (BTF)")
    except MeshError as exc:
        host["tcp_sock_btf"] = Feature(False, f"{exc} (the sockmap's back-pressure needs it)")
    headers = has_headers()
    host["kernel_headers"] = Feature(
        headers, f"{headers_path()} " + ("found" if headers else "missing")
    )
    bcc = importlib.util.find_spec("bcc") is not None
    host["bcc"] = Feature(bcc, "python3-bpfcc " + ("importable" if bcc else "not installed"))
    flavour = None
    try:
        from meshagent.redirect.iptables import detect_flavour

        flavour, how = detect_flavour(iptables)
        host["iptables"] = Feature(True, f"{flavour}: {how}")
    except MeshError as exc:
        host["iptables"] = Feature(False, str(exc))
    host["splice"] = Feature(hasattr(os, "splice"), "os.splice (Linux splice(2))")
    raw = kernel_facts.probe()
    raw.setdefault("kernel", platform.release())
    return evaluate(raw, host, tuple(without), flavour)
