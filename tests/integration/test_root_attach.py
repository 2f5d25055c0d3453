"""The agent where a node runs it: `meshagent run` without --cgroup attaches
at the machine's root cgroup, below which every process of the machine
runs. Only in a QEMU guest of vagrant/ (vagrant/guest-suite sets
MESHAGENT_GUEST=1), a throwaway machine: on the host the tests never attach
at the root cgroup. The kubelet cluster's test shows the same at the root
of a node's cgroup namespace (test_kube_node.py)."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import urllib.request

import pytest
from meshenv import start_agent, wait_for

pytestmark = pytest.mark.kernel_matrix
PORT = 8093


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_at_the_root_cgroup_the_machines_own_traffic_is_untouched(mesh_env):
    if os.environ.get("MESHAGENT_GUEST") != "1":
        pytest.skip("attaches at the machine's root cgroup: only in a vagrant/ guest"
                    " (vagrant/test-kernels), never on the host")  # fmt: skip
    env = mesh_env
    agent = start_agent(env, "--redirect", "ebpf", in_cgroup=False, at_root=True)
    # A service of the machine and its client (this test's own process):
    # neither is in a pod, both are below the root cgroup the hooks are at.
    service = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=service.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{service.server_address[1]}/"
    client, server = env.create_pod("client"), env.create_pod("server")
    srv = env.server(server, PORT, "--send", "100")
    try:
        assert agent.attach(client)["backend"] == "ebpf"

        def machine(count: int) -> int:
            done = 0
            for _ in range(count):
                with urllib.request.urlopen(url, timeout=10) as resp:
                    resp.read()
                done += 1
            return done

        before = agent.decisions().get("not_attached", 0)
        assert machine(20) == 20
        assert agent.decisions().get("not_attached", 0) - before >= 20
        forwarded = agent.forwarded()
        out = env.client(client, server.ip4, PORT, "--send", "1000")
        assert out["recv_sha"] == srv.next()["sent_sha"]
        assert agent.forwarded() == forwarded + 1

        # Through a SIGKILL and a restart: the machine's requests all succeed,
        # and the pod is adopted and steered again.
        agent.proc.kill()
        agent.proc.wait()
        assert machine(20) == 20
        with socket.create_connection(("127.0.0.1", service.server_address[1]), timeout=10):
            pass
        agent = start_agent(env, "--redirect", "ebpf", in_cgroup=False, at_root=True)
        wait_for(lambda: agent.pod_status("client") is not None, 30, "client adopted")
        assert machine(20) == 20
        forwarded = agent.forwarded()
        out = env.client(client, server.ip4, PORT, "--send", "1000")
        assert out["recv_sha"] == srv.next()["sent_sha"]
        assert agent.forwarded() == forwarded + 1
    finally:
        service.shutdown()
        service.server_close()
