"""The policy file, its decisions, and the connect hook's tables (pure)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from meshagent.policy.model import EGRESS, INGRESS, PolicyError, Workload, parse_text
from meshagent.policy.tables import MAX_ENTRIES, egress_table, lookup

WEB = Workload("web", "default", "web-sa", (("app", "web"),), ("10.244.0.2", "fd6d::2"))
DB = Workload("db", "data", "pg", (("app", "db"),), ("10.244.1.5", "fd6d:1::5"))
CACHE = Workload("cache", "data", "redis", (("app", "cache"),), ("10.244.1.6",))

POLICY = """
apiVersion: meshagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-out}
spec:
  selector: {matchLabels: {app: web}}
  egress:
    - action: DENY
      to: [{ipBlock: {cidr: 10.9.0.0/16}}]
    - action: ALLOW
      to:
        - ipBlock: {cidr: 10.0.0.0/8}
      ports: [80, "8000-8100"]
    - action: ALLOW
      to: [{workload: {namespace: data, serviceAccount: pg}}]
      ports: [5432]
    - action: DENY
      ports: [22]
---
apiVersion: meshagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-in, namespace: data}
spec:
  selector: {matchLabels: {app: db}}
  ingress:
    - from: [{workload: {namespace: default, matchLabels: {app: web}}}]
      ports: [5432]
"""


def test_a_policy_decides_as_documented():
    rules = parse_text(POLICY)
    d = rules.decide(WEB, EGRESS, "10.9.1.1", 80)
    assert (d.allow, d.rule) == (False, "default/web-out/egress[0]")
    d = rules.decide(WEB, EGRESS, "10.1.2.3", 8050)
    assert (d.allow, d.rule) == (True, "default/web-out/egress[1]")
    assert rules.decide(WEB, EGRESS, "10.1.2.3", 443).rule == "default-deny"
    assert rules.decide(WEB, EGRESS, "10.244.1.5", 5432, peer=DB).allow
    assert not rules.decide(WEB, EGRESS, "10.244.1.6", 5432, peer=CACHE).allow
    assert rules.decide(WEB, EGRESS, "10.1.2.3", 22).rule == "default/web-out/egress[3]"
    assert not rules.decide(WEB, EGRESS, "fd6d::9", 80).allow  # an IPv4 block is no IPv6 one
    # Nobody governs the cache's egress, nor the web's ingress.
    assert rules.decide(CACHE, EGRESS, "1.2.3.4", 22).to_dict() == {
        "verdict": "allow",
        "rule": None,
        "governed": False,
    }
    assert rules.decide(WEB, INGRESS, "10.244.1.6", 80, peer=CACHE).allow
    assert rules.decide(DB, INGRESS, "10.244.0.2", 5432, peer=WEB).allow
    assert rules.decide(DB, INGRESS, "10.244.1.6", 5432, peer=CACHE).rule == "default-deny"
    assert rules.decide(DB, INGRESS, "10.244.0.2", 5433, peer=WEB).rule == "default-deny"


def test_an_empty_direction_denies_everything_that_way():
    rules = parse_text("metadata: {name: lock}\nspec:\n  selector: {pods: [web]}\n  egress: []\n")
    assert rules.decide(WEB, EGRESS, "10.1.1.1", 80).to_dict() == {
        "verdict": "deny",
        "rule": "default-deny",
        "governed": True,
    }
    assert rules.decide(WEB, INGRESS, "10.1.1.1", 80).allow
    assert rules.decide(DB, EGRESS, "10.1.1.1", 80).allow  # another namespace


@pytest.mark.parametrize(
    ("text", "line", "says"),
    [
        ("metadata: {name: a}\nspec:\n  egress:\n    - action: MAYBE\n", 4, "ALLOW or DENY"),
        ("metadata: {name: a}\nspec:\n  egress:\n    - ports: [70000]\n", 4, "1-65535"),
        (
            "metadata: {name: a}\nspec:\n  egress:\n    - to: [{ipBlock: {cidr: 10.0.0.0/33}}]\n",
            4,
            "ipBlock.cidr",
        ),
        ("metadata: {name: a}\nspec:\n  egress: []\n  sideways: []\n", 4, "unknown key 'sideways'"),
        ("metadata: {name: A_B}\nspec: {egress: []}\n", 1, "metadata.name"),
        ("metadata: {name: a}\nspec: {selector: {}}\n", 2, "neither egress nor ingress"),
        (
            "metadata: {name: a}\nspec: {egress: []}\n---\nmetadata: {name: a}\nspec: {egress: []}\n",
            4,
            "also at line 1",
        ),
        ("metadata: {name: a}\nspec:\n  egress:\n    - to: [{workload: {}}]\n", 4, "workload:"),
        (
            "metadata: {name: a}\nspec:\n  egress:\n  - {action: ALLOW, action: DENY}\n",
            4,
            "given twice",
        ),
        ("metadata: {name: a\n", 2, "not YAML"),
        ("kind: NetworkPolicy\nmetadata: {name: a}\nspec: {egress: []}\n", 1, "kind"),
    ],
)
def test_a_bad_policy_is_refused_with_its_line(text, line, says):
    with pytest.raises(PolicyError) as err:
        parse_text(text, "p.yaml")
    assert f"p.yaml line {line}" in str(err.value)
    assert says in str(err.value)


def _random_policy(rng: random.Random) -> str:
    nets = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0",
            "::/0", "fd6d::/16", "fd6d::2/128", "192.168.0.0/16"]  # fmt: skip
    lines = ["metadata: {name: r}", "spec:", "  selector: {matchLabels: {app: web}}", "  egress:"]
    for _ in range(rng.randint(0, 6)):
        lines.append(f"    - action: {rng.choice(['ALLOW', 'DENY'])}")
        if rng.random() < 0.8:
            peers = [
                f"{{ipBlock: {{cidr: '{rng.choice(nets)}'}}}}" for _ in range(rng.randint(1, 2))
            ]
            if rng.random() < 0.3:
                peers.append("{workload: {namespace: data}}")
            lines.append(f"      to: [{', '.join(peers)}]")
        if rng.random() < 0.6:
            lines.append(f"      ports: [{rng.choice([80, 22, 5432])}, '8000-8100']")
    return "\n".join(lines) + "\n"


def test_the_hook_table_decides_as_the_policy_does():
    """One longest-prefix lookup and the first port match: the same answer
    as PolicySet.decide, over random rule sets and destinations."""
    rng = random.Random(7)
    dests = ["10.1.2.3", "10.1.2.9", "10.1.9.9", "10.200.0.1", "192.168.3.4", "8.8.8.8",
             "fd6d::2", "fd6d::3", "2001:db8::1", "10.244.1.5", "fd6d:1::5", "10.244.1.6"]  # fmt: skip
    known = [WEB, DB, CACHE]
    for _ in range(300):
        rules = parse_text(_random_policy(rng))
        table = egress_table(rules, WEB, known)
        assert table is not None
        for ip in dests:
            peer = next((w for w in known if ip in w.addrs), None)
            for port in (22, 80, 5432, 8050, 9999):
                want = rules.decide(WEB, EGRESS, ip, port, peer=peer)
                allowed, number = lookup(table, ip, port)
                assert allowed == want.allow, (ip, port, want)
                got = rules.rules[number - 1].id if number else "default-deny"
                assert got == want.rule, (ip, port)


def test_ipv4_destinations_never_take_an_ipv6_network():
    rules = parse_text("metadata: {name: r}\nspec:\n  egress:\n"
                       "    - to: [{ipBlock: {cidr: '::/0'}}]\n")  # fmt: skip
    table = egress_table(rules, Workload("any"), [])
    assert lookup(table, "2001:db8::1", 80)[0]
    assert not lookup(table, "10.1.1.1", 80)[0]
    assert ipaddress.ip_network("::ffff:0:0/96") in table


def test_too_many_rules_over_one_address_are_refused():
    body = "".join(f"    - ports: [{p}]\n" for p in range(1, MAX_ENTRIES + 2))
    rules = parse_text("metadata: {name: r}\nspec:\n  egress:\n" + body)
    with pytest.raises(PolicyError, match="at most 16"):
        egress_table(rules, Workload("any"), [])


class FakeMap:
    """A BPF map as the engine uses it, logging every write in order."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self.data = name, log, {}

    def lookup(self, key):
        return self.data.get(key)

    def update(self, key, value):
        self.log.append((self.name, "update", key))
        self.data[key] = value

    def delete(self, key):
        self.log.append((self.name, "delete", key))
        return self.data.pop(key, None) is not None

    def list_keys(self):
        return list(self.data)


class FakeLoaded:
    def __init__(self) -> None:
        self.log: list = []
        self.maps = {n: FakeMap(n, self.log) for n in ("mesh_pol_cidr", "mesh_pol_gen")}

    def map(self, spec):
        return self.maps[spec.name]


def test_a_new_rule_set_is_written_whole_before_the_flip_and_the_old_goes_after():
    from meshagent.bpf import abi
    from meshagent.policy.engine import PolicyEngine

    loaded = FakeLoaded()
    timers: list = []
    engine = PolicyEngine(loaded, call_later=lambda _delay, fn: timers.append(fn))
    engine.pods = lambda: [(WEB, 11), (DB, 22)]
    engine.apply(parse_text(POLICY))
    for fn in timers:
        fn()
    first = engine.gen
    loaded.log.clear()
    timers.clear()
    engine.apply(parse_text(POLICY.replace("10.9.0.0/16", "10.8.0.0/16")))
    flips = [i for i, (m, _op, _k) in enumerate(loaded.log) if m == "mesh_pol_gen"]
    assert len(flips) == 1
    flip = flips[0]
    gen_of = lambda key: abi.POL_KEY.unpack(key)[1]  # noqa: E731
    before, after = loaded.log[:flip], loaded.log[flip + 1 :]
    assert before and all(op == "update" and gen_of(k) == first + 1 for _m, op, k in before)
    assert after == []  # the old generation goes after a grace, not at the flip
    for fn in timers:
        fn()
    gone = [gen_of(k) for _m, op, k in loaded.log if op == "delete"]
    assert gone and set(gone) == {first}
    left = {gen_of(k) for k in loaded.maps["mesh_pol_cidr"].data}
    assert left == {first + 1}


def _object(cidr: str) -> dict:
    return {"apiVersion": "meshagent.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "web-out", "namespace": "shop", "uid": "u1",
                         "resourceVersion": "7"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                     "egress": [{"action": "DENY", "to": [{"ipBlock": {"cidr": cidr}}],
                                 "ports": [22, "8000-8100"]}]}}  # fmt: skip


def test_the_api_servers_objects_are_read_as_a_file_is_and_a_bad_one_keeps_its_last_version():
    from meshagent.policy.engine import PolicyEngine
    from meshagent.policy.model import parse_object

    policy = parse_object(_object("10.9.0.0/16"))
    assert policy.key == "shop/web-out" and policy.egress[0].ports[1].hi == 8100
    with pytest.raises(PolicyError) as err:
        parse_object(_object("10.9.0.0/40"))
    assert str(err.value).startswith("AuthorizationPolicy shop/web-out: ipBlock.cidr")
    engine = PolicyEngine()
    engine.apply(parse_text(POLICY))
    engine.apply_kube([_object("10.9.0.0/16")])
    shop_web = Workload("web", "shop", labels=(("app", "web"),))
    assert not engine.decide_egress(shop_web, "10.9.1.1", 22).allow
    assert len(engine.rules.policies) == 3  # the file's two, the API's one
    engine.apply_kube([_object("10.9.0.0/40")])  # the schema let it through; the agent cannot
    assert engine.refused == 1
    assert not engine.decide_egress(shop_web, "10.9.1.1", 22).allow  # the last good one stays
    engine.apply_kube([])  # deleted
    assert engine.decide_egress(shop_web, "10.9.1.1", 22).allow


def test_a_set_that_cannot_be_put_in_force_leaves_the_one_in_force_whole():
    """Too many ports over one address: refused, and nothing of it kept
    (a later change is not blocked by it)."""
    from meshagent.policy.engine import PolicyEngine

    loaded = FakeLoaded()
    engine = PolicyEngine(loaded, call_later=lambda _d, _fn: None)
    engine.pods = lambda: [(WEB, 11)]
    engine.apply(parse_text(POLICY))
    wide = "".join(f"    - ports: [{p}]\n" for p in range(1, 20))
    with pytest.raises(PolicyError, match="at most 16"):
        engine.apply(parse_text("metadata: {name: wide}\nspec:\n  egress:\n" + wide))
    assert [p.key for p in engine.rules.policies] == ["default/web-out", "data/db-in"]
    assert [p.key for p in engine.file_rules.policies] == ["default/web-out", "data/db-in"]
    assert engine.apply_kube([_object("10.9.0.0/16")]) is not None  # not blocked by it


def test_two_changes_within_the_grace_keep_both_newer_generations_until_their_own_timers():
    from meshagent.bpf import abi
    from meshagent.policy.engine import PolicyEngine

    loaded = FakeLoaded()
    timers: list = []
    engine = PolicyEngine(loaded, call_later=lambda _d, fn: timers.append(fn))
    engine.pods = lambda: [(WEB, 11)]
    for text in (POLICY, POLICY.replace("10.9.", "10.8."), POLICY.replace("10.9.", "10.7.")):
        engine.apply(parse_text(text))
    gens = lambda: {abi.POL_KEY.unpack(k)[1] for k in loaded.maps["mesh_pol_cidr"].data}  # noqa: E731
    assert gens() == {1, 2, 3}
    timers.pop(0)()  # the first flip's (to 1): nothing before 1
    assert gens() == {1, 2, 3}
    timers.pop(0)()  # the second's (to 2): 1 goes; 2 waits for the third's grace
    assert gens() == {2, 3}
    timers.pop(0)()
    assert gens() == {3}
