"""[I] Upgrade in place: `meshagent run --takeover` receives the running
agent's pods, listeners and live connections; a transfer through each data
path keeps flowing across the switch with identical digests and no reset,
connects made during the switch succeed, and a takeover that fails leaves
the old agent serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshenv import start_agent, wait_for

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
PORT = 9400
# How long each test's traffic runs; the switch comes a quarter in. 12 s
# leaves the successor (about 2 s to answer here, under a running guest)
# well inside the transfer; 30 s cost the suite 3 more minutes.
SECONDS = float(os.environ.get("MESHAGENT_TAKEOVER_SECONDS", "12"))


def traffic(env, client, server, stream: str = "stream"):
    """The stream and the connect loop, started in the client pod."""
    procs = []
    for kind in (stream, "connects"):
        procs.append(env.popen(
            client, [sys.executable, str(HELPERS / "stream.py"), kind, server.ip4, str(PORT),
                     str(SECONDS)], stdout=subprocess.PIPE, text=True,
        ))  # fmt: skip
    return procs


def results(procs) -> tuple[dict, dict]:
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=SECONDS + 90)
        assert proc.returncode == 0, out
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs[0], outs[1]


def answers(agent) -> bool:
    """The agent itself answers on the socket (not its predecessor, not nobody)."""
    from meshagent.errors import MeshError

    if agent.proc.poll() is not None:
        raise AssertionError(f"agent exited {agent.proc.returncode}: {agent.log()}")
    try:
        return agent.request("ping")["pid"] == agent.proc.pid
    except MeshError:
        return False


def echo_server(env, server):
    proc = env.popen(server, [sys.executable, str(HELPERS / "many.py"), "serve", str(PORT)],
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert "listening" in proc.stdout.readline()
    return proc


@pytest.mark.parametrize(
    "backend,datapath",
    [("ebpf", "sockmap"), ("ebpf", "sockmap-tight"), ("ebpf", "splice"), ("ebpf", "copy"),
     ("iptables", "sockmap")],
)  # fmt: skip
def test_a_transfer_keeps_flowing_across_an_upgrade(mesh_env, backend, datapath):
    """sockmap-tight: a 16 KiB back-pressure budget, so the kernel holds the
    stream's bytes back again and again, before, during and after the switch."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    echo_server(mesh_env, server)
    datapath, _, tight = datapath.partition("-")
    args = ("--redirect", backend, "--datapath", datapath)
    if tight:
        args += ("--sockmap-budget", str(16 * 1024))
    old = start_agent(mesh_env, *args)
    old.attach(client)
    procs = traffic(mesh_env, client, server, "stream-slow" if tight else "stream")
    wait_for(lambda: old.pod_status("client")["connections_active"] >= 1, 30, "the stream")
    time.sleep(SECONDS / 4)  # well into the transfer
    if tight:  # held back already when the switch comes
        wait_for(lambda: old.request("status")["datapaths"]["sockmap"]["throttles"] > 0, 30,
                 "the kernel to hold the stream back")  # fmt: skip
    new = start_agent(mesh_env, *args, "--takeover", log_name="new.log")
    try:
        wait_for(lambda: old.proc.poll() is not None, 60, "the old agent to exit")
        assert old.proc.returncode == 0, old.log()
        wait_for(lambda: answers(new), 60, "the new agent to answer")
        took = new.request("status")["took_over"]
        assert took["pods"] == 1 and took["conns"] >= 1, new.log()
        stream, connects = results(procs)
        assert stream["error"] is None, stream
        assert stream["sent"] == stream["received"] > 0
        assert stream["sent_sha"] == stream["recv_sha"]
        assert connects["failed"] == {} and connects["ok"] > 0, connects
        assert "handed over to the successor" in old.log()
        status = new.request("status")
        assert [(p["name"], p["backend"]) for p in status["pods"]] == [("client", backend)]
        assert status["datapath"] == datapath
        wait_for(lambda: new.pod_status("client")["connections_active"] == 0, 30, "idle")
        # New connections after the switch are the new agent's own.
        assert new.pod_status("client")["connections_total"] > took["conns"]
        if tight:  # the new agent went on carrying what the kernel held back
            path = status["datapaths"]["sockmap"]
            assert path["throttles"] > 0 or path["handoff_bytes"] > 0, path
    finally:
        assert new.stop() == 0, new.log()


def test_a_takeover_that_fails_leaves_the_old_agent_serving(mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    echo_server(mesh_env, server)
    old = start_agent(mesh_env)
    try:
        old.attach(client)
        procs = traffic(mesh_env, client, server)
        wait_for(lambda: old.pod_status("client")["connections_active"] >= 1, 30, "the stream")
        mesh_env.extra_env["MESHAGENT_TEST_FAIL_TAKEOVER"] = "1"
        failed = subprocess.run(
            [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel,
             "--takeover"], env=mesh_env.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert failed.returncode == 1
        errors = [ln for ln in failed.stderr.splitlines() if ln.startswith("meshagent: error")]
        assert len(errors) == 1 and "--takeover failed; the running agent serves on" in errors[0]
        stream, connects = results(procs)
        assert stream["error"] is None and stream["sent_sha"] == stream["recv_sha"], stream
        assert connects["failed"] == {} and connects["ok"] > 0, connects
        assert "takeover failed; serving on" in old.log()
        assert old.request("ping")["pid"] == old.proc.pid
    finally:
        assert old.stop() == 0, old.log()


def test_takeover_without_a_running_agent_is_one_line(mesh_env):
    proc = subprocess.run(
        [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel, "--takeover"],
        env=mesh_env.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"meshagent: error: --takeover: no agent runs at {mesh_env.state_dir / 'agent.sock'};"
        " start without it"
    ]


def test_a_successor_killed_before_its_ok_leaves_the_old_agent_answering(mesh_env):
    """[S] The old agent waits for the successor's ok on its loop: while a
    successor that has everything hangs, the old agent answers; once it is
    killed, the old agent serves on and every fd of the handover is closed."""
    from meshagent.client import request

    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    echo_server(mesh_env, server)
    old = start_agent(mesh_env)
    sock = mesh_env.state_dir / "agent.sock"
    try:
        old.attach(client)
        quiet_fds = old.request("status")["open_fds"]
        procs = traffic(mesh_env, client, server)
        wait_for(lambda: old.pod_status("client")["connections_active"] >= 1, 30, "the stream")
        successor = subprocess.Popen(
            [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel,
             "--takeover"], env={**mesh_env.env, "MESHAGENT_TEST_HANG_TAKEOVER": "120"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        mesh_env.procs.append(successor)
        said = []
        for _ in range(200):  # its log lines, up to the hook's (EOF: "")
            said.append(successor.stderr.readline())
            if not said[-1] or "received everything; hanging" in said[-1]:
                break
        assert any("received everything; hanging" in line for line in said), said
        try:
            # The successor holds everything and has not said ok: the old
            # agent's loop still answers (a bound, not a timing).
            assert request(sock, "ping", timeout=10)["pid"] == old.proc.pid
        finally:
            os.kill(successor.pid, signal.SIGKILL)
            successor.wait(timeout=30)
        wait_for(
            lambda: "takeover failed; serving on" in old.log(), 30, "the old agent to roll back"
        )
        assert request(sock, "ping", timeout=10)["pid"] == old.proc.pid
        stream, connects = results(procs)
        assert stream["error"] is None and stream["sent_sha"] == stream["recv_sha"], stream
        assert connects["failed"] == {} and connects["ok"] > 0, connects
        wait_for(lambda: old.pod_status("client")["connections_active"] == 0, 30, "idle")
        wait_for(lambda: old.request("status")["open_fds"] == quiet_fds, 30,
                 f"the old agent's fds back to {quiet_fds}")  # fmt: skip
    finally:
        assert old.stop() == 0, old.log()
