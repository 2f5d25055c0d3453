"""--metrics-addr off loopback still serves, and the agent says once, at
start, that the metrics are unauthenticated there (docs/security.md)."""

from __future__ import annotations

import urllib.request

from meshenv import start_agent


def test_a_wildcard_metrics_addr_warns_once_and_serves(mesh_env):
    agent = start_agent(mesh_env, "--metrics-addr", "0.0.0.0:0")
    try:
        addr = agent.request("status")["metrics_addr"]
        port = addr.rpartition(":")[2]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            assert reply.status == 200
        lines = [line for line in agent.log().splitlines() if "unauthenticated" in line]
        assert len(lines) == 1, lines
        assert "warning" in lines[0]
        assert "0.0.0.0:0" in lines[0]
    finally:
        agent.stop()


def test_the_default_loopback_metrics_addr_says_nothing(mesh_env):
    agent = start_agent(mesh_env)
    try:
        assert agent.request("status")["metrics_addr"].startswith("127.0.0.1:")
        assert "unauthenticated" not in agent.log()
    finally:
        agent.stop()
