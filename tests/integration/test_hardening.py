"""Hostile pods ([F]): what a process inside an attached pod must not be
able to do to the agent or to its own redirect."""

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

PORT = 8080
MB = 1 << 20
SKIP_MARK = "0x4d455348"  # the mark the forwarder used to be trusted by

DIRECT = """
import socket, sys
for host in ("127.0.0.1", "::1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect((host, 15001))
        sock.sendall(b"x" * 100)
        got = sock.recv(1)
    except OSError as exc:
        got = type(exc).__name__
    print(host, got)
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_direct_connection_to_the_listener_is_refused_not_looped(mesh_env, any_agent):
    """SO_ORIGINAL_DST of a direct connect reports the listener itself: the
    forwarder must not connect to itself (two such connects once took the
    agent from 26 to 20,000 fds)."""
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent.attach(client)
    before = open_fds(agent.proc.pid)
    proc = mesh_env.popen(client, [sys.executable, "-c", DIRECT], stdout=-1, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for line in out.splitlines():  # reset or closed, never a conversation
        assert line.split()[1] in ("ConnectionResetError", "b''"), line
    stats = agent.pod_status("client")
    assert stats["refused_loopback"] + stats["no_orig_dst"] == 2, stats
    if agent.backend == "iptables":
        assert stats["refused_loopback"] == 2
    assert stats["connections_total"] == 0
    wait_for(lambda: open_fds(agent.proc.pid) <= before + 4, what="the agent's fds to settle")
    mesh_env.client(client, server.ip4, PORT)  # and real traffic is still forwarded
    assert srv.next()["peer"] == client.ip4
    assert agent.pod_status("client")["connections_total"] == 1


def test_a_pod_that_sets_the_old_skip_mark_is_still_steered(mesh_env):
    """The hooks know the forwarder's own sockets by cookie, not by a mark a
    pod with CAP_NET_ADMIN (or CAP_NET_RAW on 5.17+) can set."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "10")
    agent = start_agent(mesh_env)
    try:
        agent.attach(client)
        out = mesh_env.client(client, server.ip4, PORT, "--mark", SKIP_MARK, "--send", "10")
        seen = srv.next()
        assert seen["peer"] == client.ip4 and seen["recv_sha"] == out["sent_sha"]
        assert agent.forwarded() == 1  # went through the forwarder
        decisions = agent.decisions()
        assert decisions["steered"] == 1
        assert decisions["own_socket"] == 1  # the forwarder's upstream, known by its cookie
        assert "skip_mark" not in decisions
        assert agent.request("status")["map_entries"].get("mesh_orig_tup") is not None
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.parametrize("datapath", ["sockmap", "splice", "copy"])
def test_stopping_the_agent_resets_a_transfer_instead_of_ending_it(mesh_env, datapath, tmp_path):
    """SIGTERM with a download half done: the client must see ECONNRESET,
    never an EOF that passes a cut stream for a whole one."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    go = tmp_path / "go"
    mesh_env.server(server, PORT, "--send", str(4 * MB), "--pause-at", str(MB),
                    "--wait-file", str(go))  # fmt: skip
    agent = start_agent(mesh_env, "--datapath", datapath)
    try:
        agent.attach(client)
        proc = mesh_env.tcptool(client, "client", "--host", server.ip4, "--port", str(PORT))
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 1, what="the transfer")
        wait_for(lambda: agent.pod_status("client")["bytes_in"] >= MB, what="the first MiB")
    finally:
        assert agent.stop() == 0, agent.log()
    go.write_text("")
    out, _ = proc.communicate(timeout=60)
    result = json.loads(out)
    assert result.get("recv_error") == "ConnectionResetError", result
    assert result.get("recv_bytes", 0) < 4 * MB


def test_a_pod_recreated_behind_the_agents_back_is_attached_again(mesh_env, any_agent):
    """The attachment belongs to a network namespace, not a name: a pod
    re-created under the same name is not reported attached while nothing
    steers it, and one whose netns vanished is forgotten."""
    from pyroute2 import netns as pyr_netns

    from meshagent.pods.standalone import delete_pod

    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent.attach(client)
    # Gone and back under the same name, and no one told the agent.
    pyr_netns.remove(client.netns)
    delete_pod(mesh_env.store(), "client")
    client = mesh_env.create_pod("client")
    reply = agent.attach(client)
    assert reply["already"] is False and reply["backend"] == agent.backend
    mesh_env.client(client, server.ip4, PORT)
    assert srv.next()["peer"] == client.ip4
    assert agent.pod_status("client")["connections_total"] == 1
    # Gone for good: the agent notices by itself.
    pyr_netns.remove(client.netns)
    wait_for(lambda: agent.pod_status("client") is None, what="the vanished pod to be forgotten")
    assert "its network namespace vanished" in agent.log()


def hold(env, pod, server, count: int, go) -> list:
    """count connections that send 5 bytes, then wait for the go file."""
    args = ["--send", "10", "--pause-at", "5", "--wait-file", str(go)]
    return [
        env.tcptool(pod, "client", "--host", server.ip4, "--port", str(PORT), *args)
        for _ in range(count)
    ]


def finish(procs, srv, pod) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and json.loads(out)["sent_bytes"] == 10
    for _ in procs:
        seen = srv.next()
        assert seen["peer"] == pod.ip4 and seen["recv_bytes"] == 10


def test_one_pod_cannot_take_more_than_its_share(mesh_env, redirect, tmp_path):
    """--pod-conns-max: beyond it, the pod's new connections wait in its
    listener's backlog on both backends (they used to go direct on ebpf: a
    pod could leave the mesh by opening connections); `status` says why it
    waits; nothing fails, and every one is forwarded once there is room."""
    from meshenv import redirect_args

    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, *redirect_args(*redirect), "--pod-conns-max", "4")
    try:
        agent.attach(client)
        go = tmp_path / "go"
        procs = hold(mesh_env, client, server, 4, go)
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 4, what="4 forwarded")
        # Full: the forwarder stops accepting for the pod at once.
        wait_for(lambda: agent.pod_status("client")["paused"] >= 1, what="the pod to be full")
        direct = agent.decisions().get("not_attached", 0)
        procs += hold(mesh_env, client, server, 3, go)  # they wait in the backlog
        if redirect[0] == "ebpf":
            wait_for(lambda: agent.decisions().get("steered", 0) >= 7, what="7 steered")
            assert agent.decisions().get("not_attached", 0) == direct
        status = agent.pod_status("client")
        assert status["connections_active"] == 4
        assert "--pod-conns-max" in status["waiting"]
        assert "no room for new connections" in agent.log()
        go.write_text("")
        finish(procs, srv, client)
        assert agent.forwarded() == 7
        assert agent.pod_status("client")["waiting"] is None
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 0, what="all closed")
        before = agent.forwarded()
        mesh_env.client(client, server.ip4, PORT)  # steered again
        srv.next()
        assert agent.forwarded() == before + 1
    finally:
        assert agent.stop() == 0, agent.log()


def test_out_of_fds_the_agent_rests_instead_of_spinning(mesh_env, tmp_path):
    """With few fds (splice costs 6 per connection), the forwarder stops
    accepting when its budget is spent (a pod alone may use all of it): the
    pod's extra connections wait, the loop does not spin, the warning is
    not repeated per wakeup, and every byte still arrives."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--datapath", "splice", nofile=160)
    try:
        agent.attach(client)
        status = agent.request("status")
        budget = status["fd_budget"]
        assert budget == 160 - 96
        go = tmp_path / "go"
        fits = budget // 6
        procs = hold(mesh_env, client, server, fits, go)
        wait_for(lambda: agent.pod_status("client")["connections_active"] == fits,
                 what=f"{fits} forwarded")  # fmt: skip
        wait_for(lambda: agent.pod_status("client")["paused"] >= 1, what="the pause")
        direct = agent.decisions().get("not_attached", 0)
        procs += hold(mesh_env, client, server, 4, go)  # no fds left for these: they wait
        wait_for(lambda: agent.decisions().get("steered", 0) >= fits + 4, what="4 more steered")
        assert agent.decisions().get("not_attached", 0) == direct
        assert agent.request("status")["fds_in_use"] == fits * 6
        spun = agent.request("status")["loop_dispatched"]
        time.sleep(1.0)  # a spinning loop would dispatch ~10^5 events here
        assert agent.request("status")["loop_dispatched"] - spun < 200
        assert agent.log().count("no room for new connections") <= 2
        go.write_text("")
        finish(procs, srv, client)
        assert agent.forwarded() == fits + 4
        wait_for(lambda: agent.request("status")["fds_in_use"] == 0, what="fds given back")
    finally:
        assert agent.stop() == 0, agent.log()


FIRE_AND_FORGET = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for _ in range(40):
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"x" * 100)
    sock.close()  # before the forwarder may even have accepted it
"""


def test_a_client_that_sends_and_closes_at_once_loses_nothing(mesh_env, any_agent):
    """A connection whose client is gone before the forwarder accepts it
    must still reach its destination with every byte (its original
    destination must not vanish with the client socket)."""
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent.attach(client)
    # The forwarder is made slow for sure: stopped while the clients connect,
    # send and close (the kernel completes their handshakes in the backlog).
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        proc = mesh_env.popen(client, [sys.executable, "-c", FIRE_AND_FORGET, server.ip4,
                                       str(PORT)])  # fmt: skip
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)  # their sockets reach TCP_CLOSE (sock_ops' close callback)
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    got = [srv.next() for _ in range(40)]
    assert all(seen["recv_bytes"] == 100 and seen["peer"] == client.ip4 for seen in got), got
    stats = agent.pod_status("client")
    assert stats["no_orig_dst"] == 0 and stats["connections_total"] == 40


CONNECT_LOOP = """
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
refused = done = 0
deadline = time.monotonic() + 3
while time.monotonic() < deadline and done < 5000:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        refused += 1
    done += 1
    time.sleep(0.002)  # a steady client, not a flood: no backlog overflows
print(refused, done)
"""


def test_detach_never_refuses_a_connect(mesh_env, any_agent):
    """While a pod is detached, its connects go direct or through the
    forwarder, never into a listener that is closing (the rules go first,
    then the listener; iptables calls take long enough to see it)."""
    agent = any_agent
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    agent.attach(client)
    proc = mesh_env.popen(client, [sys.executable, "-c", CONNECT_LOOP, server.ip4, str(PORT)],
                          stdout=-1, text=True)  # fmt: skip
    time.sleep(1.0)  # connects are flowing (through the forwarder)
    agent.detach(client)
    out, _ = proc.communicate(timeout=60)
    refused, done = map(int, out.split())
    assert done > 50 and refused == 0, out


MANY = Path(__file__).resolve().parent.parent / "helpers" / "many.py"


@pytest.mark.parametrize("datapath,count", [("sockmap", 9000), ("splice", 3000), ("copy", 9000)])
def test_thousands_of_connections_at_once_lose_nothing(mesh_env, datapath, count):
    """As many connections open at once as the fds allow (here 20,000 per
    process: 2 per connection with sockmap, 6 with splice), every byte
    echoed back and checked by digest; afterwards the agent's fds and the
    maps are back to idle."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.popen(server, [sys.executable, str(MANY), "serve", str(PORT)],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert "listening" in srv.stdout.readline()
    agent = start_agent(mesh_env, "--datapath", datapath, "--pod-conns-max", "10000")
    try:
        agent.attach(client)
        idle = open_fds(agent.proc.pid)
        proc = mesh_env.popen(
            client, [sys.executable, str(MANY), "client", server.ip4, str(PORT), str(count),
                     "8192"], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, _ = proc.communicate(timeout=300)
        result = json.loads(out)
        assert result == {"open_at_once": count, "ok": count, "bad": [], "unfinished": 0}
        stats = agent.pod_status("client")
        assert stats["connections_total"] == count and stats["no_orig_dst"] == 0
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 0, 120,
                 "every connection to close")  # fmt: skip
        wait_for(lambda: open_fds(agent.proc.pid) <= idle + 4, 30, "the agent's fds to settle")
        status = agent.request("status")
        wait_for(lambda: not any(agent.request("status")["map_entries"].values()), 30,
                 "the maps to drain")  # fmt: skip
        assert status["fds_in_use"] == 0
    finally:
        assert agent.stop() == 0, agent.log()


def capsh_run(env, keep: tuple[str, ...], *args: str) -> subprocess.Popen:
    """`meshagent run` with every capability but keep dropped (root still),
    in a cgroup of its own as a service or a container would be (the
    iptables rules know its sockets by it)."""
    from meshagent.host import cgroup

    everything = subprocess.run(["capsh", "--print"], capture_output=True, text=True).stdout
    bounding = next(line for line in everything.splitlines() if line.startswith("Bounding set"))
    drop = [cap for cap in bounding.split("=", 1)[1].split(",") if cap not in keep]
    argv = [sys.executable, "-m", "meshagent", "run", "--cgroup", env.cgroup_rel, *args]
    procs = str(cgroup.create(env.cgroup_path / "agent") / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as file:
            file.write("0\n")

    return subprocess.Popen(
        ["capsh", f"--drop={','.join(drop)}", "--", "-c", 'exec "$@"', "meshagent", *argv],
        env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=join,
    )  # fmt: skip


def test_the_agent_needs_two_capabilities_and_names_a_missing_one(mesh_env):
    from meshagent.client import agent_running, request

    client = mesh_env.create_pod("client")
    other = mesh_env.create_pod("other")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = capsh_run(mesh_env, ("cap_sys_admin", "cap_net_admin"))
    mesh_env.procs.append(agent)
    sock = mesh_env.state_dir / "agent.sock"
    try:
        wait_for(lambda: agent.poll() is not None or agent_running(sock), 120, "the agent")
        assert agent.poll() is None, agent.communicate()[1]
        caps = Path(f"/proc/{agent.pid}/status").read_text()
        assert "CapEff:\t0000000000201000" in caps  # cap_sys_admin and cap_net_admin only
        assert request(sock, "attach", pod="client")["backend"] == "ebpf"
        assert request(sock, "attach", pod="other", redirect="iptables")["backend"] == "iptables"
        for pod in (client, other):
            mesh_env.client(pod, server.ip4, PORT)
            assert srv.next()["peer"] == pod.ip4
        assert len(request(sock, "connections")["connections"]) == 2  # both forwarded
    finally:
        agent.terminate()
        assert agent.wait(timeout=30) == 0
    lacking = capsh_run(mesh_env, ("cap_sys_admin",))
    _out, err = lacking.communicate(timeout=60)
    assert lacking.returncode == 1
    assert len(err.strip().splitlines()) == 1 and "lacks cap_net_admin" in err, err


@pytest.mark.parametrize("backend", ["ebpf", "iptables"])
def test_a_connect_to_the_unspecified_address_is_local_and_not_steered(mesh_env, backend):
    """connect() to 0.0.0.0 or :: reaches the pod's own loopback (Linux
    reads it as a local address): local traffic, which neither backend
    steers. The ebpf hooks used to take it for a remote destination and
    send it through the forwarder, which connected back into the pod."""
    client = mesh_env.create_pod("client")
    srv = mesh_env.server(client, PORT, "--send", "10")  # in the pod itself
    agent = start_agent(mesh_env, "--redirect", backend)
    try:
        agent.attach(client)
        for host in ("0.0.0.0", "::"):
            out = mesh_env.client(client, host, PORT, "--send", "10")
            assert srv.next()["recv_sha"] == out["sent_sha"]
        assert agent.forwarded() == 0  # neither went through the forwarder
        if backend == "ebpf":
            assert agent.decisions().get("loopback") == 2, agent.decisions()
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_pod_past_its_fd_share_waits_and_leaves_the_other_pods_theirs(mesh_env, tmp_path):
    """Two pods, 64 fds for forwarded connections (splice: 6 each). Each
    pod is sure of half the budget split between them (16 fds); the rest
    is lent to a pod past its share while any is left. The greedy pod gets
    8 connections and its extra ones wait; the other still gets its own 2
    at once (it used to find no room at all, and went direct)."""
    greedy = mesh_env.create_pod("greedy")
    other = mesh_env.create_pod("other")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--datapath", "splice", nofile=160)
    go = tmp_path / "go"
    procs: list = []
    try:
        agent.attach(greedy)
        agent.attach(other)
        status = agent.request("status")
        assert (status["fd_budget"], status["fd_share"]) == (64, 16)
        procs += hold(mesh_env, greedy, server, 10, go)
        wait_for(lambda: agent.pod_status("greedy")["connections_active"] == 8, what="8 forwarded")
        wait_for(lambda: agent.pod_status("greedy")["waiting"] is not None, what="greedy waits")
        assert "past its share of 16" in agent.pod_status("greedy")["waiting"]
        procs += hold(mesh_env, other, server, 2, go)
        wait_for(lambda: agent.pod_status("other")["connections_active"] == 2, what="other's 2")
        assert agent.pod_status("greedy")["connections_active"] == 8
        assert agent.decisions().get("not_attached", 0) == 0  # nobody went direct
        go.write_text("")
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and json.loads(out)["sent_bytes"] == 10
        for _ in procs:
            srv.next()
        assert agent.forwarded() == 12
    finally:
        go.write_text("")
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert agent.stop() == 0, agent.log()


GREEDY = """
import errno, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held, refused, other = [], 0, 0
for _ in range(count):
    sock = socket.socket()
    try:
        sock.connect((host, port))
        held.append(sock)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EPERM:
            refused += 1
        else:
            other += 1
print(len(held), refused, other, flush=True)
sys.stdin.readline()
"""


def test_a_pod_past_its_share_of_the_connection_map_is_refused_not_sent_direct(mesh_env):
    """--conns-max 256: the map-full check is at 248. A pod that opens 260
    connections used to fill the map, then its connects and every other
    pod's went direct. Now each pod is sure of a share (half the map over
    the attached pods, less a margin: 52 each for two) and may borrow past
    it only while the map is under half full, so the greedy pod gets 128
    and its next connects are refused (EPERM, counted pod_quota, named in
    `status`), and the other pod still gets all it asks for."""
    greedy = mesh_env.create_pod("greedy")
    other = mesh_env.create_pod("other")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--conns-max", "256")
    procs: list = []
    try:
        agent.attach(greedy)
        agent.attach(other)
        shares = agent.request("status")["backend_state"]["ebpf"]["pod_shares"]
        assert shares["greedy"]["share"] == shares["other"]["share"] == 52
        for pod, count in ((greedy, 260), (other, 40)):
            proc = mesh_env.popen(pod, [sys.executable, "-c", GREEDY, server.ip4, str(PORT),
                                        str(count)], stdin=-1, stdout=-1, text=True)  # fmt: skip
            procs.append(proc)
            held, refused, failed = map(int, proc.stdout.readline().split())
            if pod is greedy:
                assert (held, refused, failed) == (128, 132, 0)
            else:
                assert (held, refused, failed) == (40, 0, 0)
        decisions = agent.decisions()
        assert decisions.get("pod_quota") == 132
        assert decisions.get("map_full", 0) == 0  # nobody went direct for want of room
        wait_for(lambda: agent.pod_status("other")["connections_active"] == 40, what="other's 40")
        state = agent.request("status")["backend_state"]["ebpf"]
        assert state["over_share"] == ["greedy"], state
        assert state["pod_shares"]["greedy"]["live"] == 128
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0, agent.log()
