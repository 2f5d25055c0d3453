"""[S] A crash never passes a cut stream for a whole one: SIGKILL of the
agent in the middle of a long download through each data path, and the
pod's read ends in a reset, never in a clean EOF short of the total
(SO_LINGER {1,0} on both sockets of a forwarded connection, cleared only
for the forwarder's own orderly close). The same download left alone
still ends with a FIN and every byte."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from meshenv import redirect_args, start_agent, wait_for

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
PORT = 9700
MB = 1024 * 1024
TOTAL = 1024 * MB  # at the server's pace, far longer than the test waits
CASES = [("ebpf", None, "copy"), ("ebpf", None, "splice"), ("ebpf", None, "sockmap"),
         ("iptables", "nft", "copy")]  # fmt: skip


def download(env, client, server, total: int):
    """The server in one pod, the fetching client in the other (through the
    agent); returns both processes once the client has its first MiB."""
    srv = env.popen(server, [sys.executable, str(HELPERS / "download.py"), "serve", str(PORT),
                             str(total)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert "listening" in srv.stdout.readline()
    cli = env.popen(client, [sys.executable, str(HELPERS / "download.py"), "fetch", server.ip4,
                             str(PORT), str(MB)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    return srv, cli


def ended(proc) -> dict:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def spliced(agent) -> bool:
    """The download moved off the copy relay: both its sockets are in the sockhash."""
    return sum(agent.request("status")["map_entries"].values()) >= 2


def agent_for(env, case):
    backend, flavour, datapath = case
    return start_agent(env, *redirect_args(backend, flavour), "--datapath", datapath)


@pytest.fixture(params=CASES, ids=lambda c: "-".join(x for x in c if x))
def case(request):
    return request.param


def test_a_killed_agent_resets_the_pods_download(mesh_env, case):
    datapath = case[2]
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    agent = agent_for(mesh_env, case)
    agent.attach(client)
    srv, cli = download(mesh_env, client, server, TOTAL)
    assert cli.stdout.readline().strip() == "started", agent.log()
    assert agent.forwarded() == 1
    if datapath == "sockmap":
        wait_for(lambda: spliced(agent), 30, "the download to move to the sockmap")
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(30)
    out = ended(cli)
    assert out["received"] < TOTAL
    assert out["error"] == "ECONNRESET", f"the pod saw a clean EOF of a cut stream: {out}"
    assert json.loads(srv.communicate(timeout=60)[0].strip().splitlines()[-1])["error"]
    # The next agent takes the pod over; cleanup (the fixture) leaves nothing.
    again = agent_for(mesh_env, case)
    try:
        assert again.request("status")["adopted_pods"] == ["client"], again.log()
    finally:
        assert again.stop() == 0, again.log()


def test_a_download_left_alone_ends_with_a_fin_and_every_byte(mesh_env, case):
    client, server = mesh_env.create_pod("client"), mesh_env.create_pod("server")
    agent = agent_for(mesh_env, case)
    try:
        agent.attach(client)
        srv, cli = download(mesh_env, client, server, 16 * MB)
        assert cli.stdout.readline().strip() == "started", agent.log()
        assert ended(cli) == {"received": 16 * MB, "error": None}
        assert json.loads(srv.communicate(timeout=60)[0].strip().splitlines()[-1]) == {
            "sent": 16 * MB, "error": None}  # fmt: skip
        wait_for(lambda: agent.request("connections")["connections"][0]["state"] == "closed",
                 30, "the connection to end closed, not reset")  # fmt: skip
    finally:
        assert agent.stop() == 0, agent.log()
