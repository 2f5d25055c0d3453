"""Who is on the other end of a control connection, read once, right after
accept (control.py decides what the peer may ask).

The socket file is root-only (0600), but a uid-0 process without
capabilities (a monitoring DaemonSet with /run mounted) can connect() all
the same. So the peer is checked as the kernel recorded it at connect():

- SO_PEERCRED: its uid must be 0 (its pid must be visible: the agent runs
  with the host's PID namespace).
- Its effective capabilities (/proc/PID/status CapEff) must hold
  cap_net_admin or cap_sys_admin (what the agent itself needs) for any
  request that changes something; reading needs only uid 0.
- A peer with cap_net_admin alone must be in the agent's network
  namespace (a pod's container granted NET_ADMIN in its own netns is not
  an administrator of this node); when the kernel does not let us look
  (EACCES: the peer holds capabilities the agent lacks), that check is
  skipped. A peer with cap_sys_admin may be anywhere: it can enter the
  node's namespaces itself, so the check would add nothing, and the
  container runtime that runs the CNI plugin need not share the agent's
  netns.
- PID reuse: the pid is pinned by a pidfd the kernel gives for the peer
  (SO_PEERPIDFD, 6.5+), and after /proc/PID is read the pidfd must still
  name a live process, so what was read was the peer's. On older kernels
  the pidfd comes from pidfd_open(pid) at accept, leaving the window
  between connect() and accept() (the peer exits and its pid is reused by a
  privileged process while another of its processes keeps the socket).

`holds_flock` proves a successor (takeover.py): the process holds a lock
on a file.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from meshagent.host.caps import NEEDED

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
NET_ADMIN, SYS_ADMIN = 12, 21
ADMIN_CAPS = sorted(NEEDED)  # cap_net_admin (12), cap_sys_admin (21): either will do
ADMIN_NAMES = " or ".join(NEEDED[bit][0] for bit in ADMIN_CAPS)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    may_read: bool  # uid 0
    refused: str | None  # why it may not change anything; None: it may

    @property
    def admin(self) -> bool:
        return self.refused is None


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
    if uid != 0:
        return Peer(pid, uid, False, f"uid {uid} is not root")
    if pid <= 0:
        return Peer(pid, uid, True, "its process is not in the agent's PID namespace")
    return Peer(pid, uid, True, _why_not_admin(conn, pid))


def _why_not_admin(conn: socket.socket, pid: int) -> str | None:
    try:
        pidfd = _pidfd(conn, pid)
    except OSError:
        return f"pid {pid} has exited"
    try:
        try:
            caps = _cap_eff(pid)
            same_netns = _same_netns(pid)
        except OSError:
            return f"pid {pid} has exited"
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            return f"pid {pid} has exited"
        except PermissionError:
            pass  # it exists
    finally:
        os.close(pidfd)
    if not any(caps >> bit & 1 for bit in ADMIN_CAPS):
        return f"pid {pid} has neither {ADMIN_NAMES} in its effective set"
    if not same_netns and not caps >> SYS_ADMIN & 1:
        return (
            f"pid {pid} has {NEEDED[NET_ADMIN][0]} but not {NEEDED[SYS_ADMIN][0]}, and is"
            " not in the agent's network namespace"
        )
    return None


def _pidfd(conn: socket.socket, pid: int) -> int:
    try:
        return conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in (92, 95, 22):  # ENOPROTOOPT, EOPNOTSUPP, EINVAL: an older kernel
            raise
    return os.pidfd_open(pid)


def _cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _same_netns(pid: int) -> bool:
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
    except PermissionError:
        return True  # the peer holds capabilities we lack: not checkable
    ours = os.stat("/proc/self/ns/net")
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def holds_flock(pid: int, path: Path) -> bool:
    """Does process pid hold a flock on path? Taking it ourselves must fail
    (someone holds it), and /proc/locks must name pid on that inode."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return False  # nobody held it (closing fd releases ours)
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" marks a waiter
            continue
        if fields[4] == str(pid) and fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False
