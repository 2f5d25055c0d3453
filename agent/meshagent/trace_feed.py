"""The agent's side of `meshagent trace`: one tracer at a time.

The tracer's control connection is its lease. On the `trace` request the
agent sets the kernel's trace flag (mesh_trace, with the pod and port
filters), hands over the ring buffer's fd with the reply (SCM_RIGHTS), and
from then on writes the forwarder's events as JSON lines on the same
connection. When that connection closes, also because the tracer was
killed with SIGKILL, the flag is cleared: nobody traces, the programs pay
one lookup per event.
"""

from __future__ import annotations

import json
import os
import socket
import time

from meshagent import log
from meshagent.api import Reply, Request
from meshagent.attachments import Attachments
from meshagent.bpf import abi
from meshagent.bpf.loader import Loaded
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.host import netns
from meshagent.host.loop import Loop


class Tracer:
    """One running `meshagent trace`: the forwarder's events go to its
    connection, as whole JSON lines.

    A line the socket takes only in part would be cut in the middle; so the
    lines go through a small bounded buffer whose unsent tail the loop sends
    later. When the tracer reads too slowly and the buffer is full, whole
    events are dropped (and counted), the agent never waits."""

    BUFFER = 256 * 1024  # bytes of lines not yet sent
    RETRY = 0.05  # seconds between tries to send the rest

    def __init__(
        self, conn: socket.socket, pod: str | None, port: int, loop: Loop | None = None
    ) -> None:
        self.conn = conn
        self.pod = pod
        self.port = port
        self.loop = loop  # host.loop.Loop: retries the unsent rest (None: the next event does)
        self.dropped = 0
        self.pending = bytearray()
        self.timer = None
        self.closed = False

    def event(self, event: dict) -> None:
        """A forwarder event, if it passes the filters; dropped whole, never
        waited for, when the tracer reads too slowly."""
        if self.closed:
            return
        if self.pod and event.get("pod") != self.pod:
            return
        if self.port and not str(event.get("orig_dst", "")).endswith(f":{self.port}"):
            return
        line = json.dumps({"time": time.time(), "source": "forwarder", **event}) + "\n"
        data = line.encode()
        if len(self.pending) + len(data) > self.BUFFER:
            self.dropped += 1
            return
        self.pending += data
        self.flush()

    def flush(self) -> None:
        """Send what the socket takes now; the rest stays, whole lines or
        the tail of one already begun."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.closed or not self.pending:
            return
        try:
            sent = self.conn.send(self.pending, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError:  # the tracer is gone: its close ends the trace
            self.dropped += self.pending.count(b"\n")
            self.pending.clear()
            self.closed = True
            return
        del self.pending[:sent]
        if self.pending and self.loop is not None:
            self.timer = self.loop.call_later(self.RETRY, self.flush)

    def close(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class TraceFeed:
    """The `trace` request, {"op": "trace", "pod": NAME?, "port": N?}: one
    tracer at a time."""

    def __init__(self, loaded: Loaded | None, forwarder: Forwarder, pods: Attachments) -> None:
        self.loaded = loaded
        self.forwarder = forwarder
        self.pods = pods
        self.tracer: Tracer | None = None

    @property
    def active(self) -> bool:
        return self.tracer is not None

    def __call__(self, request: Request) -> Reply:
        if self.tracer is not None:
            raise MeshError("a trace already runs (one at a time): stop it first")
        pod = request.optional_text("pod")
        port = request.data.get("port") or 0
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise MeshError("trace: 'port' must be a TCP port")
        loaded = self.loaded
        kernel = loaded is not None and loaded.attached("mesh_connect4")
        # Kernel events name a pod by its netns cookie; without them (iptables
        # backend, e.g. on 5.10, which has no SO_NETNS_COOKIE) the forwarder's
        # events carry the pod's name and no cookie is needed.
        pods = self._cookies() if kernel else {}
        cookie = 0
        if pod is not None:
            self.pods.resolver.get(pod)  # unknown pod: say so
            cookie = next((c for c, name in pods.items() if name == pod), 0)
            if kernel and not cookie:
                raise MeshError(f"trace: pod {pod}: its network namespace cookie is unknown")
        policy = getattr(self.forwarder, "policy", None)
        rules = {str(g): list(ids) for g, ids in policy.numbers.items()} if policy else {}
        modes = {e.handle.name: e.mode[0] for e in self.pods.attached()}
        reply = Reply({"trace": True, "pods": {str(c): n for c, n in pods.items()},
                       "rules": rules, "modes": modes})  # fmt: skip
        if kernel:
            trace_map = loaded.map(abi.TRACE)
            trace_map.update(abi.U32.pack(0), abi.TRACE_CFG.pack(1, port, 0, cookie))
            reply.fds.append(os.dup(loaded.map(abi.EVENTS).fd))
        reply.data["kernel_events"] = kernel
        self.tracer = Tracer(request.conn, pod, port, self.forwarder.loop)
        self.forwarder.on_event = self.tracer.event

        def stop() -> None:
            if kernel:
                trace_map.update(abi.U32.pack(0), abi.TRACE_CFG.pack(0, 0, 0, 0))
            if self.tracer is not None:
                self.tracer.close()
            self.tracer = None
            self.forwarder.on_event = None
            log.get().info("trace ended", extra={"reason": "the tracer's connection closed"})

        reply.on_close = stop
        log.get().info("trace started", extra={"pod": pod, "reason": f"port={port or 'any'}"})
        return reply

    def _cookies(self) -> dict[int, str]:
        """netns cookie -> pod name, for every pod on the node (kernel 5.14+):
        standalone pods, Kubernetes pods with a CNI record, and whatever else
        is attached (found by its cgroup, --pid or --netns)."""
        out = {}
        places = [(p.name, p.netns) for p in self.pods.store.all()]
        places += [(r.full_name, r.netns) for r in self.pods.resolver.cni.all()]
        places += [(e.handle.name, e.handle.netns_name) for e in self.pods.attached()]
        for name, where in places:
            try:
                fd = netns.open_fd(where)
            except MeshError:
                continue
            try:
                out[netns.cookie(fd)] = name
            except (OSError, MeshError):
                pass
            finally:
                os.close(fd)
        return out
