"""cgroup v2: find the mount, make, join and remove cgroups."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from meshagent.errors import MeshError


def cgroup2_mount() -> Path:
    """Where cgroup v2 is mounted (/sys/fs/cgroup, or .../unified on hybrid hosts)."""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    return Path(parts[1])
    except OSError as exc:
        raise MeshError(f"cannot read /proc/mounts: {exc.strerror}") from None
    raise MeshError("no cgroup v2 mount found: run scripts/bootstrap (it mounts one)")


def resolve(path: str | None, must_exist: bool = True) -> Path:
    """A cgroup given as a path under the cgroup2 mount, absolute or relative
    to it; None means the root."""
    root = cgroup2_mount()
    if not path or path == "/":
        return root
    candidate = Path(path)
    if not candidate.is_absolute() or not _is_under(candidate, root):
        candidate = root / str(path).lstrip("/")
    candidate = Path(os.path.normpath(candidate))
    if not _is_under(candidate, root):
        raise MeshError(f"cgroup {path}: not under the cgroup v2 mount {root}")
    if must_exist and not (candidate / "cgroup.procs").exists():
        raise MeshError(f"cgroup {candidate}: no such cgroup v2 directory")
    return candidate


def _is_under(path: Path, root: Path) -> bool:
    try:
        Path(os.path.normpath(path)).relative_to(root)
    except ValueError:
        return False
    return True


def create(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def procs(path: Path) -> list[int]:
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def remove(path: Path, timeout: float = 5.0) -> None:
    """Kill what runs in the cgroup and below, then remove it, leaves first."""
    if not path.exists():
        return
    for child in sorted(
        (p for p in path.iterdir() if p.is_dir()), key=lambda p: len(p.parts), reverse=True
    ):
        remove(child, timeout)
    kill_file = path / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while True:
        pids = procs(path)
        if not pids:
            break
        if kill_file.exists():
            kill_file.write_text("1\n")
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if time.monotonic() > deadline:
            raise MeshError(f"cgroup {path}: processes {pids} did not exit")
        time.sleep(0.02)
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise MeshError(f"cgroup {path}: cannot remove: {exc.strerror}") from None
            time.sleep(0.02)
