"""Directories whose contents decide what the agent does (the state dir, the
BPF object cache): only the agent's own uid may write there."""

from __future__ import annotations

import os
from pathlib import Path

from meshagent.errors import MeshError


def check_owner_only(path: Path, what: str, also: str = "") -> None:
    """One line naming the owner, the mode and the fix, if others may write
    to path (a missing path is fine: the agent makes it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise MeshError(
            f"{what} {path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}:"
            f" only its owner (uid {os.geteuid()}) may write there; fix it with chown"
            f" {os.geteuid()} and chmod go-w{also}"
        )
