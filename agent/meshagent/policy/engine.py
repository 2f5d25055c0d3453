"""The agent's policy: the rule set in force, the pods it knows, and the
connect hook's maps kept to match.

A new rule set (the file at start, `policy apply`, SIGHUP) is checked
whole first: a malformed one is refused and the one in force stays. Then
every eBPF-attached pod's tables are written under a new generation, the
generation in force flips in one map write (mesh_pol_gen[0]), and the old
generation's entries go a moment later: a connect sees the old rules or
the new ones, never a mix, and connections already open are untouched.

A pod being attached gets its tables (in the generation in force) before
its connects are steered; pods coming and going can change other pods'
tables (rules naming workloads resolve to their addresses): those take a
whole new generation.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path

from meshagent import log
from meshagent.bpf import abi
from meshagent.errors import MeshError
from meshagent.policy.model import (
    DEFAULT_NAMESPACE,
    EGRESS,
    INGRESS,
    Decision,
    Policy,
    PolicyError,
    PolicySet,
    Workload,
    load,
    parse_object,
)
from meshagent.policy.tables import egress_table

GRACE = 0.05  # s: after a flip, before the old generation's entries go (a hook runs in µs)


def pol_key(gen: int, netns: int, prefix: ipaddress.IPv6Network) -> bytes:
    return abi.POL_KEY.pack(96 + prefix.prefixlen, gen, netns, prefix.network_address.packed)


def pol_value(entries) -> bytes:
    words = [e.lo | e.hi << 16 | e.action << 32 | e.rule << 40 for e in entries]
    words += [0] * (abi.POL_RULES - len(words))
    return abi.POL_VAL.pack(len(entries), 0, *words)


class PolicyEngine:
    def __init__(self, loaded=None, call_later: Callable | None = None) -> None:
        self.rules = PolicySet()
        self.version = 0
        self.loaded_at: float | None = None
        self.path: Path | None = None
        self.log = log.get()
        self.cidr = loaded.map(abi.POL_CIDR) if loaded is not None else None
        self.gen_map = loaded.map(abi.POL_GEN) if loaded is not None else None
        self.call_later = call_later
        self.gen = self._gen_in_force()
        self.pods: Callable[[], list[tuple[Workload, int | None]]] = list  # (pod, netns cookie)
        self.peers: Callable[[], list[Workload]] = list  # workloads on other nodes
        self.refused = 0  # rule sets refused (malformed)
        self.numbers: dict[int, tuple[str, ...]] = {}  # generation & 0xffff -> its rule ids
        self.file_rules = PolicySet(source="none")  # --policy, `policy apply`
        self.kube: dict[str, Policy] = {}  # the API's AuthorizationPolicy objects, good ones

    # -- the rule set ------------------------------------------------------
    def apply(self, rules: PolicySet) -> dict:
        """The file's rules (with the API's, if any) in force."""
        self.file_rules = rules
        return self._put()

    def apply_kube(self, objs: list[dict]) -> dict:
        """The API's AuthorizationPolicy objects (with the file's) in force.
        An object the agent cannot take (the schema let it through) is
        logged and counted; its last good version, if any, stays."""
        good: dict[str, Policy] = {}
        for obj in objs:
            meta = obj.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            try:
                good[key] = parse_object(obj)
            except MeshError as exc:
                self.refused += 1
                self.log.warning("policy object refused; its last good version stays",
                                 extra={"reason": str(exc)})  # fmt: skip
                if key in self.kube:
                    good[key] = self.kube[key]
        self.kube = good
        return self._put()

    def _put(self) -> dict:
        """Put the union in force (whole): the maps first, then Python's view."""
        file_rules = self.file_rules
        policies = file_rules.policies + tuple(self.kube.values())
        source = file_rules.source if not self.kube else (
            f"{file_rules.source} and {len(self.kube)} API objects"
            if file_rules.policies else "the API"
        )  # fmt: skip
        rules = PolicySet(policies, source=source)
        self._write_all(rules)
        self.version += 1
        rules.version = self.version
        self.rules = rules
        self.loaded_at = time.time()
        self.log.info("policy in force", extra={"reason": f"{rules.source}: {len(rules.policies)} "
                                                          f"policies, {len(rules.rules)} rules, "
                                                          f"version {self.version}"})  # fmt: skip
        return self.summary()

    def apply_file(self, path: Path) -> dict:
        """`policy apply`: the file's rules in force, or a PolicyError and
        the rules in force stay (SIGHUP reads the --policy file again)."""
        try:
            rules = load(path)
        except PolicyError:
            self.refused += 1
            raise
        return self.apply(rules)

    def reload(self) -> dict | None:
        """SIGHUP: the --policy file again. A bad one is logged, refused, and
        the rules in force stay."""
        if self.path is None:
            return None
        try:
            rules = load(self.path)
        except MeshError as exc:
            self.refused += 1
            self.log.warning("policy file refused; the rules in force stay",
                             extra={"reason": str(exc)})  # fmt: skip
            return None
        return self.apply(rules)

    def summary(self) -> dict:
        return {**self.rules.summary(), "generation": self.gen, "refused": self.refused,
                "loaded_at": self.loaded_at}  # fmt: skip

    # -- decisions in Python (iptables-backend pods, inbound, `policy check`)
    def workload(self, name: str) -> Workload | None:
        return next((w for w, _c in self.pods() if w.name == _short(name) and
                     w.namespace == _namespace(name)), None)  # fmt: skip

    def known(self) -> list[Workload]:
        return [w for w, _c in self.pods()] + self.peers()

    @property
    def has_ingress(self) -> bool:
        return any(p.ingress is not None for p in self.rules.policies)

    def local_at(self, ip: str) -> Workload | None:
        """The pod of this node at ip, if one is attached."""
        return next((w for w, _c in self.pods() if ip in w.addrs), None)

    def peer_at(self, ip: str) -> Workload | None:
        return next((w for w in self.known() if ip in w.addrs), None)

    def decide_egress(self, pod: Workload, ip: str, port: int) -> Decision:
        return self.rules.decide(pod, EGRESS, ip, port, peer=self.peer_at(ip))

    def decide_ingress(self, pod: Workload, ip: str, port: int, peer: Workload | None) -> Decision:
        return self.rules.decide(pod, INGRESS, ip, port, peer=peer or self.peer_at(ip))

    # -- the hook's maps ---------------------------------------------------
    def _gen_in_force(self) -> int:
        if self.gen_map is None:
            return 0
        try:
            return abi.U32.unpack(self.gen_map.lookup(abi.U32.pack(0)))[0]
        except (OSError, KeyError, TypeError, ValueError):
            return 0

    def _tables(self, rules: PolicySet, pods: list[tuple[Workload, int | None]]) -> dict:
        known = [w for w, _c in pods] + self.peers()
        out = {}
        for pod, cookie in pods:
            if cookie is None:
                continue
            table = egress_table(rules, pod, known)  # PolicyError: too many over one prefix
            if table is not None:
                out[cookie] = table
        return out

    def _write_all(self, rules: PolicySet) -> None:
        tables = self._tables(rules, self.pods())
        if self.cidr is None:
            return
        gen = (self.gen + 1) & 0xFFFFFFFF
        try:
            for cookie, table in tables.items():
                for prefix, entries in table.items():
                    self.cidr.update(pol_key(gen, cookie, prefix), pol_value(entries))
        except OSError as exc:
            self._drop_gen(keep=self.gen)
            raise MeshError(f"policy: {abi.POL_CIDR.name}: {exc.strerror} (the rules in force stay)"
                            ) from None  # fmt: skip
        self.gen_map.update(abi.U32.pack(0), abi.U32.pack(gen))  # the flip
        self.gen = gen
        self.numbers[gen & 0xFFFF] = tuple(r.id for r in rules.rules)
        for old in [g for g in self.numbers if g not in (gen & 0xFFFF, (gen - 1) & 0xFFFF)]:
            del self.numbers[old]
        if self.call_later is not None:
            self.call_later(GRACE, lambda: self._drop_gen(keep=self.gen))
        else:
            time.sleep(GRACE)
            self._drop_gen(keep=self.gen)

    def _drop_gen(self, keep: int) -> None:
        """Remove every entry of a generation other than keep."""
        for key in self.cidr.list_keys():
            if abi.POL_KEY.unpack(key)[1] != keep:
                try:
                    self.cidr.delete(key)
                except (OSError, KeyError):
                    pass

    def prepare(self, pod: Workload, cookie: int) -> None:
        """A pod about to be steered: its tables in the generation in force
        (it is not steered yet, so no connect sees them half written)."""
        if self.cidr is None:
            return
        table = egress_table(self.rules, pod, [*self.known(), pod])
        for prefix, entries in (table or {}).items():
            try:
                self.cidr.update(pol_key(self.gen, cookie, prefix), pol_value(entries))
            except OSError as exc:
                raise MeshError(f"pod {pod.name}: policy: {abi.POL_CIDR.name}: {exc.strerror}"
                                ) from None  # fmt: skip

    def pods_changed(self) -> None:
        """Pods came or went: rules naming workloads may resolve to other
        addresses now (a new generation when anything differs)."""
        if any(p.workload is not None for r in self.rules.rules for p in r.peers):
            self._write_all(self.rules)

    def forget(self, cookie: int) -> None:
        if self.cidr is None:
            return
        for key in self.cidr.list_keys():
            if abi.POL_KEY.unpack(key)[2] == cookie:
                try:
                    self.cidr.delete(key)
                except (OSError, KeyError):
                    pass


def _short(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _namespace(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else DEFAULT_NAMESPACE
