"""The forwarder: per-pod listeners, original destination, upstream connect,
then a data path (forwarder/datapath.py: copy, splice or sockmap)."""

from __future__ import annotations

from meshagent.forwarder.copy import CopyPath
from meshagent.forwarder.core import Forwarder
from meshagent.forwarder.datapath import DataPath
from meshagent.forwarder.records import PodStats
from meshagent.forwarder.sockmap import SockmapPath
from meshagent.forwarder.sockmap_maps import SockmapMaps
from meshagent.forwarder.splice import SplicePath
from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode


def build_paths(
    loop: Loop,
    modes: tuple[DataPathMode, ...],
    maps: SockmapMaps | None,
    sndbuf: int = 0,
    msg: bool = False,
    wake: bool = True,
    replies: bool = False,
) -> dict[DataPathMode, DataPath]:
    """One object per data path in modes (copy always: it is the fallback);
    msg: the sockmap path uses sk_msg where sock_ops gave the pod's socket;
    wake: it reads the kernel's hold-backs from mesh_wake (the start
    self-test's does not: the running agent's would lose them); replies:
    with msg, a same-node server's replies may go straight into the pod."""
    copy = CopyPath(loop)
    paths: dict[DataPathMode, DataPath] = {DataPathMode.COPY: copy}
    if DataPathMode.SPLICE in modes:
        paths[DataPathMode.SPLICE] = SplicePath(loop)
    if DataPathMode.SOCKMAP in modes and maps is not None:
        paths[DataPathMode.SOCKMAP] = SockmapPath(loop, maps, copy, sndbuf, msg, wake=wake,
                                                   replies=replies)  # fmt: skip
    return paths


__all__ = ["DataPath", "Forwarder", "PodStats", "build_paths"]
