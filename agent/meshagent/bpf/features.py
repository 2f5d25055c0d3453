"""What this kernel can do for the programs in bpf/programs.py, found by
asking it: a tiny program per program type and per helper, a map per map
type, one atomic instruction, one attach type, one link command, one
socket option. Each answer carries how it was found.

Why not `bpftool feature probe`: bookworm's bpftool 7.1 reports every
helper as available to every program type on kernel 6.18 (the verifier's
wording changed), so it would say sock_ops can call bpf_get_netns_cookie on
any kernel. These probes read the verifier's own refusal.

The result ("raw facts") is plain JSON of one shape, whether probed here,
derived from the kernel version (not root), or read from a fixture of
another kernel (tests/unit/kernels/): features() turns any of them into
the features the plan reads.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import socket

from meshagent.bpf import syscall as sc
from meshagent.bpf.programs import HELPER_IDS, KERNEL_FEATURES, Kind, Version

# Verifier refusals that mean "this helper is not for this program type".
_NO_HELPER = re.compile(r"unknown func|invalid func|cannot use helper|not supported for program")
SO_NETNS_COOKIE = 71
BPF_ALU64_MOV_K = 0xB7
BPF_CALL = 0x85
BPF_EXIT = 0x95
BPF_STX_DW = 0x7B
BPF_ATOMIC_DW = 0xDB
BPF_FETCH_ADD = 0x01
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
BPF_ALU64_MOV_X = 0xBF
BPF_ALU64_ADD_K = 0x07
BPF_JEQ_K = 0x15

# A probe program needs an attach type only for cgroup sock_addr.
_EXPECTED_ATTACH = {"cgroup_sock_addr": sc.BPF_CGROUP_INET4_CONNECT}


def version(release: str | None = None) -> Version:
    match = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def full_version(
    release: str | None = None, build: str | None = None
) -> tuple[int, int, int] | None:
    """(major, minor, sublevel), from the release ("6.1.45") or, where the
    release hides it (Debian: "6.1.0-57-amd64"), from the build string
    ("... Debian 6.1.140-1 ..."); None when neither says."""
    release = release if release is not None else platform.release()
    build = build if build is not None else platform.version()
    found = re.search(r"Debian (\d+)\.(\d+)\.(\d+)", build)
    if found:
        return int(found[1]), int(found[2]), int(found[3])
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", release)
    if found and not re.match(r"\d+\.\d+\.0-\d+", release):
        return int(found[1]), int(found[2]), int(found[3])
    return None


def seq_check(release: str | None = None, build: str | None = None) -> int:
    """How the stream verdict treats a segment that repeats bytes already
    delivered (bpf/skb_verdict.c, MESH_SEQ_CHECK): 0 not checked, 1 the
    connection is reset, 2 the old bytes are cut off.

    The check reads TCP's sequence numbers from skb->cb, which sk_skb
    programs see from its start only since 5.16 (before, 8 bytes on: 0).
    Cutting changes the skb's head, which panics (BUG_ON(skb_shared)) where
    the verdict's caller still took a second reference (sk_psock_verdict_recv's
    skb_get, from 6.0 until 78fa0d61d97a: in 6.4, 6.1.31 and 6.3.5): there
    only a reset, and where the sublevel cannot be known, too."""
    major_minor = version(release)
    if major_minor < (5, 16):
        return 0
    if major_minor < (6, 0) or major_minor >= (6, 4):
        return 2
    full = full_version(release, build)
    if full is not None and ((full[:2] == (6, 1) and full[2] >= 31) or
                             (full[:2] == (6, 3) and full[2] >= 5)):  # fmt: skip
        return 2
    return 1


def _ret1() -> bytes:
    return sc.insn(BPF_ALU64_MOV_K, 0, imm=1) + sc.insn(BPF_EXIT)


def _load(prog_type: str, insns: bytes, attach: int | None = None) -> tuple[bool, int, str]:
    expected = _EXPECTED_ATTACH.get(prog_type, 0) if attach is None else attach
    fd, err, log = sc.prog_load(sc.PROG_TYPES[prog_type], insns, expected)
    if fd is not None:
        os.close(fd)
    return fd is not None, err, log


def _helper_ok(prog_type: str, helper: str) -> bool:
    """Loads `call helper; r0 = 1; exit`: a missing helper is refused by
    name; any other refusal (the arguments are garbage) means it exists."""
    ok, _err, log = _load(prog_type, sc.insn(BPF_CALL, imm=HELPER_IDS[helper]) + _ret1())
    return ok or not _NO_HELPER.search(log)


def _atomic_fetch_ok() -> bool:
    """r1 = 0; *(u64 *)(r10 - 8) = r1; r2 = 1; atomic_fetch_add(r10 - 8, r2)."""
    code = (
        sc.insn(BPF_ALU64_MOV_K, 1, imm=0)
        + sc.insn(BPF_STX_DW, 10, 1, off=-8)
        + sc.insn(BPF_ALU64_MOV_K, 2, imm=1)
        + sc.insn(BPF_ATOMIC_DW, 10, 2, off=-8, imm=BPF_FETCH_ADD)
        + _ret1()
    )
    return _load("sk_skb", code)[0]


def _sockhash_lookup_ok() -> bool:
    """A sock_addr program that looks a key up in a sockhash and releases the
    socket it may get (allowed since 5.8; before, the verifier refuses it)."""
    try:
        map_fd = sc.map_create(sc.MapType.SOCKHASH, 8, 4, 4, 0)
    except OSError:
        return False
    try:
        code = (
            sc.insn(BPF_ALU64_MOV_K, 1, imm=0)
            + sc.insn(BPF_STX_DW, 10, 1, off=-8)  # the key, 0
            + sc.insn(BPF_LD_IMM64, 1, BPF_PSEUDO_MAP_FD, imm=map_fd)
            + sc.insn(0)
            + sc.insn(BPF_ALU64_MOV_X, 2, 10)
            + sc.insn(BPF_ALU64_ADD_K, 2, imm=-8)
            + sc.insn(BPF_CALL, imm=HELPER_IDS["bpf_map_lookup_elem"])
            + sc.insn(BPF_JEQ_K, 0, off=2, imm=0)  # nothing found: done
            + sc.insn(BPF_ALU64_MOV_X, 1, 0)
            + sc.insn(BPF_CALL, imm=HELPER_IDS["bpf_sk_release"])
            + _ret1()
        )
        return _load("cgroup_sock_addr", code)[0]
    finally:
        os.close(map_fd)


def _link_create_known() -> bool:
    """BPF_LINK_CREATE with no valid fds: EBADF where the command exists."""
    try:
        sc.link_create(0xFFFFFFFF, 0xFFFFFFFF, sc.BPF_CGROUP_INET4_CONNECT)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return True


def _so_netns_cookie() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:
        return False
    return True


def probe() -> dict:
    """Raw facts of the running kernel, by bpf(2); from the version if this
    process may not load programs (not root)."""
    release = platform.release()
    if _load("sk_skb", _ret1())[1] in (errno.EPERM, errno.EACCES):
        raw = from_version(version(release), release)
        raw["how"] = f"kernel version {release} (not probed: loading programs needs root)"
        return raw
    raw: dict = {
        "kernel": release,
        "how": "probed with bpf(2)",
        "program_types": [],
        "map_types": [],
        "helpers": {},
        "other": [],
    }
    for feature in KERNEL_FEATURES:
        if feature.kind is Kind.PROG and _load(feature.name, _ret1())[0]:
            raw["program_types"].append(feature.name)
        elif feature.kind is Kind.MAP and _map_ok(feature.name):
            raw["map_types"].append(feature.name)
        elif feature.kind is Kind.HELPER and feature.prog_type in raw["program_types"]:
            have = raw["helpers"].setdefault(feature.prog_type, [])
            for helper in feature.helpers:
                if helper not in have and _helper_ok(feature.prog_type, helper):
                    have.append(helper)
    checks = {
        "atomic_fetch": lambda: "sk_skb" in raw["program_types"] and _atomic_fetch_ok(),
        "getpeername_hooks": lambda: _load(
            "cgroup_sock_addr", _ret1(), sc.BPF_CGROUP_INET4_GETPEERNAME
        )[0],
        "sockhash_lookup": lambda: (
            "cgroup_sock_addr" in raw["program_types"]
            and "sockhash" in raw["map_types"]
            and _sockhash_lookup_ok()
        ),
        "bpf_link": _link_create_known,
        "so_netns_cookie": _so_netns_cookie,
    }
    raw["other"] = [name for name, check in checks.items() if check()]
    return raw


def _map_ok(name: str) -> bool:
    key, value, flags = 8, 8, 0
    if name == "lpm_trie":
        key, flags = 20, sc.BPF_F_NO_PREALLOC
    elif name in ("percpu_array", "array"):
        key = 4
    elif name == "ringbuf":
        key, value = 0, 0
    entries = 4096 if name == "ringbuf" else 4
    try:
        os.close(sc.map_create(sc.MapType[name.upper()], key, value, entries, flags))
    except OSError:
        return False
    return True


def from_version(kernel: Version, release: str = "") -> dict:
    """Raw facts as the feature table's `since` says a kernel has them."""
    raw: dict = {
        "kernel": release or f"{kernel[0]}.{kernel[1]}",
        "how": f"kernel version {release or kernel}",
        "program_types": [],
        "map_types": [],
        "helpers": {},
        "other": [],
    }
    for feature in KERNEL_FEATURES:
        if kernel < feature.since:
            continue
        if feature.kind is Kind.PROG:
            raw["program_types"].append(feature.name)
        elif feature.kind is Kind.MAP:
            raw["map_types"].append(feature.name)
        elif feature.kind is Kind.HELPER:
            raw["helpers"].setdefault(feature.prog_type, []).extend(feature.helpers)
        else:
            raw["other"].append(feature.name)
    return raw


def features(raw: dict) -> dict[str, tuple[bool, str]]:
    """Each KERNEL_FEATURES name -> (present, how it was found)."""
    how = raw.get("how", "")
    out: dict[str, tuple[bool, str]] = {}
    for feature in KERNEL_FEATURES:
        if feature.kind is Kind.PROG:
            ok = feature.name in raw.get("program_types", ())
        elif feature.kind is Kind.MAP:
            ok = feature.name in raw.get("map_types", ())
        elif feature.kind is Kind.HELPER:
            have = raw.get("helpers", {}).get(feature.prog_type, ())
            ok = all(helper in have for helper in feature.helpers)
        else:
            ok = feature.name in raw.get("other", ())
        out[feature.name] = (ok, f"{how}: {feature.what}")
    return out
