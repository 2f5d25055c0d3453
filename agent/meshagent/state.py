"""The agent's state dir: which files it holds, the lock that lets one agent
run on it, and the record of each attached pod (attached.json), which a
restarted agent adopts, a successor is handed and `cleanup` undoes.

    agent.lock      flock held for an agent's life (and by `cleanup`)
    successor.lock  flock held by `run --takeover` while it asks for the pods
                    (the running agent hands over only to its holder)
    agent.sock      the control socket (control.py)
    attached.json   {"pods": {NAME: PodRecord}}
    node.json, pods/, .lock   standalone pods (pods/store.py)
    cni/            the CNI plugin's records of Kubernetes pods (pods/kubelet.py)
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from meshagent import log
from meshagent.errors import MeshError

AGENT_LOCK = "agent.lock"
SUCCESSOR_LOCK = "successor.lock"
AGENT_SOCKET = "agent.sock"
ATTACHED = "attached.json"
# Written by earlier agents and removed by cleanup; nothing reads it.
LEGACY_FILES = ("agent.json",)


@dataclass(frozen=True)
class PodRecord:
    """One attached pod as the state dir, a successor and `status` see it."""

    name: str
    backend: str  # modes.Backend's value
    netns: str  # a name under /run/netns, or an absolute path
    netns_id: str  # "DEV:INO" of the netns file: the same namespace, not a new one
    since: float = 0.0  # attached since (time.time())
    draining: bool = False  # detached; its rules stay while its connections live
    source: str = "standalone"  # how its netns was found (pods/resolve.py)
    auto: bool = False  # attached for a label or the CNI config, not by hand
    flavour: str | None = None  # iptables: which flavour holds its rules
    attaching: bool = False  # its rules were being written (a crash meanwhile)
    mode: str = "forward"  # modes.PodMode (kept only when not forward)

    def to_dict(self) -> dict:
        """The JSON form, without the name (the key of attached.json) and
        without what is unset."""
        out = asdict(self)
        del out["name"]
        for key in ("flavour", "attaching"):
            if not out[key]:
                del out[key]
        if out["mode"] == "forward":  # records as older agents wrote them
            del out["mode"]
        return out

    @classmethod
    def from_dict(cls, name: str, data: dict) -> PodRecord:
        """A record read back; MeshError naming the pod if it is malformed."""
        known = {f.name for f in fields(cls)} - {"name"}
        try:
            record = cls(name=name, **{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise MeshError(f"pod {name}: its attachment record is malformed ({exc})") from None
        for key in ("backend", "netns", "netns_id"):
            if not isinstance(getattr(record, key), str):
                raise MeshError(f"pod {name}: its attachment record has no valid {key!r}")
        if record.mode not in ("forward", "kernel"):
            raise MeshError(f"pod {name}: its attachment record has no valid 'mode'")
        return record


def netns_id_of(dev: int, ino: int) -> str:
    return f"{dev}:{ino}"


class StateDir:
    """The paths under the state dir and the agent's lock on it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def socket(self) -> Path:
        return self.path / AGENT_SOCKET

    @property
    def lock_file(self) -> Path:
        return self.path / AGENT_LOCK

    @property
    def successor_lock(self) -> Path:
        return self.path / SUCCESSOR_LOCK

    def lock_successor(self) -> int:
        """Take the successor lock (one takeover at a time) and return its
        fd, held until the handover is over; MeshError if another holds it."""
        fd = os.open(self.successor_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MeshError(
                f"another takeover is under way ({self.successor_lock} is held)"
            ) from None
        return fd

    @property
    def attached_file(self) -> Path:
        return self.path / ATTACHED

    def check_safe(self) -> None:
        """The state dir decides what the agent attaches: only its owner may
        write there."""
        from meshagent.host.files import check_owner_only

        check_owner_only(self.path, "state dir")

    def lock(self, wait: float = 0.0, what: str = "agent") -> int:
        """Take the agent lock (waiting up to `wait` seconds) and return its
        fd, to be closed when done; MeshError if another holds it. One agent
        per state dir, also when two start at the same moment (the socket
        check alone is a race). The file stays: unlinked, a successor's lock
        on it would be on an orphan and a third agent could lock a new one."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
            os.close(fd)
            if what == "agent":
                raise MeshError(
                    f"another agent runs with state dir {self.path}: stop it first, or give"
                    " this one a state dir of its own (meshagent --state-dir DIR run)"
                )
            raise MeshError(f"an agent runs with state dir {self.path}: stop it first")

    # -- attached.json ---------------------------------------------------------
    def read_attached(self) -> dict[str, PodRecord]:
        """The pods an agent left attached ({} if none, or unreadable)."""
        path = self.attached_file
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.get().warning("unreadable attachments ignored", extra={"reason": str(path)})
            return {}
        pods = data.get("pods") if isinstance(data, dict) else None
        out: dict[str, PodRecord] = {}
        for name, record in pods.items() if isinstance(pods, dict) else ():
            if not isinstance(record, dict):
                continue
            try:
                out[name] = PodRecord.from_dict(name, record)
            except MeshError as exc:
                log.get().warning("attachment record ignored", extra={"reason": str(exc)})
        return out

    def write_attached(self, records: list[PodRecord]) -> None:
        pods = {r.name: r.to_dict() for r in sorted(records, key=lambda r: r.name)}
        write_json(self.attached_file, {"pods": pods})


def write_json(path: Path, data: dict) -> None:
    """Write whole or not at all (a crash leaves the old file), readable by
    the owner only (0600 whatever the umask): the records name pods, netns
    paths and addresses."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover .tmp keeps its old mode otherwise
        with os.fdopen(fd, "w") as out:
            fd = -1
            out.write(json.dumps(data, indent=2) + "\n")
    finally:
        if fd >= 0:
            os.close(fd)
    os.replace(tmp, path)
