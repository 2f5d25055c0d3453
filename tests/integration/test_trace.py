"""`meshagent trace` against real connections: the kernel's decision for
each connect (steered, or passed with its reason), the forwarder's view for
every backend, JSON lines that parse, and a trace flag that never outlives
the tracer, even one killed with SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from meshenv import redirect_args, start_agent, wait_for

PORT = 8080
LOOPBACK_CONNECT = "import socket; socket.socket().connect_ex(('127.0.0.1', 1))"


def start_trace(env, *args: str) -> subprocess.Popen:
    """The tracer, stopped by SIGINT as a user's Ctrl-C stops it: with SIGINT
    at its default even when this suite runs where it is ignored (a
    background job of a script: Python then leaves Ctrl-C ignored and the
    tracer never stops)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshagent", "trace", "-o", "json", *args],
        env=env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    env.procs.append(proc)
    return proc


@pytest.mark.kernel_matrix
def test_trace_shows_each_decision_and_each_connection(mesh_env, redirect):
    client = mesh_env.create_pod("client")
    other = mesh_env.create_pod("other")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "300")
    agent = start_agent(mesh_env, *redirect_args(*redirect))
    try:
        agent.attach(client)
        agent.attach(other)
        tracer = start_trace(mesh_env, "--pod", "client")
        events: list[dict] = []  # as the tracer prints them (no window to outlast)
        reader = threading.Thread(
            target=lambda: events.extend(json.loads(line) for line in tracer.stdout), daemon=True
        )
        reader.start()
        wait_for(lambda: agent.request("status")["tracing"], what="the trace to start")
        mesh_env.client(client, server.ip4, PORT, "--send", "700")
        srv.next()
        mesh_env.client(other, server.ip4, PORT)  # filtered out: another pod
        srv.next()
        loop = mesh_env.popen(client, [sys.executable, "-c", LOOPBACK_CONNECT])
        loop.wait(timeout=30)

        def seen_all() -> bool:
            closed = any(e["source"] == "forwarder" and e["event"] == "closed" for e in events)
            loopback = any(e.get("reason") == "loopback" for e in events)
            return closed and (loopback or redirect[0] != "ebpf")

        wait_for(seen_all, 60, "the trace to show the connection and the loopback connect")
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=60)
        reader.join(timeout=30)
        assert tracer.returncode in (0, 130), tracer.stderr.read()
    finally:
        assert agent.stop() == 0, agent.log()
    assert events and all(e["pod"] in ("client", None) for e in events), events
    dst = f"{server.ip4}:{PORT}"
    closed = [e for e in events if e["source"] == "forwarder" and e["event"] == "closed"]
    assert len(closed) == 1, events
    assert closed[0]["orig_dst"] == dst and closed[0]["pod"] == "client"
    assert (closed[0]["bytes_out"], closed[0]["bytes_in"]) == (700, 300)
    assert closed[0]["closed_by"] in ("pod", "upstream") and closed[0]["seconds"] >= 0
    assert "handoff_bytes" in closed[0]
    assert any(e["event"] == "forwarded" and e["orig_dst"] == dst for e in events)
    kernel = [e for e in events if e["source"] == "kernel"]
    if redirect[0] == "ebpf":
        steered = [e for e in kernel if e["event"] == "steered"]
        assert [e["orig_dst"] for e in steered] == [dst]
        assert steered[0]["pod"] == "client"
        passed = {e["reason"] for e in kernel if e["event"] == "passed"}
        assert {"loopback", "own_socket"} <= passed, kernel
        assert any(e["event"] == "established" and e["orig_dst"] == dst for e in kernel)
    else:  # the iptables pod's connects never reach the connect hooks as attached
        assert not [e for e in kernel if e["event"] == "steered"]


def test_the_trace_flag_is_cleared_when_the_tracer_is_killed(mesh_env):
    agent = start_agent(mesh_env)
    try:
        tracer = start_trace(mesh_env)
        wait_for(lambda: agent.request("status")["tracing"], what="the trace to start")
        second = subprocess.run(
            [sys.executable, "-m", "meshagent", "trace", "--seconds", "1"],
            env=mesh_env.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 1 and "a trace already runs" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        tracer.send_signal(signal.SIGKILL)
        tracer.wait(timeout=30)
        wait_for(lambda: not agent.request("status")["tracing"], what="the flag to clear")
        assert "trace ended" in agent.log()
        # And a new trace may start.
        again = start_trace(mesh_env, "--seconds", "1")
        time.sleep(0.2)
        assert again.wait(timeout=60) == 0
    finally:
        assert agent.stop() == 0, agent.log()


KIB = 1024
BULK = 8 << 20  # far past the budget: the kernel holds the server's bytes back many times


def forwarder(events: list[dict], kind: str) -> list[dict]:
    """The forwarder's events of one kind, so far (a copy: the reader appends)."""
    return [e for e in list(events) if e["source"] == "forwarder" and e["event"] == kind]


def test_trace_shows_the_kernel_holding_a_connection_back(mesh_env):
    """With a 16 KiB budget, the server's 8 MiB to a client pod are held back
    by the sk_skb verdict (and carried by Python within the budget): the
    trace says so, for that pod, and every byte still arrives in order.
    A connection moves to the sockmap only after 64 KiB and before either
    side's EOF, so the client sends 64 KiB, then holds its half open (no
    FIN) until the test has seen the event; the server's FIN comes only
    after its 8 MiB."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", str(BULK))
    agent = start_agent(mesh_env, "--datapath", "sockmap", "--sockmap-budget", str(16 * KIB))
    go = mesh_env.state_dir / "go"
    try:
        agent.attach(client)
        tracer = start_trace(mesh_env, "--pod", "client")
        events: list[dict] = []
        reader = threading.Thread(
            target=lambda: events.extend(json.loads(line) for line in tracer.stdout), daemon=True
        )
        reader.start()
        wait_for(lambda: agent.request("status")["tracing"], what="the trace to start")
        cli = mesh_env.tcptool(
            client, "client", "--host", server.ip4, "--port", str(PORT),
            "--send", str(128 * KIB), "--pause-at", str(64 * KIB), "--wait-file", str(go),
        )  # fmt: skip
        try:
            wait_for(lambda: forwarder(events, "throttled"), 60, "a throttled event in the trace")
        except AssertionError as exc:  # say what the agent saw
            status = agent.request("status")
            raise AssertionError(
                f"{exc}: sockmap {status['datapaths']['sockmap']};"
                f" decisions {status['decisions']}; events {events}"
            ) from None
        go.write_text("")  # the client's second half, then its FIN
        out, _ = cli.communicate(timeout=60)
        assert cli.returncode == 0, out
        got, sent = json.loads(out.strip().splitlines()[-1]), srv.next()
        wait_for(lambda: forwarder(events, "closed"), 60, "the connection's end in the trace")
        status = agent.request("status")
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=60)
        reader.join(timeout=30)
        assert tracer.returncode in (0, 130), tracer.stderr.read()
    finally:
        go.touch()  # a client still waiting goes on (it would wait 60 s at most)
        assert agent.stop() == 0, agent.log()
    assert (got["recv_bytes"], got["recv_sha"]) == (BULK, sent["sent_sha"])  # intact, in order
    assert (sent["recv_bytes"], sent["recv_sha"]) == (128 * KIB, got["sent_sha"])
    held, (closed,) = forwarder(events, "throttled"), forwarder(events, "closed")
    dst = f"{server.ip4}:{PORT}"
    assert {(e["pod"], e["orig_dst"], e["reason"], e["datapath"]) for e in held} == {
        ("client", dst, "budget", "sockmap")
    }, held
    assert held[0]["client"] == closed["client"]  # the same connection
    assert closed["datapath"] == "sockmap"
    path = status["datapaths"]["sockmap"]
    assert path["budget_bytes"] == 16 * KIB and path["throttles"] >= len(held), path
    assert status["decisions"]["throttled"]["egress"] > 0, status["decisions"]
