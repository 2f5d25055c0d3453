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
READ_BATCH = 4096  # records per wake-up; the rest at the next
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
        loop.add(self.ring.fd, select.EPOLLIN, self._ready)
        forwarder.kernel = self

    def _ready(self, _events: int = 0) -> None:
        for raw in self.ring.read(READ_BATCH):
            self.account(raw)

    def drain(self) -> None:
        """Every record written so far (status, tests: nothing waits in the ring)."""
        self._ready()

    def account(self, raw: bytes) -> None:
        (_netns, _cookie, started, ended, sent, rcvd, addr, src, pod_id, err, port, sport,
         flags, closer, last, _pad) = abi.KDONE_RECORD.unpack_from(raw)  # fmt: skip
        now_wall, now_mono = time.time(), time.monotonic_ns()
        name = self.fwd.pod_names.get(pod_id, f"pod#{pod_id}")
        record = ConnRecord(
            name,
            format_endpoint(abi.from_addr16(src), sport),
            format_endpoint(abi.from_addr16(addr), port),
            now_wall - (now_mono - started) / 1e9,
            datapath=KERNEL,
        )
        record.bytes_out, record.bytes_in = sent, rcvd
        state, reason, closed_by = outcome(flags, err, closer, last)
        self.records += 1
        slot = self.fwd.pods.get(pod_id)
        if slot is not None:
            slot.stats.connections_total += 1
            slot.stats.bytes_out += sent
            slot.stats.bytes_in += rcvd
            if state == "reset":
                slot.stats.resets += 1
            elif state == "failed":
                slot.stats.upstream_errors += 1
        self.fwd.moved[(name, "out", KERNEL)] += sent
        self.fwd.moved[(name, "in", KERNEL)] += rcvd
        more: dict = {"closed_by": closed_by, "exact": bool(flags & abi.KC_EXACT)}
        self.fwd.ended(record, state, reason, ended_at=now_wall - (now_mono - ended) / 1e9,
                       **more)  # fmt: skip

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


_BY_PEER = {errno.ECONNRESET, errno.EPIPE}


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
