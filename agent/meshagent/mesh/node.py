"""This node in the mesh: outbound, a steered connection to a pod of
another node goes there over the mutual-TLS hop (mesh/hop.py); inbound, each
attached pod gets a listener on port 15008 inside its netns that takes the
hop, checks who is asking and delivers to the application with the client
pod's own address as the source.

The transparent source, without iptables: the socket to the application is
made in the pod's netns with IP_TRANSPARENT, bound to the client pod's
address and marked (SO_MARK). In the pod's netns, net.ipv4.tcp_fwmark_accept
gives the application's accepted socket the mark of the SYN, and a rule
sends what carries the mark to a table whose only route is `local default
dev lo`: the application's replies come back to our socket instead of
leaving for the client's node. Nothing else in the pod carries the mark.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from meshagent import log
from meshagent.addrs import format_endpoint
from meshagent.errors import MeshError
from meshagent.forwarder.budget import cost, set_buffers, tier
from meshagent.forwarder.copy import linger_reset, reset_close, writable_now
from meshagent.forwarder.records import ConnRecord, PodSlot
from meshagent.host import netns
from meshagent.host.loop import Loop
from meshagent.mesh import openssl
from meshagent.mesh.certs import NodeCerts
from meshagent.mesh.hop import PORT, Hop, Link, Refused
from meshagent.mesh.identity import SpiffeId, node_id
from meshagent.mesh.ktls import KtlsHop
from meshagent.mesh.links import LinkPool
from meshagent.mesh.meshfile import MeshNode, MeshView

MARK = 0x3A98  # 15000: the hop's sockets to applications
TABLE = 15008
RULE_PREF = 15008
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
FWMARK_ACCEPT = "ipv4/tcp_fwmark_accept"  # under /proc/sys/net (sysctl_net)
# A container's /proc/sys is read-only: the DaemonSet mounts the host's
# /proc/sys/net here (as Cilium's does). Either shows the netns of the
# thread that opens a file, so a pod's knobs are written from inside it.
HOST_SYSCTL_NET = "/host/proc/sys/net"
CONNECT_TIMEOUT = 10.0
RETRIES = 30  # ticks a pod's 15008 is tried again


@dataclass
class Inbound:
    """One attached pod's side of the hop: its listeners and what was
    changed in its netns (undone when it leaves)."""

    slot: PodSlot
    listeners: list[socket.socket] = field(default_factory=list)
    fwmark_accept_was: str | None = None
    error: str | None = None
    mode: str = "permissive"
    addrs: dict[int, str] = field(default_factory=dict)  # family -> the pod's address
    tries: int = 0


class TlsPath:
    """The forwarder's data path for a connection that crosses the hop
    (it asks only join, abandon, replies_direct and fds_per_connection):
    OpenSSL in this process ("tls"), or the kernel's TLS, spliced ("ktls":
    two pipes more)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.mode = "ktls" if mesh.kernel_tls else "tls"
        self.fds_per_connection = 4 if mesh.kernel_tls else 2

    def join(self, client: socket.socket, wire: socket.socket, state: dict, on_done) -> Hop:
        return self.mesh.outbound_hop(client, wire, state, on_done)

    def abandon(self, state: object) -> None:
        pass

    def replies_direct(self, state: object) -> bool:
        """Never: what comes back on the wire is TLS records for this node to open."""
        return False


class Mesh:
    def __init__(self, loop: Loop, view: MeshView, certs: NodeCerts, kernel_why: str = "") -> None:
        self.loop = loop
        self.view = view
        self.certs = certs
        self.kernel_tls = certs.kernel_tls  # the hop's bytes: kernel TLS and splice, or OpenSSL
        self.kernel_why = kernel_why
        self.hop_class = KtlsHop if self.kernel_tls else Hop
        if not self.kernel_tls:
            try:
                openssl.check()  # the OpenSSL hop's half-close (mesh/openssl.py)
            except openssl.Unavailable as exc:
                raise MeshError(f"the mesh's TLS hop cannot half-close here: {exc}") from None
        self.path = TlsPath(self)
        self.port = PORT
        self.inbound: dict[int, Inbound] = {}  # pod_id ->
        # (direction, result): result "ok" or a failure's reason.
        self.handshakes: Counter[tuple[str, str]] = Counter()
        self.hops: dict[Hop, str] = {}  # live hops: direction
        # The last resumable session to each node, with the client context
        # it was made in (a new certificate: a new context, a full handshake).
        self.sessions: dict[str, tuple[object, ssl.SSLSession]] = {}
        # While the first (full) handshake to a node is under way, the hops
        # to that node made meanwhile wait for it, to resume its session: a
        # burst of connections costs one full handshake, not one each.
        self.first: dict[str, list] = {}  # node -> hops waiting
        # Links reused for the next stream (mesh/hop.py): the OpenSSL mode.
        self.reuse = not self.kernel_tls
        self.links = LinkPool(loop)
        self.forwarder = None  # set by Forwarder.use_mesh
        # A pod's inbound mode (mesh/strict.py), by name; the agent sets it.
        self.mode_of: Callable[[str], str] = lambda _name: "permissive"
        self.strict_ips: dict[str, Inbound] = {}  # this node's strict pods, by address
        # On Kubernetes the labels say a pod's mode and the agent makes its
        # strict rules (or takes them away) when it opens the pod.
        self.enforce_modes = False
        self.enroll = None  # mesh/enroll.py on Kubernetes: the certificate's source
        self.log = log.get()

    # -- who is who --------------------------------------------------------
    def pod_identity(self, pod: str) -> str:
        return self.view.workload(pod)

    def remote(self, ip: str) -> MeshNode | None:
        return self.view.remote(ip)

    # -- outbound -----------------------------------------------------------
    def outbound_state(self, slot: PodSlot, orig_ip: str, orig_port: int, node: MeshNode,
                       app: object = None) -> dict:  # fmt: skip
        """What the hop needs; app: the data path's (kept for a fall-back)."""
        return {
            "node": node.name,
            "key": (slot.pod_id, orig_ip),  # an idle link's (mesh/links.py)
            "header": {
                "dst": format_endpoint(orig_ip, orig_port),
                "src": self.pod_identity(slot.name),
            },
            "app": app,
        }

    def fell_back(self, slot: PodSlot, record: ConnRecord, state: dict) -> None:
        """The destination took no hop (connection refused on 15008): the
        forwarder goes on in plaintext; counted, said once in a while."""
        self.handshakes[("out", "fallback_plaintext")] += 1
        if record.mtls is not None:
            record.mtls["fallback"] = "plaintext: the destination takes no hop"
        fwd = self.forwarder
        fwd.limited.warning(slot.name, "mtls_fallback",
            "the destination pod takes no hop (no agent on its node, or not attached there);"
            " plaintext, as without a mesh",
            {"pod": slot.name, "conn": record.client, "orig_dst": record.orig_dst,
             "reason": "mtls_fallback_plaintext"})  # fmt: skip

    def local_upstream(self, slot: PodSlot, ip: str, family: int) -> socket.socket | None:
        """For a strict pod of this node: a socket in its netns, bound to
        the client pod's own address (transparent), so that its rules let
        it in and it sees who connects. None for any other destination."""
        entry = self.strict_ips.get(ip)
        if entry is None:
            return None
        src = self.inbound.get(slot.pod_id)
        source = (src.addrs if src is not None else {}).get(family)
        if source is None:
            raise MeshError(f"no IPv{4 if family == socket.AF_INET else 6} address of the pod")
        sock = netns.socket_in(
            entry.slot.netns_fd, family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
        )
        try:
            _transparent(sock, family)
            entry.slot.steering.prepare_upstream(sock)
            sock.bind((source, 0))
        except OSError:
            sock.close()
            raise
        return sock

    def outbound_hop(self, client: socket.socket, wire: socket.socket, state: dict, on_done) -> Hop:
        expected = str(node_id(self.view.trust_domain, state["node"]))
        record = getattr(on_done, "record", None)  # the forwarder's (_Ended)

        def check(hop: Hop) -> None:
            if hop.peer != expected:
                raise Refused("wrong_node", f"the destination's node is {hop.peer}, not {expected}")

        def done(hop: Hop, reason: str | None) -> None:
            self.hops.pop(hop, None)
            if leading is not None:
                self._release(node, leading)
            if hop.phase == "relay":
                keep(hop)  # TLS 1.3: the ticket came after the handshake
                if record is not None and record.mtls is not None:
                    record.mtls["close_notify"] = hop.close_notify
            if hop.phase != "relay":
                key = (reason or "closed").split(":")[0]
                self.handshakes[("out", key)] += 1
                if record is not None:
                    self.forwarder.limited.warning(record.pod, f"mtls_out:{key}",
                        "the hop to another node failed; reset the pod's connection",
                        {"pod": record.pod, "conn": record.client, "orig_dst": record.orig_dst,
                         "reason": reason, "node": state["node"]})  # fmt: skip
            on_done(hop, reason)

        def up(hop: Hop) -> None:
            self.handshakes[("out", _how(hop))] += 1
            if record is not None and record.mtls is not None:
                record.mtls["peer"] = hop.peer
                record.mtls["resumed"] = hop.resumed
                if hop.reused:
                    record.mtls["reused"] = True
            if hop.reused:
                return
            keep(hop)
            if leading is not None:
                self._release(node, leading)

        def keep(hop: Hop) -> None:
            session = hop.new_session()
            if session is not None:
                self.sessions[state["node"]] = (ctx, session)

        node = state["node"]
        ctx = self.certs.current().client
        more = {}
        if self.reuse:
            key = state["key"]
            more = {"link": state.pop("link", None),
                    "on_idle": lambda link: self._idle_out(key, link, ctx)}  # fmt: skip
        session = None if more.get("link") else self._session(node, ctx)
        waits = session is None and node in self.first and not more.get("link")
        leading = None  # if this hop is the first: the list of those waiting for it
        if session is None and not waits and not more.get("link"):
            leading = self.first[node] = []
        hop = self.hop_class(self.loop, wire, ctx, False, done, check, plain=client,
                             header=state["header"], on_up=up, session=session,
                             start=not waits, **more)  # fmt: skip
        if waits:
            self.first[node].append(hop)
        self.hops[hop] = "out"
        return hop

    def _idle_out(self, key: tuple[int, str], link: Link, ctx: ssl.SSLContext) -> None:
        if link.fit(self.certs.current().client, ctx):
            self.links.park(key, link)
        else:
            link.close()

    def take_link(self, slot: PodSlot, ip: str) -> Link | None:
        """An idle link from slot's pod to the pod at ip, if one waits."""
        return self.links.take((slot.pod_id, ip)) if self.reuse else None

    def _session(self, node: str, ctx: object) -> ssl.SSLSession | None:
        kept = self.sessions.get(node)
        return kept[1] if kept is not None and kept[0] is ctx else None

    def _release(self, node: str, waiting: list) -> None:
        """The first handshake to node ended (up, or failed): the hops that
        waited for it start, resuming its session if there is one."""
        if self.first.get(node) is not waiting:
            return  # released already
        del self.first[node]
        session = self._session(node, self.certs.current().client)
        for hop in waiting:
            try:
                hop.begin(session)
            except ValueError:  # made before the certificate changed: another context
                hop.begin(None)

    # -- inbound ------------------------------------------------------------
    def open_pod(self, slot: PodSlot, tries: int = 0) -> None:
        """Listen on 15008 in the pod; a pod where that fails stays attached
        (its outbound is meshed), `status` says why it takes no hop, and
        tick() tries again a while (a predecessor may hold the port still)."""
        entry = Inbound(slot, tries=tries, mode=self.mode_of(slot.name))
        self.inbound[slot.pod_id] = entry
        try:
            with netns.entered(slot.netns_fd):
                entry.fwmark_accept_was, entry.addrs = _route_marked_to_lo(True)
            if entry.mode == "strict":
                for addr in entry.addrs.values():
                    self.strict_ips[addr] = entry
            if self.enforce_modes:
                from meshagent.mesh import strict

                strict.apply_fd(slot.netns_fd, entry.mode == "strict", what=f"pod {slot.name}",
                                allow_node=True)  # fmt: skip
            for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                sock = netns.socket_in(slot.netns_fd, family)
                entry.listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                linger_reset(sock)
                sock.bind((host, PORT))
                sock.listen(4096)
                sock.setblocking(False)
                self.loop.add(sock.fileno(), select.EPOLLIN, self._acceptor(entry, sock))
        except Exception as exc:  # netlink's errors too: the pod stays attached
            entry.error = f"inbound hop: {getattr(exc, 'strerror', None) or exc}"
            if tries in (0, RETRIES):
                self.log.warning("pod takes no hop from other nodes",
                                 extra={"pod": slot.name, "reason": entry.error})  # fmt: skip
            self._close_listeners(entry)

    def close_pod(self, slot: PodSlot) -> None:
        self.links.drop_pod(slot.pod_id)
        entry = self.inbound.pop(slot.pod_id, None)
        if entry is None:
            return
        for addr in entry.addrs.values():
            if self.strict_ips.get(addr) is entry:
                del self.strict_ips[addr]
        self._close_listeners(entry)
        if entry.fwmark_accept_was is not None:
            with contextlib.suppress(Exception), netns.entered(slot.netns_fd):
                _route_marked_to_lo(False, entry.fwmark_accept_was)

    def _close_listeners(self, entry: Inbound) -> None:
        for sock in entry.listeners:
            with contextlib.suppress(KeyError, OSError, ValueError):
                self.loop.remove(sock.fileno())
            sock.close()
        entry.listeners.clear()

    def _acceptor(self, entry: Inbound, listener: socket.socket) -> Callable[[int], None]:
        def handle(_events: int) -> None:
            for _ in range(64):
                try:
                    wire, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                self._take(entry, wire, peer[0], peer[1])

        return handle

    def _take(self, entry: Inbound, wire: socket.socket, peer_ip: str, peer_port: int,
              link: Link | None = None, ctx: ssl.SSLContext | None = None) -> None:  # fmt: skip
        """A hop from another node: a new connection, or (link) the next
        stream on one whose last stream ended cleanly."""
        slot = entry.slot
        if link is None:
            wire.setblocking(False)
            wire.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fwd = self.forwarder
        record = ConnRecord(slot.name, format_endpoint(peer_ip, peer_port), "?", time.time())
        record.datapath = self.path.mode
        record.fds = self.path.fds_per_connection
        record.buffer = slot.buffer or tier(1, fwd.memory.budget)
        record.reserved = cost(record.buffer)
        record.mtls = {"direction": "in"}
        fwd._hold(slot, record)
        slot.stats.inbound_total += 1
        set_buffers(wire, record.buffer)

        def done(hop: Hop, reason: str | None) -> None:
            self.hops.pop(hop, None)
            fwd._hold(slot, record, -1)
            if hop.idle:
                return  # a link that carried no next stream: nothing to count
            record.bytes_out, record.bytes_in = hop.bytes_out, hop.bytes_in
            if hop.phase == "relay":
                record.mtls["close_notify"] = hop.close_notify
            if hop.phase != "relay":
                key = (reason or "closed").split(":")[0]
                self.handshakes[("in", key)] += 1
                fwd.errors[f"mtls_in_{key}"] += 1
                fwd.limited.warning(slot.name, f"mtls_in:{key}",
                    "refused a hop from another node",
                    {"pod": slot.name, "conn": record.client, "reason": reason,
                     "peer": hop.peer})  # fmt: skip
            fwd.moved[(slot.name, "in_hop", "tls")] += hop.bytes_in + hop.bytes_out
            fwd._end(record, "reset" if reason else "closed", reason, closed_by=hop.closed_by)

        def check(hop: Hop) -> None:
            self._check_client(hop, peer_ip)
            record.mtls["peer"] = hop.peer

        def up(hop: Hop) -> None:
            self.handshakes[("in", _how(hop))] += 1

        def header_in(hop: Hop, header: dict) -> None:
            if link is not None:
                record.started = time.time()  # the stream's, not the idle wait's
                record.mtls["peer"] = hop.peer
                record.mtls["reused"] = True
            self._deliver(entry, hop, header, peer_ip, record)

        ctx = ctx or self.certs.current().server

        def idle_in(nxt: Link) -> None:
            if nxt.fit(self.certs.current().server, ctx):
                self._take(entry, nxt.wire, peer_ip, peer_port, nxt, ctx)
            else:
                nxt.close()

        more = {"link": link, "on_idle": idle_in} if self.reuse else {}
        hop = self.hop_class(self.loop, wire, ctx, True, done, check, on_up=up,
                             on_header=header_in, **more)  # fmt: skip
        self.hops[hop] = "in"

    def _policy_denies(self, pod: str, peer_ip: str, port: int, src: str) -> str | None:
        """The rule that denies a hop from src (proven by the peer node's
        certificate and checked against the mesh) to pod's port, or None."""
        policy = getattr(self.forwarder, "policy", None)
        if policy is None or not policy.has_ingress:
            return None
        from meshagent.policy.model import workload_of_identity

        me = policy.workload(pod) or self.forwarder.workload_of(pod)
        peer = workload_of_identity(src, peer_ip)
        known = policy.peer_at(peer_ip)
        if known is not None and (known.namespace, known.service_account) == (
            peer.namespace, peer.service_account,
        ):  # fmt: skip
            peer = known  # the API's view adds its labels
        decision = policy.decide_ingress(me, peer_ip, port, peer)
        return None if decision.allow else decision.rule

    def _check_client(self, hop: Hop, peer_ip: str) -> None:
        """The client's node is a node of this mesh, and the connection comes
        from that node's pod addresses."""
        try:
            ident = SpiffeId.parse(hop.peer or "")
        except MeshError:
            raise Refused("bad_identity", f"the client's certificate names {hop.peer}") from None
        node = self.view.nodes.get(ident.node or "") if ident.is_node else None
        if ident.trust_domain != self.view.trust_domain or node is None:
            raise Refused("unknown_node", f"{hop.peer} is no node of this mesh")
        if not self.view.holds(node, peer_ip):
            raise Refused("not_on_node", f"{peer_ip} is not a pod address of node {node.name}")

    def _deliver(self, entry: Inbound, hop: Hop, header: dict, peer_ip: str,
                 record: ConnRecord) -> None:  # fmt: skip
        """The header is in: check it, connect to the application."""
        slot = entry.slot
        peer = SpiffeId.parse(hop.peer or "")
        src = str(header.get("src", ""))
        try:
            claimed = SpiffeId.parse(src)
        except MeshError:
            hop.refuse("bad_identity", f"the source identity {src!r} is no SPIFFE ID")
            return
        why = (
            f"{src} is of another trust domain"
            if claimed.trust_domain != self.view.trust_domain
            else self.view.check_source(peer.node or "", peer_ip, claimed)
        )
        if why is not None:
            hop.refuse("identity_not_on_node", why)
            return
        hop.source = src
        record.mtls["source"] = src
        dst = str(header.get("dst", ""))
        local = hop.wire.getsockname()[0]
        host, _, port_text = dst.rpartition(":")
        host = host.strip("[]")
        try:
            port = int(port_text)
            same = ipaddress.ip_address(host) == ipaddress.ip_address(local)
        except ValueError:
            hop.refuse("bad_header", f"destination {dst!r}")
            return
        if not same or not 0 < port < 65536 or port == PORT:
            hop.refuse("bad_destination", f"{dst} is not this pod's ({local})")
            return
        record.orig_dst = format_endpoint(host, port)
        denied = self._policy_denies(slot.name, peer_ip, port, src)
        if denied is not None:
            slot.stats.denied_policy += 1
            hop.refuse("denied_policy", f"{src} to {dst}: {denied}")
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            app = netns.socket_in(slot.netns_fd, family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except (OSError, MeshError) as exc:
            hop.refuse("internal", f"socket: {exc}")
            return
        try:
            _transparent(app, family)
            app.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_buffers(app, record.buffer)
            linger_reset(app)
            slot.steering.prepare_upstream(app)
            app.bind((peer_ip, 0))
            err = app.connect_ex((host, port))
        except OSError as exc:
            app.close()
            hop.refuse("internal", f"transparent socket: {exc.strerror}")
            return
        if err not in (0, errno.EINPROGRESS):
            app.close()
            hop.refuse("app_refused", f"{dst}: {errno.errorcode.get(err, err)}")
            return

        def connected(_events: int = 0, timed_out: bool = False) -> None:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(KeyError, OSError, ValueError):
                self.loop.remove(app.fileno())
            if timed_out and writable_now(app):
                timed_out = False  # connected meanwhile: a busy loop ran the timer first
            code = (
                errno.ETIMEDOUT if timed_out else app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            )
            if code:
                reset_close(app)
                hop.refuse("app_refused", f"{dst}: {errno.errorcode.get(code, code)}")
                return
            record.state = "forwarding"
            self.forwarder._emit("forwarded", slot.name, record.client, record.orig_dst, None,
                                 datapath=record.datapath, mtls=record.mtls)  # fmt: skip
            hop.connected(app)

        timer = None
        if err == 0:
            connected()
            return
        timer = self.loop.call_later(CONNECT_TIMEOUT, lambda: connected(timed_out=True))
        self.loop.add(app.fileno(), select.EPOLLOUT, connected)

    # -- reporting ------------------------------------------------------------
    def pod_snapshot(self, pod_id: int) -> dict | None:
        entry = self.inbound.get(pod_id)
        if entry is None:
            return None
        return {
            "identity": self.pod_identity(entry.slot.name),
            "inbound": f"{PORT}" if entry.listeners else None,
            "mode": entry.mode,
            "error": entry.error,
        }

    def snapshot(self) -> dict:
        return {
            **self.view.to_dict(),
            "kernel_tls": {"on": self.kernel_tls, "why": self.kernel_why},
            "certificate": self.certs.snapshot(),
            "handshakes": {f"{d} {r}": n for (d, r), n in sorted(self.handshakes.items())},
            "hops": len(self.hops),
            "sessions": sorted(self.sessions),  # nodes a new hop resumes a session with
            "links": self.links.snapshot(),
            **({"enroll": self.enroll.snapshot()} if self.enroll is not None else {}),
        }

    def counters(self) -> dict:
        """Copies for the metrics thread."""
        return {
            "handshakes": dict(self.handshakes),
            "hops": Counter(self.hops.values()),
            "cert_expiry": self.certs.not_after_epoch(),
            "cert_reloads": self.certs.reloads,
        }

    def tick(self) -> None:
        """Once a second: new certificates are taken up; a pod whose 15008
        could not be opened (a predecessor still held it) is tried again."""
        self.certs.current()
        for entry in list(self.inbound.values()):
            if not entry.listeners and entry.error is not None and entry.tries < RETRIES:
                slot = entry.slot
                del self.inbound[slot.pod_id]
                self.open_pod(slot, entry.tries + 1)

    def let_go(self, handed: set | frozenset = frozenset()) -> None:
        """A successor took the pods over: close the hop listeners (it opens
        its own, and keeps the pods' routes, which stay as they are) and
        reset the hops whose sessions cannot leave this process: those in
        OpenSSL, the inbound ones (not handed over yet), any not handed
        over. Outbound hops spliced in the kernel's TLS (handed) went over
        with the pods' connections."""
        for entry in self.inbound.values():
            self._close_listeners(entry)
        self.inbound.clear()
        self.links.close()
        self.strict_ips.clear()
        for hop in list(self.hops):
            if hop in handed:
                self.hops.pop(hop, None)  # the successor's now: no reset, no count here
                continue
            hop.reset("takeover: a hop's TLS session cannot move to the new agent")

    def close(self) -> None:
        self.links.close()
        for entry in list(self.inbound.values()):
            self.close_pod(entry.slot)
        for hop in list(self.hops):
            hop.reset("agent stopped")


def _how(hop: Hop) -> str:
    """A hop that came up, as counted: on a reused link, resumed, or ok."""
    if hop.reused:
        return "reused"
    return "resumed" if hop.resumed else "ok"


def _transparent(sock: socket.socket, family: int) -> None:
    """A socket that may bind another host's address, marked so that the
    replies to it stay in the netns (_route_marked_to_lo)."""
    if family == socket.AF_INET:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)


def _route_marked_to_lo(on: bool, restore: str | None = None) -> tuple[str, dict[int, str]]:
    """In the current thread's netns: what carries MARK is delivered
    locally (both families); tcp_fwmark_accept on. Returns the sysctl's
    value before and the pod's global addresses by family (on), or puts
    restore back (off)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    was = None
    knob = sysctl_net(FWMARK_ACCEPT)
    with open(knob) as f:
        was = f.read().strip()
    addrs: dict[int, str] = {}
    with IPRoute() as ipr:
        if on:
            for msg in ipr.get_addr():
                family = msg["family"]
                if msg["scope"] == 0 and family not in addrs:  # universe: not lo, not link-local
                    addrs[family] = msg.get_attr("IFA_ADDRESS")
        # Local routes are of host scope (the kernel refuses IPv4 ones of another).
        for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            route = {"dst": dst, "table": TABLE, "type": "local", "family": family, "scope": 254}
            rule = {"family": family, "fwmark": MARK, "fwmask": 0xFFFFFFFF, "table": TABLE,
                    "priority": RULE_PREF}  # fmt: skip
            with contextlib.suppress(NetlinkError):
                ipr.rule("del", **rule)
            with contextlib.suppress(NetlinkError):
                ipr.route("del", **route)
            if on:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.route("add", oif=lo, **route)
                ipr.rule("add", **rule)
    with open(knob, "w") as f:
        f.write("1" if on else (restore or "0"))
    return was, addrs


def sysctl_net(knob: str) -> str:
    """The file of net.KNOB (as ipv4/tcp_fwmark_accept) for this thread's netns."""
    top = HOST_SYSCTL_NET if os.path.isdir(HOST_SYSCTL_NET) else "/proc/sys/net"
    return f"{top}/{knob}"
