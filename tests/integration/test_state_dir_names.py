"""[S] A state dir whose name the bpffs would refuse (a dot: `mktemp -d
/tmp/x.XXXX`, /run/meshagent.test) runs an agent, steers a pod and is
cleaned up without a trace; a bpffs error is one line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from meshenv import start_agent

PORT = 9310


def test_an_agent_runs_and_cleans_up_with_a_dot_in_its_state_dir(mesh_env):
    from meshagent.bpf.pins import Pins

    dotted = mesh_env.state_dir.with_name(mesh_env.state_dir.name + ".test")
    mesh_env.state_dir.rename(dotted)  # the sandbox's cleanup removes it under its new name
    mesh_env.state_dir = dotted
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env)
    try:
        agent.attach(client)
        mesh_env.client(client, server.ip4, PORT)
        assert srv.next()["peer"] == client.ip4
        assert agent.pod_status("client")["connections_total"] == 1
        pins = Pins(dotted)
        assert "." not in pins.dir.name and "links" in {p.name for p in pins.dir.iterdir()}
    finally:
        assert agent.stop() == 0, agent.log()
    assert pins.exists()  # kept for the next agent
    done = mesh_env.meshagent("cleanup", check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert not pins.exists()
    assert not Path(pins.dir).exists()


def test_a_bpffs_error_is_one_line_naming_the_path(tmp_path):
    from meshagent.bpf.pins import BPFFS, Pins
    from meshagent.errors import MeshError

    pins = Pins(tmp_path, root=BPFFS / "meshtest.refused")  # the bpffs refuses the dot
    with pytest.raises(MeshError) as raised:
        pins.put("maps", "x", 0)
    message = str(raised.value)
    assert "\n" not in message and str(BPFFS / "meshtest.refused") in message, message
    assert "not permitted" in message, message
