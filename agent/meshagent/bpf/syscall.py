"""bpf(2) as raw syscalls: every map operation, program load for feature
probes, links, attach and object info. No libbcc here, so the long-lived
agent can work with maps through their fds alone.

BPF links (BPF_LINK_CREATE) attach cgroup programs so that the kernel
detaches them when the last fd closes: a crashed agent leaves nothing
attached behind it.

Every map is opened with the kernel's own description of it (type, key and
value size): a key or value of another size is refused here, before the
kernel reads past a buffer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path

from meshagent.bpf.abi import MapSpec
from meshagent.errors import MeshError

# __NR_bpf by machine (uname -m), for 64-bit processes, from the kernel's
# tables: arch/x86/entry/syscalls/syscall_64.tbl (x86_64),
# include/uapi/asm-generic/unistd.h (arm64, riscv, loongarch),
# arch/powerpc/kernel/syscalls/syscall.tbl, arch/s390/kernel/syscalls/syscall.tbl.
BPF_SYSCALL_NUMBERS = {
    "x86_64": 321,
    "aarch64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}


def bpf_syscall_number(machine: str, pointer_bits: int = 64) -> int:
    """bpf(2)'s number on this machine; MeshError on any other (a wrong
    number would be another system call)."""
    number = BPF_SYSCALL_NUMBERS.get(machine) if pointer_bits == 64 else None
    if number is None:
        raise MeshError(
            f"unsupported architecture {machine} ({pointer_bits}-bit): meshagent knows the"
            f" bpf(2) system call number of 64-bit {', '.join(BPF_SYSCALL_NUMBERS)} only"
        )
    return number


MACHINE = platform.machine()
POINTER_BITS = struct.calcsize("P") * 8
# -1 on an unsupported machine: _call refuses it (every map, program and
# link starts with a _call), so nothing here runs another system call.
SYS_BPF = BPF_SYSCALL_NUMBERS.get(MACHINE, -1) if POINTER_BITS == 64 else -1

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_DETACH = 34


class MapType(IntEnum):
    """enum bpf_map_type: the ones meshagent creates, probes or tells apart.
    A map type is named here, never written as a number elsewhere."""

    HASH = 1
    ARRAY = 2
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    SOCKHASH = 18
    RINGBUF = 27


# The kernel hands out one value per possible CPU of these.
PERCPU_MAP_TYPES = (MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH)
# enum bpf_prog_type
PROG_TYPES = {"sock_ops": 13, "sk_skb": 14, "sk_msg": 16, "cgroup_sock_addr": 18}

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30

BPF_F_NO_PREALLOC = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)

ATTR_SIZE = 128  # bigger than every bpf_attr variant used here; the rest is zero


class BpfError(OSError):
    """A bpf(2) command failed; errno and which map or command."""


def _call(cmd: int, attr: ctypes.Array, size: int = ATTR_SIZE) -> int:
    if SYS_BPF < 0:
        bpf_syscall_number(MACHINE, POINTER_BITS)  # raises: says which machine
    ret = _libc.syscall(SYS_BPF, cmd, ctypes.addressof(attr), size)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


def _attr(fmt: str, *fields: object) -> ctypes.Array:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *fields)
    return buf


@cache
def possible_cpus() -> int:
    """How many values a per-CPU map hands out per key."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0
    id: int = 0


def map_info(fd: int) -> MapInfo:
    """What the kernel says about the map behind fd (struct bpf_map_info)."""
    info = ctypes.create_string_buffer(80)
    attr = _attr("=IIQ", fd, len(info), ctypes.addressof(info))
    _call(BPF_OBJ_GET_INFO_BY_FD, attr)
    map_type, map_id, key_size, value_size, max_entries, flags, name = struct.unpack_from(
        "=IIIIII16s", info.raw
    )
    return MapInfo(
        map_type, key_size, value_size, max_entries, name.rstrip(b"\0").decode(), flags, map_id
    )


class MapFd:
    """One map by fd, with the kernel's sizes; keys and values are bytes of
    exactly those sizes. The u64 methods are the per-connection fast path
    (preallocated buffers, no struct objects per call): the loop's only.
    Everything else may be called from any thread."""

    def __init__(self, fd: int, spec: MapSpec | None = None) -> None:
        self.fd = fd
        self.adopted = False  # taken over from a pin (bpf/pins.py), state and all
        self.info = map_info(fd)
        self.name = self.info.name or (spec.name if spec else f"fd {fd}")
        self.key_size = self.info.key_size
        self.value_size = self.info.value_size
        if self.info.map_type in PERCPU_MAP_TYPES:
            self.value_size = round8(self.info.value_size) * possible_cpus()
        if spec is not None:
            check_spec(spec, self.info)
        self._key = ctypes.create_string_buffer(max(self.key_size, 8))
        self._value = ctypes.create_string_buffer(max(self.value_size, 8))
        self._elem = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into(
            "=IIQQ",
            self._elem,
            0,
            fd,
            0,
            ctypes.addressof(self._key),
            ctypes.addressof(self._value),
        )
        self._elem_at = ctypes.addressof(self._elem)
        self._u64 = self.key_size == 8
        self._value_mask = (1 << 8 * min(self.value_size, 8)) - 1  # a value under 8 bytes

    # -- bytes (safe from any thread: buffers of their own per call) ---------
    def _call_elem(self, cmd: int, key: bytes, value: bytes | None = None, flags: int = 0):
        """(result, value buffer) of one element command on fresh buffers."""
        if len(key) != self.key_size:
            raise ValueError(
                f"map {self.name}: key of {len(key)} bytes, the map's is {self.key_size}"
            )
        if value is not None and len(value) != self.value_size:
            raise ValueError(
                f"map {self.name}: value of {len(value)} bytes, the map's is {self.value_size}"
            )
        kbuf = ctypes.create_string_buffer(key, max(self.key_size, 8))
        vbuf = ctypes.create_string_buffer(value or b"", max(self.value_size, 8))
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into(
            "=IIQQQ", attr, 0, self.fd, 0, ctypes.addressof(kbuf), ctypes.addressof(vbuf), flags
        )
        # A delete passes only map_fd and key (anything after it: EINVAL).
        size = 16 if cmd == BPF_MAP_DELETE_ELEM else 32
        return _libc.syscall(SYS_BPF, cmd, ctypes.addressof(attr), size), vbuf

    def lookup(self, key: bytes) -> bytes | None:
        ret, vbuf = self._call_elem(BPF_MAP_LOOKUP_ELEM, key)
        return None if ret < 0 else vbuf.raw[: self.value_size]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        ret, _ = self._call_elem(BPF_MAP_UPDATE_ELEM, key, value, flags)
        if ret < 0:
            err = ctypes.get_errno()
            raise BpfError(err, f"{self.name} update: {os.strerror(err)}")

    def delete(self, key: bytes) -> bool:
        """True if there was an entry."""
        return self._call_elem(BPF_MAP_DELETE_ELEM, key)[0] == 0

    def list_keys(self, limit: int = 1 << 22) -> list[bytes]:
        out: list[bytes] = []
        prev_buf = ctypes.create_string_buffer(max(self.key_size, 8))
        nxt = ctypes.create_string_buffer(max(self.key_size, 8))
        prev = 0
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        while len(out) < limit:
            struct.pack_into("=IIQQ", attr, 0, self.fd, 0, prev, ctypes.addressof(nxt))
            if _libc.syscall(SYS_BPF, BPF_MAP_GET_NEXT_KEY, ctypes.addressof(attr), 32) < 0:
                break
            out.append(nxt.raw[: self.key_size])
            ctypes.memmove(prev_buf, nxt, self.key_size)
            prev = ctypes.addressof(prev_buf)
        return out

    def count(self) -> int:
        """How many entries: in batches of BATCH (a few syscalls, so a
        metrics scrape in another thread barely holds the GIL), key by key
        where the map has no batch lookup (sockhash)."""
        total = self.count_batched()
        return len(self.list_keys()) if total is None else total

    BATCH = 4096

    def count_batched(self) -> int | None:
        """How many entries, by BPF_MAP_LOOKUP_BATCH; None where the map has
        no batch lookup (sockhash, ring buffer)."""
        if self.info.max_entries == 0 or self.key_size == 0:
            return 0
        total = 0
        for _keys, _values, got in self._batches():
            if got is None:
                return None
            total += got
        return total

    def items_batched(self) -> list[tuple[bytes, bytes]] | None:
        """Every (key, value), by BPF_MAP_LOOKUP_BATCH (one syscall per
        BATCH entries); None where the map has no batch lookup."""
        out: list[tuple[bytes, bytes]] = []
        k, v = self.key_size, max(self.value_size, 1)
        for keys, values, got in self._batches():
            if got is None:
                return None
            raw_keys, raw_values = keys.raw, values.raw
            out.extend(
                (raw_keys[i * k : (i + 1) * k], raw_values[i * v : (i + 1) * v]) for i in range(got)
            )
        return out

    def _batches(self):
        """(keys buffer, values buffer, entries in them) per batch; got is
        None (once, first) where the kernel has no batch lookup for the map."""
        n = min(self.BATCH, max(self.info.max_entries, 1))
        keys = ctypes.create_string_buffer(n * self.key_size)
        values = ctypes.create_string_buffer(n * max(self.value_size, 1))
        token_in = ctypes.create_string_buffer(max(self.key_size, 8))
        token_out = ctypes.create_string_buffer(max(self.key_size, 8))
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        first = True
        while True:
            struct.pack_into(
                "=QQQQIIQQ", attr, 0, 0 if first else ctypes.addressof(token_in),
                ctypes.addressof(token_out), ctypes.addressof(keys), ctypes.addressof(values),
                n, self.fd, 0, 0,
            )  # fmt: skip
            ret = _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_BATCH, ctypes.addressof(attr), 56)
            got = struct.unpack_from("=I", attr, 32)[0]
            err = ctypes.get_errno() if ret < 0 else 0
            if ret < 0 and err != errno.ENOENT:
                yield keys, values, (None if first else got)  # no batch support here
                return
            yield keys, values, got
            if ret < 0:  # ENOENT: the walk is over
                return
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False

    def lookup_loop(self, key: bytes) -> bytes | None:
        """lookup() on the preallocated buffers (the loop's only, like the
        u64 methods): once per forwarded connection."""
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, the map's is "
                             f"{self.key_size}")  # fmt: skip
        self._key.raw = key
        if _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, self._elem_at, 32) < 0:
            return None
        return self._value.raw[: self.value_size]

    # -- u64 keys (socket cookies) ------------------------------------------
    def update_u64(self, key: int, value: int) -> None:
        """key and value as u64 (a smaller value, e.g. a sockhash fd or a
        flag byte, takes the low bytes: little-endian)."""
        self._need_u64()
        struct.pack_into("=Q", self._key, 0, key)
        struct.pack_into("=Q", self._value, 0, value)
        self._update(0)

    def lookup_u64(self, key: int) -> int | None:
        self._need_u64()
        struct.pack_into("=Q", self._key, 0, key)
        if _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, self._elem_at, 32) < 0:
            return None
        return struct.unpack_from("=Q", self._value, 0)[0] & self._value_mask

    def delete_u64(self, key: int) -> bool:
        self._need_u64()
        struct.pack_into("=Q", self._key, 0, key)
        return self._delete()

    def delete_many_u64(self, keys: list[int]) -> None:
        """Delete u64 keys in as few syscalls as possible
        (BPF_MAP_DELETE_BATCH stops at a missing key: resume after it)."""
        self._need_u64()
        array = (ctypes.c_uint64 * len(keys))(*keys)
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        start = 0
        while start < len(keys):
            struct.pack_into(
                "=QQQQIIQQ", attr, 0, 0, 0, ctypes.addressof(array) + 8 * start, 0,
                len(keys) - start, self.fd, 0, 0,
            )  # fmt: skip
            ret = _libc.syscall(SYS_BPF, BPF_MAP_DELETE_BATCH, ctypes.addressof(attr), 56)
            done = struct.unpack_from("=I", attr, 32)[0]
            if ret == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.EINVAL) or done >= len(keys) - start:
                return
            if err == errno.EINVAL:  # no batch support: one by one
                for key in keys[start:]:
                    self.delete_u64(key)
                return
            start += done + 1  # skip the missing key

    # -- per-CPU values -----------------------------------------------------
    def lookup_percpu_u64(self, key: bytes) -> list[int]:
        """A per-CPU map's u64 value on every possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return []
        stride = round8(self.info.value_size)
        return [struct.unpack_from("=Q", raw, cpu * stride)[0] for cpu in range(possible_cpus())]

    # -- internals ----------------------------------------------------------
    def _need_u64(self) -> None:
        if not self._u64 or self.value_size not in (1, 2, 4, 8):
            raise ValueError(
                f"map {self.name}: key {self.key_size} / value {self.value_size} bytes is not u64"
            )

    def _update(self, flags: int) -> None:
        struct.pack_into("=Q", self._elem, 24, flags)
        if _libc.syscall(SYS_BPF, BPF_MAP_UPDATE_ELEM, self._elem_at, 32) < 0:
            err = ctypes.get_errno()
            raise BpfError(err, f"{self.name} update: {os.strerror(err)}")

    def _delete(self) -> bool:
        # Only map_fd and key: the kernel refuses (EINVAL) a delete whose
        # attr has anything after the key, and _elem holds the value pointer.
        return _libc.syscall(SYS_BPF, BPF_MAP_DELETE_ELEM, self._elem_at, 16) == 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def round8(size: int) -> int:
    return (size + 7) & ~7


def check_spec(spec: MapSpec, info: MapInfo) -> None:
    """The Python struct sizes must be the C's, as the kernel holds them."""
    if spec.key.size != info.key_size or spec.value.size != info.value_size:
        raise ValueError(
            f"map {spec.name}: Python packs key {spec.key.size} / value {spec.value.size} bytes,"
            f" the compiled C has key {info.key_size} / value {info.value_size}"
        )


# -- programs and links --------------------------------------------------
def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach prog_fd to target_fd (a cgroup) as a BPF link; returns the link fd.
    Other programs on the cgroup are untouched (links imply multi-attach)."""
    return _call(BPF_LINK_CREATE, _attr("=IIII", prog_fd, target_fd, attach_type, 0))


def link_detach(link_fd: int) -> None:
    """Detach now, before the fd closes (closing alone would also do it)."""
    _call(BPF_LINK_DETACH, _attr("=I", link_fd))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the link's program for prog_fd in one step (no moment without)."""
    _call(BPF_LINK_UPDATE, _attr("=III", link_fd, prog_fd, 0))


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    cgroup_id: int  # cgroup links: the cgroup directory's inode
    attach_type: int


def link_info(fd: int) -> LinkInfo:
    """struct bpf_link_info of a link (the cgroup part for cgroup links)."""
    info = ctypes.create_string_buffer(64)
    _call(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)))
    link_type, link_id, prog_id, _pad, cgroup_id, attach_type = struct.unpack_from(
        "=IIIIQI", info.raw
    )
    return LinkInfo(link_type, link_id, prog_id, cgroup_id, attach_type)


def prog_id(fd: int) -> int:
    """A program's id (struct bpf_prog_info)."""
    info = ctypes.create_string_buffer(256)
    _call(BPF_OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), ctypes.addressof(info)))
    return struct.unpack_from("=II", info.raw)[1]


def obj_pin(fd: int, path: Path) -> None:
    """Pin a map, program or link at path on a bpffs (it outlives the fd)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    _call(BPF_OBJ_PIN, _attr("=QI", ctypes.addressof(raw), fd))


def obj_get(path: Path) -> int:
    """An fd for the object pinned at path."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return _call(BPF_OBJ_GET, _attr("=QI", ctypes.addressof(raw), 0))


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """BPF_PROG_ATTACH (a verdict program on a sockhash)."""
    _call(BPF_PROG_ATTACH, _attr("=IIII", target_fd, prog_fd, attach_type, 0))


def map_create(
    map_type: int, key_size: int, value_size: int, entries: int, flags: int = 0, name: str = ""
) -> int:
    return _call(
        BPF_MAP_CREATE,
        _attr("=IIIIIII16s", map_type, key_size, value_size, entries, flags, 0, 0,
              name.encode()[:15]),
    )  # fmt: skip


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One struct bpf_insn."""
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


def prog_load(
    prog_type: int,
    insns: bytes,
    expected_attach_type: int = 0,
    log_size: int = 1 << 16,
    name: str = "mesh_probe",
    license: str = "GPL",
) -> tuple[int | None, int, str]:
    """Load a program; (fd or None, errno, the verifier's log). log_size 0:
    no log (the verifier is faster without one)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(max(log_size, 1))
    attr = _attr(
        "=IIQQIIQII16sII",
        prog_type, len(insns) // 8, ctypes.addressof(code), ctypes.addressof(license_),
        1 if log_size else 0, log_size, ctypes.addressof(log) if log_size else 0, 0, 0,
        name.encode()[:15], 0, expected_attach_type,
    )  # fmt: skip
    try:
        return _call(BPF_PROG_LOAD, attr), 0, log.value.decode(errors="replace")
    except BpfError as exc:
        return None, exc.errno or 0, log.value.decode(errors="replace")
