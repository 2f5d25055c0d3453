"""What every command shares: the app object passed down with pass_obj,
and the one check that a command runs as root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from meshagent.errors import MeshError


@dataclass
class App:
    state_dir: Path

    @property
    def socket_path(self) -> Path:
        from meshagent.config import check_socket_path
        from meshagent.state import StateDir

        path = StateDir(self.state_dir).socket
        check_socket_path(path)
        return path

    def store(self):
        from meshagent.pods.store import PodStore

        return PodStore(self.state_dir)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise MeshError(f"{what} needs root")
