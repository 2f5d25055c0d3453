"""Every data path (sockmap with and without sk_msg, splice, copy), in
pods, through the real redirect: the hand-off under load, half-close,
resets, no leftovers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from meshenv import start_agent, wait_for

from meshagent.bpf.features import version

PORT = 9100
MB = 1024 * 1024
# "tight": a 16 KiB back-pressure budget, so that every connection that
# carries more is held back by the kernel, and carried by Python, many times.
DATAPATHS = ("sockmap", "sockmap-nomsg", "sockmap-tight", "sockmap-nomsg-tight", "splice", "copy")
TIGHT = 16 * 1024


def agent_args(param: str) -> list[str]:
    """`meshagent run` options for a DATAPATHS entry."""
    datapath, *flags = param.split("-")
    args = ["--datapath", datapath]
    if datapath == "sockmap" and "nomsg" not in flags:
        args.append("--sockmap-msg")  # off by default (test_blocking_reads.py)
    if "tight" in flags:
        args += ["--sockmap-budget", str(TIGHT)]
    return args


@pytest.fixture(params=DATAPATHS)
def path_agent(request, mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    datapath, _, nomsg = request.param.partition("-")
    nomsg = "nomsg" in nomsg
    agent = start_agent(mesh_env, *agent_args(request.param))
    agent.tight = "tight" in request.param
    agent.attach(client)
    status = agent.request("status")
    assert status["datapath"] == datapath
    if datapath == "sockmap":
        # sk_msg wherever the kernel has it (5.15+), unless turned off.
        assert status["datapaths"]["sockmap"]["msg"] == (not nomsg and version() >= (5, 15))
    try:
        yield agent, client, server
    finally:
        assert agent.stop() == 0, agent.log()


def drained(agent) -> bool:
    status = agent.request("status")
    return not any(status["map_entries"].values()) and status["live_steered"] == 0


@pytest.mark.kernel_matrix
def test_many_connections_write_at_once_in_random_chunks(mesh_env, path_agent):
    """200 connections at once; both ends write immediately (client after
    connect, server on accept) in random chunks of 1 B to 256 KiB."""
    agent, client, server = path_agent
    conns = 200
    srv = mesh_env.server(server, PORT, "--random-size", str(MB // 2), "--random-chunks")
    proc = mesh_env.tcptool(
        client, "stress", "--host", server.ip4, "--port", str(PORT), "--conns", str(conns),
        "--random-size", str(MB // 2), "--random-chunks", "--timeout", "60",
    )  # fmt: skip
    out, _ = proc.communicate(timeout=180)
    lines = [json.loads(line) for line in out.splitlines()]
    summary = lines.pop()
    assert summary == {"done": conns, "stuck": 0}, "some transfers never finished (a stall)"
    by_client = {line["id"]: line for line in lines}
    by_server = {}
    for _ in range(conns):
        seen = srv.next()
        by_server[seen["id"]] = seen
    assert sorted(by_client) == sorted(by_server) == list(range(conns))
    for conn_id, sent in by_client.items():
        got = by_server[conn_id]
        assert "recv_error" not in sent and "recv_error" not in got, (sent, got)
        assert got["recv_sha"] == sent["sent_sha"], f"pod->server bytes differ on {conn_id}"
        assert sent["recv_sha"] == got["sent_sha"], (
            f"server->pod bytes differ on {conn_id}: {sent['recv_bytes']} received,"
            f" {got['sent_bytes']} sent"
        )
    status = agent.request("status")
    path = status["datapaths"][status["datapath"]]
    # Every connection counted once, by the path it started on (a sockmap pair
    # whose sockets could not enter stays a sockmap connection, copied).
    assert sum(p["connections_total"] for p in status["datapaths"].values()) == conns
    assert path["connections_total"] == conns
    assert path["stalls"] == 0
    if status["datapath"] == "sockmap":
        # The kernel carried the payload; Python only the hand-off.
        assert status["decisions"]["spliced"]["egress"] > 0
        # Not asked here: that sk_msg redirected some of the pods' sends. A
        # pod's send goes straight upstream only once Python has carried all
        # it sent before, and these writers never pause: in the 6.1 guest
        # (software emulation) and once on 6.18 under load Python never
        # caught up, and sk_msg rightly redirected nothing. test_redis shows
        # sk_msg carrying a keep-alive client's commands.
        if agent.tight:  # held back, and still every byte in order
            # How often is not asked: it depends on how many connections
            # reach the sockmap within their 512 KiB (a move waits for a
            # segment boundary). Held-back segments: conns // 4 or more
            # before the memory budget fixed the socket buffers; since,
            # 23-49 on 6.18 with a QEMU guest beside, 36 in the 6.12 guest
            # on 64dbec8 and 5 there on b36f5f5 (19 segments spliced in all).
            assert path["throttles"] > 0, path
            assert status["decisions"]["throttled"]["egress"] > 0, status["decisions"]
        else:
            assert path["handoff_bytes"] < path["bytes"] / 2, path
    wait_for(lambda: drained(agent), what="map entries to go")


ECHO = r"""
import socket, sys
l = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(1); l.settimeout(60)
print("ready", flush=True)
c, _ = l.accept(); c.settimeout(60)
while data := c.recv(1 << 16):
    c.sendall(data)
"""

ROUNDS = r"""
import random, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
rng = random.Random(7); wrong = 0
for n in range(int(sys.argv[3])):
    ask = rng.randbytes(rng.randrange(1, 4096))
    s.sendall(ask)
    got = b""
    while len(got) < len(ask):
        part = s.recv(len(ask) - len(got))
        if not part:
            sys.exit(f"the connection closed after {n} rounds")
        got += part
    wrong += got != ask
print(wrong, flush=True)
"""


@pytest.mark.kernel_matrix
def test_a_keep_alive_clients_requests_go_through_the_kernel(mesh_env, path_agent):
    """One connection, 300 requests and their echoed replies (1 B to 4 KiB):
    every reply right; on the sockmap, once the hand-off is over, the kernel
    carries both ways (the replies by the stream verdict, the requests by
    sk_msg where the path has it), Python only the first bytes."""
    agent, client, server = path_agent
    rounds = 300
    echo = mesh_env.popen(server, [sys.executable, "-c", ECHO, server.ip4, str(PORT)],
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert echo.stdout.readline().strip() == "ready"
        out = mesh_env.script(client, ROUNDS, server.ip4, str(PORT), str(rounds), timeout=180)
        assert out.strip() == "0", f"{out.strip()} of {rounds} replies wrong"
    finally:
        for proc in (echo,):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    status = agent.request("status")
    path = status["datapaths"][status["datapath"]]
    assert path["connections_total"] == 1 and path["stalls"] == 0, path
    if status["datapath"] == "sockmap":
        decisions = status["decisions"]
        assert decisions["spliced"]["egress"] > 0, decisions  # replies, by the verdict
        if path["msg"]:  # requests straight into the upstream socket
            assert decisions.get("msg_spliced", {}).get("egress", 0) > 0, decisions
        assert path["handoff_bytes"] < path["bytes"] / 2, path
    wait_for(lambda: drained(agent), what="map entries to go")


# A server that, once the pod has every byte of its first FIRST, sends the
# last BACK of them again in front of the rest: the TCP repair API rebuilds
# its socket with the send sequence BACK bytes earlier (as CRIU restores a
# socket), so the next segment overlaps bytes the upstream socket already
# received, as a retransmission does after a lost ACK.
REPAIR_SERVER = r"""
import random, socket, struct, sys, termios, fcntl, time
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS, TCP_REPAIR_WINDOW = 19, 20, 21, 22, 29
RECV_QUEUE, SEND_QUEUE, TCP = 1, 2, socket.IPPROTO_TCP
FIRST, TOTAL, BACK = 256 << 10, 512 << 10, 1000
for name in ("tcp_timestamps", "tcp_sack"):  # this netns only: the rebuilt socket has neither
    with open(f"/proc/sys/net/ipv4/{name}", "w") as f:
        f.write("0")
data = random.Random(5).randbytes(TOTAL)
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen(1); l.settimeout(60)
print("ready", flush=True)
c, _ = l.accept(); l.close()
c.sendall(data[:FIRST])
end = time.monotonic() + 60
while struct.unpack("i", fcntl.ioctl(c.fileno(), termios.TIOCOUTQ, b"0000"))[0] and time.monotonic() < end:
    time.sleep(0.01)  # until the pod's side acked all of it
time.sleep(0.5)
wscale = c.getsockopt(TCP, socket.TCP_INFO, 8)[6]
mss = c.getsockopt(TCP, socket.TCP_MAXSEG)
c.setsockopt(TCP, TCP_REPAIR, 1)
c.setsockopt(TCP, TCP_REPAIR_QUEUE, SEND_QUEUE); snd = c.getsockopt(TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
c.setsockopt(TCP, TCP_REPAIR_QUEUE, RECV_QUEUE); rcv = c.getsockopt(TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
window = c.getsockopt(TCP, TCP_REPAIR_WINDOW, 20)
here, there = c.getsockname(), c.getpeername()
c.close()  # in repair mode: neither FIN nor RST
n = socket.socket()
n.setsockopt(TCP, TCP_REPAIR, 1)
n.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
n.setsockopt(TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
n.setsockopt(TCP, TCP_QUEUE_SEQ, struct.pack("I", (snd - BACK) & 0xFFFFFFFF))
n.setsockopt(TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
n.setsockopt(TCP, TCP_QUEUE_SEQ, struct.pack("I", rcv))
n.bind(here); n.connect(there)
n.setsockopt(TCP, TCP_REPAIR_OPTIONS, struct.pack("IIII", 2, mss, 3, (wscale & 15) | (wscale >> 4) << 16))
n.setsockopt(TCP, TCP_REPAIR_WINDOW, window)
n.setsockopt(TCP, TCP_REPAIR, 0)
n.sendall(data[FIRST - BACK:])
n.shutdown(socket.SHUT_WR)
n.settimeout(60); n.recv(1)
print("sent", flush=True)
"""

READ_ALL = r"""
import hashlib, random, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
got = bytearray()
try:
    while part := s.recv(1 << 16):
        got += part
    end = "eof"
except ConnectionResetError:
    end = "reset"
want = random.Random(5).randbytes(512 << 10)
first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), None)
print(len(got), first, end, flush=True)
"""


def overlap_run(mesh_env, client, server) -> tuple[int, str, str]:
    """The repair server and a pod reading all: (bytes read, the first
    wrong byte's offset or "None", "eof" or "reset")."""
    srv = mesh_env.popen(server, [sys.executable, "-c", REPAIR_SERVER, str(PORT)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        assert srv.stdout.readline().strip() == "ready"
        got, first_wrong, end = mesh_env.script(client, READ_ALL, server.ip4, str(PORT)).split()
        return int(got), first_wrong, end
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(timeout=10)


@pytest.mark.kernel_matrix
def test_a_retransmission_overlapping_delivered_bytes_is_not_delivered_twice(mesh_env, path_agent):
    """The server's TCP sends 1000 bytes the pod already has again, in front
    of new ones (a retransmission after a lost ACK does this; seen under load
    on 6.18). TCP queues such a segment whole; the stream verdict is handed
    it whole by the kernel (tcp_read_skb), unlike tcp_recvmsg and splice,
    which skip the old bytes. The pod must get every byte once."""
    agent, client, server = path_agent
    got, first_wrong, end = overlap_run(mesh_env, client, server)
    assert (got, first_wrong, end) == (512 << 10, "None", "eof"), (
        f"the pod read {got} bytes of {512 << 10} ({end}), the first wrong at {first_wrong}",
        json.dumps(agent.request("status")["decisions"]),
    )
    status = agent.request("status")
    if status["datapath"] == "sockmap":  # the verdict saw the overlap and cut it off
        assert status["decisions"].get("overlap", {}).get("egress", 0) >= 1, status["decisions"]
    wait_for(lambda: drained(agent), what="map entries to go")


def test_where_repeated_bytes_cannot_be_cut_off_the_connection_is_reset(mesh_env):
    """Where cutting could panic the kernel (6.0 to 6.3 before the fix that
    dropped the verdict caller's second reference) the verdict only drops
    the segment and the forwarder resets the connection: the pod reads a
    prefix of the stream, whole, then a reset, never a repeated block."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    agent = start_agent(mesh_env, "--datapath", "sockmap", "--bpf-cflag", "-DMESH_SEQ_CHECK=1")
    try:
        agent.attach(client)
        got, first_wrong, end = overlap_run(mesh_env, client, server)
        assert (first_wrong, end) == ("None", "reset"), (got, first_wrong, end)
        assert got < 512 << 10
        decisions = agent.request("status")["decisions"]
        assert decisions.get("overlap_lost", {}).get("egress", 0) >= 1, decisions
        assert "could not be cut off" in agent.log()
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.kernel_matrix
def test_half_close_then_ten_megabytes_back(mesh_env, path_agent):
    agent, client, server = path_agent
    srv = mesh_env.server(server, PORT, "--send", str(10 * MB), "--send-after-eof")
    for host in (server.ip4, server.ip6):
        out = mesh_env.client(client, host, PORT, "--send", "1000")
        seen = srv.next()
        assert seen["recv_bytes"] == 1000 and seen["recv_sha"] == out["sent_sha"]
        assert out["recv_bytes"] == 10 * MB and out["recv_sha"] == seen["sent_sha"]
    wait_for(lambda: drained(agent), what="map entries to go")


def test_reset_from_the_server_reaches_the_pod(mesh_env, path_agent):
    agent, client, server = path_agent
    srv = mesh_env.server(server, PORT, "--reset", "100")
    out = mesh_env.client(client, server.ip4, PORT, "--send", str(4 * MB))
    assert srv.next()["reset_after"] == 100
    assert "ConnectionResetError" in (out.get("recv_error"), out.get("send_error")), out
    try:
        wait_for(lambda: agent.pod_status("client")["resets"] == 1, what="the reset to be counted")
    except AssertionError as exc:
        conns = agent.request("connections")["connections"]
        raise AssertionError(f"{exc}: {agent.pod_status('client')}; {conns}") from None
    wait_for(lambda: drained(agent), what="map entries to go")


def test_reset_from_the_pod_reaches_the_server(mesh_env, path_agent):
    agent, client, server = path_agent
    srv = mesh_env.server(server, PORT)
    out = mesh_env.client(client, server.ip4, PORT, "--reset", "100")
    assert out["connected_to"] == f"{server.ip4}:{PORT}"
    assert agent.forwarded() == 1
    seen = srv.next()
    assert seen.get("recv_error") == "ConnectionResetError", seen
    wait_for(lambda: drained(agent), what="map entries to go")


def test_many_short_connections_leave_nothing_behind(mesh_env, path_agent):
    agent, client, server = path_agent
    conns = 300
    srv = mesh_env.server(server, PORT, "--send", "64")
    proc = mesh_env.tcptool(
        client, "stress", "--host", server.ip6, "--port", str(PORT),
        "--conns", str(conns), "--random-size", "64",
    )  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert json.loads(out.splitlines()[-1]) == {"done": conns, "stuck": 0}
    for _ in range(conns):
        seen = srv.next()
        assert seen["sent_bytes"] == 64
        # From the pod's own address: the upstream socket was made in its
        # netns (in batches: forwarder/upstreams.py).
        assert seen["peer"] == client.ip6, seen
    wait_for(lambda: drained(agent), what="map entries to go")
    assert agent.pod_status("client")["connections_total"] == conns
    made = agent.request("status")["upstreams"]
    assert made["made"] >= conns and made["batches"] < made["made"] // 2, made
    # An idle pod's spare sockets are closed (after upstreams.IDLE, at a
    # tick): on one path, which has no say in it (3 s each).
    if agent.request("status")["datapath"] == "copy":
        spares = lambda: agent.request("status")["upstreams"]["spare"]  # noqa: E731
        wait_for(lambda: spares() == 0, timeout=10, what="the pod's spare sockets to close")


def test_the_kill_switch_moves_new_connections_to_copy(mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "1000")
    agent = start_agent(mesh_env, "--datapath", "sockmap")
    try:
        agent.attach(client)
        # Held open until the forwarder has it: a socket that already got its
        # peer's FIN cannot enter the sockhash and is copied instead.
        go = mesh_env.state_dir / "go"
        first = mesh_env.tcptool(
            client, "client", "--host", server.ip4, "--port", str(PORT),
            "--send", "1000", "--pause-at", "0", "--wait-file", str(go),
        )  # fmt: skip
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 1, what="forwarding")
        go.write_text("")
        first.communicate(timeout=60)
        srv.next()
        out = mesh_env.meshagent("datapath", "set", "copy").stdout
        assert "data path copy for new connections" in out
        assert mesh_env.meshagent("datapath").stdout.startswith("copy:")
        mesh_env.client(client, server.ip4, PORT, "--send", "1000")
        srv.next()
        used = [c["datapath"] for c in agent.request("connections")["connections"]]
        assert used == ["sockmap", "copy"]
        paths = agent.request("status")["datapaths"]
        assert paths["sockmap"]["connections_total"] == paths["copy"]["connections_total"] == 1
        bad = mesh_env.meshagent("datapath", "set", "warp", check=False)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.kernel_matrix
def test_auto_picks_splice_when_the_kernel_has_no_sockhash(mesh_env):
    agent = start_agent(mesh_env, "--without", "sockhash")
    try:
        status = agent.request("status")
        assert status["datapath"] == "splice"
        assert "sockhash" in status["datapath_reason"]
        assert "sockhash" not in " ".join(status["kernel_features"])
    finally:
        assert agent.stop() == 0, agent.log()
