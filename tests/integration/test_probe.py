"""`meshagent probe`: the hops one real connection took, captured with
scapy inside the pod, joined with the kernel's decision for that socket."""

from __future__ import annotations

import json

from meshenv import start_agent

PORT = 8080


def probe(env, *args: str) -> dict:
    proc = env.meshagent("probe", *args, "-o", "json", timeout=120)
    return json.loads(proc.stdout)


def test_probe_tells_steered_from_direct_and_shows_the_upstream_source(mesh_env):
    client = mesh_env.create_pod("client")
    other = mesh_env.create_pod("other")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    agent = start_agent(mesh_env)
    try:
        agent.attach(client)
        dst = f"{server.ip4}:{PORT}"
        steered = probe(mesh_env, "client", dst)
        assert steered["verdict"] == "steered" and steered["connected"]
        assert steered["peer_seen_by_app"] == dst  # transparent to the application
        assert steered["upstream_syn"], steered
        assert steered["upstream_syn"]["src"].startswith(f"{client.ip4}:")
        assert steered["upstream_syn"]["iface"] == "eth0"
        assert steered["kernel"]["event"] == "steered"
        assert {e["event"] for e in steered["forwarder"]} >= {"forwarded"}
        direct = probe(mesh_env, "other", dst)  # not attached
        assert direct["verdict"] == "direct"
        assert direct["kernel"]["reason"] == "not_attached"
        assert direct["upstream_syn"]["src"].startswith(f"{other.ip4}:")
        assert not [p for p in direct["packets"] if p["dst"].endswith(":15001")]
        v6 = probe(mesh_env, "client", f"[{server.ip6}]:{PORT}")
        assert v6["verdict"] == "steered" and v6["upstream_syn"]["src"].startswith(
            f"[{client.ip6}]:"
        )
        closed = probe(mesh_env, "client", f"{server.ip4}:{PORT + 1}", "--syn")
        assert closed["answer"] == "RST"
        opened = probe(mesh_env, "client", dst, "--syn")
        assert opened["answer"] == "SYN-ACK"
    finally:
        assert agent.stop() == 0, agent.log()


def test_probe_finds_the_listener_on_the_agents_own_port(mesh_env):
    """`run --port` other than the default: a steered connection goes to
    that port, and the probe asks the agent which one it is."""
    mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--port", "15011")
    try:
        agent.attach(mesh_env.store().get("client"))
        result = probe(mesh_env, "client", f"{server.ip4}:{PORT}")
        assert result["verdict"] == "steered", result
        assert result["listener_port"] == 15011
        assert [p for p in result["packets"] if p["dst"].endswith(":15011")]
    finally:
        assert agent.stop() == 0, agent.log()


def test_probe_works_without_an_agent_and_says_direct(mesh_env):
    mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    result = probe(mesh_env, "client", f"{server.ip4}:{PORT}")
    assert result["verdict"] == "direct" and result["kernel"] is None
    bad = mesh_env.meshagent("probe", "client", "nonsense", check=False)
    assert bad.returncode == 1 and "ADDRESS:PORT" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
