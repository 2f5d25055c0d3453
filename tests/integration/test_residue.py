"""The residue check itself: each kind of leftover it looks for is planted
(harmlessly: an empty chain, a loopback listener, an fd) and must be named."""

from __future__ import annotations

import os
import socket
import subprocess

from residue import untagged_residue


def test_the_residue_check_names_what_was_left(mesh_env):
    from meshagent.config import AgentConfig
    from meshagent.host import netns
    from meshagent.redirect.rules import CHAIN

    pod = mesh_env.create_pod("left")
    before = untagged_residue()
    fd = netns.open_fd(pod.netns)
    listener = socket.create_server(("127.0.0.1", AgentConfig().port))
    subprocess.run(["iptables-legacy", "-w", "5", "-t", "nat", "-N", CHAIN], check=True)
    try:
        found = untagged_residue() - before
    finally:
        subprocess.run(["iptables-legacy", "-w", "5", "-t", "nat", "-X", CHAIN], check=True)
        listener.close()
        os.close(fd)
    assert any(f"fd {fd}: " in item for item in found), found
    assert any("listener on the forwarder's port" in item for item in found), found
    assert any(f"chain {CHAIN}" in item and "iptables-legacy-save" in item for item in found)
    assert untagged_residue() - before == set()
