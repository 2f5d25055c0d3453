"""A real database through the mesh: redis-server in one pod, clients in an
attached pod, on each data path. redis-benchmark gives the many-clients
load; a small RESP client checks every value it reads back, over one
keep-alive connection that moves from copy to the sockmap (and to sk_msg
where the kernel has it) in the middle of its pipelined commands."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from meshenv import start_agent, wait_for

PORT = 6379
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
BENCH = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"

# SET 400 values of 1 B to 200 KiB in pipelined batches, then GET them all
# back the same way, and compare; one connection for all of it.
CHECKER = r"""
import random, socket, sys

def command(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out

class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""
    def line(self):
        while b"\r\n" not in self.buf:
            self.more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line
    def exactly(self, n):
        while len(self.buf) < n:
            self.more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data
    def more(self):
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("EOF from redis")
        self.buf += chunk
    def reply(self):
        line = self.line()
        if line[:1] == b"$":
            n = int(line[1:])
            value = self.exactly(n) if n >= 0 else None
            self.exactly(2)
            return value
        if line[:1] == b"-":
            raise SystemExit(f"redis error: {line!r}")
        return line

rng = random.Random(int(sys.argv[3]))
values = {f"key:{i}": rng.randbytes(rng.choice([1, 100, 4000, 60000, 200000]))
          for i in range(400)}
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
reader = Reader(sock)
keys = list(values)
for start in range(0, len(keys), 20):
    batch = keys[start:start + 20]
    sock.sendall(b"".join(command("SET", k, values[k]) for k in batch))
    for _ in batch:
        assert reader.reply() == b"+OK"
bad = 0
for start in range(0, len(keys), 20):
    batch = keys[start:start + 20]
    sock.sendall(b"".join(command("GET", k) for k in batch))
    for k in batch:
        bad += reader.reply() != values[k]
sock.close()
print(f"checked {len(keys)} values, {bad} wrong")
sys.exit(1 if bad else 0)
"""


@pytest.fixture(params=("sockmap", "sockmap-nomsg", "sockmap-replies", "copy"))
def redis_pods(request, mesh_env, tmp_path):
    if not shutil.which(REDIS):
        pytest.fail("redis-server is missing: run scripts/bootstrap")
    server = mesh_env.create_pod("db")
    client = mesh_env.create_pod("app")
    mesh_env.popen(
        server, [REDIS, "--port", str(PORT), "--bind", "*", "-::*", "--protected-mode", "no",
                 "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    datapath, _, variant = request.param.partition("-")
    msg = ["--sockmap-msg"] if datapath == "sockmap" and variant != "nomsg" else []
    replies = ["--sockmap-replies"] if variant == "replies" else []
    agent = start_agent(mesh_env, "--datapath", datapath, *msg, *replies)
    agent.replies = bool(replies)
    try:
        agent.attach(client)
        yield agent, client, server
    finally:
        assert agent.stop() == 0, agent.log()


def test_redis_values_come_back_whole_and_benchmark_clients_all_finish(mesh_env, redis_pods):
    agent, client, server = redis_pods

    def ping() -> bool:
        proc = mesh_env.popen(client, ["redis-cli", "-h", server.ip4, "-p", str(PORT), "PING"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
        return proc.communicate(timeout=30)[0].strip() == "PONG"

    wait_for(ping, 30, "redis-server to answer through the mesh")
    for seed in (1, 2):
        out = mesh_env.script(client, CHECKER, server.ip4, str(PORT), str(seed))
        assert "400 values, 0 wrong" in out
    # 20 clients, keep-alive and a connection per request: every request answered.
    for keepalive in ("1", "0"):
        bench = mesh_env.popen(
            client, [BENCH, "-h", server.ip4, "-p", str(PORT), "-t", "set,get", "-n", "4000",
                     "-c", "20", "-k", keepalive, "-d", "512", "--csv"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        out, _ = bench.communicate(timeout=180)
        assert bench.returncode == 0, out
        rows = {line.split(",")[0].strip('"') for line in out.splitlines() if line}
        assert {"SET", "GET"} <= rows, out
    status = agent.request("status")
    path = status["datapaths"][status["datapath"]]
    assert path["stalls"] == 0
    if status["datapath"] == "sockmap":
        assert path["connections_total"] > 0
        if agent.replies:  # the replies, straight into the app's socket
            assert status["decisions"]["msg_ingress"]["egress"] > 0
        else:  # the replies, by the verdict
            assert status["decisions"]["spliced"]["egress"] > 0
        if path["msg"]:
            assert status["decisions"]["msg_spliced"]["egress"] > 0  # the commands, by sk_msg
