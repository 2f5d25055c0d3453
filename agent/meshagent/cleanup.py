"""`meshagent cleanup`: remove everything the agent made (uninstall).

An agent that stops leaves its pods attached for the next one: the pinned
BPF maps, programs and cgroup links, the pods' iptables rules and
STATE_DIR/attached.json. This removes all of it, and with `cache` the
compiled BPF objects too. It refuses while an agent runs on the state dir.
Pods made with `meshagent pod create` are left alone (`meshagent pod delete`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from meshagent.errors import MeshError


def cleanup(state_dir: Path, cache_dir: Path | None = None) -> list[str]:
    """What was removed, one line each."""
    from meshagent.attachments import ATTACHED_FILE, read_attached
    from meshagent.bpf.pins import Pins
    from meshagent.host import netns

    removed: list[str] = []
    with _agent_lock(state_dir):
        records = read_attached(state_dir)
        for name, record in records.items():
            netns_name = record.get("netns")
            if record.get("backend") != "iptables" or not netns_name:
                continue
            if netns.exists(netns_name):
                backend = _iptables_backend(record.get("flavour"))
                backend.remove(name, netns_name, quiet=True)
                removed.append(f"iptables rules of pod {name} ({backend.tools.flavour})")
        pins = Pins(state_dir)
        if pins.exists():
            removed += [f"pinned {item}" for item in pins.remove()]
        for name in (ATTACHED_FILE, "agent.json", "agent.sock"):
            path = state_dir / name
            if path.exists() or path.is_symlink():
                path.unlink()
                removed.append(str(path))
    (state_dir / "agent.lock").unlink(missing_ok=True)
    if cache_dir is not None and cache_dir.is_dir():
        shutil.rmtree(cache_dir)
        removed.append(f"compiled BPF objects in {cache_dir}")
    return removed


def _iptables_backend(flavour: str | None):
    from meshagent.config import AgentConfig
    from meshagent.redirect.iptables import IptablesBackend, Tools, detect_flavour
    from meshagent.redirect.rules import RuleConfig

    cfg = AgentConfig()
    flavour, _how = detect_flavour(flavour)
    rules = RuleConfig(cfg.port, cfg.skip_mark, (), ())
    return IptablesBackend(rules, Tools.of(flavour))


class _agent_lock:
    """Held while cleaning: no agent may start meanwhile, and none may run."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "agent.lock"

    def __enter__(self) -> None:
        self.fd = None
        if not self.path.parent.is_dir():
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise MeshError(
                f"an agent runs with state dir {self.path.parent}: stop it first"
            ) from None

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
