"""The agent's BPF objects pinned on the bpffs, so they outlive the agent.

    /sys/fs/bpf/meshagent/<instance>/maps/<name>
                                    /progs/<name>
                                    /links/<name>

<instance> is named after the state dir (two agents with two state dirs
never share pins). A restarted agent finds the maps (the pods' entries,
the connections' original destinations, the sockhash) and the cgroup links,
reuses every map whose definition is unchanged and swaps the links'
programs in one step (BPF_LINK_UPDATE): the hooks never go missing, across
a restart or an upgrade. `meshagent cleanup` detaches and removes it all.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

from meshagent.bpf import syscall as sc
from meshagent.errors import MeshError

BPFFS = Path("/sys/fs/bpf")
BPFFS_MAGIC = 0xCAFE4A11


def instance_name(state_dir: Path) -> str:
    """<state dir's name>-<hash of its full path>: readable, and unique."""
    full = str(state_dir.resolve())
    return f"{state_dir.name or 'root'}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"


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
        return self.dir.is_dir()

    def open(self, kind: str, name: str) -> int | None:
        """An fd for the pinned object, or None if there is none."""
        path = self.path(kind, name)
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
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / name
        path.unlink(missing_ok=True)
        try:
            sc.obj_pin(fd, path)
        except OSError as exc:
            raise MeshError(f"cannot pin {path}: {exc.strerror}") from None

    def names(self, kind: str) -> list[str]:
        folder = self.dir / kind
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
        path.unlink(missing_ok=True)

    def remove(self) -> list[str]:
        """Detach and unpin everything of this instance; what was removed."""
        removed = []
        for kind in ("links", "progs", "maps"):  # links first: the hooks go at once
            for name in self.names(kind):
                self.drop(kind, name)
                removed.append(f"{kind}/{name}")
            (self.dir / kind).rmdir() if (self.dir / kind).is_dir() else None
        if self.dir.is_dir():
            self.dir.rmdir()
        try:
            self.root.rmdir()  # the last instance: meshagent leaves nothing on the bpffs
        except OSError:
            pass
        return removed
