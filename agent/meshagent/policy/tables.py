"""A pod's egress rules as the connect hook looks them up (pure).

The hook (bpf/include/policy.h) makes one longest-prefix lookup of the
destination in mesh_pol_cidr, keyed by the rule set's generation, the pod
and the address (IPv4 as ::ffff:a.b.c.d). The entry it finds lists every
rule that covers that prefix: the rules of that prefix and of every prefix
that holds it, as (port range, action, rule number), at most MAX_ENTRIES.
So one lookup gives exactly the rules that match the address, and the hook
applies them as PolicySet.decide does: a DENY that matches the port, else
an ALLOW, else the default deny. No entry: no policy governs the pod's
egress (the hook allows).

Every governed pod gets ::/0 and ::ffff:0:0/96, so an IPv4 destination
always lands in the IPv4 part of the trie: an IPv6 network that covers
::ffff:0:0/96 (e.g. ::/0) never stands for IPv4 destinations.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshagent.policy.model import ALLOW, EGRESS, Peer, PolicySet, Rule, Workload

MAX_ENTRIES = 16  # MESH_POL_RULES in bpf/include/policy.h
MAPPED = ipaddress.ip_network("::ffff:0:0/96")
EVERYTHING = ipaddress.ip_network("::/0")
ACTION_ALLOW, ACTION_DENY = 1, 2

V6Net = ipaddress.IPv6Network


@dataclass(frozen=True)
class Entry:
    lo: int
    hi: int
    action: int  # ACTION_*
    rule: int  # the rule's number: its index in PolicySet.rules + 1


def to_v6(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> V6Net:
    """net in the hook's key space (IPv4 as IPv4-mapped)."""
    if net.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + net.network_address.packed)
        return ipaddress.IPv6Network((mapped, 96 + net.prefixlen))
    return net  # type: ignore[return-value]


def _host(ip: str) -> V6Net:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return to_v6(ipaddress.ip_network(addr))


@dataclass(frozen=True)
class _Covered:
    """A prefix of a rule's, and whether it stands only for its family."""

    net: V6Net
    v4: bool | None  # True: an IPv4 peer; False: IPv6; None: any address


def _prefixes(peer: Peer, known: list[Workload]) -> list[_Covered]:
    if peer.cidr is not None:
        return [_Covered(to_v6(peer.cidr), peer.cidr.version == 4)]
    out = []
    for w in known:
        if peer.workload is not None and peer.workload.matches(w):
            for ip in w.addrs:
                out.append(_Covered(_host(ip), ipaddress.ip_address(ip.split("%")[0]).version == 4))
    return out


def _covers(c: _Covered, prefix: V6Net) -> bool:
    if not (prefix.subnet_of(c.net)):
        return False
    if c.v4 is None:
        return True
    return c.v4 == prefix.subnet_of(MAPPED)


_ALL = (1 << 128) - 1


def _covering(prefix: V6Net, by_net: dict) -> list:
    """The rules' prefixes that hold prefix (itself included): one dict
    lookup per shorter length, not a scan of every rule."""
    out: list = []
    addr = int(prefix.network_address)
    for length in range(prefix.prefixlen, -1, -1):
        found = by_net.get((addr & (_ALL ^ (_ALL >> length)), length))
        if found:
            out += found
    return out


def egress_table(rules_set: PolicySet, pod: Workload, known: list[Workload]
                 ) -> dict[V6Net, list[Entry]] | None:  # fmt: skip
    """The pod's trie entries, or None when no policy governs its egress.
    MeshError (PolicyError) when a prefix would need more than MAX_ENTRIES."""
    from meshagent.policy.model import PolicyError

    rules = rules_set.governing(pod, EGRESS)
    if rules is None:
        return None
    number = {r: i + 1 for i, r in enumerate(rules_set.rules)}
    covered: list[tuple[Rule, _Covered]] = []
    for rule in rules:
        if not rule.peers:
            covered.append((rule, _Covered(EVERYTHING, None)))
        for peer in rule.peers:
            covered += [(rule, c) for c in _prefixes(peer, known)]
    prefixes = {EVERYTHING, MAPPED} | {c.net for _r, c in covered}
    by_net: dict[tuple[int, int], list[tuple[Rule, _Covered]]] = {}
    for rule, c in covered:
        by_net.setdefault((int(c.net.network_address), c.net.prefixlen), []).append((rule, c))
    table: dict[V6Net, list[Entry]] = {}
    for prefix in prefixes:
        entries: list[Entry] = []
        seen: set[tuple[int, int, int]] = set()
        for rule, c in _covering(prefix, by_net):
            if not _covers(c, prefix):
                continue
            action = ACTION_ALLOW if rule.action == ALLOW else ACTION_DENY
            for lo, hi in [(p.lo, p.hi) for p in rule.ports] or [(1, 65535)]:
                if (number[rule], lo, hi) not in seen:
                    seen.add((number[rule], lo, hi))
                    entries.append(Entry(lo, hi, action, number[rule]))
        entries.sort(key=lambda e: (e.action != ACTION_DENY, e.rule))  # DENY first, in order
        if len(entries) > MAX_ENTRIES:
            raise PolicyError(f"pod {pod.namespace}/{pod.name}: {len(entries)} rule ports cover "
                              f"{prefix} (at most {MAX_ENTRIES} per address)")  # fmt: skip
        table[prefix] = entries
    return table


def lookup(table: dict[V6Net, list[Entry]], ip: str, port: int) -> tuple[bool, int]:
    """What the hook decides from the table: (allowed, rule number; 0 the
    default deny). A model of policy.h, for tests."""
    addr = ipaddress.IPv6Address(_host(ip).network_address)
    best = max((p for p in table if addr in p), key=lambda p: p.prefixlen)
    for entry in table[best]:
        if entry.lo <= port <= entry.hi:
            return entry.action == ACTION_ALLOW, entry.rule
    return False, 0
