"""Real client and server: curl through the mesh to nginx in another pod."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from meshenv import wait_for

from meshagent.demo import nginx_conf

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture
def nginx(mesh_env, tmp_path):
    if not shutil.which(NGINX):
        pytest.fail("nginx is missing: run scripts/bootstrap")
    server = mesh_env.create_pod("web")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, "hello from the server pod"))
    mesh_env.popen(server, [NGINX, "-c", str(conf), "-p", str(tmp_path)])
    log = tmp_path / "access.log"
    wait_for(lambda: (tmp_path / "nginx.pid").exists(), what="nginx to start")
    return server, log


@pytest.mark.kernel_matrix
def test_curl_to_nginx_through_the_forwarder(mesh_env, any_agent, nginx):
    agent = any_agent
    server, access_log = nginx
    client = mesh_env.create_pod("client")
    agent.attach(client)
    for url in (f"http://{server.ip4}/", f"http://[{server.ip6}]/"):
        proc = mesh_env.popen(
            client, ["curl", "-sS", "--max-time", "20", url], stdout=subprocess.PIPE, text=True
        )
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert out == "hello from the server pod\n"
    stats = agent.pod_status("client")
    assert stats["connections_total"] == 2
    assert stats["bytes_in"] > 0
    wait_for(lambda: access_log.exists() and access_log.read_text().count("\n") == 2)
    peers = [line.split()[0] for line in access_log.read_text().splitlines()]
    assert peers == [client.ip4, client.ip6]
