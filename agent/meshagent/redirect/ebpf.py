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
        conns_max: int = 65536,
    ) -> None:
        self.pods = loaded.map(abi.PODS)
        self.shares = loaded.map(abi.POD_SHARE)
        self.pod_live = loaded.map(abi.POD_LIVE)
        self.klive = loaded.map(abi.KLIVE)  # kernel-mode connections up, per pod
        self.state = loaded.map(abi.STATE)
        self.names: dict[bytes, str] = {}  # mesh_pods key -> pod name, for status
        self.conns_max = conns_max
        self.orig_tup = loaded.map(abi.ORIG_TUP)
        self.orig_cls = loaded.map(abi.ORIG_CLS)
        self.own = loaded.map(abi.OWN)
        self.listeners = {
            socket.AF_INET: loaded.map(abi.LSN4),
            socket.AF_INET6: loaded.map(abi.LSN6),
        }
        self.port = port
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
        self.reshare()
        return [abi.U64.unpack(key)[0] for key in gone]

    def share(self, pods: int) -> int:
        """What each of `pods` attached pods is sure to get of mesh_orig_tup:
        half the map, less a margin for connects racing the check, split
        evenly. Past it a pod borrows only while the map is under half
        full (bpf/include/steer.h), so the borrowed half and the shares
        never fill it (the map-full check is at conns_max - 8)."""
        half = self.conns_max // 2
        return max(1, (half - 8 - half // 8) // max(1, pods))

    def reshare(self) -> None:
        """Every attached pod's share, for as many pods as are attached now
        (entries of pods no longer attached go)."""
        keys = self.pods.list_keys()
        value = abi.U64.pack(self.share(len(keys)))
        attached = set(keys)
        for key in self.shares.list_keys():
            if key not in attached:
                self.shares.delete(key)
        for key in keys:
            self.shares.update(key, value)

    def steer(self, pod: PodHandle, on: bool) -> None:
        """The pod's entry in mesh_pods: in, its connects are steered (in
        kernel mode: decided and accounted, but steered only where the
        forwarder has work, mesh_kfwd)."""
        key = abi.U64.pack(pod.netns_cookie)
        if not on:
            self.pods.delete(key)
            self.names.pop(key, None)
            self.klive.delete(key)  # its connections still closing find none: no-op
            return
        try:
            value = abi.pod_value(pod.pod_id, pod.port or self.port, pod.mode == "kernel")
            self.pods.update(key, value)
        except OSError as exc:
            raise MeshError(f"pod {pod.name}: {self.pods.name}: {exc.strerror}") from None
        self.names[key] = pod.name

    def attach(self, pod: PodHandle) -> None:
        self.listening(pod)
        self.steer(pod, True)
        self.reshare()

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
        self.reshare()

    def keep_stopped(self, pod: PodHandle) -> None:
        """Nothing: its mesh_pods entry went at stop_new, and only attach
        puts one back."""

    def refresh(self, pod: PodHandle) -> None:
        """Nothing: the hooks know the forwarder's sockets by cookie."""

    def remove(
        self, pod: str, netns_name: str, quiet: bool = False, netns_fd: int | None = None
    ) -> None:
        pass

    def steering(self, pod: PodHandle) -> EbpfSteering:
        return EbpfSteering(self, pod)

    def snapshot(self) -> dict:
        """Entry counts, and each pod's mesh_orig_tup entries against its
        share: over_share names the pods whose connects the hooks refuse
        now (past their share, with the map half full or more)."""
        raw = self.state.lookup(abi.U32.pack(abi.STATE_TUP_LIVE))
        total = abi.U64.unpack(raw)[0] if raw else 0
        shares, over = {}, []
        for key, name in sorted(dict(self.names).items(), key=lambda item: item[1]):
            live, share = self.pod_live.lookup(key), self.shares.lookup(key)
            live = max(0, abi.S64.unpack(live)[0]) if live else 0
            share = abi.U64.unpack(share)[0] if share else 0
            shares[name] = {"live": live, "share": share}
            if share and live >= share and total >= self.conns_max // 2:
                over.append(name)
        return {
            "attached_pods": self.pods.count(),
            "orig_entries": self.orig_tup.count(),
            "pod_shares": shares,
            "over_share": over,
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
    kernel_policy = True  # the connect hook applied the pod's egress policy

    def __init__(self, backend: EbpfBackend, pod: PodHandle) -> None:
        self.backend = backend
        self.pod = pod
        self.cookie = pod.netns_cookie

    def orig_dst(self, _sock: socket.socket, ip: str, port: int) -> Orig | None:
        key = abi.client_key(self.cookie, ip, port)
        raw = self.backend.orig_tup.lookup_loop(key)
        if raw is None:  # the client closed before we accepted: its entry moved
            raw = self.backend.orig_cls.lookup(key)
            if raw is None:
                return None
            self.backend.orig_cls.delete(key)
            return Orig(*abi.orig_dst(raw))  # closed: no sk_msg path for it
        app = abi.orig_app(raw)
        return Orig(*abi.orig_dst(raw), AppSocket(key, app) if app is not None else None)

    def prepare_upstream(self, sock: socket.socket, replies: bool = False) -> None:
        """The connect hook passes sockets whose cookie is in mesh_own (and
        removes the entry): something a pod cannot forge, unlike a mark.
        replies: the value says so too (abi.OWN_REPLIES: bpf/include/maps.h,
        mesh_reply), in the same system call."""
        self.backend.own.update_u64(socket_cookie(sock), abi.OWN_REPLIES if replies else 1)
