"""[I] A restartable agent: a stopped or crashed agent's pods stay attached
(pinned BPF state, kept rules, STATE_DIR/attached.json) and the next agent
takes them over without a new `attach`; `meshagent cleanup` removes it all."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from meshenv import our_iptables, redirect_args, start_agent, wait_for

PORT = 9300


def pinned(env) -> list[str]:
    from meshagent.bpf.pins import Pins

    pins = Pins(env.state_dir)
    return [f"{kind}/{name}" for kind in ("maps", "progs", "links") for name in pins.names(kind)]


@pytest.mark.kernel_matrix
def test_a_stopped_agent_keeps_its_pods_and_the_next_one_takes_them_over(mesh_env, redirect):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    args = redirect_args(*redirect)
    agent = start_agent(mesh_env, *args)
    agent.attach(client)
    mesh_env.client(client, server.ip4, PORT)
    srv.next()
    assert agent.pod_status("client")["connections_total"] == 1
    assert agent.stop() == 0, agent.log()
    # No agent: the pod's connects go direct (ebpf: no listener, the hook
    # passes; iptables: the leading RETURN), they are not refused.
    out = mesh_env.client(client, server.ip4, PORT)
    assert srv.next()["peer"] == client.ip4 and out["connected_to"].startswith(server.ip4)
    if redirect[0] == "ebpf":
        assert "links/mesh_connect4" in pinned(mesh_env)
    else:
        assert our_iptables(client, redirect[1])  # kept for the next agent
    again = start_agent(mesh_env, *args)
    try:
        status = again.request("status")
        assert status["adopted_pods"] == ["client"], again.log()
        assert again.pod_status("client")["backend"] == redirect[0]
        mesh_env.client(client, server.ip4, PORT)  # no new attach: steered again
        srv.next()
        wait_for(lambda: again.pod_status("client")["connections_total"] == 1, 30,
                 "the adopted pod's connection to be forwarded")  # fmt: skip
    finally:
        assert again.stop() == 0, again.log()


def test_after_a_crash_the_next_agent_takes_the_pods_over(mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env)
    agent.attach(client)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(30)
    again = start_agent(mesh_env)
    try:
        assert again.request("status")["adopted_pods"] == ["client"], again.log()
        mesh_env.client(client, server.ip4, PORT)
        srv.next()
        wait_for(lambda: again.pod_status("client")["connections_total"] == 1, 30, "forwarded")
    finally:
        assert again.stop() == 0, again.log()


def test_pods_deleted_while_no_agent_ran_are_dropped_with_their_entries(mesh_env):
    from meshagent.pods.standalone import delete_pod

    gone = mesh_env.create_pod("gone")
    stays = mesh_env.create_pod("stays")
    agent = start_agent(mesh_env)
    agent.attach(gone)
    agent.attach(stays)
    assert agent.request("status")["backend_state"]["ebpf"]["attached_pods"] == 2
    assert agent.stop() == 0, agent.log()
    delete_pod(mesh_env.store(), "gone")
    again = start_agent(mesh_env)
    try:
        status = again.request("status")
        assert status["adopted_pods"] == ["stays"]
        assert [p["name"] for p in status["pods"]] == ["stays"]
        assert "pod not adopted" in again.log() and "the pod was deleted" in again.log()
        # The deleted pod's netns cookie is out of mesh_pods: one entry left.
        assert status["backend_state"]["ebpf"]["attached_pods"] == 1
        attached = json.loads((mesh_env.state_dir / "attached.json").read_text())["pods"]
        assert list(attached) == ["stays"]
        assert "stale pod entry removed" in again.log()
    finally:
        assert again.stop() == 0, again.log()


@pytest.mark.parametrize("backend", ["ebpf", "iptables"])
def test_cleanup_removes_everything_and_refuses_while_an_agent_runs(mesh_env, backend):
    client = mesh_env.create_pod("client")
    agent = start_agent(mesh_env, "--redirect", backend, *(
        ["--iptables", "legacy"] if backend == "iptables" else []))  # fmt: skip
    agent.attach(client)
    busy = mesh_env.meshagent("cleanup", check=False)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f"meshagent: error: an agent runs with state dir {mesh_env.state_dir}: stop it first"
    ]
    assert agent.stop() == 0, agent.log()
    if backend == "ebpf":
        assert pinned(mesh_env)
    out = mesh_env.meshagent("cleanup", "-o", "json")
    removed = json.loads(out.stdout)["removed"]
    assert pinned(mesh_env) == []
    assert not (mesh_env.state_dir / "attached.json").exists()
    if backend == "iptables":
        assert our_iptables(client, "legacy") == []
        assert any("iptables rules of pod client" in item for item in removed)
    else:
        assert "pinned links/mesh_connect4" in removed
        assert not subprocess.run(["bpftool", "cgroup", "show", str(mesh_env.cgroup_path)],
                                  capture_output=True, text=True).stdout.strip()  # fmt: skip
    again = mesh_env.meshagent("cleanup")
    assert again.stdout.strip() == "nothing to remove"
