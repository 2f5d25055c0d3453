"""Fail-open: no pod loses connectivity because the agent or a map failed."""

from __future__ import annotations

import json
import subprocess

from meshenv import start_agent, wait_for

PORT = 9100


def cgroup_programs(path) -> list:
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out) if out.strip() else []


def test_killed_agent_leaves_pods_talking_directly_and_restarts_clean(mesh_env):
    """SIGKILL: the pinned hooks stay, but with no listener in the pod the
    connect hook passes (fail open in the kernel); the next agent takes the
    stale socket file and the pod over; `cleanup` detaches every hook."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env)
    agent.attach(client)
    mesh_env.client(client, server.ip4, PORT)
    srv.next()
    assert agent.forwarded() == 1
    hooks = {"mesh_connect4", "mesh_connect6", "mesh_sockops", "mesh_getpeer4", "mesh_getpeer6"}
    assert {p["name"] for p in cgroup_programs(mesh_env.cgroup_path)} == hooks

    agent.proc.kill()
    agent.proc.wait(timeout=30)
    assert {p["name"] for p in cgroup_programs(mesh_env.cgroup_path)} == hooks  # pinned
    mesh_env.client(client, server.ip4, PORT)  # direct: nobody listens on 15001 now
    assert srv.next()["peer"] == client.ip4

    again = start_agent(mesh_env)
    try:
        assert again.request("status")["adopted_pods"] == ["client"]
        mesh_env.client(client, server.ip6, PORT)
        assert srv.next()["peer"] == client.ip6
        assert again.forwarded() == 1
        # One link per hook, updated in place, not a second set beside it.
        assert sorted(p["name"] for p in cgroup_programs(mesh_env.cgroup_path)) == sorted(hooks)
    finally:
        assert again.stop() == 0
    assert not (mesh_env.state_dir / "agent.sock").exists()
    mesh_env.meshagent("cleanup")
    assert not cgroup_programs(mesh_env.cgroup_path)


def test_no_listener_in_the_pod_means_the_connect_goes_direct(mesh_env):
    """The kernel checks for the pod's listener before rewriting: a pod in
    the map without a listener (agent wedged, listener lost) talks directly."""
    from meshagent.bpf import loader
    from meshagent.bpf.programs import PROGRAMS
    from meshagent.config import AgentConfig
    from meshagent.host import netns
    from meshagent.redirect import PodHandle
    from meshagent.redirect.ebpf import EbpfBackend

    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    maps, fds, refused = loader.load_programs(AgentConfig(state_dir=mesh_env.state_dir),
                                              PROGRAMS)  # fmt: skip
    assert not refused
    datapath = loader.attach(fds, maps, mesh_env.cgroup_path)
    try:
        fd = netns.open_fd(client.netns)
        try:
            EbpfBackend(datapath, 15001, (), ()).attach(PodHandle("client", client.netns, fd, 1))
        finally:
            import os

            os.close(fd)
        mesh_env.client(client, server.ip4, PORT)  # connects: nobody listens on 15001
        assert srv.next()["peer"] == client.ip4
        metrics = datapath.metrics()
        assert metrics["no_listener"]["egress"] == 1
        assert "steered" not in metrics
    finally:
        datapath.close()
    assert not cgroup_programs(mesh_env.cgroup_path)


def test_full_map_means_the_connect_goes_direct(mesh_env, tmp_path):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--conns-max", "16")  # room for 8 live connections
    try:
        agent.attach(client)
        go = tmp_path / "go"
        hold = ["--send", "10", "--pause-at", "5", "--wait-file", str(go)]
        held = [
            mesh_env.tcptool(client, "client", "--host", server.ip4, "--port", str(PORT), *hold)
            for _ in range(12)
        ]
        wait_for(
            lambda: sum(agent.decisions().get(k, 0) for k in ("steered", "map_full")) == 12,
            what="12 connects decided",
        )
        go.write_text("")
        results = []
        for proc in held:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            results.append(json.loads(out))
        for _ in held:
            srv.next()
        decisions = agent.decisions()
        assert decisions["steered"] == 8
        assert decisions["map_full"] == 4
        assert agent.forwarded() == 8
        assert all(r["sent_bytes"] == 10 for r in results)
        # Entries leave with their connections: room again.
        wait_for(lambda: agent.request("status")["live_steered"] == 0, what="entries to go")
        mesh_env.client(client, server.ip4, PORT)
        assert agent.forwarded() == 9
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_pod_squatting_the_forwarder_port_is_neither_steered_into_it_nor_kept_out(mesh_env):
    """While no agent runs, a pod binds the forwarder's port itself (its own
    server, or a squatter). The connect hook steers only to the forwarder's
    own listeners (mesh_lsn4/mesh_lsn6), so the pod's connects go direct,
    not into that socket; the next agent attaches the pod on a port the
    kernel picks, and forwards its connects again."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env)
    agent.attach(client)
    agent.proc.kill()
    agent.proc.wait(timeout=30)
    squatter = mesh_env.server(client, 15001)  # 0.0.0.0:15001 (and v6) in the pod
    try:
        mesh_env.client(client, server.ip4, PORT)
        assert srv.next(timeout=10)["peer"] == client.ip4, "steered into the pod's own socket"
        again = start_agent(mesh_env)
        try:
            status = again.request("status")
            assert status["adopted_pods"] == ["client"], again.log()
            (pod,) = status["pods"]
            port = int(pod["listeners"][0].rsplit(":", 1)[1])
            assert port != 15001
            assert "pod listener moved" in again.log()
            mesh_env.client(client, server.ip4, PORT)
            assert srv.next(timeout=10)["peer"] == client.ip4
            mesh_env.client(client, server.ip6, PORT)
            assert srv.next(timeout=10)["peer"] == client.ip6
            assert again.forwarded() == 2
        finally:
            assert again.stop() == 0
    finally:
        squatter.proc.kill()
        squatter.proc.wait(timeout=10)
    assert squatter.lines.get(timeout=5) is None  # it printed nothing: nothing reached it
