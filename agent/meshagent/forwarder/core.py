"""Accept steered connections, find where they were going, connect there
from inside the pod, and hand both sockets to a relay."""

from __future__ import annotations

import errno
import select
import socket
import time
from collections import deque
from collections.abc import Callable

from meshagent import log, netns
from meshagent.addrs import format_endpoint
from meshagent.errors import MeshError
from meshagent.forwarder.datapaths import MODES, DatapathStats
from meshagent.forwarder.loop import Loop
from meshagent.forwarder.records import ConnRecord, Pending, PodSlot
from meshagent.forwarder.relay import Relay, SpliceLeg, reset_close
from meshagent.forwarder.sockmap import SockmapMaps, SockmapRelay, cookie_of
from meshagent.redirect import OrigLookup

CONNECT_TIMEOUT = 10.0
SO_SNDBUFFORCE = 32
ACCEPT_BATCH = 64
RECENT_MAX = 256


def _writable_now(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(0))


class Forwarder:
    def __init__(
        self,
        loop: Loop,
        skip_mark: int,
        port: int,
        maps: SockmapMaps | None = None,
        mode: str = "copy",
        sockmap_sndbuf: int = 0,
    ) -> None:
        self.loop = loop
        self.skip_mark = skip_mark
        self.port = port
        self.maps = maps
        self.mode = mode
        self.sockmap_sndbuf = sockmap_sndbuf
        self.pods: dict[str, PodSlot] = {}
        self.relays: dict[Relay | SockmapRelay, tuple[PodSlot, ConnRecord]] = {}
        self.pending: dict[socket.socket, Pending] = {}
        self.recent: deque[ConnRecord] = deque(maxlen=RECENT_MAX)
        self.paths = {mode: DatapathStats() for mode in MODES}
        self.log = log.get()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise MeshError(f"data path {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "sockmap" and self.maps is None:
            raise MeshError("data path sockmap is not available on this agent (see status)")
        self.mode = mode

    # -- listeners ---------------------------------------------------------
    def open_pod(
        self, name: str, pod_id: int, netns_fd: int, netns_cookie: int, lookup: OrigLookup,
        backend: str,
    ) -> PodSlot:  # fmt: skip
        """Listen on 127.0.0.1:port and [::1]:port inside the pod's netns."""
        slot = PodSlot(name, pod_id, netns_fd, netns_cookie, lookup, backend)
        try:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                sock = netns.socket_in(netns_fd, family)
                slot.listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((host, self.port))
                except OSError as exc:
                    raise MeshError(
                        f"pod {name}: cannot listen on {format_endpoint(host, self.port)}:"
                        f" {exc.strerror}"
                    ) from None
                sock.listen(4096)
                sock.setblocking(False)
        except BaseException:
            for sock in slot.listeners:
                sock.close()
            raise
        for sock in slot.listeners:
            self.loop.add(sock.fileno(), select.EPOLLIN, self._acceptor(slot, sock))
        self.pods[name] = slot
        return slot

    def close_pod(self, name: str) -> PodSlot | None:
        """Stop listening for a pod. Connections already queued on the
        listener are accepted first; forwarded ones keep running."""
        slot = self.pods.pop(name, None)
        if slot is None:
            return None
        for sock in slot.listeners:
            self._accept_all(slot, sock)
            self.loop.remove(sock.fileno())
            sock.close()
        slot.listeners.clear()
        return slot

    def _acceptor(self, slot: PodSlot, sock: socket.socket) -> Callable[[int], None]:
        def handle(_events: int) -> None:
            self._accept_all(slot, sock, ACCEPT_BATCH)

        return handle

    def _accept_all(self, slot: PodSlot, listener: socket.socket, limit: int = 1 << 20) -> None:
        for _ in range(limit):
            try:
                client, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning(
                        "accept failed", extra={"pod": slot.name, "reason": exc.strerror}
                    )
                    return
                continue
            self._forward(slot, client, peer[0], peer[1])

    # -- one connection ----------------------------------------------------
    def _forward(self, slot: PodSlot, client: socket.socket, peer_ip: str, peer_port: int) -> None:
        client.setblocking(False)
        conn = format_endpoint(peer_ip, peer_port)
        orig = slot.lookup(client, peer_ip, peer_port)
        if orig is None:
            slot.stats.no_orig_dst += 1
            self.log.warning(
                "no original destination; closing",
                extra={"pod": slot.name, "conn": conn, "reason": "no_orig_dst"},
            )
            reset_close(client)
            return
        orig_ip, orig_port = orig
        record = ConnRecord(slot.name, conn, format_endpoint(orig_ip, orig_port), time.time())
        record.datapath = self.mode
        slot.stats.connections_total += 1
        slot.stats.connections_active += 1
        client_cookie = self._enter_sockhash(client, record) if self.mode == "sockmap" else None
        family = socket.AF_INET6 if ":" in orig_ip else socket.AF_INET
        try:
            upstream = netns.socket_in(slot.netns_fd, family)
        except (OSError, MeshError) as exc:
            self._fail(slot, record, client, None, f"upstream socket: {exc}", client_cookie)
            return
        try:
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.skip_mark)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
            err = upstream.connect_ex((orig_ip, orig_port))
        except OSError as exc:
            reason = f"upstream connect: {exc.strerror}"
            self._fail(slot, record, client, upstream, reason, client_cookie)
            return
        if err not in (0, errno.EINPROGRESS):
            reason = f"upstream connect: {errno.errorcode.get(err, err)}"
            self._fail(slot, record, client, upstream, reason, client_cookie)
            return
        timer = self.loop.call_later(
            CONNECT_TIMEOUT, lambda: self._connect_done(upstream, timed_out=True)
        )
        self.pending[upstream] = Pending(slot, record, client, timer, client_cookie)
        if err == 0 or _writable_now(upstream):
            # On a local bridge the handshake often completes inside connect():
            # skip the epoll round trip.
            self._connect_done(upstream)
            return
        self.loop.add(upstream.fileno(), select.EPOLLOUT, lambda _ev: self._connect_done(upstream))

    def _enter_sockhash(self, sock: socket.socket, record: ConnRecord) -> int | None:
        """Put a socket into the sockhash before anything reads from it; on
        failure (no longer ESTABLISHED) the pair is copied in userspace."""
        cookie = cookie_of(sock)
        if self.sockmap_sndbuf:
            # The kernel's redirect sends from a worker that, when the send
            # buffer is full, retries only a jiffy later: a deep send buffer
            # keeps it from stalling (bulk throughput 0.4x -> ~0.85x direct).
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self.sockmap_sndbuf)
        try:
            self.maps.insert(sock, cookie)
        except OSError:
            self.paths["sockmap"].fallbacks += 1
            record.datapath = "copy"
            return None
        return cookie

    def _connect_done(self, upstream: socket.socket, timed_out: bool = False) -> None:
        entry = self.pending.pop(upstream, None)
        if entry is None:
            return
        slot, record, client = entry.slot, entry.record, entry.client
        entry.timer.cancel()
        err = (
            errno.ETIMEDOUT
            if timed_out
            else upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        )
        if err:
            self.loop.remove(upstream.fileno())
            reason = f"upstream connect: {errno.errorcode.get(err, err)}"
            self._fail(slot, record, client, upstream, reason, entry.client_cookie)
            return
        record.state = "forwarding"  # the relay takes over upstream's epoll entry
        upstream_cookie = None
        if entry.client_cookie is not None:
            upstream_cookie = self._enter_sockhash(upstream, record)
        if upstream_cookie is None:
            self._copy(slot, record, client, upstream, (entry.client_cookie,))
            return
        relay = SockmapRelay(
            self.loop, self.maps, client, entry.client_cookie, upstream, upstream_cookie,
            self._relay_done, self._stalled,
        )  # fmt: skip
        self.relays[relay] = (slot, record)
        self.paths["sockmap"].connections_active += 1
        try:
            relay.start()
        except OSError:  # the peer map is full: copy this pair instead
            del self.relays[relay]
            self.paths["sockmap"].connections_active -= 1
            self.paths["sockmap"].fallbacks += 1
            record.datapath = "copy"
            self._copy(slot, record, client, upstream, (entry.client_cookie, upstream_cookie))

    def _copy(
        self,
        slot: PodSlot,
        record: ConnRecord,
        client: socket.socket,
        upstream: socket.socket,
        cookies: tuple[int | None, ...],
    ) -> None:
        """The splice(2) or copy relay. Sockets left in the sockhash without a
        peer are fine: the verdict passes their bytes to the relay, and their
        entries go once they are closed."""
        leg = SpliceLeg if record.datapath == "splice" else Relay.default_leg
        relay = Relay(self.loop, client, upstream, self._relay_done, leg)
        relay.forget_cookies = tuple(c for c in cookies if c is not None)
        self.relays[relay] = (slot, record)
        self.paths[record.datapath].connections_active += 1

    def _stalled(self, relay: SockmapRelay) -> None:
        slot, record = self.relays.get(relay, (None, None))
        self.paths["sockmap"].stalls += 1
        self.log.warning(
            "hand-off stalled: passed bytes not yet readable",
            extra={
                "pod": slot.name if slot else None,
                "conn": record.client if record else None,
                "reason": "handoff_stall",
            },
        )

    def sweep(self) -> None:
        """Recheck spliced connections (after a redirect failed somewhere)."""
        for relay in list(self.relays):
            if isinstance(relay, SockmapRelay):
                relay.recheck()

    def _fail(
        self,
        slot: PodSlot,
        record: ConnRecord,
        client: socket.socket,
        upstream: socket.socket | None,
        reason: str,
        client_cookie: int | None = None,
    ) -> None:
        slot.stats.upstream_errors += 1
        slot.stats.connections_active -= 1
        if client_cookie is not None:
            self.maps.forget(client_cookie)
        reset_close(client)
        if upstream is not None:
            upstream.close()
        self._end(record, "failed", reason)
        self.log.warning(
            "upstream failed; reset the pod's connection",
            extra={
                "pod": slot.name,
                "conn": record.client,
                "orig_dst": record.orig_dst,
                "reason": reason,
            },
        )

    def _relay_done(self, relay: Relay | SockmapRelay, reason: str | None) -> None:
        slot, record = self.relays.pop(relay)
        if isinstance(relay, Relay):
            for cookie in relay.forget_cookies:
                self.maps.forget(cookie)
        slot.stats.connections_active -= 1
        slot.stats.bytes_out += relay.bytes_out
        slot.stats.bytes_in += relay.bytes_in
        record.bytes_out, record.bytes_in = relay.bytes_out, relay.bytes_in
        path = self.paths[record.datapath]
        path.connections_active -= 1
        path.connections_total += 1
        path.bytes += relay.bytes_out + relay.bytes_in
        if isinstance(relay, SockmapRelay):
            path.handoff_bytes += relay.python_bytes
        if reason is not None:
            slot.stats.resets += 1
        self._end(record, "reset" if reason else "closed", reason)

    def _end(self, record: ConnRecord, state: str, reason: str | None) -> None:
        record.state = state
        record.reason = reason
        record.ended = time.time()
        self.recent.append(record)

    # -- reporting ---------------------------------------------------------
    def open_connections(self, name: str) -> int:
        """Forwarded or connecting connections of a pod (also after close_pod)."""
        live = sum(1 for slot, _record in self.relays.values() if slot.name == name)
        return live + sum(1 for p in self.pending.values() if p.slot.name == name)

    def live_bytes(self, name: str) -> tuple[int, int]:
        out = inn = 0
        for relay, (slot, _record) in self.relays.items():
            if slot.name == name:
                out += relay.bytes_out
                inn += relay.bytes_in
        return out, inn

    def connections(self) -> list[dict]:
        live = []
        for relay, (_slot, record) in self.relays.items():
            record.bytes_out, record.bytes_in = relay.bytes_out, relay.bytes_in
            live.append(record.to_dict())
        live.extend(p.record.to_dict() for p in self.pending.values())
        return [r.to_dict() for r in self.recent] + live

    def close(self) -> None:
        for name in list(self.pods):
            self.close_pod(name)
        for relay in list(self.relays):
            relay.finish("agent stopped")
        for upstream in list(self.pending):
            entry = self.pending.pop(upstream)
            entry.timer.cancel()
            self.loop.remove(upstream.fileno())
            if entry.client_cookie is not None:
                self.maps.forget(entry.client_cookie)
            upstream.close()
            entry.client.close()
