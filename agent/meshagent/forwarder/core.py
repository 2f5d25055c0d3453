"""Accept steered connections, find where they were going, connect there
from inside the pod, and hand both sockets to a relay."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time
from collections import Counter, deque
from collections.abc import Callable

from meshagent import log
from meshagent.addrs import format_endpoint, is_local_destination
from meshagent.config import AgentConfig
from meshagent.errors import MeshError
from meshagent.forwarder.budget import (
    Members,
    Shares,
    buffer_for,
    cost,
    memory_max_auto,
    set_buffers,
    tier,
)
from meshagent.forwarder.copy import linger_reset, reset_close, writable_now
from meshagent.forwarder.datapath import Connection, DataPath
from meshagent.forwarder.pod_series import PodSeries
from meshagent.forwarder.records import ConnRecord, Pending, PodSlot, PodStats
from meshagent.forwarder.upstreams import Upstreams
from meshagent.host import netns
from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode
from meshagent.steering import PodHandle, Steering

CONNECT_TIMEOUT = 10.0
ACCEPT_BATCH = 64
LISTEN_MISSES = 8  # connections of another buffer size before the listeners take it
RECENT_MAX = 256
# fds kept for the rest: 69 open with two pods attached and no connection
# (39 BPF maps, 7 programs, 5 links, the loop, the pods' listeners and netns
# fds; measured 2026-12-07), and some to spare.
FD_RESERVE = 96
PAUSE_FIRST = 0.05  # seconds a listener rests when there is no room, doubling
PAUSE_MAX = 1.0
LOG_EVERY = 5.0  # seconds between two warnings of one pod for one reason
LOG_KEYS_MAX = 4096  # (pod, reason) pairs remembered; past it, quiet ones are forgotten
LISTEN_TRIES = 8  # kernel-picked ports tried when the agent's port is the pod's


class _PortTaken(Exception):
    """A listener's port is in use in the pod (the reason, as a message)."""


class LimitedLog:
    """Per-connection warnings, at most one line per pod and reason every
    `every` seconds; the next line says how many were suppressed. A pod
    that fails every connection (no route, a dead upstream) must not fill
    the log."""

    def __init__(self, logger, every: float = LOG_EVERY, clock=time.monotonic) -> None:
        self.log = logger
        self.every = every
        self.clock = clock
        self.seen: dict[tuple[str | None, str], tuple[float, int]] = {}  # -> (when, suppressed)

    def warning(self, pod: str | None, kind: str, message: str, extra: dict) -> None:
        now = self.clock()
        key = (pod, kind)
        when, suppressed = self.seen.get(key, (float("-inf"), 0))
        if now - when < self.every:
            self.seen[key] = (when, suppressed + 1)
            return
        if suppressed:
            more = f" ({suppressed} more since the last line)"
            extra = {**extra, "reason": f"{extra.get('reason') or kind}{more}"}
        self.log.warning(message, extra=extra)
        if len(self.seen) >= LOG_KEYS_MAX:
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.every}
        self.seen[key] = (now, 0)


class Forwarder:
    def __init__(
        self,
        loop: Loop,
        port: int,
        paths: dict[DataPathMode, DataPath],
        mode: DataPathMode = DataPathMode.COPY,
        pod_conns_max: int = AgentConfig.pod_conns_max,
        fd_budget: int | None = None,
        memory_max: int | None = None,
    ) -> None:
        self.loop = loop
        self.port = port
        self.paths = paths
        self.mode = mode
        self.pods: Members = Members()  # pod_id -> PodSlot, for pods with listeners
        self.pod_names: dict[int, str] = {}  # pod_id -> name, also after its slot went
        self.kernel = None  # kernel_conns.KernelConns: kernel-mode pods' connections
        self.conns: dict[Connection, tuple[PodSlot, ConnRecord]] = {}
        self.pending: dict[socket.socket, Pending] = {}
        self.recent: deque[ConnRecord] = deque(maxlen=RECENT_MAX)
        self.pod_conns_max = pod_conns_max
        # By forwarded connections, by each path's real cost: fds, and bytes
        # (budget.py); both shared fairly by the attached pods.
        self.fds = Shares(fd_budget if fd_budget is not None else _fd_budget())
        self.upstreams = Upstreams()  # upstream sockets made in the pods ahead of need
        self.memory_from = "--memory-max"
        if memory_max is None:
            memory_max, self.memory_from = memory_max_auto()
        self.memory = Shares(memory_max)
        # Connections clamped to a smaller buffer: the cost they will reserve
        # once the kernel holds no more for them (tick() looks).
        self.shrinking: dict[Connection, int] = {}
        self.clamped = 0  # connections clamped so far (status)
        # For the metrics: how connections ended, bytes moved, what failed.
        self.outcomes: Counter[tuple[str, str, str]] = Counter()  # (pod, datapath, result)
        self.moved: Counter[tuple[str, str, str]] = Counter()  # (pod, direction, datapath)
        self.series = PodSeries(self.outcomes, self.moved)  # a gone pod's go, later
        self.errors: Counter[str] = Counter()
        self.on_event: Callable[[dict], None] | None = None  # a tracer's, while one runs
        self.mesh = None  # mesh.node.Mesh: other nodes, over mutual TLS (use_mesh)
        self.policy = None  # policy.engine.PolicyEngine (the agent sets it)
        self.workload_of = None  # pod name -> policy.model.Workload
        self.log = log.get()
        self.limited = LimitedLog(self.log)  # per-connection warnings
        for path in paths.values():
            path.on_stall = self._stalled
            path.on_throttle = self._throttled
        paths[mode].selected(True)

    def use_mesh(self, mesh) -> None:
        """Connections to other nodes' pods cross the mutual-TLS hop; each
        attached pod takes the hop from them on port 15008."""
        self.mesh = mesh
        mesh.forwarder = self
        for slot in list(self.pods.values()):  # pods attached before the mesh came
            mesh.open_pod(slot)

    def set_mode(self, mode: DataPathMode) -> None:
        if mode not in self.paths:
            raise MeshError(f"data path {mode} is not available on this agent (see status)")
        self.paths[self.mode].selected(False)
        self.mode = mode
        self.paths[mode].selected(True)

    # -- listeners ---------------------------------------------------------
    def open_pod(self, pod: PodHandle, steering: Steering) -> PodSlot:
        """Listen on 127.0.0.1 and [::1] inside the pod's netns, on the
        agent's port; if the pod holds that port itself (its own server, or
        one that squatted it while no agent ran), on a port the kernel picks
        there, said in the log and in `status`."""
        slot = PodSlot(pod.name, pod.pod_id, pod.netns_fd, steering)
        try:
            self._listen(slot, pod, self.port)
        except _PortTaken as taken:
            for _ in range(LISTEN_TRIES):
                try:
                    self._listen(slot, pod, 0)
                    break
                except _PortTaken:  # the kernel's pick for IPv4 is taken on IPv6
                    continue
            else:
                raise MeshError(f"pod {pod.name}: {taken}") from None
            self.log.warning(
                "pod listener moved",
                extra={"pod": pod.name, "reason": f"{taken}: listening on port {pod.port}"},
            )
        for sock in slot.listeners:
            self.loop.add(sock.fileno(), select.EPOLLIN, self._acceptor(slot, sock))
        self.pods[slot.pod_id] = slot
        self.pod_names[slot.pod_id] = slot.name
        if self.mesh is not None:
            self.mesh.open_pod(slot)
        return slot

    def _listen(self, slot: PodSlot, pod: PodHandle, port: int) -> None:
        """Both listeners on port (0: the kernel's pick for IPv4, then the
        same for IPv6), or none: _PortTaken when one is in use."""
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                sock = netns.socket_in(pod.netns_fd, family)
                slot.listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # Accepted sockets inherit both: one system call fewer each
                # (SO_LINGER {1,0}: a crash resets the pod's connections).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                linger_reset(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    where = f"cannot listen on {format_endpoint(host, port)}: {exc.strerror}"
                    if exc.errno == errno.EADDRINUSE:
                        raise _PortTaken(where) from None
                    raise MeshError(f"pod {pod.name}: {where}") from None
                port = sock.getsockname()[1]
                sock.listen(4096)
                sock.setblocking(False)
        except BaseException:
            for sock in slot.listeners:
                sock.close()
            slot.listeners.clear()
            raise
        pod.port, pod.listeners = port, slot.listeners

    def close_pod(self, slot: PodSlot) -> None:
        """Stop listening for a pod. Connections already queued on the
        listener are accepted first; forwarded ones keep running."""
        if self.pods.get(slot.pod_id) is not slot:
            return
        del self.pods[slot.pod_id]
        self.upstreams.drop_pod(slot.pod_id)
        if self.mesh is not None:
            self.mesh.close_pod(slot)
        for sock in slot.listeners:
            self._accept_all(slot, sock, closing=True)
            self.loop.remove(sock.fileno())
            sock.close()
        slot.listeners.clear()

    def _acceptor(self, slot: PodSlot, sock: socket.socket) -> Callable[[int], None]:
        def handle(_events: int) -> None:
            self._accept_all(slot, sock, ACCEPT_BATCH)

        return handle

    def _accept_all(
        self, slot: PodSlot, listener: socket.socket, limit: int = 1 << 20, closing: bool = False
    ) -> None:
        """closing: the listener goes next, so what waits in its queue (steered
        before the pod was detached) is taken whatever the pod's limit."""
        family = listener.family
        for _ in range(limit):
            why = self._no_room(slot, closing)
            if why:
                self._pause(slot, why)
                return
            try:
                # listener.accept() less its enum conversions (family and
                # type, asked of the listener per call): the same socket.
                fd, peer = listener._accept()
                client = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                slot.listen_drained.add(listener.fileno())
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed_oldest_pending()
                    self._pause(slot, f"accept: {exc.strerror}")
                    return
                continue
            slot.backoff = PAUSE_FIRST
            inherited = slot.listen_buffer if listener.fileno() in slot.listen_drained else 0
            self._forward(slot, client, peer[0], peer[1], inherited)

    # -- room: fds, bytes and the per-pod limit -------------------------------
    @property
    def fd_budget(self) -> int:
        return self.fds.budget

    @property
    def fds_in_use(self) -> int:
        return self.fds.used

    def _hold(self, slot: PodSlot, record: ConnRecord, sign: int = 1) -> None:
        """Take (sign 1) or give back (-1) what record holds of both budgets."""
        self.fds.hold(slot.pod_id, sign * record.fds)
        slot.stats.fds_in_use += sign * record.fds
        self._reserve(slot, sign * record.reserved)

    def _reserve(self, slot: PodSlot, nbytes: int) -> None:
        self.memory.hold(slot.pod_id, nbytes)
        slot.stats.memory_reserved += nbytes

    def fd_share(self) -> int:
        """The fds each attached pod is sure to get (budget.Shares)."""
        return self.fds.share(len(self.pods))

    def _no_room(self, slot: PodSlot, closing: bool = False) -> str | None:
        """Why the pod's next connection must wait, or None (and then
        slot.buffer is its buffer size). closing: the pod's listener goes
        next, so only the node's budgets count, not its shares."""
        if slot.stats.connections_active >= self.pod_conns_max and not closing:
            return f"the pod has {slot.stats.connections_active} connections open (--pod-conns-max)"
        fds = self.paths[self.mode].fds_per_connection
        if self.fds.used + fds + self.upstreams.spare > self.fds.budget:
            self.upstreams.shed()  # spare upstream sockets go before a pod waits
        if self.fds.used + fds > self.fds.budget:
            return f"forwarded connections hold {self.fds.used} of {self.fds.budget} fds"
        if not closing and fds > self.fds.room(slot.pod_id, self.pods):
            return (
                f"the pod holds {self.fds.mine(slot.pod_id)} fds, past its share of"
                f" {self.fd_share()}, and the {self.fds.lent(self.pods)} lent to pods past"
                " theirs are all there is to lend"
            )
        buffer = self._buffer_for(slot, closing)
        if buffer is None:
            # Make room: its larger connections shrink, and give back what
            # they reserved once the kernel holds no more for them (idle
            # ones at once, the others at a later tick()).
            mine, room = self._memory_room(slot, closing)
            self._clamp(slot, tier(slot.stats.connections_active + 1, mine + room))
            buffer = self._buffer_for(slot, closing)
        if buffer is None:
            mine = self.memory.mine(slot.pod_id)
            return (
                f"the pod's connections may hold {mine} bytes: all of its share of"
                f" {self.memory.share(len(self.pods))} and of what may be lent"
                f" (--memory-max {self.memory.budget})"
            )
        slot.buffer = buffer
        return None

    def _memory_room(self, slot: PodSlot, closing: bool) -> tuple[int, int]:
        """(what the pod's connections reserve, what it may still take)."""
        room = self.memory.budget - self.memory.used
        if not closing:
            room = self.memory.room(slot.pod_id, self.pods)
        return self.memory.mine(slot.pod_id), room

    def _buffer_for(self, slot: PodSlot, closing: bool) -> int | None:
        return buffer_for(slot.stats.connections_active, *self._memory_room(slot, closing))

    def _clamp(self, slot: PodSlot, buffer: int) -> None:
        """Shrink the pod's connections with a larger buffer to buffer; each
        keeps its reservation until it holds no more than the new cost."""
        for conn, (owner, record) in list(self.conns.items()):
            if owner is slot and record.buffer > buffer and not conn.closed:
                try:
                    conn.limit(buffer)
                except OSError:
                    continue
                record.buffer = buffer
                self.clamped += 1
                self.shrinking[conn] = cost(buffer)
                self._settle(conn, slot, record)

    def _settle(self, conn: Connection, slot: PodSlot, record: ConnRecord) -> None:
        """Give back what a shrinking connection reserved past its new cost
        once it holds no more than that."""
        target = self.shrinking[conn]
        if conn.holds() <= target:
            del self.shrinking[conn]
            self._reserve(slot, target - record.reserved)
            record.reserved = target

    def _settle_memory(self) -> None:
        """Each tick: clamped connections give back what they no longer hold;
        pods past their shares beyond what may be lent (more pods attached
        since) are clamped to their share."""
        for conn in list(self.shrinking):
            entry = self.conns.get(conn)
            if entry is None or conn.closed:
                del self.shrinking[conn]
                continue
            slot, record = entry
            self._settle(conn, slot, record)
            if conn not in self.shrinking and slot.paused:
                self._resume(slot)
        if self.memory.over(self.pods):
            share = self.memory.share(len(self.pods))
            for slot in self.pods.values():
                if self.memory.mine(slot.pod_id) > share:
                    self._clamp(slot, tier(slot.stats.connections_active, share))

    def _pause(self, slot: PodSlot, why: str) -> None:
        """Stop accepting for the pod: its new connections wait in its
        listener's backlog (the kernel still steers them: a pod out of room
        stays in the mesh), and look again later; never spin."""
        if not slot.paused:
            slot.paused = True
            slot.stats.paused += 1
            for sock in slot.listeners:
                self.loop.modify(sock.fileno(), 0)
        slot.waiting = why
        self._log_no_room(slot, why)
        self.loop.call_later(slot.backoff, lambda: self._resume(slot))
        slot.backoff = min(slot.backoff * 2, PAUSE_MAX)

    def _resume(self, slot: PodSlot) -> None:
        if not slot.paused or self.pods.get(slot.pod_id) is not slot:
            return
        why = self._no_room(slot)
        if why:
            slot.waiting = why
            self._log_no_room(slot, why)
            self.loop.call_later(slot.backoff, lambda: self._resume(slot))
            slot.backoff = min(slot.backoff * 2, PAUSE_MAX)
            return
        slot.paused, slot.waiting = False, None
        for sock in slot.listeners:
            self.loop.modify(sock.fileno(), select.EPOLLIN)
            self._accept_all(slot, sock, ACCEPT_BATCH)

    def _log_no_room(self, slot: PodSlot, why: str) -> None:
        self.limited.warning(
            slot.name,
            "no_room",
            "no room for new connections: they wait in the pod's listener backlog",
            {"pod": slot.name, "reason": why},
        )

    def _shed_oldest_pending(self) -> None:
        """Out of fds: the oldest connect still in flight gives its back."""
        for upstream, entry in list(self.pending.items())[:1]:
            del self.pending[upstream]
            if entry.timer is not None:
                entry.timer.cancel()
            self.loop.remove(upstream.fileno())
            upstream.close()
            self._fail(entry.slot, entry.record, entry.client, None, "shed: out of fds",
                       entry.path, entry.state)  # fmt: skip

    # -- one connection ----------------------------------------------------
    def _forward(self, slot: PodSlot, client: socket.socket, peer_ip: str, peer_port: int,
                 inherited: int = 0) -> None:  # fmt: skip
        """inherited: the buffer size client has from its listener (0: not
        known)."""
        client.setblocking(False)
        conn = format_endpoint(peer_ip, peer_port)
        orig = slot.steering.orig_dst(client, peer_ip, peer_port)
        if orig is None:
            slot.stats.no_orig_dst += 1
            self.errors["no_orig_dst"] += 1
            self.limited.warning(
                slot.name,
                "no_orig_dst",
                "no original destination; closing",
                {"pod": slot.name, "conn": conn, "reason": "no_orig_dst"},
            )
            self._emit("refused", slot.name, conn, None, "no_orig_dst")
            reset_close(client)
            return
        orig_ip, orig_port = orig.ip, orig.port
        if is_local_destination(orig_ip):
            # Neither backend steers local destinations (loopback, 0.0.0.0,
            # ::): this is a direct connection to the listener
            # (SO_ORIGINAL_DST reports the listener itself). Forwarding it
            # would connect to ourselves, forever.
            slot.stats.refused_loopback += 1
            self.errors["orig_dst_loopback"] += 1
            self.limited.warning(slot.name, "orig_dst_loopback",
                "refused: a direct connection to the listener",
                {"pod": slot.name, "conn": conn, "reason": "orig_dst_loopback",
                 "orig_dst": format_endpoint(orig_ip, orig_port)},
            )  # fmt: skip
            self._emit("refused", slot.name, conn, format_endpoint(orig_ip, orig_port),
                       "orig_dst_loopback")  # fmt: skip
            reset_close(client)
            return
        denied = self._policy_denies(slot, orig_ip, orig_port)
        if denied is not None:
            slot.stats.denied_policy += 1
            self.errors["denied_policy"] += 1
            self.limited.warning(slot.name, "denied_policy", "refused by policy; reset",
                {"pod": slot.name, "conn": conn, "reason": f"denied_policy ({denied})",
                 "orig_dst": format_endpoint(orig_ip, orig_port)},
            )  # fmt: skip
            self._emit("refused", slot.name, conn, format_endpoint(orig_ip, orig_port),
                       "denied_policy", rule=denied)  # fmt: skip
            reset_close(client)
            return
        record = ConnRecord(slot.name, conn, format_endpoint(orig_ip, orig_port), time.time())
        node = self.mesh.remote(orig_ip) if self.mesh is not None else None
        path = self.mesh.path if node is not None else self.paths[self.mode]
        record.datapath = path.mode
        record.fds = path.fds_per_connection
        record.buffer = slot.buffer or tier(1, self.memory.budget)
        record.reserved = cost(record.buffer)
        self._hold(slot, record)
        slot.stats.connections_total += 1
        slot.stats.connections_active += 1
        if record.buffer != inherited:
            try:
                set_buffers(client, record.buffer)
            except OSError as exc:
                self._fail(slot, record, client, None, f"buffers: {exc.strerror}", path, None)
                return
            if record.buffer != slot.listen_buffer:
                # Not for every change: under memory pressure the size
                # moves with the pod's connections.
                slot.listen_misses += 1
                if slot.listen_misses >= LISTEN_MISSES or not slot.listen_buffer:
                    self._listen_buffers(slot, record.buffer)
        else:
            slot.listen_misses = 0
        if node is None:
            state = path.accepted(client, orig.app)
            to_port = orig_port
        else:  # to the destination pod's hop listener, on its node
            state = self.mesh.outbound_state(slot, orig_ip, orig_port, node, orig.app)
            record.mtls = {"direction": "out", "node": node.name}
            to_port = self.mesh.port
        self._connect_upstream(slot, record, client, path, state, orig_ip, to_port)

    def _listen_buffers(self, slot: PodSlot, buffer: int) -> None:
        """Give the pod's listeners buffer, so that the sockets they accept
        have it already (two system calls fewer per connection, and their
        window scale fits it from the handshake on). Until a listener's
        queue has been empty once, what it accepts may predate this."""
        slot.listen_drained.clear()
        slot.listen_misses = 0
        try:
            for sock in slot.listeners:
                set_buffers(sock, buffer)
        except OSError:
            slot.listen_buffer = 0  # every accepted socket gets its own again
            return
        slot.listen_buffer = buffer

    def _policy_denies(self, slot: PodSlot, ip: str, port: int) -> str | None:
        """The rule that denies this connection, or None. Egress here only
        for pods the connect hook did not check (iptables); ingress for a
        destination pod of this node (the hop's inbound checks the others)."""
        policy = self.policy
        if policy is None or not policy.rules.policies:
            return None
        me = None
        if not getattr(slot.steering, "kernel_policy", False):
            me = policy.workload(slot.name) or self.workload_of(slot.name)
            decision = policy.decide_egress(me, ip, port)
            if not decision.allow:
                return decision.rule
        dest = policy.local_at(ip) if policy.has_ingress else None
        if dest is not None:
            me = me or policy.workload(slot.name) or self.workload_of(slot.name)
            family = ":" in ip
            src = next((a for a in me.addrs if (":" in a) == family), ip)
            decision = policy.decide_ingress(dest, src, port, me)
            if not decision.allow:
                return f"{decision.rule} (ingress of {dest.namespace}/{dest.name})"
        return None

    def _connect_upstream(self, slot: PodSlot, record: ConnRecord, client: socket.socket,
                          path: DataPath, state: object, ip: str, port: int) -> None:  # fmt: skip
        """Connect to ip:port from inside the pod (or, for a pod of this node
        that takes plaintext only from its own netns, from inside that one:
        mesh/node.py), then hand both sockets to path."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        if self.mesh is not None and port == self.mesh.port and path is self.mesh.path:
            link = self.mesh.take_link(slot, ip)  # an idle TLS connection there: no handshake
            if link is not None:
                state["link"] = link
                self._joined(slot, record, client, link.wire, path, state)
                return
        try:
            upstream = None
            if self.mesh is not None and port != self.mesh.port:
                upstream = self.mesh.local_upstream(slot, ip, family)
            if upstream is not None:
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                linger_reset(upstream)  # a crash resets, never FINs, a cut stream
            else:  # made in the pod, as its pool's are: TCP_NODELAY, linger_reset
                room = self.fds.budget - self.fds.used - self.upstreams.spare
                upstream = self.upstreams.take(slot.pod_id, slot.netns_fd, family, room)
        except (OSError, MeshError) as exc:
            self._fail(slot, record, client, upstream, f"upstream socket: {exc}", path, state)
            return
        try:
            set_buffers(upstream, record.buffer)  # before connect: its window scale fits
            slot.steering.prepare_upstream(upstream, path.replies_direct(state))
            err = upstream.connect_ex((ip, port))
        except OSError as exc:
            self._fail(slot, record, client, upstream, f"upstream connect: {exc.strerror}", path,
                       state)  # fmt: skip
            return
        if err not in (0, errno.EINPROGRESS):
            if self._fall_back(slot, record, client, upstream, path, state, err):
                return
            reason = f"upstream connect: {errno.errorcode.get(err, err)}"
            self._fail(slot, record, client, upstream, reason, path, state)
            return
        # On a local bridge the handshake often completes inside connect():
        # skip the epoll round trip, and the timer (it would live 10 s).
        ready = select.POLLOUT if err == 0 else writable_now(upstream)
        timer = None if ready else self.loop.call_later(
            CONNECT_TIMEOUT, lambda: self._connect_done(upstream, timed_out=True)
        )  # fmt: skip
        self.pending[upstream] = Pending(slot, record, client, timer, path, state)
        if ready:
            self._connect_done(upstream, events=ready)
            return
        self.loop.add(upstream.fileno(), select.EPOLLOUT,
                      lambda ev: self._connect_done(upstream, events=ev))  # fmt: skip

    def _fall_back(self, slot: PodSlot, record: ConnRecord, client: socket.socket,
                   upstream: socket.socket, path: object, state: object, err: int) -> bool:  # fmt: skip
        """The destination pod takes no hop (its node's agent is down, or it
        is not attached there): connect in plaintext, as without a mesh. A
        strict pod refuses that itself (its rules stay while no agent runs:
        closed for strict, open for permissive). True when it did."""
        if self.mesh is None or path is not self.mesh.path or err != errno.ECONNREFUSED:
            return False
        upstream.close()
        self.mesh.fell_back(slot, record, state)
        self._hold(slot, record, -1)
        path = self.paths[self.mode]
        record.datapath = path.mode
        record.fds = path.fds_per_connection
        self._hold(slot, record)
        ip, _, port = state["header"]["dst"].rpartition(":")
        new_state = path.accepted(client, state.get("app"))
        self._connect_upstream(slot, record, client, path, new_state, ip.strip("[]"), int(port))
        return True

    def _connect_done(self, upstream: socket.socket, timed_out: bool = False,
                      events: int = 0) -> None:  # fmt: skip
        """events: what poll or epoll said of it (writable, and no error or
        hang-up: connected, with no SO_ERROR to ask)."""
        entry = self.pending.pop(upstream, None)
        if entry is None:
            return
        slot, record, client = entry.slot, entry.record, entry.client
        if entry.timer is not None:
            entry.timer.cancel()
        if timed_out and writable_now(upstream):
            timed_out = False  # connected meanwhile: a busy loop ran the timer first
        if timed_out:
            err = errno.ETIMEDOUT
        elif events == select.POLLOUT:  # == EPOLLOUT
            err = 0
        else:
            err = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.loop.remove(upstream.fileno())
            if self._fall_back(slot, record, client, upstream, entry.path, entry.state, err):
                return
            reason = f"upstream connect: {errno.errorcode.get(err, err)}"
            self._fail(slot, record, client, upstream, reason, entry.path, entry.state)
            return
        self._joined(slot, record, client, upstream, entry.path, entry.state)

    def _joined(self, slot: PodSlot, record: ConnRecord, client: socket.socket,
                upstream: socket.socket, path: DataPath, state: object) -> None:  # fmt: skip
        """Connected: the data path takes both sockets."""
        record.state = "forwarding"  # the data path takes over upstream's epoll entry
        conn = path.join(client, upstream, state, _Ended(self, slot, record))
        if not conn.closed:
            try:
                # the path's own part (and sockmap's send buffers): both
                # sockets got the buffers at accept and before connect
                conn.limit(record.buffer, sockets=False)
            except OSError as exc:
                conn.reset(f"buffers: {exc.strerror}")
        record.datapath = conn.mode
        if self.on_event is not None:
            self._emit("forwarded", slot.name, record.client, record.orig_dst, None,
                       datapath=record.datapath)  # fmt: skip
        if not conn.closed:
            self.conns[conn] = (slot, record)

    def _stalled(self, conn: Connection, detail: str) -> None:
        slot, record = self.conns.get(conn, (None, None))
        self.limited.warning(
            slot.name if slot else None,
            "handoff_stall",
            "hand-off stalled",
            {
                "pod": slot.name if slot else None,
                "conn": record.client if record else None,
                "reason": f"handoff_stall: {detail}",
            },
        )

    def _throttled(self, conn: Connection) -> None:
        """The kernel held a spliced connection's bytes back: its reader is
        slower than its writer (a trace event; status counts them)."""
        if self.on_event is None:
            return
        _slot, record = self.conns.get(conn, (None, None))
        if record is not None:
            self._emit("throttled", record.pod, record.client, record.orig_dst, "budget",
                       datapath=record.datapath)  # fmt: skip

    def tick(self) -> None:
        """Once a second: each data path's periodic work; the metrics of
        pods gone a while are dropped."""
        for path in self.paths.values():
            path.tick()
        if self.mesh is not None:
            self.mesh.tick()
        self._settle_memory()
        self.upstreams.tick()
        live = {slot.name for slot in self.pods.values()}
        live.update(record.pod for _slot, record in self.conns.values())
        live.update(entry.record.pod for entry in self.pending.values())
        self.series.prune(live, time.monotonic())

    def _fail(
        self,
        slot: PodSlot,
        record: ConnRecord,
        client: socket.socket,
        upstream: socket.socket | None,
        reason: str,
        path: DataPath,
        state: object,
    ) -> None:
        slot.stats.upstream_errors += 1
        slot.stats.connections_active -= 1
        self.errors["upstream"] += 1
        self._hold(slot, record, -1)
        if state is not None:
            path.abandon(state)
        reset_close(client)
        if upstream is not None:
            upstream.close()
        self._end(record, "failed", reason)
        self.limited.warning(
            slot.name,
            f"upstream:{reason}",
            "upstream failed; reset the pod's connection",
            {
                "pod": slot.name,
                "conn": record.client,
                "orig_dst": record.orig_dst,
                "reason": reason,
            },
        )

    def _conn_done(
        self, slot: PodSlot, record: ConnRecord, conn: Connection, reason: str | None
    ) -> None:
        self.conns.pop(conn, None)
        self.shrinking.pop(conn, None)
        slot.stats.connections_active -= 1
        self._hold(slot, record, -1)
        if slot.paused:
            slot.backoff = PAUSE_FIRST
            self._resume(slot)
        out, back = conn.bytes_out, conn.bytes_in  # properties: asked once
        slot.stats.bytes_out += out
        slot.stats.bytes_in += back
        record.bytes_out, record.bytes_in = out, back
        self.moved[(slot.name, "out", record.datapath)] += out
        self.moved[(slot.name, "in", record.datapath)] += back
        if reason is not None:
            slot.stats.resets += 1
        self._end(record, "reset" if reason else "closed", reason, closed_by=conn.closed_by,
                  handoff_bytes=conn.handoff_bytes)  # fmt: skip

    def emit_ended(self, record: dict) -> None:
        """A tracer's event for a connection carried elsewhere (kernel mode:
        forwarder/kernel_conns.py), in the words of ours."""
        self._emit(record["state"], record["pod"], record["client"], record["orig_dst"],
                   record["reason"], datapath=record["datapath"], bytes_out=record["bytes_out"],
                   bytes_in=record["bytes_in"], closed_by=record.get("closed_by"),
                   seconds=round(record["ended"] - record["started"], 6))  # fmt: skip

    def _end(self, record: ConnRecord, state: str, reason: str | None, **more: object) -> None:
        self.outcomes[(record.pod, record.datapath, state)] += 1
        record.state = state
        record.reason = reason
        record.ended = time.time()
        record.closed_by = more.get("closed_by")  # type: ignore[assignment]
        self.recent.append(record)
        if record.mtls is not None:
            more.setdefault("mtls", record.mtls)
        if self.on_event is not None:
            self._emit(state, record.pod, record.client, record.orig_dst, reason,
                       datapath=record.datapath, bytes_out=record.bytes_out,
                       bytes_in=record.bytes_in,
                       seconds=round(record.ended - record.started, 6), **more)  # fmt: skip

    def _emit(self, event: str, pod: str, client: str, orig_dst: str | None, reason: str | None,
              **more: object) -> None:  # fmt: skip
        if self.on_event is not None:
            self.on_event({"event": event, "pod": pod, "client": client, "orig_dst": orig_dst,
                           "reason": reason, **more})  # fmt: skip

    # -- handed to a successor agent (agent/takeover.py) -------------------
    def handover_ready(self) -> bool:
        """No upstream connect in flight (those are not handed over)."""
        return not self.pending

    def stop_accepting(self) -> None:
        """Listeners rest: new connects wait in their queues (the kernel
        completes the handshakes) for whoever accepts next."""
        for slot in self.pods.values():
            for sock in slot.listeners:
                self.loop.modify(sock.fileno(), 0)

    def start_accepting(self) -> None:
        for slot in self.pods.values():
            if not slot.paused:
                for sock in slot.listeners:
                    self.loop.modify(sock.fileno(), select.EPOLLIN)
                    self._accept_all(slot, sock, ACCEPT_BATCH)

    def exported(self) -> list[tuple[PodSlot, ConnRecord, Connection]]:
        """What a successor takes: not the TLS hops (their sessions live in
        this process's OpenSSL; they end with a reset when it exits)."""
        return [(slot, record, conn) for conn, (slot, record) in self.conns.items()
                if isinstance(conn.mode, DataPathMode)]  # fmt: skip

    def suspend(self) -> None:
        """Nothing of the pods or connections reaches this loop any more."""
        for slot in self.pods.values():
            for sock in slot.listeners:
                self.loop.remove(sock.fileno())
        for conn in self.conns:
            if isinstance(conn.mode, DataPathMode):  # a hop in OpenSSL carries on
                conn.suspend()

    def resume(self) -> None:
        """The successor failed: serve again, as before."""
        for slot in self.pods.values():
            for sock in slot.listeners:
                self.loop.add(sock.fileno(), 0, self._acceptor(slot, sock))
        for conn in self.conns:
            if isinstance(conn.mode, DataPathMode):
                conn.resume()
        self.start_accepting()

    def let_go(self) -> None:
        """The successor has everything: drop this process's references
        without a FIN or RST (the successor's copies keep the sockets).
        Not the TLS hops: their sessions are this process's, they end here
        with a reset (mesh/node.py)."""
        for slot in self.pods.values():
            for sock in slot.listeners:
                sock.close()
            slot.listeners.clear()
        self.pods.clear()  # first: a hop's end below must not accept for a pod
        if self.mesh is not None:
            self.mesh.let_go({conn for conn in self.conns if isinstance(conn.mode, DataPathMode)})
        self.conns.clear()

    def adopt_pod(self, pod: PodHandle, steering: Steering, listeners: list,
                  stats: dict | None = None) -> PodSlot:  # fmt: skip
        """A pod handed over with its listening sockets (no moment without)."""
        slot = PodSlot(pod.name, pod.pod_id, pod.netns_fd, steering)
        self.pod_names[slot.pod_id] = slot.name
        if stats:
            slot.stats = PodStats(**stats)
            slot.stats.connections_active = 0  # counted again as they are restored
            slot.stats.fds_in_use = slot.stats.memory_reserved = 0
        for sock in listeners:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # for accepted ones
            linger_reset(sock)  # likewise (a predecessor may not have set it)
            slot.listeners.append(sock)
            self.loop.add(sock.fileno(), select.EPOLLIN, self._acceptor(slot, sock))
        if listeners:
            self.pods[slot.pod_id] = slot
            pod.port, pod.listeners = listeners[0].getsockname()[1], slot.listeners
            if self.mesh is not None:
                self.mesh.open_pod(slot)
        return slot

    def adopt_conn(self, slot: PodSlot, record: ConnRecord, mode: DataPathMode, client, upstream,
                   state: dict, fds: list[int], blobs: list[bytes]) -> None:  # fmt: skip
        path = self.paths.get(mode) or self.paths[DataPathMode.COPY]
        for sock in (client, upstream):  # kept by the handover; a predecessor may lack it
            with contextlib.suppress(OSError):
                linger_reset(sock)
        slot.stats.connections_active += 1
        if not record.buffer:  # a predecessor without a memory budget: its buffers were
            record.buffer = tier(1, self.memory.budget)  # the kernel's; it gets one now
            record.reserved = cost(record.buffer)
        self._hold(slot, record)
        conn = path.restore(client, upstream, state, fds, blobs, _Ended(self, slot, record))
        if not conn.closed:
            self.conns[conn] = (slot, record)
            with contextlib.suppress(OSError):
                conn.limit(record.buffer)

    # -- reporting ---------------------------------------------------------
    def open_connections(self, pod: PodSlot) -> int:
        """Forwarded or connecting connections of a pod (also after close_pod)."""
        live = sum(1 for slot, _record in self.conns.values() if slot is pod)
        return live + sum(1 for p in self.pending.values() if p.slot is pod)

    def live_bytes(self, pod: PodSlot) -> tuple[int, int]:
        out = inn = 0
        for conn, (slot, _record) in self.conns.items():
            if slot is pod:
                out += conn.bytes_out
                inn += conn.bytes_in
        return out, inn

    def connections(self) -> list[dict]:
        live = []
        for conn, (_slot, record) in self.conns.items():
            record.bytes_out, record.bytes_in = conn.bytes_out, conn.bytes_in
            live.append(record.to_dict())
        live.extend(p.record.to_dict() for p in self.pending.values())
        return [r.to_dict() for r in self.recent] + live

    def counters(self) -> dict:
        """Copies for the metrics thread (taken on the loop)."""
        return {
            "outcomes": dict(self.outcomes),
            "bytes": dict(self.moved),
            "errors": dict(self.errors),
            "active": {
                slot.name: slot.stats.connections_active + self._kernel_active(slot)
                for slot in self.pods.values()
            },
            "waiting": {slot.name: 1 for slot in self.pods.values() if slot.paused},
            "memory": {
                "max": self.memory.budget,
                "pods": {slot.name: slot.stats.memory_reserved for slot in self.pods.values()},
            },
            "handoff_bytes": sum(p.stats.handoff_bytes for p in self.paths.values()),
            "map_entries": {
                name: count for p in self.paths.values() for name, count in p.map_entries().items()
            },
            "datapaths": {mode.value: path.snapshot() for mode, path in self.paths.items()},
            "mesh": self.mesh.counters() if self.mesh is not None else None,
        }

    def _kernel_active(self, slot: PodSlot) -> int:
        cookie = getattr(slot.steering, "cookie", None)  # ebpf pods only
        return self.kernel.active(cookie) if self.kernel is not None and cookie else 0

    def snapshot(self) -> dict:
        return {
            "fds_in_use": self.fds_in_use,
            "fd_budget": self.fd_budget,
            "pod_conns_max": self.pod_conns_max,
            "fd_share": self.fd_share(),
            "upstreams": self.upstreams.snapshot(),
            "memory": {
                "max": self.memory.budget,
                "from": self.memory_from,
                "reserved": self.memory.used,
                "share": self.memory.share(len(self.pods)),
                "shrinking": len(self.shrinking),
                "clamped": self.clamped,
            },
            "datapath": self.mode.value,
            "datapaths": {mode.value: path.snapshot() for mode, path in self.paths.items()},
            "mesh": self.mesh.snapshot() if self.mesh is not None else None,
        }

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
        for slot in list(self.pods.values()):
            self.close_pod(slot)
        self.upstreams.close()
        # Connections no successor takes over end with an RST, never a FIN:
        # a client must not mistake a cut stream for a whole one.
        for conn in list(self.conns):
            conn.reset("agent stopped")
        for upstream in list(self.pending):
            entry = self.pending.pop(upstream)
            if entry.timer is not None:
                entry.timer.cancel()
            self.loop.remove(upstream.fileno())
            entry.path.abandon(entry.state)
            reset_close(upstream)
            reset_close(entry.client)
        for path in self.paths.values():
            path.tick()  # the last batch of map deletes


class _Ended:
    """A connection's end, back to the forwarder: an object of three slots
    per connection, smaller than a closure (thousands live at once)."""

    __slots__ = ("fwd", "record", "slot")

    def __init__(self, fwd: Forwarder, slot: PodSlot, record: ConnRecord) -> None:
        self.fwd, self.slot, self.record = fwd, slot, record

    def __call__(self, conn: Connection, reason: str | None) -> None:
        self.fwd._conn_done(self.slot, self.record, conn, reason)


def _fd_budget() -> int:
    """The fds forwarded connections may hold: the soft limit, less a reserve."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(soft - FD_RESERVE, 16)
