"""Agent configuration: parsing, validation and the -D cflags for the BPF."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.modes import DataPathChoice, IptablesFlavour, LogFormat, Redirect, parse

EXCL_MAX = 256
# sun_path holds 108 bytes with the terminating NUL.
SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class AgentConfig:
    """What `meshagent run` was asked for. Its defaults are the only ones:
    the command line's options read theirs from here (AgentConfig.port)."""

    state_dir: Path = Path("/run/meshagent")
    cache_dir: Path = Path("/var/cache/meshagent")  # compiled BPF objects (bpf/objects.py)
    cgroup: str | None = None  # None: the cgroup v2 root
    port: int = 15001  # the forwarder's listeners
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[str, ...] = ()
    log_format: LogFormat = LogFormat.TEXT
    datapath: DataPathChoice = DataPathChoice.AUTO
    # Send buffer of spliced sockets (SO_SNDBUFFORCE: the kernel doubles it, to
    # the default budget);
    # it also bounds what Python carries when the budget holds bytes back.
    # 0: kernel autotuning.
    sockmap_sndbuf: int = 2 << 20
    # Back-pressure: bytes a spliced socket may have on their way to the other
    # end, not yet acked, before the kernel holds the rest back (bpf/skb_verdict.c).
    sockmap_budget: int = 4 << 20
    # The sockmap path uses sk_msg for ebpf pods where it can. Off by default:
    # a pod's socket then sits in a sockmap, where the kernel returns EAGAIN
    # to a blocking read woken by the socket's own writes (tcp_bpf_recvmsg;
    # tests/integration/test_blocking_reads.py, docs/architecture.md).
    sockmap_msg: bool = False
    # ... and with it a same-node server's replies go straight into the pod's
    # socket when it has read all before (bpf/sk_msg.c, mesh_reply_msg). Off
    # by default: the server's socket joins a sockmap, where a blocking read
    # can return EAGAIN (docs/architecture.md).
    sockmap_replies: bool = False
    redirect: Redirect = Redirect.AUTO
    without: tuple[str, ...] = ()  # kernel features turned off (see probe-kernel)
    iptables: IptablesFlavour | None = None  # None: detect
    pods_max: int = 1024
    conns_max: int = 65536
    pod_conns_max: int = 4096  # connections one pod may have forwarded at once
    # Bytes forwarded connections may hold (forwarder/budget.py); None: from
    # the agent's memory cgroup limit, or the node's memory.
    memory_max: int | None = None
    metrics_addr: str = "127.0.0.1:15090"  # /metrics, /healthz, /readyz; "off": none
    takeover: bool = False  # receive a running agent's pods and connections (upgrade)
    # Once handed over to a successor: "exit", or "wait" for SIGTERM (in a
    # container, whose exit the kubelet would answer with a restart).
    after_handover: str = "exit"
    kube: str = "auto"  # the API watch: auto (kubeconfig given or in a cluster), on, off
    kubeconfig: str | None = None
    node_name: str | None = None
    # The mesh between nodes (mesh/): the mesh file, and this node's
    # certificate directory (node.crt, node.key, ca.crt); both or neither.
    mesh: Path | None = None
    certs: Path | None = None
    ktls: str = "auto"  # the hop's bytes in the kernel's TLS where it self-tests well
    policy: Path | None = None  # the authorization policy file (policy/model.py)
    check_listener: bool = True
    debug: bool = False
    extra_cflags: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        check_port(self.port, "--port")
        # Frozen: enum fields are normalized through object.__setattr__.
        for name, enum, what in (
            ("log_format", LogFormat, "--log-format"),
            ("datapath", DataPathChoice, "--datapath"),
            ("redirect", Redirect, "--redirect"),
        ):
            object.__setattr__(self, name, parse(enum, getattr(self, name), what))
        if self.iptables is not None:
            object.__setattr__(
                self, "iptables", parse(IptablesFlavour, self.iptables, "--iptables")
            )
        if not 0 <= self.sockmap_sndbuf <= 1 << 30:
            raise MeshError("--sockmap-sndbuf must be between 0 and 1 GiB")
        if not 4096 <= self.sockmap_budget <= 1 << 30:
            raise MeshError("--sockmap-budget must be between 4096 bytes and 1 GiB")
        if self.sockmap_replies and not self.sockmap_msg:
            raise MeshError("--sockmap-replies needs --sockmap-msg (the replies go by sk_msg)")
        check_socket_path(self.socket_path)
        from meshagent.addrs import parse_addr

        parse_addr(self.metrics_addr)
        if not 16 <= self.conns_max <= 1 << 22:
            raise MeshError("conns_max must be between 16 and 4194304")
        if not 1 <= self.pod_conns_max <= 1 << 22:
            raise MeshError("--pod-conns-max must be between 1 and 4194304")
        from meshagent.forwarder.budget import BUFFER_MIN, COST_FACTOR

        if self.memory_max is not None and self.memory_max < BUFFER_MIN * COST_FACTOR:
            raise MeshError(
                f"--memory-max {self.memory_max}: less than one connection needs"
                f" ({BUFFER_MIN * COST_FACTOR} bytes)"
            )
        if not 1 <= self.pods_max <= 1 << 16:
            raise MeshError("pods_max must be between 1 and 65536")
        if self.kube not in ("auto", "on", "off"):
            raise MeshError(f"--kube {self.kube}: use auto, on or off")

    @property
    def socket_path(self) -> Path:
        from meshagent.state import StateDir

        return StateDir(self.state_dir).socket


def check_socket_path(path: Path) -> None:
    """A unix socket path must fit sun_path: say so in one line, not a traceback."""
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise MeshError(
            f"--state-dir {path.parent}: the control socket {path.name} there would be"
            f" {len(os.fsencode(path))} bytes long, more than a unix socket path allows"
            f" ({SOCKET_PATH_MAX}): use a shorter one (meshagent --state-dir DIR COMMAND)"
        )


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str, what: str) -> int | None:
    """'512M' -> bytes (K, M, G are powers of 1024; Ki/Mi/Gi the same);
    'auto' -> None."""
    value = text.strip().upper().removesuffix("I").removesuffix("B")
    if value == "AUTO":
        return None
    number, unit = value.rstrip("KMG"), value[len(value.rstrip("KMG")) :]
    if not number.isdigit() or unit not in _UNITS:
        raise MeshError(f"{what} {text!r}: give bytes, like 512M or 2G, or auto")
    return int(number) * _UNITS[unit]


def check_port(port: int, what: str = "port") -> int:
    if not 1 <= port <= 65535:
        raise MeshError(f"{what}: {port} is not a TCP port (1-65535)")
    return port


def parse_ports(text: str | None) -> tuple[int, ...]:
    """'22,53,8000-8003' -> (22, 53, 8000, 8001, 8002, 8003)."""
    if not text:
        return ()
    ports: set[int] = set()
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        lo_text, _, hi_text = item.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if hi_text else lo
        except ValueError:
            raise MeshError(f"--exclude-ports: {item!r} is not a port or a range a-b") from None
        check_port(lo, "--exclude-ports")
        check_port(hi, "--exclude-ports")
        if hi < lo:
            raise MeshError(f"--exclude-ports: range {item!r} runs backwards")
        ports.update(range(lo, hi + 1))
        if len(ports) > EXCL_MAX:
            raise MeshError(f"--exclude-ports: more than {EXCL_MAX} ports")
    return tuple(sorted(ports))


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def parse_cidrs(text: str | None) -> tuple[str, ...]:
    """'10.96.0.0/12,fd00::/8' -> normalized networks (host bits refused).
    Each family on its own: an IPv6 network never covers IPv4. One inside
    ::ffff:0:0/96 (IPv4-mapped) names IPv4 addresses and becomes that IPv4
    network (::ffff:10.0.0.0/104 is 10.0.0.0/8), as a dual-stack socket
    reaching ::ffff:a.b.c.d sends IPv4."""
    if not text:
        return ()
    nets: list[str] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise MeshError(f"--exclude-cidrs: {item!r}: {exc}") from None
        if net.version == 6 and net.subnet_of(_MAPPED):
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        if str(net) not in nets:
            nets.append(str(net))
    if len(nets) > EXCL_MAX - 1:  # the ebpf trie keeps one entry for ::ffff:0:0/96
        raise MeshError(f"--exclude-cidrs: more than {EXCL_MAX - 1} networks")
    return tuple(nets)


def bpf_cflags(cfg: AgentConfig) -> list[str]:
    """The only way configuration enters the C: -DMESH_* flags."""
    flags = [
        f"-DMESH_PODS_MAX={cfg.pods_max}",
        f"-DMESH_CONNS_MAX={cfg.conns_max}",
        f"-DMESH_EXCL_MAX={EXCL_MAX}",
        f"-DMESH_CHECK_LISTENER={int(cfg.check_listener)}",
        f"-DMESH_DEBUG={int(cfg.debug)}",
        f"-DMESH_FLIGHT_MAX={cfg.sockmap_budget}",
    ]
    flags.extend(cfg.extra_cflags)
    return flags
