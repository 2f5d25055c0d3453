"""Back-pressure: a pod that stops reading must stop its server, on every
data path, as a direct connection would (the server's send blocks once the
buffers between them are full). Otherwise a fast server and a slow client
make the node queue the whole response in kernel memory.

The server writes as fast as it can while the client sleeps; the writer
stops when send() has said EAGAIN for 1.5 s (blocked: good) or at CAP
(never blocked). Then the client reads everything and the counts must
match.

Through the sockmap the kernel's stream verdict takes each segment off
the upstream socket's receive queue when it redirects it, so that socket's
window never closes, and the redirected segments wait in the accepted
socket's psock queue, which has no bound (Cilium's issue 6431): before the
budget (bpf/skb_verdict.c), all of CAP (256 MiB) queued while the client
read nothing. Now the verdict holds bytes back past the budget and they
wait in the upstream socket's own queue, whose window closes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from meshenv import start_agent

PORT = 7311
CAP = 256 << 20
BOUND = 64 << 20  # direct stops under 1 MiB, copy near 11 MiB (6.18)

WRITER = r"""
import socket, sys, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen(1)
print("ready", flush=True)
c, _ = l.accept(); c.setblocking(False)
chunk = bytes(range(256)) * 256; sent = 0; last = time.monotonic()
while sent < int(sys.argv[2]) and time.monotonic() - last < 1.5:
    try:
        sent += c.send(chunk); last = time.monotonic()
    except BlockingIOError:
        time.sleep(0.01)
print(sent, flush=True)
sys.stdin.readline()  # the reader has counted: now the FIN
c.setblocking(True); c.close()
"""

READER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120)
want = int(sys.stdin.readline())  # the writer stopped: read all it wrote
got = 0
while got < want:
    data = s.recv(1 << 20)
    if not data:
        break
    got += len(data)
print(got, flush=True)
"""


@pytest.mark.parametrize("datapath", ["copy", "splice", "sockmap", "sockmap-nomsg"])
def test_a_client_that_stops_reading_stops_its_server(mesh_env, datapath):
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    mode, _, nomsg = datapath.partition("-")
    agent = start_agent(mesh_env, "--datapath", mode, *(["--no-sockmap-msg"] if nomsg else []))
    try:
        agent.attach(client)
        writer = mesh_env.popen(
            server, [sys.executable, "-c", WRITER, str(PORT), str(CAP)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert writer.stdout.readline().strip() == "ready"
        reader = mesh_env.popen(
            client, [sys.executable, "-c", READER, server.ip4, str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        written = int(writer.stdout.readline())
        reader.stdin.write(f"{written}\n")
        reader.stdin.flush()
        got = int(reader.stdout.readline())
        writer.stdin.write("done\n")
        writer.stdin.flush()
        assert writer.wait(timeout=30) == 0
        assert reader.wait(timeout=30) == 0
        assert got == written, f"{written} bytes written, {got} read"
        status = agent.request("status")
        assert status["datapath"] == mode
        assert written <= BOUND, (
            f"the server wrote {written >> 20} MiB while the pod read nothing"
            f" ({datapath}): no back-pressure"
        )
    finally:
        assert agent.stop() == 0, agent.log()
