"""A pod's blocking read never fails with EAGAIN because of meshagent.

With sk_msg on (`--sockmap-msg`), the pod's own socket joins a sockmap, and
then the kernel's tcp_bpf_recvmsg returns EAGAIN to a blocking read that a
wake-up without data ended (the socket's own writes make those: an ACK that
frees send buffer space wakes every waiter) instead of waiting again. Seen on
6.18: a client that uploads 8 MiB from one thread while another blocks in
recv() got BlockingIOError on 20 connections of 20; without sk_msg, 0 of 20.
That is why sk_msg is off by default; this test holds the default to it."""

from __future__ import annotations

import json

import pytest
from meshenv import start_agent

PORT = 7400

SERVER = r"""
import socket, sys, threading, time
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("up", flush=True)

def serve(conn):
    total = 0
    while chunk := conn.recv(1 << 20):
        total += len(chunk)
        time.sleep(0.0005)  # a slower reader: the pod's send buffer fills
    conn.sendall(b"%d\n" % total)
    conn.close()

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# One thread writes 8 MiB and half-closes; another blocks in recv() for the
# server's answer meanwhile, as a thread-per-connection client does.
CLIENT = r"""
import json, socket, sys, threading
failed, answers = [], []
for _ in range(int(sys.argv[3])):
    sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=None)
    got = {}

    def reader():
        try:
            got["answer"] = sock.recv(64)
        except OSError as exc:
            got["error"] = type(exc).__name__

    thread = threading.Thread(target=reader)
    thread.start()
    chunk = b"x" * (256 * 1024)
    for _ in range(32):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    thread.join(60)
    if "error" in got:
        failed.append(got["error"])
    else:
        answers.append(got.get("answer", b"").decode().strip())
    sock.close()
print(json.dumps({"failed": failed, "answers": answers}))
"""

CONNS = 10


def run_clients(mesh_env, *agent_args: str) -> dict:
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    proc = mesh_env.popen(server, ["python3", "-c", SERVER, str(PORT)], stdout=-1, text=True)
    assert proc.stdout.readline().strip() == "up"
    agent = start_agent(mesh_env, "--datapath", "sockmap", *agent_args)
    try:
        agent.attach(client)
        out = mesh_env.script(client, CLIENT, server.ip4, str(PORT), str(CONNS))
        result = json.loads(out.splitlines()[-1])
        result["msg"] = agent.request("status")["datapaths"]["sockmap"]["msg"]
        return result
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.kernel_matrix
def test_by_default_a_blocking_read_beside_a_writer_never_sees_eagain(mesh_env):
    result = run_clients(mesh_env)
    assert result["msg"] is False  # the default
    assert result["failed"] == [], result
    assert result["answers"] == [str(32 * 256 * 1024)] * CONNS, result


@pytest.mark.xfail(
    strict=False,
    reason="kernel: with sk_msg the pod's socket is in a sockmap, and tcp_bpf_recvmsg returns"
    " EAGAIN to a blocking read after a wake-up without data (20 of 20 connections on 6.18);"
    " why --sockmap-msg is off by default. An XPASS means this kernel no longer does it.",
)
def test_with_sk_msg_the_same_reads_see_eagain(mesh_env):
    result = run_clients(mesh_env, "--sockmap-msg")
    if not result["msg"]:
        pytest.skip("no sk_msg path on this kernel")
    assert result["failed"] == [], result
