"""The few bpf(2) commands BCC 0.26 lacks, as raw syscalls.

BPF links (BPF_LINK_CREATE) attach cgroup programs so that the kernel
detaches them when the last fd closes: a crashed agent leaves nothing
attached behind it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

SYS_BPF = 321  # x86_64
BPF_MAP_DELETE_BATCH = 27
BPF_LINK_CREATE = 28
BPF_LINK_DETACH = 34

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    ret = _libc.syscall(SYS_BPF, cmd, buf, 128)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach prog_fd to target_fd (a cgroup) as a BPF link; returns the link fd.
    Other programs on the cgroup are untouched (links imply multi-attach)."""
    return _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, target_fd, attach_type, 0))


def prog_attach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    """BPF_PROG_ATTACH (for a verdict program on a sockhash)."""
    _bpf(8, struct.pack("=IIII", target_fd, prog_fd, attach_type, 0))


def link_detach(link_fd: int) -> None:
    """Detach now, before the fd closes (closing alone would also do it)."""
    _bpf(BPF_LINK_DETACH, struct.pack("=I", link_fd))


class MapFd:
    """A BPF map used through its fd with u64 keys (socket cookies); no BCC
    table objects on the per-connection path."""

    def __init__(self, fd: int, name: str, key_size: int = 8) -> None:
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self._key = ctypes.c_uint64()
        self._value = ctypes.c_uint64()
        from bcc.libbcc import lib

        self._lib = lib

    def update(self, key: int, value: int) -> None:
        self._key.value = key
        self._value.value = value
        if (
            self._lib.bpf_update_elem(
                self.fd, ctypes.byref(self._key), ctypes.byref(self._value), 0
            )
            < 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"{self.name} update: {os.strerror(err)}")

    def lookup(self, key: int) -> int | None:
        self._key.value = key
        if (
            self._lib.bpf_lookup_elem(self.fd, ctypes.byref(self._key), ctypes.byref(self._value))
            < 0
        ):
            return None
        return self._value.value

    def lookup_bytes(self, key: bytes, value_size: int) -> bytes | None:
        """Lookup with a key of any shape; the value as bytes."""
        value = ctypes.create_string_buffer(value_size)
        if self._lib.bpf_lookup_elem(self.fd, key, value) < 0:
            return None
        return value.raw

    def delete(self, key: int) -> None:
        self._key.value = key
        self._lib.bpf_delete_elem(self.fd, ctypes.byref(self._key))

    def delete_many(self, keys: list[int]) -> None:
        """Delete u64 keys in as few syscalls as possible
        (BPF_MAP_DELETE_BATCH stops at a missing key: resume after it)."""
        array = (ctypes.c_uint64 * len(keys))(*keys)
        start = 0
        while start < len(keys):
            count = ctypes.c_uint32(len(keys) - start)
            attr = bytearray(struct.pack(
                "=QQQQIIQQ", 0, 0, ctypes.addressof(array) + 8 * start, 0,
                count.value, self.fd, 0, 0,
            ))  # fmt: skip
            buf = ctypes.create_string_buffer(bytes(attr), 128)
            ret = _libc.syscall(SYS_BPF, BPF_MAP_DELETE_BATCH, buf, 128)
            done = struct.unpack_from("=I", buf.raw, 32)[0]
            if ret == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOENT, errno.EINVAL) or done >= len(keys) - start:
                return
            if err == errno.EINVAL:  # no batch support: one by one
                for key in keys[start:]:
                    self.delete(key)
                return
            start += done + 1  # skip the missing key

    def count(self) -> int:
        """How many entries (any key size), walking the keys."""
        key = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        total = 0
        prev = None
        while self._lib.bpf_get_next_key(self.fd, prev, nxt) == 0 and total < 1 << 22:
            total += 1
            ctypes.memmove(key, nxt, self.key_size)
            prev = key
        return total
