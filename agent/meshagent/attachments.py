"""The attached pods: one record per pod, from attach to the last of its
connections after detach; kept in STATE_DIR/attached.json, so an agent
that restarts (after a stop or a crash) takes the pods over without a new
`attach` (adopt()).

A pod's entry holds its netns (fd and identity), its redirect backend, its
forwarder slot and its state: attached, or draining (detached while
connections redirected before the detach are still open: the iptables
backend keeps its rules for them, see redirect/rules.py). What is kept of
it across agents is its PodRecord (state.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace

from meshagent import log
from meshagent.api import Deferred
from meshagent.errors import MeshError, NotAttached
from meshagent.forwarder import Forwarder
from meshagent.forwarder.records import PodSlot
from meshagent.host import netns
from meshagent.host.worker import Worker
from meshagent.modes import Backend as BackendName
from meshagent.modes import PodMode
from meshagent.pods.resolve import PodRef, Resolver, check_name
from meshagent.pods.store import PodStore
from meshagent.redirect import Backend, PodHandle
from meshagent.state import PodRecord, StateDir, netns_id_of

# Between "new connects go direct" and closing the listeners: connects the
# redirect sent to the listener just before complete their handshakes and
# are forwarded; none meets a closed port.
LISTENER_GRACE = 0.2


@dataclass
class AttachedPod:
    handle: PodHandle
    backend: Backend
    slot: PodSlot  # the forwarder's side: listeners, stats, its connections
    since: float
    draining: bool = False  # detached; its rules may stay while its connections live
    closing: object = None  # the timer that closes its listeners after the grace
    removing: bool = False  # its rules' removal is queued
    forgotten: bool = False  # its netns fd is closed
    source: str = "standalone"  # how its netns was found (pods/resolve.py)
    auto: bool = False  # attached for a label or the CNI config (kube/autoattach.py), not by hand

    def record(self) -> PodRecord:
        return PodRecord(
            name=self.handle.name,
            backend=self.backend.name.value,
            netns=self.handle.netns_name,
            netns_id=netns_id_of(*self.handle.netns_id),
            since=self.since,
            draining=self.draining,
            source=self.source,
            auto=self.auto,
            flavour=self.backend.flavour,
            mode=self.handle.mode,
        )

    @property
    def mode(self) -> tuple[str, str]:
        """The mode its connections get, and why."""
        if self.handle.mode != PodMode.KERNEL:
            return PodMode.FORWARD.value, "the default"
        if self.backend.name is not BackendName.EBPF:
            return PodMode.FORWARD.value, (
                f"kernel asked; the {self.backend.name} backend has no connect hook"
                " (every connection is forwarded)"
            )
        return PodMode.KERNEL.value, (
            "asked: direct, except to other nodes' pods (mTLS) and pods with ingress rules"
        )

    def snapshot(self) -> dict:
        record = self.record().to_dict()
        mode, why = self.mode
        return {
            "name": self.handle.name,
            **{k: record[k] for k in ("backend", "netns", "netns_id", "source", "auto")},
            "mode": mode,
            "mode_reason": why,
            "attached_since": self.since,
            "state": "draining" if self.draining else "attached",
        }


class Attachments:
    def __init__(
        self,
        store: PodStore,
        state: StateDir,
        forwarder: Forwarder,
        backends: dict[BackendName, Backend],
        default: BackendName,
        resolver: Resolver | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.resolver = resolver or Resolver(store)
        self.forwarder = forwarder
        self.backends = backends
        self.default = default
        self.pods: dict[str, AttachedPod] = {}
        self._next_pod_id = 1
        self.attach_seconds: list[float] = []  # for the metrics' histogram
        self.log = log.get()
        # Backends that block (iptables subprocesses) run in this thread
        # while the loop runs; inline before and after (start, shutdown).
        self.worker: Worker | None = None
        self.busy: set[str] = set()  # pods whose attach or detach is under way
        # Pods whose rules are being written: recorded first, so that after a
        # crash meanwhile the next agent knows to remove them.
        self.attaching: dict[str, PodRecord] = {}
        # The policy (policy/engine.py): a pod's tables before it is steered,
        # and word when the set of pods changed.
        self.prepare: Callable[[PodHandle, Backend], None] | None = None
        self.changed: Callable[[], None] | None = None

    def _changed(self) -> None:
        if self.changed is not None:
            self.changed()

    def start_offloading(self) -> None:
        self.worker = Worker(self.forwarder.loop, "rules")

    def stop_offloading(self) -> None:
        """Finish the queued work (and its bookkeeping) and go inline."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()

    def _blocking(self, name: str, backend: Backend, job, commit, op: str):
        """Run job (the backend's rule work), then commit(error) on the loop.
        Inline for backends that do not block: commit's dict or raise. Else
        a Deferred reply, and the pod is busy until commit ran."""
        if not backend.blocking or self.worker is None:
            return commit(_inline(job))
        self.busy.add(name)
        reply = Deferred()

        def done(_result, error: BaseException | None) -> None:
            self.busy.discard(name)
            try:
                reply.resolve(commit(error))
            except Exception as exc:
                reply.fail(exc, op)

        self.worker.submit(job, done)
        return reply

    def _background(self, backend: Backend, job, done) -> None:
        """Rule work nobody waits for (removals): off the loop where it blocks;
        done(error) runs on the loop after it."""
        if not backend.blocking or self.worker is None:
            done(_inline(job))
            return
        self.worker.submit(job, lambda _result, error: done(error))

    def _check_idle(self, name: str) -> None:
        if name in self.busy:
            raise MeshError(f"pod {name}: an attach or detach is under way; try again")

    def attached(self) -> list[AttachedPod]:
        return [pod for _name, pod in sorted(self.pods.items()) if not pod.draining]

    def attach(
        self,
        name: str,
        redirect: BackendName | None = None,
        netns_path: str | None = None,
        pid: int | None = None,
        auto: bool = False,
        mode: PodMode | None = None,
    ):
        """A dict, or a Deferred one when the backend's work runs off the loop.
        An attached pod asked for another mode changes to it in place."""
        self._check_idle(name)
        pod = self.resolver.get(name, netns_path, pid)
        return self._attach(pod, redirect, time.monotonic(), auto, mode)

    def _attach(
        self, pod: PodRef, redirect: BackendName | None, started: float, auto: bool = False,
        mode: PodMode | None = None,
    ):  # fmt: skip
        name = pod.name
        current = self.pods.get(name)
        if current is not None and not current.draining:
            if _same_netns(current, pod.netns):
                if mode is not None and mode != current.handle.mode:
                    self.set_mode(current, mode)
                return {"pod": name, "already": True, "backend": current.backend.name.value,
                        "mode": current.mode[0]}  # fmt: skip
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
            self._close_listeners(current)
            self._forget(current)
        undo = ExitStack()
        with undo:
            fd = netns.open_fd(pod.netns)
            undo.callback(os.close, fd)
            handle = PodHandle(name, pod.netns, fd, self._next_pod_id)
            handle.mode = (mode or PodMode.FORWARD).value
            twin = next((p for p in self.attached() if p.handle.netns_id == handle.netns_id), None)
            if twin is not None:
                raise MeshError(
                    f"pod {name}: netns {pod.netns} is the same namespace as pod"
                    f" {twin.handle.name}'s, which is attached"
                )
            slot = self.forwarder.open_pod(handle, backend.steering(handle))
            undo.callback(self.forwarder.close_pod, slot)
            self._next_pod_id += 1
            undo = undo.pop_all()  # from here, commit() undoes on failure

        if backend.blocking:
            self.attaching[name] = PodRecord(
                name, backend.name.value, pod.netns, netns_id_of(*handle.netns_id),
                source=pod.source, flavour=backend.flavour, attaching=True,
            )  # fmt: skip
            self.save()

        def commit(error: BaseException | None) -> dict:
            self.attaching.pop(name, None)
            if error is not None:
                undo.close()
                self.save()
                if isinstance(error, MeshError):
                    raise error
                raise MeshError(f"pod {name}: attach failed: {error}")
            undo.pop_all()
            self.pods[name] = AttachedPod(
                handle, backend, slot, time.time(), source=pod.source, auto=auto
            )
            self.save()
            self.attach_seconds.append(time.monotonic() - started)
            del self.attach_seconds[:-1024]
            self._changed()
            self.log.info(
                "pod attached",
                extra={
                    "pod": name,
                    "reason": f"backend={backend.name} mode={self.pods[name].mode[0]}"
                    f" netns={pod.netns} ({pod.source})",
                },
            )
            return {"pod": name, "already": False, "backend": backend.name.value,
                    "mode": self.pods[name].mode[0]}  # fmt: skip

        if self.prepare is not None:
            try:
                self.prepare(handle, backend)
            except BaseException:
                undo.close()
                raise
        return self._blocking(name, backend, lambda: backend.attach(handle), commit, "attach")

    def set_mode(self, entry: AttachedPod, mode: PodMode) -> None:
        """Another mode for an attached pod, from its next connect on (open
        connections go on as they are)."""
        old = entry.mode[0]
        entry.handle.mode = mode.value
        if entry.backend.name is BackendName.EBPF:
            entry.backend.steer(entry.handle, True)
        self.save()
        self._changed()
        self.log.info("pod mode changed", extra={"pod": entry.handle.name,
                                                 "reason": f"{old} -> {entry.mode[0]}"})  # fmt: skip

    def detach(self, name: str, grace: bool = True):
        """A dict, or a Deferred one when the backend's work runs off the loop."""
        entry = self.pods.get(name)
        if entry is None or entry.draining:
            if "/" not in name:
                self.store.get(name)  # unknown pod: say so
            check_name(name)
            raise NotAttached(f"pod {name} is not attached")
        self._check_idle(name)

        # New connects go direct first; the listeners close a moment later
        # (their queue accepted and forwarded): no connect meets a closed port.
        def commit(error: BaseException | None) -> dict:
            if error is not None:
                if not isinstance(error, MeshError):
                    raise MeshError(f"pod {name}: detach failed: {error}")
                if netns.exists(entry.handle.netns_name):
                    raise error
                self.log.warning(
                    "pod netns gone; nothing to remove", extra={"pod": name, "reason": str(error)}
                )
            entry.draining = True
            self.save()
            self._changed()
            open_conns = self.forwarder.open_connections(entry.slot)
            if grace:
                entry.closing = self.forwarder.loop.call_later(
                    LISTENER_GRACE, lambda: self._after_grace(entry)
                )
            else:
                self._after_grace(entry)
            self.log.info(
                "pod detached",
                extra={"pod": name, "reason": f"{open_conns} open connections finish as they are"},
            )
            return {"pod": name, "open_connections": open_conns}

        return self._blocking(
            name, entry.backend, lambda: entry.backend.stop_new(entry.handle), commit, "detach"
        )

    def drop_vanished(self) -> None:
        """Forget attachments whose netns is gone or was replaced (a pod
        deleted or re-created behind the agent's back)."""
        for entry in self.attached():
            if entry.handle.name in self.busy:
                continue
            if not _same_netns(entry, entry.handle.netns_name):
                self._drop_stale(entry, "its network namespace vanished")

    def _drop_stale(self, entry: AttachedPod, why: str) -> None:
        name = entry.handle.name
        # Into the netns it held, which the job owns a copy of (_forget closes
        # the entry's now): its path may name a re-created pod's by now.
        # Errors are expected: the namespace holding its rules may be gone.
        held = replace(entry.handle, netns_fd=os.dup(entry.handle.netns_fd))
        self._background(entry.backend, _closing(held.netns_fd, lambda: entry.backend.stop_new(held)),
                         _ignore)  # fmt: skip
        self.forwarder.close_pod(entry.slot)
        self._forget(entry)
        self.log.warning("pod detached", extra={"pod": name, "reason": why})

    def _close_listeners(self, entry: AttachedPod) -> None:
        if entry.closing is not None:
            entry.closing.cancel()
            entry.closing = None
        self.forwarder.close_pod(entry.slot)

    def _after_grace(self, entry: AttachedPod) -> None:
        """Close the listeners; the rules go now, or once the pod's forwarded
        connections have closed (draining)."""
        entry.closing = None
        if self.pods.get(entry.handle.name) is not entry:
            return
        self.forwarder.close_pod(entry.slot)
        if self.forwarder.open_connections(entry.slot) == 0:
            self._remove(entry)

    def finish_draining(self, everything: bool = False) -> None:
        """Remove rules kept for connections open at detach, once they closed."""
        for entry in list(self.pods.values()):
            if not entry.draining or entry.removing:
                continue
            if entry.closing is not None and not everything:
                continue
            if everything or self.forwarder.open_connections(entry.slot) == 0:
                self._close_listeners(entry)
                self._remove(entry)

    def _remove(self, entry: AttachedPod) -> None:
        # Not busy meanwhile: an attach of the same pod queues behind this
        # removal in the same worker, and _forget leaves a new record alone.
        name, netns_name = entry.handle.name, entry.handle.netns_name
        entry.removing = True

        def done(error: BaseException | None) -> None:
            if error is not None:
                self.log.warning("rule removal failed", extra={"pod": name, "reason": str(error)})
            self._forget(entry)

        fd = os.dup(entry.handle.netns_fd)  # the job's own: _forget closes the entry's
        job = _closing(fd, lambda: entry.backend.remove(name, netns_name, netns_fd=fd))
        self._background(entry.backend, job, done)

    def _forget(self, entry: AttachedPod) -> None:
        if entry.forgotten:
            return
        entry.forgotten = True
        if self.pods.get(entry.handle.name) is entry:
            del self.pods[entry.handle.name]
            self.save()
        os.close(entry.handle.netns_fd)

    # -- kept across restarts ---------------------------------------------
    def save(self) -> None:
        """attached.json: what a restarted agent takes over."""
        records = {name: entry.record() for name, entry in self.pods.items()}
        for name, record in self.attaching.items():
            records.setdefault(name, record)
        self.state.write_attached(list(records.values()))

    def adopt(self) -> list[str]:
        """Take over the pods an earlier agent left attached (attached.json):
        the same pod in the same netns is steered again at once; one whose
        netns is gone or new, or that was draining, is dropped and its rules
        removed. Returns the names taken over."""
        records = self.state.read_attached()
        adopted: list[str] = []
        for name, record in sorted(records.items()):
            if name in self.pods:  # handed over by the agent this one replaced
                continue
            why, pod = self._why_not(name, record)
            if pod is not None:
                redirect = BackendName(record.backend)
                if redirect not in self.backends:
                    self.log.warning(
                        "pod's backend not run by this agent",
                        extra={"pod": name, "reason": f"{redirect}: attached with {self.default}"},
                    )
                    if redirect is BackendName.IPTABLES:  # its rules name the old agent's
                        _remove_left_rules(name, record)  # cgroup: our connects would loop
                    redirect = None
                try:
                    self._attach(pod, redirect, time.monotonic(), record.auto,
                                 PodMode(record.mode))  # fmt: skip
                except MeshError as exc:
                    why = str(exc)
                else:
                    self.pods[name].since = record.since or time.time()
                    adopted.append(name)
                    self.log.info("pod adopted", extra={"pod": name, "reason": "still attached"})
                    continue
            self.log.warning("pod not adopted", extra={"pod": name, "reason": why})
            self._drop_record(name, record)
        for backend in self.backends.values():
            handles = [e.handle for e in self.pods.values() if e.backend is backend]
            for cookie in backend.reconcile(handles):
                self.log.info("stale pod entry removed", extra={"reason": f"netns cookie {cookie}"})
        self.save()
        return adopted

    def _why_not(self, name: str, record: PodRecord) -> tuple[str, PodRef | None]:
        """Why a recorded pod is not taken over, or the pod to take over."""
        if record.attaching:
            return "it was being attached", None
        if record.draining:
            return "it was being detached", None
        try:
            pod = self.resolver.again(name, record.source, record.netns)
        except MeshError as exc:
            return f"the pod was deleted ({exc})", None
        try:
            st = os.stat(netns.path(pod.netns))
        except OSError:
            return f"its network namespace {pod.netns} is gone", None
        if netns_id_of(st.st_dev, st.st_ino) != record.netns_id:
            return "the pod was re-created: a new network namespace", None
        return "", pod

    def _drop_record(self, name: str, record: PodRecord) -> None:
        """Remove what an earlier agent left for a pod not taken over."""
        backend = self.backends.get(BackendName(record.backend))
        if backend is not None and record.netns and netns.exists(record.netns):
            try:
                backend.remove(name, record.netns, quiet=True)
            except MeshError:
                pass

    def take_over(
        self, record: PodRecord, pod_id: int, listeners: list, stats: dict | None
    ) -> PodSlot:
        """A pod handed over by the agent this one replaces (takeover.py),
        with its listening sockets; returns its forwarder slot."""
        name = record.name
        pod = self.resolver.again(name, record.source, record.netns)
        fd = netns.open_fd(pod.netns)
        try:
            st = os.fstat(fd)
            if netns_id_of(st.st_dev, st.st_ino) != record.netns_id:
                raise MeshError(f"pod {name}: its network namespace changed during the handover")
            backend = self.backends.get(BackendName(record.backend))
            if backend is None:
                raise MeshError(f"pod {name}: this agent does not run backend {record.backend}")
            handle = PodHandle(name, pod.netns, fd, pod_id, mode=record.mode)
            if record.draining:
                backend.keep_stopped(handle)  # fail-open must not steer it again
            slot = self.forwarder.adopt_pod(handle, backend.steering(handle), listeners, stats)
            backend.listening(handle)
        except BaseException:
            os.close(fd)
            raise
        self.pods[name] = AttachedPod(
            handle, backend, slot, record.since, draining=record.draining,
            source=pod.source, auto=record.auto,
        )  # fmt: skip
        self._next_pod_id = max(self._next_pod_id, pod_id + 1)
        return slot

    def refresh_taken(self) -> None:
        """After a takeover, once the old agent has exited (its forwarder
        makes no more upstream sockets): steering that names the old agent
        (iptables rules: its cgroup) is made to name this one. A pod whose
        rules cannot be renewed is detached: left as they are, its
        forwarder's upstream connects would be redirected to itself."""
        for name, entry in sorted(self.pods.items()):
            if entry.draining:
                continue
            try:
                entry.backend.refresh(entry.handle)
            except MeshError as exc:
                self.log.warning(
                    "pod rules not renewed; detaching", extra={"pod": name, "reason": str(exc)}
                )
                try:
                    entry.backend.stop_new(entry.handle)
                except MeshError:
                    pass
                entry.draining = True
        self.save()

    def let_go(self) -> None:
        """Handed over: forget every pod without touching its rules or maps."""
        for entry in list(self.pods.values()):
            if entry.closing is not None:
                entry.closing.cancel()
            if not entry.forgotten:
                entry.forgotten = True
                os.close(entry.handle.netns_fd)
        self.pods.clear()

    def suspend_all(self) -> None:
        """The agent stops: its pods stay attached (attached.json) for the
        next one, and meanwhile their new connects go direct. ebpf does that
        in the kernel (no listener, the hook passes); iptables rules get
        their leading RETURN. A crash skips this: iptables pods then meet
        closed ports until an agent returns."""
        for entry in self.attached():
            if entry.backend.blocking:
                try:
                    entry.backend.stop_new(entry.handle)
                except MeshError as exc:
                    self.log.warning(
                        "suspend failed", extra={"pod": entry.handle.name, "reason": str(exc)}
                    )

    def snapshot(self) -> list[dict]:
        """Each attached pod with its forwarder counters."""
        out = []
        mesh = self.forwarder.mesh
        for pod in self.attached():
            stats = pod.slot.stats.to_dict()
            live_out, live_in = self.forwarder.live_bytes(pod.slot)
            stats["bytes_out"] += live_out
            stats["bytes_in"] += live_in
            port = pod.handle.port or self.forwarder.port
            out.append(
                {
                    **pod.snapshot(),
                    "listeners": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                    # no room for its new connections: they wait in its backlog
                    "waiting": pod.slot.waiting,
                    **stats,
                    "mesh": mesh.pod_snapshot(pod.slot.pod_id) if mesh is not None else None,
                }
            )
        return out


def _inline(job) -> Exception | None:
    """Run job here and now; what it raised, if anything."""
    try:
        job()
    except Exception as exc:
        return exc
    return None


def _ignore(_error: BaseException | None) -> None:
    pass


def _same_netns(entry: AttachedPod, netns_name: str) -> bool:
    """Is netns_name still the namespace this attachment holds?"""
    try:
        st = os.stat(netns.path(netns_name))
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == entry.handle.netns_id


def _closing(fd: int, job: Callable[[], object]) -> Callable[[], object]:
    """job, then close fd (a netns fd the job was given to own)."""

    def run() -> object:
        try:
            return job()
        finally:
            os.close(fd)

    return run


def _remove_left_rules(name: str, record: PodRecord) -> None:
    """The iptables rules an earlier agent left in a pod, taken away by an
    agent that does not run the iptables backend (best effort)."""
    from meshagent.redirect.iptables import teardown_only

    try:
        teardown_only(record.flavour).remove(name, record.netns, quiet=True)
    except MeshError:
        pass
