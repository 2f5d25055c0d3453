"""The few bpf(2) commands BCC 0.26 lacks, as raw syscalls.

BPF links (BPF_LINK_CREATE) attach cgroup programs so that the kernel
detaches them when the last fd closes: a crashed agent leaves nothing
attached behind it.
"""

from __future__ import annotations

import ctypes
import os
import struct

SYS_BPF = 321  # x86_64
BPF_LINK_CREATE = 28
BPF_LINK_DETACH = 34

# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11

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


def link_detach(link_fd: int) -> None:
    """Detach now, before the fd closes (closing alone would also do it)."""
    _bpf(BPF_LINK_DETACH, struct.pack("=I", link_fd))
