"""Pod records under the state dir, shared by the CLI and the agent."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.pods.model import NodeConfig, Pod, check_record, validate_name
from meshagent.state import StateDir, write_json


class PodStore:
    """state_dir/node.json and state_dir/pods/NAME.json, under a flock."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.pods_dir = self.state_dir / "pods"
        self.node_file = self.state_dir / "node.json"

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.check_safe()
        self.pods_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd = os.open(self.state_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def node(self) -> NodeConfig | None:
        data = self._node_data()
        if data is None:
            return None
        return NodeConfig(**{k: v for k, v in data.items() if k != "made"})

    def node_made(self) -> dict:
        """What the first pod made for the node (and the last pod removes):
        {"bridge": bool, "cgroups": [relative paths, outermost first]}."""
        data = self._node_data() or {}
        return data.get("made", {"bridge": False, "cgroups": []})

    def _node_data(self) -> dict | None:
        try:
            return json.loads(self.node_file.read_text())
        except FileNotFoundError:
            return None

    def save_node(self, node: NodeConfig, made: dict) -> None:
        write_json(self.node_file, {**node.to_dict(), "made": made})

    def drop_node(self) -> None:
        self.node_file.unlink(missing_ok=True)

    def get(self, name: str) -> Pod:
        validate_name(name)
        path = self.pods_dir / f"{name}.json"
        try:
            pod = Pod(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise MeshError(f"pod {name}: no such pod (see `meshagent pod list`)") from None
        except (OSError, ValueError, TypeError) as exc:
            raise MeshError(f"pod {name}: its record {path} is unreadable ({exc})") from None
        if pod.name != name:
            raise MeshError(f"pod {name}: its record {path} names pod {pod.name!r}")
        check_record(pod, self.node())
        return pod

    def find(self, name: str) -> Pod | None:
        try:
            return self.get(name)
        except MeshError:
            return None

    def save(self, pod: Pod) -> None:
        write_json(self.pods_dir / f"{pod.name}.json", pod.to_dict())

    def drop(self, name: str) -> None:
        (self.pods_dir / f"{name}.json").unlink(missing_ok=True)

    def all(self) -> list[Pod]:
        """The valid records (see problems() for the others)."""
        return self.scan()[0]

    def problems(self) -> list[str]:
        """One line per record that cannot be trusted: never silently hidden."""
        return self.scan()[1]

    def scan(self) -> tuple[list[Pod], list[str]]:
        if not self.pods_dir.is_dir():
            return [], []
        pods, problems = [], []
        for path in sorted(self.pods_dir.glob("*.json")):
            try:
                pods.append(self.get(path.stem))
            except MeshError as exc:
                problems.append(str(exc))
        return pods, problems

    def check_safe(self) -> None:
        StateDir(self.state_dir).check_safe()

    def cleanup_dirs(self) -> None:
        """Remove the state dir's pod parts once no pod is left."""
        for path in (self.pods_dir, self.state_dir / ".lock"):
            try:
                path.rmdir() if path.is_dir() else path.unlink()
            except OSError:
                pass
