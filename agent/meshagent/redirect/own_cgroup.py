"""How the iptables backend knows the forwarder's own upstream sockets: by
the agent's cgroup v2 (`-m cgroup --path`), which a pod cannot put a socket
in. A mark it could: since 5.17 SO_MARK needs only CAP_NET_RAW, which
container runtimes grant by default.

A socket belongs to the cgroup of the task that made it, whatever netns
that task had entered; the rule keeps that cgroup from the moment it is
installed (the path is looked up once, in the installer's cgroup namespace
on 6.1+ and from the hierarchy's root before). So the path is taken, and
iptables-restore run, as the node's cgroup namespace (pid 1's) sees it:
the same answer on every kernel. An agent that cannot see the node's view
(no hostPID) uses its own, which 6.1+ resolve the same way.

The rule also matches every cgroup below the path, so the agent must live
in a cgroup of its own: one that holds neither the pods nor the cgroup it
attaches at. An agent started in the root cgroup (a root shell on a host
without systemd) moves itself into `meshagent-<instance>` under the root
for its lifetime, and back out at stop.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.host import cgroup

CLONE_NEWCGROUP = 0x02000000
PATH_MAX = 511  # xt_cgroup revision 2 takes at most 511 bytes
# What a cgroup path may hold to go into iptables-restore text unquoted.
SAFE = re.compile(r"^/[A-Za-z0-9_.:@+=,/-]*$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def parse_proc_cgroup(text: str) -> str:
    """The cgroup v2 path from /proc/<pid>/cgroup text (its "0::" line)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    raise MeshError("no cgroup v2 line in /proc/self/cgroup: the iptables backend needs cgroup v2")


def is_within(path: str, ancestor: str) -> bool:
    """path is ancestor or below it (both absolute cgroup v2 paths)."""
    ancestor = ancestor.rstrip("/")
    return path == ancestor or path.startswith(ancestor + "/") or ancestor == ""


def check(path: str, attach: str) -> str | None:
    """Why path cannot name the forwarder's own sockets, or None."""
    if path == "/":
        return "the agent runs in the root cgroup, whose rule would match every socket"
    if is_within(attach, path):
        return f"the agent's cgroup {path} holds the cgroup it attaches at ({attach})"
    if len(path.encode()) > PATH_MAX:
        return f"the agent's cgroup path is over {PATH_MAX} bytes"
    if not SAFE.match(path):
        return f"the agent's cgroup path {path!r} has characters iptables-restore text cannot hold"
    return None


def _node_ns_fd() -> int | None:
    """pid 1's cgroup namespace when it is not ours and we may open it."""
    try:
        if os.stat("/proc/self/ns/cgroup").st_ino == os.stat("/proc/1/ns/cgroup").st_ino:
            return None
        return os.open("/proc/1/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWCGROUP) != 0:
        raise MeshError(f"setns (cgroup namespace): {os.strerror(ctypes.get_errno())}")


def _stay() -> None:
    """Nothing to undo: the agent did not move."""


@dataclass
class OwnCgroup:
    """The forwarder's cgroup as the rules name it, and how to run the
    rule tools so that they resolve it the same way."""

    path: str
    node_ns: int | None = None  # pid 1's cgroup namespace, entered to run the tools
    release: Callable[[], None] = _stay  # moves the agent back, if it moved

    @contextmanager
    def entered(self) -> Iterator[None]:
        """This thread in the namespace the path was read in (children
        inherit it), and back after."""
        if self.node_ns is None:
            yield
            return
        home = os.open("/proc/thread-self/ns/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self.node_ns)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(home)


def _read_path(node_ns: int | None) -> str:
    """Our cgroup v2 path, in node_ns's view when given (read on a thread
    that enters it: /proc/thread-self/cgroup is shown in the reader's)."""
    if node_ns is None:
        return parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    out: dict[str, object] = {}

    def read() -> None:
        try:
            _setns(node_ns)
            out["path"] = parse_proc_cgroup(Path("/proc/thread-self/cgroup").read_text())
        except (MeshError, OSError) as exc:
            out["error"] = exc

    reader = threading.Thread(target=read, name="cgroup-ns")  # it dies in the node's namespace
    reader.start()
    reader.join()
    if "error" in out:
        raise MeshError(f"cannot read the agent's cgroup in the node's namespace: {out['error']}")
    return str(out["path"])


def settle(attach: str, instance: str) -> OwnCgroup:
    """The agent's own cgroup for the rules; moves the agent out of the root
    cgroup first if it runs there. attach: the cgroup it attaches at
    ("/" for the whole node)."""
    node_ns = _node_ns_fd()
    try:
        path = _read_path(node_ns)
    except MeshError:
        if node_ns is not None:
            os.close(node_ns)
        node_ns = None  # no hostPID or no CAP_SYS_ADMIN there: our own view (6.1+ agree)
        path = _read_path(None)
    release: Callable[[], None] = _stay
    if path == "/" and node_ns is None:
        path, release = _move_out(instance)
    why = check(path, attach)
    if why:
        release()
        if node_ns is not None:
            os.close(node_ns)
        raise MeshError(f"iptables backend: {why}; run the agent in a cgroup of its own")
    return OwnCgroup(path, node_ns, release)


def _move_out(instance: str) -> tuple[str, Callable[[], None]]:
    """Into <root>/meshagent-<instance>; the callable moves back and removes it."""
    root = cgroup.cgroup2_mount()
    mine = root / f"meshagent-{instance}"
    try:
        cgroup.create(mine)
        (mine / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError as exc:
        raise MeshError(
            f"the agent runs in the root cgroup, whose rule would match every socket, and"
            f" cannot move into {mine} ({exc.strerror}); run it in a cgroup of its own"
            " (a container, or systemd-run --scope)"
        ) from None

    def back() -> None:
        try:
            (root / "cgroup.procs").write_text(f"{os.getpid()}\n")
            mine.rmdir()
        except OSError:
            pass  # a later start reuses it (same instance name)

    # as the kernel names it now (the mount need not be the hierarchy's root)
    return parse_proc_cgroup(Path("/proc/self/cgroup").read_text()), back
