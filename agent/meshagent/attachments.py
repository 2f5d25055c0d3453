"""The attached pods: one record per pod, from attach to the last of its
connections after detach.

A pod's record holds its netns (fd and identity), its redirect backend and
its state: attached, or draining (detached while connections redirected
before the detach are still open: the iptables backend keeps its rules for
them, see redirect/rules.py).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass

from meshagent import log
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.host import netns
from meshagent.modes import Backend as BackendName
from meshagent.pods.store import PodStore
from meshagent.redirect import Backend, PodHandle


@dataclass
class AttachedPod:
    handle: PodHandle
    backend: Backend
    since: float
    draining: bool = False

    def snapshot(self) -> dict:
        dev, ino = self.handle.netns_id
        return {
            "name": self.handle.name,
            "backend": self.backend.name.value,
            "netns": self.handle.netns_name,
            "netns_inode": f"{dev}:{ino}",
            "attached_since": self.since,
            "state": "draining" if self.draining else "attached",
        }


class Attachments:
    def __init__(
        self,
        store: PodStore,
        forwarder: Forwarder,
        backends: dict[BackendName, Backend],
        default: BackendName,
    ) -> None:
        self.store = store
        self.forwarder = forwarder
        self.backends = backends
        self.default = default
        self.pods: dict[str, AttachedPod] = {}
        self._next_pod_id = 1
        self.attach_seconds: list[float] = []  # for the metrics' histogram
        self.log = log.get()

    def attached(self) -> list[AttachedPod]:
        return [pod for _name, pod in sorted(self.pods.items()) if not pod.draining]

    def attach(self, name: str, redirect: BackendName | None = None) -> dict:
        started = time.monotonic()
        reply = self._attach(name, redirect)
        if not reply["already"]:
            self.attach_seconds.append(time.monotonic() - started)
            del self.attach_seconds[:-1024]
        return reply

    def _attach(self, name: str, redirect: BackendName | None) -> dict:
        pod = self.store.get(name)
        current = self.pods.get(name)
        if current is not None and not current.draining:
            if _same_netns(current, pod.netns):
                return {"pod": name, "already": True, "backend": current.backend.name.value}
            self._drop_stale(current, "the pod was re-created: a new network namespace")
            current = None
        wanted = redirect or self.default
        backend = self.backends.get(wanted)
        if backend is None:
            raise MeshError(
                f"pod {name}: redirect {wanted}: not available on this agent"
                " (see `meshagent status`)"
            )
        if current is not None:  # draining: attach renders its rules live again
            self._forget(current)
        with ExitStack() as undo:
            fd = netns.open_fd(pod.netns)
            undo.callback(os.close, fd)
            handle = PodHandle(name, pod.netns, fd, self._next_pod_id)
            twin = next((p for p in self.attached() if p.handle.netns_id == handle.netns_id), None)
            if twin is not None:
                raise MeshError(
                    f"pod {name}: netns {pod.netns} is the same namespace as pod"
                    f" {twin.handle.name}'s, which is attached"
                )
            self.forwarder.open_pod(name, fd, backend.steering(handle))
            undo.callback(self.forwarder.close_pod, name)
            try:
                backend.attach(handle)
            except MeshError:
                raise
            except Exception as exc:
                raise MeshError(f"pod {name}: attach failed: {exc}") from None
            undo.pop_all()
        self._next_pod_id += 1
        self.pods[name] = AttachedPod(handle, backend, time.time())
        self.log.info(
            "pod attached",
            extra={"pod": name, "reason": f"backend={backend.name} netns={pod.netns}"},
        )
        return {"pod": name, "already": False, "backend": backend.name.value}

    def detach(self, name: str) -> dict:
        entry = self.pods.get(name)
        if entry is None or entry.draining:
            self.store.get(name)  # unknown pod: say so
            raise MeshError(f"pod {name} is not attached")
        self.forwarder.close_pod(name)  # queued connections are accepted first
        open_conns = self.forwarder.open_connections(name)
        try:
            owed = entry.backend.detach(entry.handle, open_connections=open_conns > 0)
        except MeshError as exc:
            if netns.exists(entry.handle.netns_name):
                raise
            owed = False
            self.log.warning(
                "pod netns gone; nothing to remove", extra={"pod": name, "reason": str(exc)}
            )
        if owed:
            entry.draining = True
        else:
            self._forget(entry)
        self.log.info(
            "pod detached",
            extra={"pod": name, "reason": f"{open_conns} open connections finish as they are"},
        )
        return {"pod": name, "open_connections": open_conns}

    def drop_vanished(self) -> None:
        """Forget attachments whose netns is gone or was replaced (a pod
        deleted or re-created behind the agent's back)."""
        for entry in self.attached():
            if not _same_netns(entry, entry.handle.netns_name):
                self._drop_stale(entry, "its network namespace vanished")

    def _drop_stale(self, entry: AttachedPod, why: str) -> None:
        name = entry.handle.name
        self.forwarder.close_pod(name)
        try:
            entry.backend.detach(entry.handle)
        except MeshError:
            pass  # the namespace holding its rules is gone with them
        self._forget(entry)
        self.log.warning("pod detached", extra={"pod": name, "reason": why})

    def finish_draining(self, everything: bool = False) -> None:
        """Remove rules kept for connections open at detach, once they closed."""
        for entry in list(self.pods.values()):
            if entry.draining and (
                everything or self.forwarder.open_connections(entry.handle.name) == 0
            ):
                self._remove(entry)

    def _remove(self, entry: AttachedPod) -> None:
        try:
            entry.backend.remove(entry.handle.name, entry.handle.netns_name)
        except MeshError as exc:
            self.log.warning(
                "rule removal failed", extra={"pod": entry.handle.name, "reason": str(exc)}
            )
        self._forget(entry)

    def _forget(self, entry: AttachedPod) -> None:
        self.pods.pop(entry.handle.name, None)
        os.close(entry.handle.netns_fd)

    def detach_all(self) -> None:
        for pod in self.attached():
            try:
                self.detach(pod.handle.name)
            except MeshError as exc:
                self.log.warning(
                    "detach failed", extra={"pod": pod.handle.name, "reason": str(exc)}
                )

    def snapshot(self) -> list[dict]:
        """Each attached pod with its forwarder counters."""
        out = []
        for pod in self.attached():
            name = pod.handle.name
            stats = self.forwarder.pods[name].stats.to_dict()
            live_out, live_in = self.forwarder.live_bytes(name)
            stats["bytes_out"] += live_out
            stats["bytes_in"] += live_in
            port = self.forwarder.port
            out.append(
                {
                    **pod.snapshot(),
                    "listeners": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                    **stats,
                }
            )
        return out


def _same_netns(entry: AttachedPod, netns_name: str) -> bool:
    """Is netns_name still the namespace this attachment holds?"""
    try:
        st = os.stat(netns.path(netns_name))
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == entry.handle.netns_id
