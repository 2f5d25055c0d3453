"""[S] The control socket checks who is asking: a root process without
capabilities (a monitoring DaemonSet with /run mounted) may read (ping,
status, connections) and nothing more; above all it cannot be handed the
pods' listeners and connections."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from meshenv import start_agent

# Runs as uid 0 with every capability dropped (effective, permitted, bounding):
# sends one request line and prints the reply and how many fds came with it.
ASK = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(20)
sock.connect(sys.argv[1])
sock.sendall(sys.argv[2].encode() + b"\n")
data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
while not data.endswith(b"\n"):
    more = sock.recv(65536)
    if not more:
        break
    data += more
print(json.dumps({"reply": json.loads(data), "fds": len(fds)}))
"""


def ask_without_caps(path, request: dict) -> dict:
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", sys.executable, "-c", ASK,
         str(path), json.dumps(request)], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def agent(mesh_env):
    mesh_env.create_pod("client")
    agent = start_agent(mesh_env)
    try:
        yield agent
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_root_process_without_capabilities_cannot_take_the_pods(agent, mesh_env):
    path = mesh_env.state_dir / "agent.sock"
    got = ask_without_caps(path, {"op": "handover"})
    assert got["fds"] == 0, f"a process without capabilities was handed the pods: {got}"
    reply = got["reply"]
    assert reply["ok"] is False and "cap_net_admin or cap_sys_admin" in reply["error"], reply
    assert agent.request("ping")["pid"] == agent.proc.pid  # still serving
    assert "handed over" not in agent.log()


@pytest.mark.parametrize(
    "request_",
    [{"op": "attach", "pod": "client"}, {"op": "detach", "pod": "client"}, {"op": "trace"},
     {"op": "datapath", "set": "copy"}, {"op": "cni-del", "pod": "default/x"}],
)  # fmt: skip
def test_changes_need_a_capability(agent, mesh_env, request_):
    reply = ask_without_caps(mesh_env.state_dir / "agent.sock", request_)["reply"]
    assert reply["ok"] is False, reply
    assert reply["error"].startswith(f"{request_['op']}: refused"), reply
    assert "cap_net_admin or cap_sys_admin" in reply["error"], reply
    assert agent.request("status")["pods"] == []


def test_reading_needs_only_root(agent, mesh_env):
    path = mesh_env.state_dir / "agent.sock"
    assert ask_without_caps(path, {"op": "ping"})["reply"]["pid"] == agent.proc.pid
    assert ask_without_caps(path, {"op": "status"})["reply"]["ok"] is True
    assert ask_without_caps(path, {"op": "connections"})["reply"]["ok"] is True
    assert ask_without_caps(path, {"op": "datapath"})["reply"]["ok"] is True


def test_a_handover_needs_the_successor_lock(agent, mesh_env):
    """Capabilities alone are not enough: only a process that holds the
    successor lock (which `run --takeover` takes) is handed the pods."""
    from meshagent.client import request_with_fds
    from meshagent.errors import MeshError

    with pytest.raises(MeshError, match=r"successor\.lock"):
        sock, _reply, fds, _rest = request_with_fds(mesh_env.state_dir / "agent.sock",
                                                    {"op": "handover"})  # fmt: skip
        sock.close()
        for fd in fds:
            os.close(fd)
    assert agent.request("ping")["pid"] == agent.proc.pid


def ask_with(path, request: dict, caps: str, own_netns: bool) -> dict:
    """As root with only `caps` (e.g. "+net_admin"), in a network namespace
    of its own or in the agent's."""
    cmd = ["setpriv", "--bounding-set", f"-all,{caps}", "--inh-caps", "-all", sys.executable,
           "-c", ASK, str(path), json.dumps(request)]  # fmt: skip
    if own_netns:
        cmd = ["unshare", "--net", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["reply"]


def test_net_admin_alone_counts_only_in_the_agents_netns(agent, mesh_env):
    """A pod's container granted NET_ADMIN in its own netns is no node
    administrator; with cap_sys_admin (the container runtime running the CNI
    plugin) the netns does not matter."""
    path = mesh_env.state_dir / "agent.sock"
    detach = {"op": "detach", "pod": "client"}
    elsewhere = ask_with(path, detach, "+net_admin", own_netns=True)
    assert (
        elsewhere["ok"] is False and "not in the agent's network namespace" in (elsewhere["error"])
    ), elsewhere
    here = ask_with(path, detach, "+net_admin", own_netns=False)
    assert here["ok"] is False and "is not attached" in here["error"], here  # not refused
    runtime = ask_with(path, detach, "+sys_admin", own_netns=True)
    assert runtime["ok"] is False and "is not attached" in runtime["error"], runtime
