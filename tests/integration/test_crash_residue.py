"""[S] What a restart or a crash leaves in the pinned maps is not taken
for live state by the next agent: the in-kernel live-connection counter
is recounted from mesh_orig_tup at start (a recreated per-connection map
left it counting connections nobody decrements; at the limit every
connect on the node went direct, across restarts), and after a SIGKILL
the trace flag and the sockmap path's peer/X/Y entries of the dead
agent's connections are gone."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from meshenv import start_agent, wait_for
from test_takeover import answers

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
PORT = 9710
MB = 1024 * 1024
TOTAL = 1024 * MB  # far longer than the test runs
SOCKMAP = ("--redirect", "ebpf", "--datapath", "sockmap")


def pinned_map(env, spec):
    from meshagent.bpf import syscall as sc
    from meshagent.bpf.pins import Pins

    fd = Pins(env.state_dir).open("maps", spec.name)
    assert fd is not None, f"{spec.name} is not pinned"
    return sc.MapFd(fd, spec)


def set_live(env, value: int) -> None:
    """The drift of the issue: the counter says what the connections do not."""
    from meshagent.bpf import abi

    state = pinned_map(env, abi.STATE)
    try:
        state.update(abi.U32.pack(abi.STATE_TUP_LIVE), abi.U64.pack(value))
    finally:
        state.close()


def download(env, client, server):
    """A steered connection that stays open: (server, client) processes
    once the client has its first MiB."""
    srv = env.popen(server, [sys.executable, str(HELPERS / "download.py"), "serve", str(PORT),
                             str(TOTAL)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert "listening" in srv.stdout.readline()
    cli = env.popen(client, [sys.executable, str(HELPERS / "download.py"), "fetch", server.ip4,
                             str(PORT), str(MB)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert cli.stdout.readline().strip() == "started"
    return srv, cli


def end(*procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def steered_again(env, agent, client, server, port: int) -> None:
    srv = env.server(server, port)
    before = agent.forwarded()
    env.client(client, server.ip4, port)
    srv.next()
    wait_for(lambda: agent.forwarded() == before + 1, 30, "the new connect to be forwarded")


def test_a_wrong_live_counter_is_recounted_by_the_next_agent(mesh_env):
    client, server = mesh_env.create_pod("client"), mesh_env.create_pod("server")
    agent = start_agent(mesh_env, "--redirect", "ebpf")
    agent.attach(client)
    srv, cli = download(mesh_env, client, server)
    try:
        assert agent.request("status")["live_steered"] == 1
        # A counter near the limit (or wrapped below zero by decrements of
        # connections it never counted): the next start must not trust it.
        set_live(mesh_env, (1 << 64) - 1)
        old = agent
        new = start_agent(mesh_env, "--redirect", "ebpf", "--takeover", log_name="new.log")
        agent = new
        wait_for(lambda: old.proc.poll() is not None, 60, "the old agent to exit")
        wait_for(lambda: answers(new), 60, "the new agent to answer")
        assert new.request("status")["live_steered"] == 1, new.log()  # the download, still open
        steered_again(mesh_env, new, client, server, PORT + 1)
    finally:
        end(cli, srv)
        try:
            wait_for(lambda: agent.request("status")["live_steered"] == 0, 30, "the count to 0")
        finally:
            assert agent.stop() == 0, agent.log()
    # The same without a takeover: stopped agent, wrong counter, plain start.
    set_live(mesh_env, 5)
    again = start_agent(mesh_env, "--redirect", "ebpf")
    try:
        assert again.request("status")["live_steered"] == 0, again.log()
        steered_again(mesh_env, again, client, server, PORT + 2)
    finally:
        assert again.stop() == 0, again.log()


def test_a_crash_leaves_no_trace_flag_and_no_sockmap_entries(mesh_env):
    from meshagent.bpf import abi

    client, server = mesh_env.create_pod("client"), mesh_env.create_pod("server")
    agent = start_agent(mesh_env, *SOCKMAP)
    agent.attach(client)
    idle = agent.request("status")["map_entries"]
    tracer = subprocess.Popen(
        [sys.executable, "-m", "meshagent", "trace", "-o", "json"],
        env=mesh_env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    mesh_env.procs.append(tracer)
    srv, cli = download(mesh_env, client, server)
    try:
        wait_for(lambda: agent.request("status")["tracing"], 30, "the trace to start")
        wait_for(lambda: sum(agent.request("status")["map_entries"].values()) >= 2, 30,
                 "the download to move to the sockmap")  # fmt: skip
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(30)
        end(cli, srv, tracer)
        trace = pinned_map(mesh_env, abi.TRACE)
        try:
            assert abi.TRACE_CFG.unpack(trace.lookup(abi.U32.pack(0)))[0] == 1  # the residue
        finally:
            trace.close()
        again = start_agent(mesh_env, *SOCKMAP)
        try:
            status = again.request("status")
            assert status["tracing"] is False
            assert status["map_entries"] == idle, again.log()
            trace = pinned_map(mesh_env, abi.TRACE)
            try:
                assert abi.TRACE_CFG.unpack(trace.lookup(abi.U32.pack(0)))[0] == 0
            finally:
                trace.close()
        finally:
            assert again.stop() == 0, again.log()
    finally:
        end(cli, srv, tracer)
