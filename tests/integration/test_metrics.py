"""Prometheus metrics and health from a running agent, read with
prometheus_client's own parser."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from meshenv import start_agent, wait_for
from prometheus_client.parser import text_string_to_metric_families

from meshagent.forwarder.sockmap import UPGRADE_BYTES

PORT = 8080


def get(addr: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(addr: str) -> dict[tuple[str, tuple], float]:
    status, text = get(addr, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    """The sum over every sample of name whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in metrics.items() if n == name and wanted <= set(got))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readyz_is_503_until_the_programs_are_attached(mesh_env):
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel,
         "--metrics-addr", addr],
        env=mesh_env.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    mesh_env.procs.append(proc)
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while 200 not in seen and time.monotonic() < deadline:
        try:
            seen.append(get(addr, "/readyz")[0])
        except OSError:
            pass  # not listening yet
        time.sleep(0.01)
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert 503 in seen and seen[-1] == 200, seen
    assert seen.index(200) > seen.index(503)


def test_a_scrape_counts_exactly_the_connections_and_bytes(mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "500")
    agent = start_agent(mesh_env)
    try:
        addr = agent.request("status")["metrics_addr"]
        assert get(addr, "/healthz")[0] == 200 and get(addr, "/readyz")[0] == 200
        before = samples(addr)
        agent.attach(client)
        for _ in range(3):
            mesh_env.client(client, server.ip4, PORT, "--send", "1000")
            srv.next()
        labels = {"pod": "client"}  # over every data path (a pair may fall back to copy)

        def counted() -> dict | None:
            now = samples(addr)
            done = value(now, "meshagent_connections_total", result="closed", **labels)
            return now if done == 3 else None

        now = wait_for(counted, what="the metrics to show 3 connections")
        assert value(now, "meshagent_bytes_total", direction="out", **labels) == 3000
        assert value(now, "meshagent_bytes_total", direction="in", **labels) == 1500
        steered = value(now, "meshagent_decisions_total", reason="steered")
        assert steered - value(before, "meshagent_decisions_total", reason="steered") == 3
        assert value(now, "meshagent_active_connections", pod="client") == 0
        assert value(now, "meshagent_bpf_map_capacity", map="mesh_orig_tup") == 65536
        assert value(now, "meshagent_attach_seconds_count") == 1
        assert value(now, "meshagent_process_open_fds") > 0
        sockmap = agent.request("status")["datapaths"]["sockmap"]  # back-pressure, by name
        assert value(now, "meshagent_sockmap_budget_bytes") == sockmap["budget_bytes"] == 4 << 20
        for name in ("meshagent_sockmap_throttles_total", "meshagent_sockmap_throttled_connections",
                     "meshagent_sockmap_held_bytes"):  # fmt: skip
            assert (name, ()) in now, name
        build = [k for k in now if k[0] == "meshagent_build_info"]
        assert build and dict(build[0][1])["backend"] == "ebpf"
        text = get(addr, "/metrics")[1]
        assert server.ip4 not in text and client.ip4 not in text  # no addresses as labels
        assert get(addr, "/nosuch")[0] == 404
    finally:
        assert agent.stop() == 0, agent.log()


HOLD = """
import socket, sys
socks = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]
for s in socks:
    s.sendall(b"x" * int(sys.argv[4]))  # enough to move from copy to the sockmap
print("held", flush=True)
sys.stdin.read()  # hold them until the test closes stdin
"""


def test_map_entries_and_fds_match_the_kernel(mesh_env):
    """The sockhash count the scrape shows (the forwarder's bookkeeping, so
    a scrape never walks the map) equals a walk of the kernel's map, both
    with connections open and after; open fds equal /proc's count. Each
    connection carries enough to leave its copy phase for the sockmap."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT, "--send-after-eof")  # no early FIN: nothing keeps a move out
    agent = start_agent(mesh_env, "--datapath", "sockmap")
    try:
        addr = agent.request("status")["metrics_addr"]
        agent.attach(client)
        holder = mesh_env.popen(
            client, [sys.executable, "-c", HOLD, server.ip4, str(PORT), "40",
                     str(UPGRADE_BYTES + 1)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdout.readline().strip() == "held"
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 40, 30, "40 conns")

        seen: list = []

        def agree(expected: int):
            kernel = agent.request("status")["map_entries"]["mesh_sockhash"]
            now = samples(addr)
            scraped = value(now, "meshagent_bpf_map_entries", map="mesh_sockhash")
            fds = len(list(Path(f"/proc/{agent.proc.pid}/fd").iterdir()))
            seen[:] = [("walked", kernel), ("scraped", scraped), ("expected", expected),
                       ("fds", fds), ("scraped fds", value(now, "meshagent_process_open_fds"))]  # fmt: skip
            ok = kernel == scraped == expected
            return ok and abs(value(now, "meshagent_process_open_fds") - fds) <= 2

        try:
            wait_for(lambda: agree(80), 30, "80 sockhash entries, scraped and walked alike")
        except AssertionError as exc:  # say which part disagreed
            sockmap = agent.request("status")["datapaths"]["sockmap"]
            raise AssertionError(f"{exc}: last seen {seen}; sockmap {sockmap}") from None
        holder.stdin.close()
        holder.wait(30)
        wait_for(lambda: agree(0), 30, "an empty sockhash, scraped and walked alike")
    finally:
        assert agent.stop() == 0, agent.log()
