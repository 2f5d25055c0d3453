"""`meshagent cleanup`: remove everything the agent made (uninstall).

An agent that stops leaves its pods attached for the next one: the pinned
BPF maps, programs and cgroup links, the pods' iptables rules and
STATE_DIR/attached.json. This removes all of it, and with `cache` the
compiled BPF objects too. It refuses while an agent runs on the state dir.
Pods made with `meshagent pod create` are left alone (`meshagent pod delete`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshagent.state import LEGACY_FILES, StateDir


def cleanup(state_dir: Path, cache_dir: Path | None = None, cni_records: bool = False) -> list[str]:
    """What was removed, one line each. cni_records: also the CNI plugin's
    records of the node's pods, and the state dir itself once it is empty
    (an uninstall on Kubernetes: the plugin is out of the chain by then)."""
    from meshagent.bpf.pins import Pins
    from meshagent.host import netns
    from meshagent.pods.kubelet import CNI_DIR

    state = StateDir(state_dir)
    removed: list[str] = []
    with _agent_lock(state):
        for name, record in state.read_attached().items():
            if record.backend != "iptables" or not record.netns:
                continue
            if netns.exists(record.netns):
                backend = _iptables_backend(record.flavour)
                backend.remove(name, record.netns, quiet=True)
                removed.append(f"iptables rules of pod {name} ({backend.tools.flavour})")
        pins = Pins(state_dir)
        if pins.exists():
            removed += [f"pinned {item}" for item in pins.remove()]
        own = own_cgroup_dir(state_dir)
        if own is not None:
            removed.append(f"cgroup {own}")
        for path in (state.attached_file, state.socket, *(state.path / n for n in LEGACY_FILES)):
            if path.exists() or path.is_symlink():
                path.unlink()
                removed.append(str(path))
        records = state.path / CNI_DIR
        if cni_records and records.is_dir():
            count = len(list(records.iterdir()))
            shutil.rmtree(records)
            removed.append(f"{count} CNI record(s) in {records}")
    state.lock_file.unlink(missing_ok=True)
    state.successor_lock.unlink(missing_ok=True)
    if cni_records:
        try:
            state.path.rmdir()  # only an empty one: standalone pods' files stay
            removed.append(f"state dir {state.path}")
        except OSError:
            pass
    if cache_dir is not None and cache_dir.is_dir():
        shutil.rmtree(cache_dir)
        removed.append(f"compiled BPF objects in {cache_dir}")
    return removed


def _iptables_backend(flavour: str | None):
    from meshagent.redirect.iptables import teardown_only

    return teardown_only(flavour)


@contextmanager
def _agent_lock(state: StateDir) -> Iterator[None]:
    """Held while cleaning: no agent may start meanwhile, and none may run."""
    if not state.path.is_dir():
        yield
        return
    fd = state.lock(what="cleanup")
    try:
        yield
    finally:
        os.close(fd)


def own_cgroup_dir(state_dir: Path) -> Path | None:
    """The empty cgroup an agent of this state dir moved into from the root
    cgroup (redirect/own_cgroup.py) and could not remove (it crashed):
    removed, and returned; None when there is none."""
    from meshagent.bpf.pins import instance_name
    from meshagent.errors import MeshError
    from meshagent.host import cgroup

    try:
        path = cgroup.cgroup2_mount() / f"meshagent-{instance_name(state_dir)}"
    except MeshError:
        return None
    try:
        path.rmdir()  # only an empty one: a running agent's stays
    except OSError:
        return None
    return path
