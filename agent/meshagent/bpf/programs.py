"""Every BPF program meshagent loads, and what each needs from the kernel.

One table drives three things: the kernel probe (it probes exactly the
program types, map types and helpers listed here), the plan (a program is
loadable only if all it needs is there) and a test that reads the C
(tests/unit/test_programs.py: the helpers each entry file calls are the
helpers listed for it, and its "Minimum kernel" comment is the newest
`since` of its needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from meshagent.bpf import syscall as sc

Version = tuple[int, int]


class Kind(StrEnum):
    PROG = "program type"
    MAP = "map type"
    HELPER = "helper"
    INSN = "instruction"
    ATTACH = "attach type"
    SOCKOPT = "socket option"


@dataclass(frozen=True)
class KernelFeature:
    """One thing a kernel has or lacks; `since` is the first mainline
    release with it (the fallback when it cannot be probed)."""

    name: str
    kind: Kind
    since: Version
    what: str
    prog_type: str = ""  # HELPER: the program type that must be allowed to call it
    helpers: tuple[str, ...] = ()  # HELPER: the helper functions (all needed)


KERNEL_FEATURES: tuple[KernelFeature, ...] = (
    KernelFeature("cgroup_sock_addr", Kind.PROG, (4, 17), "cgroup sock_addr programs"),
    KernelFeature("sock_ops", Kind.PROG, (4, 13), "sock_ops programs"),
    KernelFeature("sk_skb", Kind.PROG, (4, 14), "sk_skb programs"),
    KernelFeature("lru_hash", Kind.MAP, (4, 10), "LRU hash maps"),
    KernelFeature("lpm_trie", Kind.MAP, (4, 11), "LPM trie maps"),
    KernelFeature("percpu_array", Kind.MAP, (4, 6), "per-CPU array maps"),
    KernelFeature("sockhash", Kind.MAP, (4, 18), "sockhash maps"),
    KernelFeature("ringbuf", Kind.MAP, (5, 8), "BPF ring buffers"),
    KernelFeature(
        "netns_cookie", Kind.HELPER, (5, 7), "bpf_get_netns_cookie in sock_addr programs",
        "cgroup_sock_addr", ("bpf_get_netns_cookie",),
    ),
    KernelFeature(
        "socket_cookie_sock_addr", Kind.HELPER, (5, 0),
        "bpf_get_socket_cookie in sock_addr programs",
        "cgroup_sock_addr", ("bpf_get_socket_cookie",),
    ),
    KernelFeature(
        "sk_release_sock_addr", Kind.HELPER, (5, 2),
        "bpf_sk_release in sock_addr programs (kernel-side fail-open)",
        "cgroup_sock_addr", ("bpf_sk_release",),
    ),
    KernelFeature(
        "netns_cookie_sock_ops", Kind.HELPER, (5, 15), "bpf_get_netns_cookie in sock_ops programs",
        "sock_ops", ("bpf_get_netns_cookie",),
    ),
    KernelFeature(
        "socket_cookie_sock_ops", Kind.HELPER, (5, 0), "bpf_get_socket_cookie in sock_ops programs",
        "sock_ops", ("bpf_get_socket_cookie",),
    ),
    KernelFeature(
        "sock_ops_cb_flags", Kind.HELPER, (4, 16), "bpf_sock_ops_cb_flags_set (state callbacks)",
        "sock_ops", ("bpf_sock_ops_cb_flags_set",),
    ),
    KernelFeature(
        "socket_cookie_sk_skb", Kind.HELPER, (5, 0), "bpf_get_socket_cookie in sk_skb programs",
        "sk_skb", ("bpf_get_socket_cookie",),
    ),
    KernelFeature(
        "sk_redirect_hash", Kind.HELPER, (4, 18), "bpf_sk_redirect_hash in sk_skb programs",
        "sk_skb", ("bpf_sk_redirect_hash",),
    ),
    KernelFeature(
        "ringbuf_sock_addr", Kind.HELPER, (5, 8), "bpf_ringbuf_output in sock_addr programs",
        "cgroup_sock_addr", ("bpf_ringbuf_output",),
    ),
    KernelFeature(
        "ringbuf_sock_ops", Kind.HELPER, (5, 8), "bpf_ringbuf_output in sock_ops programs",
        "sock_ops", ("bpf_ringbuf_output",),
    ),
    KernelFeature(
        "current_task_sock_addr", Kind.HELPER, (5, 10),
        "bpf_get_current_pid_tgid and _comm in sock_addr programs (trace shows pid and comm;"
        " probed present on 5.10 in a VM, earlier releases not checked)",
        "cgroup_sock_addr", ("bpf_get_current_pid_tgid", "bpf_get_current_comm"),
    ),
    KernelFeature(
        "ktime_sock_addr", Kind.HELPER, (4, 17), "bpf_ktime_get_ns in sock_addr programs",
        "cgroup_sock_addr", ("bpf_ktime_get_ns",),
    ),
    KernelFeature(
        "ktime_sock_ops", Kind.HELPER, (4, 13), "bpf_ktime_get_ns in sock_ops programs",
        "sock_ops", ("bpf_ktime_get_ns",),
    ),
    KernelFeature(
        "skc_to_tcp_sock_sock_ops", Kind.HELPER, (5, 9),
        "bpf_skc_to_tcp_sock in sock_ops programs (kernel mode's byte counts leave out the"
        " FIN exactly, and name a reset's error)",
        "sock_ops", ("bpf_skc_to_tcp_sock",),
    ),
    KernelFeature("sk_msg", Kind.PROG, (4, 17), "sk_msg programs"),
    KernelFeature(
        "netns_cookie_sk_msg", Kind.HELPER, (5, 15), "bpf_get_netns_cookie in sk_msg programs",
        "sk_msg", ("bpf_get_netns_cookie",),
    ),
    KernelFeature(
        "msg_redirect_hash", Kind.HELPER, (4, 18), "bpf_msg_redirect_hash in sk_msg programs",
        "sk_msg", ("bpf_msg_redirect_hash",),
    ),
    KernelFeature(
        "sock_hash_update_sock_ops", Kind.HELPER, (4, 18),
        "bpf_sock_hash_update in sock_ops programs (the sk_msg path)",
        "sock_ops", ("bpf_sock_hash_update",),
    ),
    KernelFeature(
        "skc_to_tcp_sock_sk_skb", Kind.HELPER, (5, 9),
        "bpf_skc_to_tcp_sock in sk_skb programs (the sockmap's back-pressure)",
        "sk_skb", ("bpf_skc_to_tcp_sock",),
    ),
    KernelFeature(
        "skc_to_tcp_sock_sk_msg", Kind.HELPER, (5, 10),
        "bpf_skc_to_tcp_sock in sk_msg programs (the sk_msg path reads the pod's stream)",
        "sk_msg", ("bpf_skc_to_tcp_sock",),
    ),
    KernelFeature(
        "sk_release_sk_skb", Kind.HELPER, (4, 20), "bpf_sk_release in sk_skb programs",
        "sk_skb", ("bpf_sk_release",),
    ),
    KernelFeature(
        "ringbuf_sk_skb", Kind.HELPER, (5, 8), "bpf_ringbuf_output in sk_skb programs",
        "sk_skb", ("bpf_ringbuf_output",),
    ),
    KernelFeature(
        "skb_trim_sk_skb", Kind.HELPER, (5, 10),
        "bpf_skb_pull_data and bpf_skb_adjust_room in sk_skb programs (the verdict cuts"
        " retransmitted bytes off)",
        "sk_skb", ("bpf_skb_pull_data", "bpf_skb_adjust_room"),
    ),
    KernelFeature("atomic_fetch", Kind.INSN, (5, 12), "atomic fetch-and-add (BPF_FETCH)"),
    KernelFeature(
        "sockhash_lookup", Kind.INSN, (5, 8),
        "a sockhash lookup in sock_addr programs (kernel-side fail-open: the forwarder's own"
        " listener, not any socket on its port)",
    ),
    KernelFeature("bpf_link", Kind.ATTACH, (5, 7), "BPF links for cgroup programs"),
    KernelFeature("getpeername_hooks", Kind.ATTACH, (5, 8), "cgroup getpeername hooks"),
    KernelFeature("so_netns_cookie", Kind.SOCKOPT, (5, 14), "SO_NETNS_COOKIE (a pod's netns cookie)"),
)  # fmt: skip
FEATURES_BY_NAME = {feature.name: feature for feature in KERNEL_FEATURES}

# Helper ids (enum bpf_func_id in linux/bpf.h) for the probe.
HELPER_IDS = {
    "bpf_map_lookup_elem": 1,
    "bpf_map_update_elem": 2,
    "bpf_map_delete_elem": 3,
    "bpf_ktime_get_ns": 5,
    "bpf_get_current_pid_tgid": 14,
    "bpf_get_current_comm": 16,
    "bpf_skb_pull_data": 39,
    "bpf_get_socket_cookie": 46,
    "bpf_skb_adjust_room": 50,
    "bpf_sock_ops_cb_flags_set": 59,
    "bpf_sock_hash_update": 70,
    "bpf_msg_redirect_hash": 71,
    "bpf_sk_redirect_hash": 72,
    "bpf_sk_release": 86,
    "bpf_get_netns_cookie": 122,
    "bpf_ringbuf_output": 130,
    "bpf_skc_to_tcp_sock": 137,
}
# Every program type has the map helpers; no feature needed for them.
MAP_HELPERS = ("bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_delete_elem")


class Role(StrEnum):
    """What a program is for; the plan loads programs by role."""

    REDIRECT = "redirect"  # the ebpf backend: all of these, or none
    PEERNAME = "peername"  # optional: applications see their original peer
    VERDICT = "verdict"  # the sockmap data path
    MSG = "msg"  # optional: the sockmap path's sk_msg fast path (ebpf backend only)


@dataclass(frozen=True)
class Program:
    name: str  # the C entry function (at most 15 characters)
    file: str  # its entry file under bpf/
    prog_type: str
    attach_type: int
    role: Role
    needs: tuple[str, ...]  # KERNEL_FEATURES names
    optional: tuple[str, ...] = ()  # used where present: -DMESH_HAVE_<NAME>=1
    target: str = "mesh_sockhash"  # a non-cgroup program: the map it attaches to

    @property
    def min_kernel(self) -> Version:
        return max(FEATURES_BY_NAME[name].since for name in self.needs)

    @property
    def prog_type_id(self) -> int:
        return sc.PROG_TYPES[self.prog_type]

    @property
    def helpers(self) -> set[str]:
        """The helpers its C always calls: its helper features' plus the map helpers."""
        out = set(MAP_HELPERS)
        for name in self.needs:
            out.update(FEATURES_BY_NAME[name].helpers)
        return out


def have_macro(feature: str) -> str:
    return f"MESH_HAVE_{feature.upper()}"


_CONNECT_NEEDS = (
    "cgroup_sock_addr", "netns_cookie", "socket_cookie_sock_addr", "sk_release_sock_addr",
    "sockhash_lookup", "lru_hash", "lpm_trie", "percpu_array", "sockhash", "ringbuf", "ringbuf_sock_addr",
    "ktime_sock_addr", "bpf_link",
)  # fmt: skip
_PEERNAME_NEEDS = ("cgroup_sock_addr", "netns_cookie", "getpeername_hooks", "bpf_link")

PROGRAMS: tuple[Program, ...] = (
    Program("mesh_connect4", "connect4.c", "cgroup_sock_addr", sc.BPF_CGROUP_INET4_CONNECT,
            Role.REDIRECT, _CONNECT_NEEDS, ("current_task_sock_addr",)),
    Program("mesh_connect6", "connect6.c", "cgroup_sock_addr", sc.BPF_CGROUP_INET6_CONNECT,
            Role.REDIRECT, _CONNECT_NEEDS, ("current_task_sock_addr",)),
    Program("mesh_sockops", "sockops.c", "sock_ops", sc.BPF_CGROUP_SOCK_OPS, Role.REDIRECT,
            ("sock_ops", "netns_cookie_sock_ops", "socket_cookie_sock_ops", "sock_ops_cb_flags",
             "lru_hash", "percpu_array", "ringbuf", "ringbuf_sock_ops", "ktime_sock_ops", "bpf_link"),
            ("sock_hash_update_sock_ops", "skc_to_tcp_sock_sock_ops")),
    Program("mesh_getpeer4", "getpeername4.c", "cgroup_sock_addr",
            sc.BPF_CGROUP_INET4_GETPEERNAME, Role.PEERNAME, _PEERNAME_NEEDS),
    Program("mesh_getpeer6", "getpeername6.c", "cgroup_sock_addr",
            sc.BPF_CGROUP_INET6_GETPEERNAME, Role.PEERNAME, _PEERNAME_NEEDS),
    Program("mesh_verdict", "skb_verdict.c", "sk_skb", sc.BPF_SK_SKB_STREAM_VERDICT, Role.VERDICT,
            ("sk_skb", "sockhash", "socket_cookie_sk_skb", "sk_redirect_hash", "atomic_fetch",
             "percpu_array", "skc_to_tcp_sock_sk_skb", "sk_release_sk_skb", "ringbuf",
             "ringbuf_sk_skb", "skb_trim_sk_skb")),
    Program("mesh_msg", "sk_msg.c", "sk_msg", sc.BPF_SK_MSG_VERDICT, Role.MSG,
            ("sk_msg", "sockhash", "netns_cookie_sk_msg", "msg_redirect_hash", "atomic_fetch",
             "lru_hash", "percpu_array", "skc_to_tcp_sock_sk_msg"), target="mesh_apphash"),
)  # fmt: skip
PROGRAMS_BY_NAME = {program.name: program for program in PROGRAMS}
PROGRAM_FILES = {program.name: program.file for program in PROGRAMS}


def by_role(role: Role) -> tuple[Program, ...]:
    return tuple(program for program in PROGRAMS if program.role is role)
