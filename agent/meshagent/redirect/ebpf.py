"""The eBPF redirect backend: one map update per pod (netns cookie -> pod).

It owns its maps: the attached pods, the excluded ports and networks, and
the original destinations that the connect and sock_ops hooks record.
"""

from __future__ import annotations

import ipaddress
import socket

from meshagent.bpf import abi
from meshagent.bpf.loader import Loaded
from meshagent.errors import MeshError
from meshagent.host.sockets import socket_cookie
from meshagent.modes import Backend
from meshagent.steering import AppSocket, Orig, PodHandle

_ONE = abi.BYTE.pack(1)


class EbpfBackend:
    name = Backend.EBPF
    blocking = False  # one map update
    flavour = None  # no rules

    def __init__(
        self,
        loaded: Loaded,
        port: int,
        exclude_ports: tuple[int, ...],
        exclude_cidrs: tuple[str, ...],
    ) -> None:
        self.pods = loaded.map(abi.PODS)
        self.orig_tup = loaded.map(abi.ORIG_TUP)
        self.orig_cls = loaded.map(abi.ORIG_CLS)
        self.own = loaded.map(abi.OWN)
        self.listeners = {
            socket.AF_INET: loaded.map(abi.LSN4),
            socket.AF_INET6: loaded.map(abi.LSN6),
        }
        self.port = port
        self.stopped: set[int] = set()  # detached: fail_open must not bring them back
        # Exactly this agent's exclusions (maps taken over from a pin may
        # hold an earlier agent's).
        _set_entries(loaded.map(abi.EXCL_PORT), {abi.U16.pack(p): _ONE for p in exclude_ports})
        _set_entries(loaded.map(abi.EXCL_CIDR), exclude_entries(exclude_cidrs))

    def reconcile(self, pods: list[PodHandle]) -> list[int]:
        """Remove mesh_pods entries that belong to none of these pods (left
        by an earlier agent for pods since deleted); the cookies removed."""
        keep = {abi.U64.pack(pod.netns_cookie) for pod in pods}
        gone = [key for key in self.pods.list_keys() if key not in keep]
        for key in gone:
            self.pods.delete(key)
        return [abi.U64.unpack(key)[0] for key in gone]

    def steer(self, pod: PodHandle, on: bool) -> None:
        """The pod's entry in mesh_pods: in, its connects are steered."""
        key = abi.U64.pack(pod.netns_cookie)
        if not on:
            self.pods.delete(key)
            return
        try:
            self.pods.update(key, abi.pod_value(pod.pod_id, pod.port or self.port))
        except OSError as exc:
            raise MeshError(f"pod {pod.name}: {self.pods.name}: {exc.strerror}") from None

    def attach(self, pod: PodHandle) -> None:
        self.stopped.discard(pod.netns_cookie)
        self.listening(pod)
        self.steer(pod, True)

    def listening(self, pod: PodHandle) -> None:
        """The pod's listeners into mesh_lsn4/mesh_lsn6: the connect hooks
        steer only to these (a closed one leaves the map by itself)."""
        key = pod.netns_cookie
        for sock in pod.listeners:
            table = self.listeners[sock.family]
            try:
                table.update_u64(key, sock.fileno())
            except OSError as exc:
                raise MeshError(f"pod {pod.name}: {table.name}: {exc.strerror}") from None

    def stop_new(self, pod: PodHandle) -> None:
        """One map delete; open connections need nothing more."""
        self.keep_stopped(pod)
        self.steer(pod, False)

    def keep_stopped(self, pod: PodHandle) -> None:
        self.stopped.add(pod.netns_cookie)

    def refresh(self, pod: PodHandle) -> None:
        """Nothing: the hooks know the forwarder's sockets by cookie."""

    def remove(
        self, pod: str, netns_name: str, quiet: bool = False, netns_fd: int | None = None
    ) -> None:
        pass

    def steering(self, pod: PodHandle) -> EbpfSteering:
        return EbpfSteering(self, pod)

    def snapshot(self) -> dict:
        return {
            "attached_pods": self.pods.count(),
            "orig_entries": self.orig_tup.count(),
        }


_HOLE = abi.BYTE.pack(0)
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def exclude_entries(cidrs: tuple[str, ...]) -> dict[bytes, bytes]:
    """The mesh_excl_cidr entries for --exclude-cidrs: key -> 1 (excluded),
    per family as the iptables backend does. The trie looks IPv4 up as
    ::ffff:a.b.c.d, so an IPv6 network covering ::ffff:0:0/96 (::/0, ::/80)
    also gets ::ffff:0:0/96 -> 0, a hole the longest-prefix match finds for
    every IPv4 address (an IPv4 network, /96 + n, is longer and still wins;
    0.0.0.0/0 is that same key and stays 1). A network inside
    ::ffff:0:0/96 names IPv4 (config.parse_cidrs makes it the IPv4 one)."""
    entries = {abi.cidr_key(cidr): _ONE for cidr in cidrs}
    hole = abi.cidr_key(str(_MAPPED))
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        if net.version == 6 and net.prefixlen < 96 and net.supernet_of(_MAPPED):
            entries.setdefault(hole, _HOLE)
    return entries


def _set_entries(table, wanted: dict[bytes, bytes]) -> None:
    for key in table.list_keys():
        if key not in wanted:
            table.delete(key)
    for key, value in wanted.items():
        table.update(key, value)


class EbpfSteering:
    def __init__(self, backend: EbpfBackend, pod: PodHandle) -> None:
        self.backend = backend
        self.pod = pod
        self.cookie = pod.netns_cookie

    def orig_dst(self, _sock: socket.socket, ip: str, port: int) -> Orig | None:
        key = abi.client_key(self.cookie, ip, port)
        raw = self.backend.orig_tup.lookup(key)
        if raw is None:  # the client closed before we accepted: its entry moved
            raw = self.backend.orig_cls.lookup(key)
            if raw is None:
                return None
            self.backend.orig_cls.delete(key)
            return Orig(*abi.orig_dst(raw))  # closed: no sk_msg path for it
        app = abi.orig_app(raw)
        return Orig(*abi.orig_dst(raw), AppSocket(key, app) if app is not None else None)

    def prepare_upstream(self, sock: socket.socket) -> None:
        """The connect hook passes sockets whose cookie is in mesh_own (and
        removes the entry): something a pod cannot forge, unlike a mark."""
        self.backend.own.update(abi.U64.pack(socket_cookie(sock)), _ONE)

    def fail_open(self, on: bool) -> None:
        """Out of the pod's map entry, its connects go direct (the hook's
        not_attached); back in, they are steered again."""
        if on or self.cookie not in self.backend.stopped:  # not while it is being detached
            self.backend.steer(self.pod, not on)
