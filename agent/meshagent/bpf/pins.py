"""The agent's BPF objects pinned on the bpffs, so they outlive the agent.

    /sys/fs/bpf/meshagent/<instance>/maps/<name>
                                    /progs/<name>
                                    /links/<name>

<instance> is named after the state dir (two agents with two state dirs
never share pins); the bpffs refuses a name with a dot, so a dot becomes
"_" (the hash of the full path keeps such names apart). Every bpffs error
is a MeshError naming the path and the reason. A restarted agent finds the maps (the pods' entries,
the connections' original destinations, the sockhash) and the cgroup links,
reuses every map whose definition is unchanged and swaps the links'
programs in one step (BPF_LINK_UPDATE): the hooks never go missing, across
a restart or an upgrade. `meshagent cleanup` detaches and removes it all.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshagent.bpf import syscall as sc
from meshagent.errors import MeshError

BPFFS = Path("/sys/fs/bpf")
BPFFS_MAGIC = 0xCAFE4A11
NAME_MAX = 255  # bytes in one name on the bpffs, as on any Linux filesystem
REFUSED = "."  # the bpffs refuses any name with a dot (kernel/bpf/inode.c, bpf_lookup)


def instance_name(state_dir: Path) -> str:
    """<state dir's name>-<hash of its full path>: readable, and unique.
    A name the bpffs accepts is kept as it always was (an installed agent
    finds its pins); a dot becomes "_", and a name too long is cut."""
    full = str(state_dir.resolve())
    suffix = f"-{hashlib.sha256(full.encode()).hexdigest()[:8]}"
    name = state_dir.name or "root"
    for char in REFUSED:
        name = name.replace(char, "_")
    room = NAME_MAX - len(suffix)
    name = name.encode()[:room].decode(errors="ignore")  # never half a character
    return name + suffix


@contextmanager
def bpffs_errors(what: str) -> Iterator[None]:
    """An OSError from the bpffs as one line: what, the path, the reason."""
    try:
        yield
    except OSError as exc:
        path = exc.filename if exc.filename is not None else "the bpffs"
        reason = exc.strerror or str(exc)
        raise MeshError(f"cannot {what} {path}: {reason} (bpffs)") from None


def ensure_bpffs() -> None:
    """Mount the bpffs at /sys/fs/bpf if nothing is mounted there."""
    if _is_bpffs(BPFFS):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", bytes(BPFFS), b"bpf", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise MeshError(
            f"no bpffs at {BPFFS} and mounting one failed: {os.strerror(err)};"
            f" mount it with: mount -t bpf bpf {BPFFS}"
        )


def _is_bpffs(path: Path) -> bool:
    return path.is_dir() and _fs_magic(path) == BPFFS_MAGIC


def _fs_magic(path: Path) -> int:
    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(bytes(path), ctypes.byref(buf)) != 0:
        return 0
    return buf.f_type & 0xFFFFFFFF


class Pins:
    def __init__(self, state_dir: Path, root: Path = BPFFS / "meshagent") -> None:
        self.root = root
        self.dir = root / instance_name(state_dir)

    def path(self, kind: str, name: str) -> Path:
        return self.dir / kind / name

    def exists(self) -> bool:
        with bpffs_errors("look up"):
            return self.dir.is_dir()

    def open(self, kind: str, name: str) -> int | None:
        """An fd for the pinned object, or None if there is none."""
        path = self.path(kind, name)
        with bpffs_errors("look up"):
            if not path.exists():
                return None
        try:
            return sc.obj_get(path)
        except OSError as exc:
            raise MeshError(f"cannot open pinned {path}: {exc.strerror}") from None

    def put(self, kind: str, name: str, fd: int) -> None:
        """Pin fd as kind/name, replacing what was pinned there."""
        ensure_bpffs()
        folder = self.dir / kind
        path = folder / name
        with bpffs_errors("make"):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.unlink(missing_ok=True)
        try:
            sc.obj_pin(fd, path)
        except OSError as exc:
            raise MeshError(f"cannot pin {path}: {exc.strerror}") from None

    def names(self, kind: str) -> list[str]:
        folder = self.dir / kind
        with bpffs_errors("list"):
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def drop(self, kind: str, name: str) -> None:
        """Unpin one object; a link is detached first (a pinned link whose
        last pin goes would detach anyway once no fd holds it)."""
        path = self.path(kind, name)
        if kind == "links":
            fd = self.open(kind, name)
            if fd is not None:
                try:
                    sc.link_detach(fd)
                except OSError:
                    pass
                os.close(fd)
        with bpffs_errors("unpin"):
            path.unlink(missing_ok=True)

    def remove(self) -> list[str]:
        """Detach and unpin everything of this instance; what was removed."""
        removed = []
        for kind in ("links", "progs", "maps"):  # links first: the hooks go at once
            for name in self.names(kind):
                self.drop(kind, name)
                removed.append(f"{kind}/{name}")
            with bpffs_errors("remove"):
                (self.dir / kind).rmdir() if (self.dir / kind).is_dir() else None
        with bpffs_errors("remove"):
            if self.dir.is_dir():
                self.dir.rmdir()
        try:
            self.root.rmdir()  # the last instance: meshagent leaves nothing on the bpffs
        except OSError:
            pass
        return removed
