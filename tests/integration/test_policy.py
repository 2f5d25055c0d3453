"""L4 authorization policy against the kernel: the connect hook refuses with
EPERM (eBPF pods), the forwarder resets (iptables pods), reloads apply whole
to new connections only, and the rules hold while no agent runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from meshenv import redirect_args, start_agent, wait_for

A, B = 18080, 18090  # the server's two ports

# Connect to each HOST:PORT and read: "ok", or the errno's name.
PROBE = r"""
import errno, json, socket, sys
out = []
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(10)
    try:
        s.connect((host, int(port)))
        out.append("ok" if s.recv(100) else "closed")
    except OSError as exc:
        out.append(errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno
                   else type(exc).__name__)
    finally:
        s.close()
print(json.dumps(out))
"""


def probe(env, pod, *targets: str) -> list[str]:
    return json.loads(env.script(pod, PROBE, *targets).strip().splitlines()[-1])


def ep(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def policy_text(server, deny_b: bool = True) -> str:
    """client: DENY the server's port B (IPv4), ALLOW port A on both of the
    server's addresses; anything else: the default deny."""
    deny = (
        f"""
    - action: DENY
      to: [{{ipBlock: {{cidr: {server.ip4}/32}}}}]
      ports: [{B}]"""
        if deny_b
        else ""
    )
    return f"""apiVersion: meshagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: client-out}}
spec:
  selector: {{pods: [client]}}
  egress:{deny}
    - action: ALLOW
      to:
        - ipBlock: {{cidr: {server.ip4}/32}}
        - ipBlock: {{cidr: "{server.ip6}/128"}}
      ports: [{A}]
"""


def write(env, name: str, text: str):
    env.state_dir.mkdir(parents=True, exist_ok=True)
    path = env.state_dir / name  # goes with the sandbox
    path.write_text(text)
    return path


@pytest.fixture
def servers(mesh_env):
    server = mesh_env.create_pod("server")
    for port in (A, B):
        mesh_env.server(server, port, "--send", "100")
    return server


def answers(agent) -> bool:
    from meshagent.errors import MeshError

    try:
        return bool(agent.request("ping"))
    except MeshError:
        return False


def expected(backend: str) -> str:
    """How a denied connect shows: EPERM from the hook; a reset from the
    forwarder for an iptables pod (its connect() completed already)."""
    return "EPERM" if backend == "ebpf" else "ECONNRESET"


@pytest.mark.kernel_matrix
def test_egress_by_cidr_and_port_both_families(mesh_env, redirect, servers):
    server = servers
    client = mesh_env.create_pod("client")
    other = mesh_env.create_pod("other")
    path = write(mesh_env, "policy.yaml", policy_text(server))
    agent = start_agent(mesh_env, "--policy", str(path), *redirect_args(*redirect))
    try:
        agent.attach(client)
        agent.attach(other)
        denied = expected(redirect[0])
        tracer, seen = agent.trace("client")
        got = probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B), ep(server.ip6, A),
                    ep(server.ip6, B))  # fmt: skip
        assert got == ["ok", denied, "ok", denied]
        # The trace names the rule (the hook's, or the forwarder's re-check).
        kind = "denied" if redirect[0] == "ebpf" else "refused"
        wait_for(lambda: len([e for e in seen if e["event"] == kind]) >= 2, 30, "denials in trace")
        rules = sorted(e["rule"] for e in seen if e["event"] == kind)
        assert rules[0] == "default-deny" and rules[1].startswith("default/client-out/egress[0]")
        tracer.terminate()
        # A pod no policy selects: allowed everything.
        assert probe(mesh_env, other, ep(server.ip4, B), ep(server.ip6, B)) == ["ok", "ok"]
        if redirect[0] == "ebpf":
            assert agent.decisions()["denied_policy"] == 2
        pods = {p["name"]: p for p in agent.request("status")["pods"]}
        if redirect[0] != "ebpf":  # the forwarder's re-check
            assert pods["client"]["denied_policy"] == 2, pods["client"]
        check = mesh_env.meshagent("policy", "check", "client", ep(server.ip4, B), "-o", "json")
        verdict = json.loads(check.stdout)
        assert (verdict["verdict"], verdict["rule"]) == ("deny", "default/client-out/egress[0]")
        check = mesh_env.meshagent("policy", "check", "client", ep(server.ip6, B), "-o", "json")
        assert json.loads(check.stdout)["rule"] == "default-deny"
        check = mesh_env.meshagent("policy", "check", "other", ep(server.ip6, B))
        assert check.stdout.startswith("allow:"), check.stdout
    finally:
        assert agent.stop() == 0, agent.log()


def test_pods_and_peers_by_labels_and_a_new_pod_joins_the_rules(mesh_env):
    """app=web may reach pods labelled tier=db on port A, nothing else. A
    second db pod made after the rules were written (`pod create` does not
    tell the agent) joins them when it is attached."""
    web = mesh_env.create_pod("web", labels={"app": "web"})
    db = mesh_env.create_pod("db", labels={"tier": "db"})
    cache = mesh_env.create_pod("cache", labels={"tier": "cache"})
    for pod in (db, cache):
        mesh_env.server(pod, A, "--send", "100")
    text = f"""metadata: {{name: web-out}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  egress:
    - to: [{{workload: {{matchLabels: {{tier: db}}}}}}]
      ports: [{A}]
"""
    agent = start_agent(mesh_env, "--policy", str(write(mesh_env, "labels.yaml", text)))
    try:
        agent.attach(web)
        got = probe(mesh_env, web, ep(db.ip4, A), ep(db.ip6, A), ep(cache.ip4, A))
        assert got == ["ok", "ok", "EPERM"]
        db2 = mesh_env.create_pod("db2", labels={"tier": "db"})
        mesh_env.server(db2, A, "--send", "100")
        assert probe(mesh_env, web, ep(db2.ip4, A)) == ["EPERM"]  # the tables predate it
        agent.attach(db2)  # the agent learns of it: web's tables are made again
        assert probe(mesh_env, web, ep(db2.ip4, A)) == ["ok"]
    finally:
        assert agent.stop() == 0, agent.log()


def with_policy(env, server, *extra: str):
    """Pod client, and an agent with policy_text(server) from a file (and
    extra arguments): (the pod, the file, the agent)."""
    client = env.create_pod("client")
    path = write(env, "policy.yaml", policy_text(server))
    return client, path, start_agent(env, "--policy", str(path), *extra)


def test_a_reload_changes_new_connects_only_and_a_bad_file_changes_nothing(mesh_env, servers):
    server = servers
    client, path, agent = with_policy(mesh_env, server)
    held = None
    try:
        agent.attach(client)
        assert probe(mesh_env, client, ep(server.ip4, B)) == ["EPERM"]
        # A connection open before the change: it stays (it sends after).
        held = mesh_env.popen(client, [sys.executable, "-c", HOLD, server.ip4, str(A)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert held.stdout.readline().strip() == "connected"
        # A malformed file: refused with its line; the rules in force stay.
        bad = write(mesh_env, "bad.yaml", policy_text(server).replace("ALLOW", "PERMIT"))
        out = mesh_env.meshagent("policy", "apply", str(bad), check=False)
        assert out.returncode == 1
        assert "bad.yaml line 10" in out.stderr and "ALLOW or DENY" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert probe(mesh_env, client, ep(server.ip4, B)) == ["EPERM"]
        # `policy apply`: B allowed, A now denied (by the default deny).
        flipped = policy_text(server, deny_b=False).replace(str(A), str(B))
        applied = mesh_env.meshagent("policy", "apply", str(write(mesh_env, "p2.yaml", flipped)),
                                     "-o", "json")  # fmt: skip
        assert json.loads(applied.stdout)["version"] == 2
        assert probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B)) == ["EPERM", "ok"]
        held.stdin.write("more\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "still open"
        # SIGHUP: the --policy file again (rewritten: A and B both allowed).
        path.write_text(policy_text(server, deny_b=False).replace(f"[{A}]", f"[{A}, {B}]"))
        os.kill(agent.proc.pid, signal.SIGHUP)
        for _ in range(100):
            if agent.request("policy", action="show")["version"] == 3:
                break
            time.sleep(0.1)
        assert probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B)) == ["ok", "ok"]
        # A bad file on SIGHUP: logged, refused, the rules stay.
        path.write_text("spec: [")
        os.kill(agent.proc.pid, signal.SIGHUP)
        for _ in range(100):
            if agent.request("policy", action="show")["refused"] >= 1:
                break
            time.sleep(0.1)
        shown = agent.request("policy", action="show")
        assert (shown["version"], shown["refused"]) == (3, 1)
        assert probe(mesh_env, client, ep(server.ip4, B)) == ["ok"]
    finally:
        if held is not None:
            held.kill()
            held.wait()
        assert agent.stop() == 0, agent.log()


HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
assert s.recv(100)
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"x" * 1000)
print("still open", flush=True)
sys.stdin.readline()
"""

# Connects to B, then A, for a while: a pair of "1" (allowed) or "0" (refused).
STREAM = r"""
import socket, sys, time
host, b, a, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
pairs, end = [], time.monotonic() + seconds
while time.monotonic() < end and len(pairs) < 100000:
    pair = ""
    for port in (b, a):
        s = socket.socket()
        try:
            s.connect((host, port))
            pair += "1"
        except PermissionError:
            pair += "0"
        finally:
            s.close()
    pairs.append(pair)
print(" ".join(pairs))
"""


def test_connects_through_a_reload_never_see_half_a_rule_set(mesh_env, servers):
    """Each rule set is in force whole. Before: A allowed, B denied; after:
    B allowed, A denied (and 2,000 more rules, so that writing them takes a
    while). Connecting to B then A over and over gives "01" pairs, then
    "10" ones, with at most one "00" between (B before the change, A
    after). "11" would be a connect that found no rules of either set (the
    hook allows a pod with no entry), a reversal a set not whole."""
    server = servers
    client = mesh_env.create_pod("client")
    head = "apiVersion: meshagent.io/v1alpha1\nmetadata: {name: c}\n"
    head += "spec:\n  selector: {pods: [client]}\n  egress:\n"
    before = write(mesh_env, "before.yaml", head + f"    - ports: [{A}]\n")
    agent = start_agent(mesh_env, "--policy", str(before))
    try:
        agent.attach(client)
        many = "".join(f"    - to: [{{ipBlock: {{cidr: 10.{i // 250}.{i % 250}.0/24}}}}]\n"
                       "      ports: [443]\n" for i in range(2000))  # fmt: skip
        after = write(mesh_env, "after.yaml", head + many + f"    - ports: [{B}]\n")
        stream = mesh_env.popen(client, [sys.executable, "-c", STREAM, server.ip4, str(B), str(A),
                                         "10"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(2)
        mesh_env.meshagent("policy", "apply", str(after))
        out, _ = stream.communicate(timeout=60)
        pairs = out.split()
        assert pairs[0] == "01" and pairs[-1] == "10", (pairs[:3], pairs[-3:])
        first = next(i for i, p in enumerate(pairs) if p != "01")
        middle = pairs[first : first + 1] if pairs[first] == "00" else []
        rest = pairs[first + len(middle) :]
        assert set(rest) == {"10"}, f"not whole: {pairs[max(0, first - 3) : first + 8]}"
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.kernel_matrix
def test_the_rules_hold_while_no_agent_runs_after_a_restart_and_a_takeover(mesh_env, servers):
    """The connect hook's (eBPF pods'): an iptables pod's policy is the
    forwarder's, not checked while no agent runs (docs/policy.md). Where the
    kernel has no eBPF backend (5.10), skipped with the plan's reason."""
    server = servers
    ebpf = ("--redirect", "ebpf")
    client, path, agent = with_policy(mesh_env, server, *ebpf)
    try:
        agent.attach(client)
        assert probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B)) == ["ok", "EPERM"]
    finally:
        assert agent.stop() == 0, agent.log()
    # No agent: connects go direct (fail open), but a denied one stays denied.
    assert probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B)) == ["ok", "EPERM"]
    agent = start_agent(mesh_env, "--policy", str(path), *ebpf)
    try:
        assert probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B)) == ["ok", "EPERM"]
        assert agent.forwarded() >= 1
        # A takeover (an upgrade in place): the successor's rules, at once.
        new = start_agent(mesh_env, "--policy", str(path), "--takeover", *ebpf,
                          log_name="new.log")  # fmt: skip
        wait_for(lambda: agent.proc.poll() is not None, 60, "the old agent to exit")
        assert agent.proc.returncode == 0, agent.log()
        agent = new
        wait_for(lambda: answers(agent), 60, "the new agent to answer")
        assert probe(mesh_env, client, ep(server.ip4, A), ep(server.ip4, B)) == ["ok", "EPERM"]
        assert agent.request("policy", action="show")["policies"] == ["default/client-out"]
    finally:
        assert agent.stop() == 0, agent.log()
    # Without --policy the next agent governs nothing.
    agent = start_agent(mesh_env, *ebpf)
    try:
        assert probe(mesh_env, client, ep(server.ip4, B)) == ["ok"]
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_bad_policy_file_stops_the_agent_at_start(mesh_env):
    path = write(mesh_env, "bad.yaml", "metadata: {name: x}\nspec:\n  egress:\n    - ports: [0]\n")
    out = mesh_env.meshagent("run", "--cgroup", mesh_env.cgroup_rel, "--policy", str(path),
                             check=False, timeout=60)  # fmt: skip
    assert out.returncode != 0
    assert "bad.yaml line 4" in out.stderr and "1-65535" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_across_nodes_the_destination_checks_the_source_identity(mesh_nodes):
    """node-b's policy lets only pod good of node-a reach the server: pod
    bad's hop is refused at node-b (NO denied_policy), counted there, and
    its connection reset; `policy check --from` says the same."""
    env_a, env_b = mesh_nodes.envs
    server = env_b.create_pod("server")
    env_b.server(server, A, "--send", "100")
    text = f"""metadata: {{name: server-in}}
spec:
  selector: {{pods: [server]}}
  ingress:
    - from: [{{workload: {{pod: good}}}}]
      ports: [{A}]
"""
    a = mesh_nodes.start(0)
    b = mesh_nodes.start(1, "--policy", str(write(env_b, "in.yaml", text)))
    good, bad = env_a.create_pod("good"), env_a.create_pod("bad")
    a.attach(good)
    a.attach(bad)
    b.attach(server)
    wait_for(lambda: (b.pod_status("server") or {}).get("mesh", {}).get("inbound"),
             what="the server pod's hop listener")  # fmt: skip
    assert probe(env_a, good, ep(server.ip4, A)) == ["ok"]
    assert probe(env_a, bad, ep(server.ip4, A), ep(server.ip6, A)) in (
        ["ECONNRESET", "ECONNRESET"], ["closed", "closed"], ["ECONNRESET", "closed"],
        ["closed", "ECONNRESET"],
    )  # fmt: skip
    status = b.request("status")
    assert status["mesh"]["handshakes"].get("in denied_policy") == 2, status["mesh"]["handshakes"]
    pods = {p["name"]: p for p in status["pods"]}
    assert pods["server"]["denied_policy"] == 2
    domain = b.request("status")["mesh"]["trust_domain"]
    for pod, verdict in ((bad, "deny"), (good, "allow")):
        out = env_b.meshagent("policy", "check", "server", ep(pod.ip4, A), "--from",
                              f"spiffe://{domain}/node/node-a/pod/{pod.name}", "-o", "json")  # fmt: skip
        assert json.loads(out.stdout)["verdict"] == verdict
