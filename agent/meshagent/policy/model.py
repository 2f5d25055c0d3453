"""Authorization policy: what it says, read from YAML, and what it decides
(pure Python; policy/tables.py turns it into the connect hook's maps).

A policy file holds one or more documents (YAML `---`), each shaped as
the Kubernetes resource (deploy/policy-crd.yaml) so that one text serves
both:

    apiVersion: meshagent.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: {name: web, namespace: default}
    spec:
      selector:                # which pods it governs
        matchLabels: {app: web}        # and/or (standalone) pods: [web]
      egress:                  # connections the pods open (checked at connect())
        - action: DENY
          to: [{ipBlock: {cidr: 10.9.0.0/16}}]
        - action: ALLOW
          to:
            - ipBlock: {cidr: 10.0.0.0/8}
            - workload: {namespace: db, serviceAccount: pg}
          ports: [5432, "8000-8100"]
      ingress:                 # connections to the pods (checked where they arrive)
        - action: ALLOW
          from: [{workload: {namespace: web}}]

Decisions, as Istio's AuthorizationPolicy and Kubernetes' NetworkPolicy
make them: a pod no policy governs in a direction is allowed everything
that way. Once a policy that selects it has `egress` (or `ingress`), even
an empty list, the pod is governed that way: a DENY rule that matches
denies; else an ALLOW rule that matches allows; else it is denied (the
default deny). A rule matches when one of its peers does (none: any
peer) and one of its ports does (none: any port). Rules apply to TCP.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshagent.errors import MeshError

API_VERSION = "meshagent.io/v1alpha1"
KIND = "AuthorizationPolicy"
ALLOW, DENY = "ALLOW", "DENY"
EGRESS, INGRESS = "egress", "ingress"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
LABEL_KEY_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
DEFAULT_NAMESPACE = "default"  # standalone pods live here

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(MeshError):
    """A policy that cannot be taken, with the file and line."""


@dataclass(frozen=True)
class Workload:
    """What the policy knows of a pod: the pod it governs, or the peer of a
    connection (then addrs are the addresses it may be reached at)."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    service_account: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    addrs: tuple[str, ...] = ()
    identity: str = ""  # its SPIFFE ID, where it has one

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class WorkloadSelector:
    """A peer by what it is: every field given must match."""

    namespace: str | None = None
    service_account: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    pod: str | None = None  # a pod's name (standalone)

    def matches(self, w: Workload) -> bool:
        if self.namespace is not None and w.namespace != self.namespace:
            return False
        if self.service_account is not None and w.service_account != self.service_account:
            return False
        if self.pod is not None and w.name != self.pod:
            return False
        have = w.label_map
        return all(have.get(k) == v for k, v in self.labels)


@dataclass(frozen=True)
class Peer:
    cidr: Network | None = None
    workload: WorkloadSelector | None = None

    def matches(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                who: Workload | None) -> bool:  # fmt: skip
        if self.cidr is not None:
            return ip is not None and ip.version == self.cidr.version and ip in self.cidr
        return who is not None and self.workload is not None and self.workload.matches(who)


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class Rule:
    policy: str  # namespace/name
    direction: str
    index: int
    action: str
    peers: tuple[Peer, ...] = ()  # none: any peer
    ports: tuple[PortRange, ...] = ()  # none: any port
    line: int = 0

    @property
    def id(self) -> str:
        return f"{self.policy}/{self.direction}[{self.index}]"

    def matches_port(self, port: int) -> bool:
        return not self.ports or any(r.lo <= port <= r.hi for r in self.ports)

    def matches(self, ip, who: Workload | None, port: int) -> bool:
        if not self.matches_port(port):
            return False
        return not self.peers or any(p.matches(ip, who) for p in self.peers)


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    pods: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    egress: tuple[Rule, ...] | None = None  # None: says nothing of egress
    ingress: tuple[Rule, ...] | None = None
    line: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, pod: Workload) -> bool:
        if pod.namespace != self.namespace:
            return False
        if self.pods and pod.name not in self.pods:
            return False
        have = pod.label_map
        return all(have.get(k) == v for k, v in self.labels)

    def rules(self, direction: str) -> tuple[Rule, ...] | None:
        return self.egress if direction == EGRESS else self.ingress


@dataclass(frozen=True)
class Decision:
    allow: bool
    rule: str | None  # the rule that decided, "default-deny" or None (no policy governs)
    governed: bool = False

    @property
    def reason(self) -> str:
        if self.allow:
            return "allowed" if self.governed else "no_policy"
        return "denied_policy"

    def to_dict(self) -> dict:
        return {"verdict": "allow" if self.allow else "deny", "rule": self.rule,
                "governed": self.governed}  # fmt: skip


@dataclass
class PolicySet:
    policies: tuple[Policy, ...] = ()
    source: str = ""
    version: int = 0  # the agent's count of rule sets taken
    # Every rule in a stable order; the connect hook names a rule by its index here + 1.
    rules: tuple[Rule, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.rules = tuple(
            r for p in self.policies for d in (EGRESS, INGRESS) for r in (p.rules(d) or ())
        )

    def governing(self, pod: Workload, direction: str) -> list[Rule] | None:
        """The rules that govern pod's connections in direction, or None
        when no policy selecting it speaks of that direction."""
        found: list[Rule] | None = None
        for policy in self.policies:
            rules = policy.rules(direction)
            if rules is not None and policy.selects(pod):
                found = (found or []) + list(rules)
        return found

    def decide(self, pod: Workload, direction: str, ip: str | None, port: int,
               peer: Workload | None = None) -> Decision:  # fmt: skip
        """pod's connection to (egress) or from (ingress) ip:port, the peer
        being the workload at ip where it is known. For ingress, port is
        pod's own (the destination) port."""
        rules = self.governing(pod, direction)
        if rules is None:
            return Decision(True, None, governed=False)
        addr = ipaddress.ip_address(ip.split("%")[0]) if ip else None
        for action in (DENY, ALLOW):
            for rule in rules:
                if rule.action == action and rule.matches(addr, peer, port):
                    return Decision(action == ALLOW, rule.id, governed=True)
        return Decision(False, "default-deny", governed=True)

    def summary(self) -> dict:
        return {"source": self.source, "version": self.version,
                "policies": [p.key for p in self.policies], "rules": len(self.rules)}  # fmt: skip


# -- reading -------------------------------------------------------------


class _Map(dict):
    line = 0
    lines: dict

    def at(self, key: str) -> int:
        return self.lines.get(key, self.line)


class _List(list):
    line = 0


def _loader():
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml where there
        pass

    def mapping(loader, node):
        out = _Map()
        out.line = node.start_mark.line + 1
        out.lines = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise PolicyError(f"line {key_node.start_mark.line + 1}: a key must be a string")
            if key in out:
                raise PolicyError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice")
            out[key] = loader.construct_object(value_node, deep=True)
            out.lines[key] = key_node.start_mark.line + 1
        return out

    def sequence(loader, node):
        out = _List(loader.construct_object(child, deep=True) for child in node.value)
        out.line = node.start_mark.line + 1
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


def load(path: Path | str) -> PolicySet:
    """Read and check a policy file: a PolicyError names the file and line."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PolicyError(f"policy file {where}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {where}: not text (UTF-8)") from None
    return parse_text(text, where)


def parse_text(text: str, where: str = "policy") -> PolicySet:
    import yaml

    try:
        docs = [d for d in yaml.load_all(text, Loader=_loader()) if d is not None]
    except PolicyError as exc:
        raise PolicyError(f"{where} {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{where}{line}: not YAML ({getattr(exc, 'problem', exc)})") from None
    policies: list[Policy] = []
    for doc in docs:
        if isinstance(doc, _Map) and doc.get("kind") == "List" and "items" in doc:
            items = doc["items"]
            if not isinstance(items, list):
                raise PolicyError(f"{where} line {doc.at('items')}: items: a list of policies")
            policies += [parse_policy(item, where) for item in items]
        else:
            policies.append(parse_policy(doc, where))
    seen: dict[str, int] = {}
    for p in policies:
        if p.key in seen:
            raise PolicyError(
                f"{where} line {p.line}: policy {p.key} is also at line {seen[p.key]}"
            )
        seen[p.key] = p.line
    return PolicySet(tuple(policies), source=where)


def _fail(where: str, line: int, what: str) -> PolicyError:
    return PolicyError(f"{where} line {line}: {what}" if line else f"{where}: {what}")


def _lined(obj: object) -> object:
    """A plain object (an API server's) in the shapes the reader takes, with
    no lines."""
    if isinstance(obj, dict):
        out = _Map({k: _lined(v) for k, v in obj.items()})
        out.lines = {}
        return out
    if isinstance(obj, list):
        return _List(_lined(v) for v in obj)
    return obj


def parse_object(obj: dict) -> Policy:
    """An AuthorizationPolicy as the API server gives it (deploy/policy-crd.yaml)."""
    meta = obj.get("metadata") or {}
    where = f"AuthorizationPolicy {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    return parse_policy(_lined(obj), where)


def _keys(obj: object, allowed: set[str], where: str, what: str, line: int) -> _Map:
    if not isinstance(obj, dict):
        raise _fail(where, getattr(obj, "line", line), f"{what}: expected a mapping")
    unknown = sorted(set(map(str, obj)) - allowed)
    if unknown:
        at = obj.at(unknown[0]) if isinstance(obj, _Map) else line
        raise _fail(where, at, f"{what}: unknown key {unknown[0]!r} ({', '.join(sorted(allowed))})")
    return obj  # type: ignore[return-value]


def _name(value: object, where: str, line: int, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > 253:
        raise _fail(where, line, f"{what} {value!r}: lower-case letters, digits, '-' and '.'")
    return value


def _labels(value: object, where: str, line: int, what: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _fail(where, line, f"{what}: a mapping of label to value")
    out = []
    for k, v in value.items():
        at = value.at(k) if isinstance(value, _Map) else line
        if not isinstance(k, str) or not LABEL_KEY_RE.match(k):
            raise _fail(where, at, f"{what}: {k!r} is not a label key")
        if isinstance(v, bool) or not isinstance(v, str | int) or not LABEL_VALUE_RE.match(str(v)):
            raise _fail(where, at, f"{what}: {k}={v!r} is not a label value")
        out.append((k, str(v)))
    return tuple(sorted(out))


def parse_policy(doc: object, where: str) -> Policy:
    line = getattr(doc, "line", 0)
    doc = _keys(doc, {"apiVersion", "kind", "metadata", "spec"}, where, "policy", line)
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise _fail(
            where, doc.at("apiVersion"), f"apiVersion {doc['apiVersion']!r}: expected {API_VERSION}"
        )
    if doc.get("kind", KIND) != KIND:
        raise _fail(where, doc.at("kind"), f"kind {doc['kind']!r}: expected {KIND}")
    meta = doc.get("metadata")  # only name and namespace count (an API server adds more)
    if not isinstance(meta, dict):
        raise _fail(where, doc.at("metadata"), "metadata: expected a mapping with a name")
    meta = meta if isinstance(meta, _Map) else _lined(meta)
    name = _name(meta.get("name"), where, meta.at("name"), "metadata.name")
    namespace = _name(meta.get("namespace", DEFAULT_NAMESPACE), where, meta.at("namespace"),
                      "metadata.namespace")  # fmt: skip
    key = f"{namespace}/{name}"
    spec = _keys(doc.get("spec"), {"selector", "egress", "ingress"}, where, "spec", doc.at("spec"))
    pods: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    if "selector" in spec:
        sel = _keys(spec["selector"], {"matchLabels", "pods"}, where, "spec.selector",
                    spec.at("selector"))  # fmt: skip
        if "matchLabels" in sel:
            labels = _labels(sel["matchLabels"], where, sel.at("matchLabels"), "matchLabels")
        if "pods" in sel:
            names = sel["pods"]
            if not isinstance(names, list) or not names:
                raise _fail(where, sel.at("pods"), "selector.pods: a list of pod names")
            pods = tuple(_name(n, where, sel.at("pods"), "pod") for n in names)
    if "egress" not in spec and "ingress" not in spec:
        raise _fail(where, spec.line or line, f"policy {key}: neither egress nor ingress")
    directions = {}
    for direction in (EGRESS, INGRESS):
        if direction in spec:
            directions[direction] = _rules(spec[direction], key, direction, where,
                                           spec.at(direction))  # fmt: skip
    return Policy(name, namespace, pods, labels, directions.get(EGRESS), directions.get(INGRESS),
                  line)  # fmt: skip


def _rules(value: object, key: str, direction: str, where: str, line: int) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(where, line, f"{direction}: a list of rules")
    peer_key = "to" if direction == EGRESS else "from"
    rules = []
    for i, raw in enumerate(value):
        at = getattr(raw, "line", line)
        raw = _keys(raw, {"action", peer_key, "ports"}, where, f"{direction}[{i}]", at)
        action = str(raw.get("action", ALLOW)).upper()
        if action not in (ALLOW, DENY):
            raise _fail(where, raw.at("action"), f"action {raw['action']!r}: ALLOW or DENY")
        peers = (
            _peers(raw.get(peer_key), direction, where, raw.at(peer_key)) if peer_key in raw else ()
        )
        ports = _ports(raw.get("ports"), where, raw.at("ports")) if "ports" in raw else ()
        rules.append(Rule(key, direction, i, action, peers, ports, at))
    return tuple(rules)


def _peers(value: object, direction: str, where: str, line: int) -> tuple[Peer, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(where, line, f"{'to' if direction == EGRESS else 'from'}: a list of peers "
                                 "(leave it out for any peer)")  # fmt: skip
    out = []
    for raw in value:
        at = getattr(raw, "line", line)
        raw = _keys(raw, {"ipBlock", "workload"}, where, "peer", at)
        if len(raw) != 1:
            raise _fail(where, at, "a peer is an ipBlock or a workload, one per entry")
        if "ipBlock" in raw:
            block = _keys(raw["ipBlock"], {"cidr"}, where, "ipBlock", raw.at("ipBlock"))
            try:
                net = ipaddress.ip_network(str(block.get("cidr")), strict=False)
            except ValueError as exc:
                raise _fail(where, block.at("cidr"), f"ipBlock.cidr: {exc}") from None
            out.append(Peer(cidr=net))
        else:
            w = _keys(raw["workload"], {"namespace", "serviceAccount", "matchLabels", "pod"}, where,
                      "workload", raw.at("workload"))  # fmt: skip
            if not w:
                raise _fail(where, raw.at("workload"), "workload: give namespace, serviceAccount, "
                                                       "matchLabels or pod")  # fmt: skip
            sel = WorkloadSelector(
                namespace=_name(w["namespace"], where, w.at("namespace"), "namespace")
                if "namespace" in w else None,
                service_account=_name(w["serviceAccount"], where, w.at("serviceAccount"),
                                      "serviceAccount") if "serviceAccount" in w else None,
                labels=_labels(w["matchLabels"], where, w.at("matchLabels"), "matchLabels")
                if "matchLabels" in w else (),
                pod=_name(w["pod"], where, w.at("pod"), "pod") if "pod" in w else None,
            )  # fmt: skip
            out.append(Peer(workload=sel))
    return tuple(out)


PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


def _ports(value: object, where: str, line: int) -> tuple[PortRange, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(where, line, "ports: a list of ports or ranges (\"8000-8100\"); "
                                 "leave it out for any port")  # fmt: skip
    out = []
    for item in value:
        m = PORT_RE.match(str(item)) if not isinstance(item, bool) else None
        lo = int(m.group(1)) if m else -1
        hi = int(m.group(2)) if m and m.group(2) else lo
        if not m or not 1 <= lo <= hi <= 65535:
            raise _fail(where, line, f"port {item!r}: 1-65535, or a range LO-HI")
        out.append(PortRange(lo, hi))
    return tuple(out)


def workload_of_identity(identity: str, ip: str) -> Workload:
    """A connection's source as its SPIFFE ID says: spiffe://D/ns/NS/sa/SA
    (Kubernetes), spiffe://D/node/NODE/pod/POD (standalone)."""
    from meshagent.mesh.identity import SpiffeId

    path = SpiffeId.parse(identity).path
    parts = dict(zip(path[::2], path[1::2], strict=False))
    if "ns" in parts:
        return Workload("", parts["ns"], parts.get("sa", "default"), (), (ip,), identity)
    return Workload(parts.get("pod", ""), addrs=(ip,), identity=identity)


def workloads_matching(selector: WorkloadSelector, known: Iterable[Workload]) -> list[Workload]:
    return [w for w in known if selector.matches(w)]


Resolver = Callable[[str], Workload | None]
