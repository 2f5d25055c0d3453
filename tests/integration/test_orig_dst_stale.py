"""An original destination is used only for the connection it was recorded
for, and --exclude-cidrs is per address family on every backend.

- A steered connection from a fixed local port closes; a direct connect to
  the pod's forwarder listener from that same port must be refused (the
  ebpf backend kept the closed connection's destination in mesh_orig_cls
  and forwarded the direct connect to it).
- --exclude-cidrs ::/0 exempts IPv6 only, 0.0.0.0/0 IPv4 only (IPv4 is
  looked up as ::ffff:a.b.c.d in the ebpf backend's trie, which ::/0
  covered).
"""

from __future__ import annotations

import json
import subprocess
import sys

from meshenv import redirect_args, start_agent

PORT = 9100
LOCAL_PORT = 40001
FORWARDER_PORT = 15001  # the agent's default --port

# Run in the pod: a steered connection from LOCAL_PORT, closed in order, then
# a direct connect from the same port to the forwarder listener. connect()
# is retried (bounded) while the closed connection's TIME_WAIT still holds
# the 4-tuple (loopback reuse needs a second of age), or while the
# forwarder's end of it is not closed yet (its SYN then meets a reset).
SAME_PORT_TWICE = r"""
import errno, json, socket, sys, time

host, port, local, listener = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def connect(dst, dst_port):
    for _ in range(100):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(20)
        sock.bind(("0.0.0.0", local))
        try:
            sock.connect((dst, dst_port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.ECONNRESET):
                raise
            time.sleep(0.1)
    raise SystemExit("the local port never came free")

def talk(sock, data):
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return len(got)

first = talk(connect(host, port), b"steered")
try:
    direct = talk(connect("127.0.0.1", listener), b"direct!")
    refused = ""
except ConnectionRefusedError:
    direct, refused = 0, "refused"
print(json.dumps({"first": first, "direct": direct, "refused": refused}), flush=True)
"""


def test_direct_connect_from_a_closed_steered_port_is_refused(mesh_env, agent):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "5")
    agent.attach(client)

    proc = mesh_env.popen(
        client,
        [sys.executable, "-c", SAME_PORT_TWICE, server.ip4, str(PORT), str(LOCAL_PORT),
         str(FORWARDER_PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["first"] == 5  # the steered connection went through
    first = srv.next()
    assert first["peer"] == client.ip4 and first["recv_bytes"] == len(b"steered")
    # No byte of the old destination reached the direct connect ...
    assert result["direct"] == 0, result
    # ... and the server saw no second connection: the next one it sees is
    # this steered one (its digest, not the direct connect's).
    out = mesh_env.client(client, server.ip4, PORT, "--send", "11", "--seed", "9")
    assert out["recv_bytes"] == 5
    seen = srv.next()
    assert seen["recv_sha"] == out["sent_sha"], seen
    assert agent.decisions().get("steered", 0) == 2


def _steered(agent, env, pod, host) -> bool:
    before = agent.forwarded()
    env.client(pod, host, PORT)
    return agent.forwarded() > before


def test_excluding_one_family_leaves_the_other_steered(mesh_env, redirect):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    for excluded, steered, direct in (
        ("::/0", server.ip4, server.ip6),
        ("0.0.0.0/0", server.ip6, server.ip4),
    ):
        agent = start_agent(mesh_env, "--exclude-cidrs", excluded, *redirect_args(*redirect))
        agent.backend = redirect[0]
        try:
            agent.attach(client)
            before = agent.decisions()  # the counters live on in the pinned map
            assert _steered(agent, mesh_env, client, steered), (excluded, steered)
            assert not _steered(agent, mesh_env, client, direct), (excluded, direct)
            # A dual-stack socket reaching IPv4 is IPv4 traffic.
            mapped = f"::ffff:{server.ip4}"
            assert _steered(agent, mesh_env, client, mapped) == (excluded == "::/0")
            if agent.backend == "ebpf":
                after = agent.decisions()
                counted = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                assert counted["excluded_cidr"] == 1 + (excluded != "::/0")
                assert counted["steered"] == 2 - (excluded != "::/0")
        finally:
            assert agent.stop() == 0, agent.log()
