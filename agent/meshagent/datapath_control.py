"""The `datapath` request: which data path new connections take, and why;
`meshagent datapath set MODE` changes it while the agent runs."""

from __future__ import annotations

from meshagent import log
from meshagent.api import Reply, Request
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.modes import DataPathMode


class DataPathControl:
    def __init__(self, forwarder: Forwarder, has_msg: bool, reason: str) -> None:
        self.forwarder = forwarder
        self.has_msg = has_msg  # the plan loaded the sk_msg program
        self.reason = reason  # why the current data path was chosen

    def __call__(self, request: Request) -> Reply:
        mode = request.choice("set", DataPathMode, optional=True)
        msg = request.optional_bool("msg")
        replies = request.optional_bool("replies")
        if mode is None:
            return Reply({"datapath": self.forwarder.mode.value, "reason": self.reason})
        return Reply(self.set(mode, msg, replies))

    def set(self, mode: DataPathMode, msg: bool | None = None, replies: bool | None = None) -> dict:
        if replies is not None:
            sockmap = self.forwarder.paths.get(DataPathMode.SOCKMAP)
            if mode is not DataPathMode.SOCKMAP or sockmap is None:
                raise MeshError("--replies/--no-replies: only with `datapath set sockmap`")
            if replies and not (self.has_msg and (msg or (msg is None and sockmap.msg))):
                raise MeshError("--replies: needs the sk_msg path (--msg)")
            sockmap.replies = replies
        if msg is not None:
            sockmap = self.forwarder.paths.get(DataPathMode.SOCKMAP)
            if mode is not DataPathMode.SOCKMAP or sockmap is None:
                raise MeshError("--msg/--no-msg: only with `datapath set sockmap`")
            if msg and not self.has_msg:
                raise MeshError(
                    "--msg: this agent has no sk_msg path (ebpf backend, kernel 5.15+;"
                    " see `meshagent probe-kernel`)"
                )
            sockmap.msg = msg
        self.forwarder.set_mode(mode)
        self.reason = "set while running (`meshagent datapath set`)"
        log.get().info(f"data path {mode} for new connections", extra={"reason": "datapath set"})
        return {"datapath": mode.value}
