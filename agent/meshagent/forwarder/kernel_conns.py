"""Kernel mode's connections, as the forwarder accounts for them.

A kernel-mode pod's connects go direct (bpf/include/steer.h); sock_ops
follows each to its close and hands one record to mesh_kdone
(bpf/include/kernel.h). Each record becomes a ConnRecord of data path
"kernel", counted where a forwarded connection's is: the pod's stats,
`connections`, the metrics, a tracer's events. This also keeps mesh_kfwd,
the destinations a kernel-mode pod's connects still take to the forwarder.
"""

from __future__ import annotations

import errno
import select
import time
from collections.abc import Iterable

from meshagent import log
from meshagent.addrs import format_endpoint
from meshagent.bpf import abi
from meshagent.bpf.ringbuf import RingBuf
from meshagent.forwarder.records import ConnRecord

KERNEL = "kernel"  # the data path's name in records and metrics
READ_BATCH = 4096  # records read at once
DRAIN_SECONDS = 0.2  # the ring is read this often, besides when a batch wakes us
FWD_MAX = 16384  # MESH_KFWD_MAX


class KernelConns:
    def __init__(self, loop, loaded, forwarder) -> None:
        self.fwd = forwarder
        self.ring = RingBuf(loaded.map(abi.KDONE).fd)
        loaded.on_close(self.ring.close)
        self.kfwd = loaded.map(abi.KFWD)
        self.klive = loaded.map(abi.KLIVE)
        self.forwarded: set[bytes] = set(self.kfwd.list_keys())  # a predecessor's too
        self.records = 0  # accounted so far
        self.log = log.get()
        self._too_many = False
        self.state = loaded.map(abi.STATE)
        self.loop = loop
        self.read_total = self._read_so_far()  # a predecessor's reads count too
        loop.add(self.ring.fd, select.EPOLLIN, self._ready)
        loop.call_later(DRAIN_SECONDS, self._tick)
        forwarder.kernel = self

    def _read_so_far(self) -> int:
        raw = self.state.lookup(abi.U32.pack(abi.STATE_KDONE_READ))
        return abi.U64.unpack(raw)[0] if raw else 0

    def _ready(self, _events: int = 0) -> None:
        """Read what waits; the hooks wake us only once a batch waits
        (MESH_KDONE_WAKE), so the count read is theirs to compare."""
        records = self.ring.read(READ_BATCH)
        while records:
            self.account(records)
            self.read_total += len(records)
            records = self.ring.read(READ_BATCH) if len(records) == READ_BATCH else []
        self.state.update(abi.U32.pack(abi.STATE_KDONE_READ), abi.U64.pack(self.read_total))

    def _tick(self) -> None:
        self._ready()
        self.loop.call_later(DRAIN_SECONDS, self._tick)

    def drain(self) -> None:
        """Every record written so far (`connections`, status: none waits in the ring)."""
        self._ready()

    def account(self, records: list[bytes]) -> None:
        """A batch of records: summed per pod and result (the counters), and
        kept whole only where someone looks (the last of `recent`; each one
        while a tracer runs): a pod may open thousands a second."""
        fwd = self.fwd
        sums: dict[tuple[int, str], list[int]] = {}
        unpack = abi.KDONE_RECORD.unpack_from
        for raw in records:
            fields = unpack(raw)
            sent, rcvd, pod_id, err, flags = fields[4], fields[5], fields[8], fields[9], fields[12]
            if not err and flags & _UP_AND_FIN > abi.KC_UP:  # the usual end, quickly
                state = "closed"
            else:
                state = outcome(flags, err, fields[13], fields[14])[0]
            total = sums.get((pod_id, state))
            if total is None:
                sums[(pod_id, state)] = [1, sent, rcvd]
            else:
                total[0] += 1
                total[1] += sent
                total[2] += rcvd
        self.records += len(records)
        clock = time.time() - time.monotonic_ns() / 1e9  # wall = clock + ktime / 1e9
        tracing = fwd.on_event is not None
        for raw in records if tracing else records[-RECENT_KEPT:]:
            record = KernelRecord(raw, fwd.pod_names, clock)
            fwd.recent.append(record)
            if tracing:
                fwd.emit_ended(record.to_dict())
        for (pod_id, state), (count, sent, rcvd) in sums.items():
            name = fwd.pod_names.get(pod_id, f"pod#{pod_id}")
            slot = fwd.pods.get(pod_id)
            if slot is not None:
                stats = slot.stats
                stats.connections_total += count
                stats.bytes_out += sent
                stats.bytes_in += rcvd
                if state == "reset":
                    stats.resets += count
                elif state == "failed":
                    stats.upstream_errors += count
            fwd.outcomes[(name, KERNEL, state)] += count
            fwd.moved[(name, "out", KERNEL)] += sent
            fwd.moved[(name, "in", KERNEL)] += rcvd

    def active(self, cookie: int) -> int:
        """A pod's kernel-mode connections established now."""
        raw = self.klive.lookup(abi.U64.pack(cookie))
        return max(0, abi.S64.unpack(raw)[0]) if raw else 0

    def forward_to(self, networks: Iterable[str]) -> None:
        """mesh_kfwd holds exactly these networks (addresses, CIDRs)."""
        wanted = {abi.cidr_key(net) for net in networks}
        if len(wanted) > FWD_MAX:
            if not self._too_many:
                self.log.error(
                    "kernel mode: too many destinations need the forwarder",
                    extra={"reason": f"{len(wanted)} > {FWD_MAX}: kernel-mode pods forward"
                           " every connection until there are fewer"},
                )  # fmt: skip
            self._too_many = True
            wanted = {abi.cidr_key("::/0"), abi.cidr_key("0.0.0.0/0")}
        else:
            self._too_many = False
        for key in self.forwarded - wanted:
            self.kfwd.delete(key)
        for key in wanted - self.forwarded:
            self.kfwd.update(key, abi.BYTE.pack(1))
        self.forwarded = wanted


def forwarded_networks(view, ingress: Iterable[str]) -> list[str]:
    """What mesh_kfwd holds: other nodes' pods (view: the mesh's; None
    without one), by each pod's address on Kubernetes (kubeview.py) or by
    the mesh file's pod CIDRs, and the addresses of this node's pods whose
    ingress a policy governs."""
    nets: list[str] = []
    if view is not None and hasattr(view, "by_ip"):  # Kubernetes: each pod's address
        nets += [ip for ip, pod in view.by_ip.items() if pod.node != view.me]
    elif view is not None:  # the mesh file: other nodes' pod CIDRs
        nets += [str(c) for n in view.nodes.values() if n.name != view.me for c in n.pod_cidrs]
    return nets + list(ingress)


_BY_PEER = {errno.ECONNRESET, errno.EPIPE}
_UP_AND_FIN = abi.KC_UP | abi.KC_FIN_OUT | abi.KC_FIN_IN
RECENT_KEPT = 256  # forwarder.core.RECENT_MAX: no more are shown


class KernelRecord:
    """A kernel-mode connection's record, as `connections` and a tracer
    read it (a ConnRecord's fields), made from the raw bytes only when
    read: most are never looked at."""

    __slots__ = ("clock", "names", "raw")

    def __init__(self, raw: bytes, names: dict[int, str], clock: float) -> None:
        self.raw, self.names, self.clock = raw, names, clock

    def to_dict(self) -> dict:
        (_netns, _cookie, started, ended, sent, rcvd, addr, src, pod_id, err, port, sport,
         flags, closer, last, _pad) = abi.KDONE_RECORD.unpack_from(self.raw)  # fmt: skip
        state, reason, closed_by = outcome(flags, err, closer, last)
        record = ConnRecord(
            self.names.get(pod_id, f"pod#{pod_id}"),
            format_endpoint(abi.from_addr16(src), sport),
            format_endpoint(abi.from_addr16(addr), port),
            self.clock + started / 1e9,
            state=state,
            bytes_out=sent,
            bytes_in=rcvd,
            ended=self.clock + ended / 1e9,
            reason=reason,
            datapath=KERNEL,
            closed_by=closed_by,
        )
        return {**record.to_dict(), "exact": bool(flags & abi.KC_EXACT)}


def outcome(flags: int, err: int, closer: int, last: int) -> tuple[str, str | None, str | None]:
    """(state, reason, closed_by) of a kernel-mode connection's record, as
    a forwarded connection's read: closed, reset or failed; who closed
    first (pod or upstream, the destination)."""
    by = abi.KC_BY.get(closer)
    if not flags & abi.KC_UP:
        why = errno.errorcode.get(err, str(err)) if err else "closed before it was up"
        return "failed", f"connect: {why}", None
    if err:
        name = errno.errorcode.get(err, str(err))
        if err in _BY_PEER:
            return "reset", f"reset by upstream ({name})", by or "upstream"
        return "reset", name, by
    if flags & (abi.KC_FIN_OUT | abi.KC_FIN_IN):
        return "closed", None, by
    # Closed from established (or close_wait) without a FIN of its own
    # and no error: the pod aborted it (SO_LINGER 0, unread data).
    if flags & abi.KC_EXACT:
        return "reset", "reset by pod", by or "pod"
    return "reset", f"reset (from {abi.TCP_STATES.get(last, last)})", by
