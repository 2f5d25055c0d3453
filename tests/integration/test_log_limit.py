"""A pod that makes the forwarder fail every connection does not fill the
agent's log: per-connection warnings are limited per pod and reason."""

from __future__ import annotations

import sys

DIRECT = """
import socket
for n in range(24):
    host = ("127.0.0.1", "::1")[n % 2]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect((host, 15001))
        sock.recv(1)
    except OSError:
        pass
    sock.close()
"""
LINES = ("refused: a direct connection to the listener", "no original destination")


def test_direct_connections_give_one_line_per_reason(mesh_env, any_agent):
    agent = any_agent
    client = mesh_env.create_pod("client")
    agent.attach(client)
    proc = mesh_env.popen(client, [sys.executable, "-c", DIRECT], stdout=-1, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stats = agent.pod_status("client")
    assert stats["refused_loopback"] + stats["no_orig_dst"] == 24, stats
    log = agent.log()
    for line in LINES:
        assert log.count(line) <= 1, (line, log.count(line))
