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
MAX_RULES = 65535  # a rule's number in the hook's entries and trace events is 16 bits


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
        self.bad: dict[str, str] = {}  # API objects refused: the reason last logged
        # On Kubernetes, until the API watch has listed the pods (their labels
        # select them): new rules are kept, not written; the generation in
        # force (a previous agent's, adopted with the maps) stays meanwhile.
        self.holding = False
        self._pods: list[tuple[Workload, int | None]] = []  # as of view()
        self._peers: list[Workload] = []

    # -- the rule set ------------------------------------------------------
    def apply(self, rules: PolicySet) -> dict:
        """The file's rules (with the API's, if any) in force, or a
        MeshError and the rules in force stay (nothing kept of these)."""
        return self._put(rules, self.kube)

    def apply_kube(self, objs: list[dict]) -> dict | None:
        """The API's AuthorizationPolicy objects (with the file's) in force.
        An object the agent cannot take (the schema let it through) is
        logged and counted; its last good version, if any, stays. A set
        that cannot be put in force (too many rules over one address) is
        logged and counted, and the rules in force stay. Never raises: it
        runs on the loop for a watch event."""
        good: dict[str, Policy] = {}
        for obj in objs:
            meta = obj.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            try:
                good[key] = parse_object(obj)
            except MeshError as exc:
                if self.bad.get(key) != str(exc):  # once per version of the object
                    self.bad[key] = str(exc)
                    self.refused += 1
                    self.log.warning("policy object refused; its last good version stays",
                                     extra={"reason": str(exc)})  # fmt: skip
                if key in self.kube:
                    good[key] = self.kube[key]
        try:
            return self._put(self.file_rules, good)
        except MeshError as exc:
            self.refused += 1
            self.log.warning("the API's policies not applied; the rules in force stay",
                             extra={"reason": str(exc)})  # fmt: skip
            return None

    def _put(self, file_rules: PolicySet, kube: dict[str, Policy]) -> dict:
        """Put the union in force (whole): the maps first, then Python's
        view; what it was made of is kept only once it is in force."""
        policies = file_rules.policies + tuple(kube.values())
        source = file_rules.source if not kube else (
            f"{file_rules.source} and {len(kube)} API objects"
            if file_rules.policies else "the API"
        )  # fmt: skip
        rules = PolicySet(policies, source=source)
        if len(rules.rules) > MAX_RULES:
            raise PolicyError(f"{source}: {len(rules.rules)} rules (at most {MAX_RULES})")
        if self.holding:
            self.file_rules, self.kube = file_rules, kube
            return {**self.summary(), "held": "until the API watch has listed the pods"}
        self._write_all(rules)
        self.file_rules, self.kube = file_rules, kube
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
        the rules in force stay (SIGHUP and a restart read the --policy
        file again)."""
        try:
            return self.apply(load(path))
        except PolicyError:
            self.refused += 1
            raise

    def reload(self) -> dict | None:
        """SIGHUP: the --policy file again. A bad one is logged, refused, and
        the rules in force stay."""
        if self.path is None:
            return None
        try:
            return self.apply(load(self.path))
        except MeshError as exc:
            self.refused += 1
            self.log.warning("policy file refused; the rules in force stay",
                             extra={"reason": str(exc)})  # fmt: skip
            return None

    def summary(self) -> dict:
        return {**self.rules.summary(), "generation": self.gen, "refused": self.refused,
                "loaded_at": self.loaded_at, "holding": self.holding}  # fmt: skip

    # -- decisions in Python (iptables-backend pods, inbound, `policy check`)
    # They read the pods as they were at the last rebuild (view()): no disk
    # or API work per connection.
    def view(self) -> None:
        """Take the pods and the peers as they are now."""
        self._pods = self.pods()
        self._peers = self.peers()

    def workload(self, name: str) -> Workload | None:
        return next((w for w, _c in self._pods if w.name == _short(name) and
                     w.namespace == _namespace(name)), None)  # fmt: skip

    def known(self) -> list[Workload]:
        return [w for w, _c in self._pods] + self._peers

    @property
    def has_ingress(self) -> bool:
        return any(p.ingress is not None for p in self.rules.policies)

    def ingress_addrs(self) -> list[str]:
        """Addresses of this node's attached pods whose ingress a policy
        governs: the forwarder checks those (kernel-mode pods send their
        connections there through it)."""
        ruled = [p for p in self.rules.policies if p.ingress is not None]
        if not ruled:
            return []
        return [a for w, _c in self._pods if any(p.selects(w) for p in ruled) for a in w.addrs]

    def local_at(self, ip: str) -> Workload | None:
        """The pod of this node at ip, if one is attached."""
        return next((w for w, _c in self._pods if ip in w.addrs), None)

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

    def _tables(self, rules: PolicySet) -> dict:
        known = self.known()
        out = {}
        for pod, cookie in self._pods:
            if cookie is None:
                continue
            table = egress_table(rules, pod, known)  # PolicyError: too many over one prefix
            if table is not None:
                out[cookie] = table
        return out

    def _write_all(self, rules: PolicySet) -> None:
        """Every governed pod's tables under a new generation, then the
        flip; MeshError (nothing changed) if they cannot all be written."""
        self.view()
        tables = self._tables(rules)
        if self.cidr is None:
            return
        # Another agent (a takeover's predecessor) may have flipped since.
        self.gen = self._gen_in_force() if self.gen_map is not None else self.gen
        gen = (self.gen + 1) & 0xFFFFFFFF
        try:
            for cookie, table in tables.items():
                for prefix, entries in table.items():
                    self.cidr.update(pol_key(gen, cookie, prefix), pol_value(entries))
            self.gen_map.update(abi.U32.pack(0), abi.U32.pack(gen))  # the flip
        except OSError as exc:
            self._drop(lambda g: g == gen)  # what was written of the new one
            raise MeshError(f"policy: {getattr(exc, 'strerror', None) or exc} (the rules in force "
                            f"stay; {abi.POL_CIDR.name} holds MESH_POL_MAX entries, two sets' "
                            "worth at a change)") from None  # fmt: skip
        self.gen = gen
        self.numbers[gen & 0xFFFF] = tuple(r.id for r in rules.rules)
        for old in [g for g in self.numbers if g not in (gen & 0xFFFF, (gen - 1) & 0xFFFF)]:
            del self.numbers[old]
        if self.call_later is not None:  # the old generation, once no connect can be reading it
            self.call_later(GRACE, lambda keep=gen: self._drop(lambda g: _older(g, keep)))
        else:
            time.sleep(GRACE)
            self._drop(lambda g: _older(g, gen))

    def _drop(self, which: Callable[[int], bool]) -> None:
        """Remove the entries of the generations which() names. A flip's
        timer names those before it: one flipped away from at least GRACE
        ago (a newer flip since has its own timer)."""
        try:
            keys = self.cidr.list_keys()
        except OSError as exc:
            self.log.warning("policy: old entries not removed", extra={"reason": str(exc)})
            return
        for key in keys:
            if which(abi.POL_KEY.unpack(key)[1]):
                try:
                    self.cidr.delete(key)
                except (OSError, KeyError):
                    pass

    def prepare(self, pod: Workload, cookie: int) -> None:
        """A pod about to be steered: its tables in the generation in force
        (it is not steered yet, so no connect sees them half written; the
        next generation leaves out whatever a failed attach left)."""
        if self.cidr is None:
            return
        table = egress_table(self.rules, pod, [*self.known(), pod])
        for prefix, entries in (table or {}).items():
            try:
                self.cidr.update(pol_key(self.gen, cookie, prefix), pol_value(entries))
            except OSError as exc:
                raise MeshError(f"pod {pod.name}: policy: {getattr(exc, 'strerror', None) or exc}"
                                ) from None  # fmt: skip

    def release(self) -> None:
        """The API watch has listed the pods: the rules kept meanwhile in
        force (never raises: a watch event)."""
        self.holding = False
        try:
            self._put(self.file_rules, self.kube)
        except MeshError as exc:
            self.refused += 1
            self.log.warning("policy not applied; the rules in force stay",
                             extra={"reason": str(exc)})  # fmt: skip

    def pods_changed(self) -> None:
        """Pods came, went or changed (labels, addresses): every governed
        pod's tables again, as a new generation (a detached pod's go with
        the old one). A set that no longer fits is logged; the tables in
        force stay. Never raises: it runs in an attach's commit or for a
        watch event."""
        if self.holding:
            return
        if not self.rules.policies:
            self.view()
            return
        try:
            self._write_all(self.rules)
        except MeshError as exc:
            self.log.warning("policy tables not rebuilt for the pods' change; the ones in force"
                             " stay", extra={"reason": str(exc)})  # fmt: skip


def _older(gen: int, than: int) -> bool:
    """gen came before than (generations count up, modulo 2**32)."""
    return 0 < (than - gen) & 0xFFFFFFFF < 1 << 31


def _short(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _namespace(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else DEFAULT_NAMESPACE
