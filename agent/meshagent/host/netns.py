"""Network namespaces by name (/run/netns/NAME) or path: enter, make sockets inside."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshagent.errors import MeshError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def path(name: str) -> Path:
    """A netns by name (/run/netns/NAME) or by absolute path (a runtime's
    /var/run/netns/cni-..., /proc/PID/ns/net)."""
    return Path(name) if name.startswith("/") else NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def open_fd(name: str) -> int:
    try:
        return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MeshError(f"network namespace {name} does not exist") from None


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise MeshError(f"setns: {os.strerror(err)}")


_home = threading.local()


def _home_fd() -> int:
    """This thread's own netns, opened once per thread."""
    fd = getattr(_home, "fd", None)
    if fd is None:
        fd = _home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return fd


@contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run the block with this thread inside the netns given by fd; come back
    after. Sockets made inside stay in that netns for their whole life."""
    home = _home_fd()
    setns(fd)
    try:
        yield
    finally:
        setns(home)


def socket_in(fd: int, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket made inside the netns fd (entered() without the context
    manager's calls: once per forwarded connection)."""
    home = _home_fd()
    setns(fd)
    try:
        return socket.socket(family, kind)
    finally:
        setns(home)


def sockets_in(fd: int, family: int, kind: int, count: int) -> list[socket.socket]:
    """count sockets made inside the netns fd, for one pair of setns (about
    5 us a pair: forwarder/upstreams.py makes a pod's upstream sockets in
    batches). Fewer than count only when one could not be made after the
    first; none: the error."""
    made: list[socket.socket] = []
    home = _home_fd()
    setns(fd)
    try:
        for _ in range(count):
            try:
                made.append(socket.socket(family, kind))
            except OSError:
                if not made:
                    raise
                break
    finally:
        setns(home)
    return made


def cookie_of(sock: socket.socket) -> int:
    """The netns cookie of the namespace a socket lives in (kernel 5.14+)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    return int.from_bytes(raw, "little")


def cookie(fd: int) -> int:
    with socket_in(fd, socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return cookie_of(probe)
