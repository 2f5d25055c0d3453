"""Steering through every redirect backend (ebpf; iptables legacy and nft),
against the running kernel.

Each test has its own cgroup, pods and agent (attached at that cgroup only).
"Steered" means the forwarder took the connection (its count went up); with
the ebpf backend the hooks also count each decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from meshenv import TCPTOOL, our_iptables, redirect_args, start_agent, wait_for

PORT = 9100
MB = 1024 * 1024


def through(agent, env, pod, host, port, *args) -> tuple[bool, dict]:
    """Run the client; (was it forwarded, its result). Either way the
    application's getpeername() shows where it connected to (transparency:
    the getpeername hooks with ebpf, conntrack with iptables)."""
    before = agent.forwarded()
    out = env.client(pod, host, port, *args)
    assert out["connected_to"] == f"{host}:{port}", out
    return agent.forwarded() > before, out


@pytest.mark.kernel_matrix
def test_steers_ipv4_and_ipv6_and_server_sees_the_pod(mesh_env, any_agent):
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "1000")
    assert agent.attach(client)["backend"] == agent.backend

    for host, source in ((server.ip4, client.ip4), (server.ip6, client.ip6)):
        forwarded, out = through(agent, mesh_env, client, host, PORT, "--send", "5000")
        assert forwarded
        seen = srv.next()
        assert seen["peer"] == source
        assert seen["recv_sha"] == out["sent_sha"]
        assert out["recv_sha"] == seen["sent_sha"]

    stats = agent.pod_status("client")
    assert stats["backend"] == agent.backend
    assert stats["connections_total"] == 2
    assert stats["bytes_out"] == 10000 and stats["bytes_in"] == 2000
    conns = agent.request("connections")["connections"]
    assert {c["orig_dst"] for c in conns} == {f"{server.ip4}:{PORT}", f"[{server.ip6}]:{PORT}"}
    if agent.backend == "ebpf":
        assert agent.decisions()["steered"] == 2


def test_ten_megabytes_each_way_keep_their_digests(mesh_env, any_agent):
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", str(10 * MB), "--seed", "7")
    agent.attach(client)
    for host in (server.ip4, server.ip6):
        forwarded, out = through(
            agent, mesh_env, client, host, PORT, "--send", str(10 * MB), "--seed", "3"
        )
        seen = srv.next()
        assert forwarded
        assert out["recv_bytes"] == seen["sent_bytes"] == 10 * MB
        assert out["recv_sha"] == seen["sent_sha"]
        assert seen["recv_bytes"] == out["sent_bytes"] == 10 * MB
        assert seen["recv_sha"] == out["sent_sha"]


@pytest.mark.kernel_matrix
def test_root_netns_and_unattached_pod_are_not_steered(mesh_env, any_agent):
    agent = any_agent
    client = mesh_env.create_pod("client")
    other = mesh_env.create_pod("other")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent.attach(client)

    forwarded, _ = through(agent, mesh_env, other, server.ip4, PORT)
    assert not forwarded
    assert srv.next()["peer"] == other.ip4

    # A process of the root netns, inside the attached cgroup: hooks run, no steering.
    host_cg = mesh_env.cgroup_path / "host"
    host_cg.mkdir()

    def join() -> None:
        (host_cg / "cgroup.procs").write_text("0\n")

    proc = subprocess.run(
        [sys.executable, str(TCPTOOL), "client", "--host", server.ip4, "--port", str(PORT)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=join,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{server.ip4}:{PORT}" in proc.stdout
    assert srv.next()["peer"] == mesh_env.node().gateway4

    assert agent.forwarded() == 0
    if agent.backend == "ebpf":
        decisions = agent.decisions()
        assert decisions.get("steered", 0) == 0
        assert decisions["not_attached"] >= 2


def test_excluded_port_and_cidr_are_not_steered(mesh_env, redirect):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    agent = start_agent(
        mesh_env, "--exclude-ports", "9200,9300-9301", "--exclude-cidrs", f"{server.ip4}/32",
        *redirect_args(*redirect),
    )  # fmt: skip
    agent.backend = redirect[0]
    try:
        mesh_env.server(server, PORT)
        mesh_env.server(server, 9301)
        agent.attach(client)
        assert not through(agent, mesh_env, client, server.ip6, 9301)[0]
        assert not through(agent, mesh_env, client, server.ip4, PORT)[0]
        assert through(agent, mesh_env, client, server.ip6, PORT)[0]
        if agent.backend == "ebpf":
            decisions = agent.decisions()
            assert decisions["excluded_port"] == 1
            assert decisions["excluded_cidr"] == 1
            assert decisions["steered"] == 1
    finally:
        assert agent.stop() == 0, agent.log()


def test_forwarder_upstream_is_never_steered_again(mesh_env, any_agent):
    # The agent runs inside the attached cgroup and connects upstream from
    # inside the attached pod: only its socket cookie in mesh_own (ebpf) or
    # the agent's own cgroup (iptables: -m cgroup) keeps it from looping.
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent.attach(client)
    for _ in range(3):
        assert through(agent, mesh_env, client, server.ip4, PORT)[0]
        assert srv.next()["peer"] == client.ip4
    assert agent.pod_status("client")["connections_total"] == 3
    assert agent.pod_status("client")["no_orig_dst"] == 0
    if agent.backend == "ebpf":
        decisions = agent.decisions()
        assert decisions["steered"] == 3
        assert decisions["own_socket"] == 3  # a mark is no longer trusted ([F] 2)


def test_detach_stops_new_steering_while_an_open_connection_finishes(
    mesh_env, any_agent, redirect, tmp_path
):
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", str(2 * MB))
    agent.attach(client)
    go = tmp_path / "go"
    first = mesh_env.tcptool(
        client, "client", "--host", server.ip4, "--port", str(PORT),
        "--send", str(2 * MB), "--pause-at", str(MB), "--wait-file", str(go),
    )  # fmt: skip
    wait_for(
        lambda: agent.pod_status("client")["connections_active"] == 1, what="the open connection"
    )
    if agent.backend == "ebpf":
        entries = agent.request("status")["map_entries"]
        assert entries["mesh_orig_tup"] == 1  # the open connection's original destination
    agent.detach(client)
    assert agent.pod_status("client") is None
    assert not through(agent, mesh_env, client, server.ip4, PORT)[0]
    assert srv.next()["peer"] == client.ip4

    go.write_text("")
    out, _ = first.communicate(timeout=60)
    result = json.loads(out)
    seen = srv.next()
    assert result["recv_bytes"] == 2 * MB and result["recv_sha"] == seen["sent_sha"]
    assert seen["recv_bytes"] == 2 * MB and seen["recv_sha"] == result["sent_sha"]
    if redirect[0] == "iptables":
        # Rules stayed (draining) while the connection was open; now they go.
        wait_for(lambda: not our_iptables(client, redirect[1]), what="the chain to be removed")


def test_server_that_speaks_first(mesh_env, any_agent):
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    banner = "220 mail.example ESMTP ready\r\n"
    srv = mesh_env.server(server, PORT, "--banner", banner)
    agent.attach(client)
    forwarded, out = through(agent, mesh_env, client, server.ip4, PORT)
    assert forwarded
    assert out["recv_bytes"] == len(banner)
    assert out["recv_sha"] == hashlib.sha256(banner.encode()).hexdigest()
    assert srv.next()["peer"] == client.ip4


def test_dual_stack_socket_reaching_ipv4_through_a_mapped_address(mesh_env, any_agent):
    """An AF_INET6 socket connecting to ::ffff:a.b.c.d is steered to the
    IPv4 listener and still sees (and reaches) its IPv4 destination."""
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "300")
    agent.attach(client)
    forwarded, out = through(agent, mesh_env, client, f"::ffff:{server.ip4}", PORT, "--send", "200")
    assert forwarded
    seen = srv.next()
    assert seen["peer"] == client.ip4
    assert seen["recv_sha"] == out["sent_sha"] and out["recv_sha"] == seen["sent_sha"]
    (conn,) = agent.request("connections")["connections"]
    assert conn["orig_dst"] == f"{server.ip4}:{PORT}"


FLAGS_PROBE = r"""
BPF_ARRAY(rtt_samples, u64, 1);
int flags_probe(struct bpf_sock_ops *skops)
{
    u32 zero = 0;
    u64 *count;

    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
    if (skops->op == BPF_SOCK_OPS_RTT_CB) {
        count = rtt_samples.lookup(&zero);
        if (count)
            __sync_fetch_and_add(count, 1);
    }
    return 1;
}
"""


def test_sock_ops_keeps_the_callback_flags_other_programs_set(mesh_env):
    """Another sock_ops program (in the pod's cgroup, so the kernel runs it
    before ours) asks for RTT callbacks on the same connections; ours adds
    its state callback to the flags instead of replacing them, so the
    other program still gets its RTT samples, and ours still sees the close."""
    from bcc import BPF

    from meshagent.bpf import syscall as sc
    from meshagent.host import cgroup

    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env)
    probe = BPF(text=FLAGS_PROBE.encode())
    link = -1
    try:
        agent.attach(client)
        prog = probe.load_func(b"flags_probe", BPF.SOCK_OPS)
        pod_cg = os.open(cgroup.cgroup2_mount() / client.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = sc.link_create(prog.fd, pod_cg, sc.BPF_CGROUP_SOCK_OPS)
        finally:
            os.close(pod_cg)
        out = mesh_env.client(client, server.ip4, PORT, "--send", "200000")
        assert out["sent_sha"] == srv.next()["recv_sha"]
        samples = probe[b"rtt_samples"][0].value
        assert samples > 0, "our sock_ops program cleared the other program's RTT flag"
        wait_for(lambda: agent.request("status")["live_steered"] == 0, 30,
                 "our state callback to see the close")  # fmt: skip
        assert agent.request("status")["decisions"]["closed"]["egress"] >= 1
    finally:
        if link >= 0:
            os.close(link)  # the link's only fd: the program leaves the cgroup
        probe.cleanup()
        assert agent.stop() == 0, agent.log()
