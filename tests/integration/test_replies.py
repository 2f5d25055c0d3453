"""A same-node server's replies straight into the pod's socket ([P] part 3,
bpf/sk_msg.c mesh_reply_msg): on the sockmap path with sk_msg, once the
pod's socket has read everything that came before, the server's sends go
into its receive queue, within its free receive memory; past that they take
the TCP path through the forwarder, and the next request arms them again.

Real pods and the real kernel: a server that greets first, then answers each
request with a reply of the size asked (1 B to 3 MiB, some read slowly so
that the budget runs out mid-reply, some pipelined); the client checks
every byte of every reply, and the agent's count of the connection's bytes
is checked against both ends' own.

The server is non-blocking, as redis, nginx and most servers are: a
blocking read on a socket in a sockmap can return EAGAIN when the socket's
own send path wakes it (tcp_bpf_recvmsg does not wait again; seen here on
6.18 with a thread-per-connection server), which is why this path is off
unless asked for (--sockmap-replies)."""

from __future__ import annotations

import json

import pytest
from meshenv import start_agent, wait_for

from meshagent.bpf import abi

PORT = 7300

SERVER = r"""
# Non-blocking, one thread (as redis and nginx are): see the module's note.
import json, random, selectors, socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
srv.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)
print(json.dumps({"listening": True}), flush=True)
state = {}

def want(conn):
    st = state[conn]
    sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if st["out"] else 0))

while True:
    for key, events in sel.select():
        sock = key.fileobj
        if sock is srv:
            conn, _ = srv.accept()
            conn.setblocking(False)
            state[conn] = {"in": b"", "out": bytearray(b"hello\n"), "sent": 0, "received": 0}
            sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            continue
        st = state[sock]
        if events & selectors.EVENT_READ:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                sel.unregister(sock)
                sock.close()
                print(json.dumps({"sent": st["sent"], "received": st["received"]}), flush=True)
                del state[sock]
                continue
            if chunk:
                st["received"] += len(chunk)
                st["in"] += chunk
                while b"\n" in st["in"]:
                    line, st["in"] = st["in"].split(b"\n", 1)
                    size, seed = map(int, line.split())
                    st["out"] += random.Random(seed).randbytes(size)
        if st["out"]:
            try:
                n = sock.send(st["out"][: 1 << 20])
            except BlockingIOError:
                n = 0
            del st["out"][:n]
            st["sent"] += n
        want(sock)
"""

CLIENT = r"""
import hashlib, json, random, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
sock = socket.create_connection((host, port), timeout=60)

def exactly(n, slow=False):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(4096 if slow else 1 << 20, n - len(out)))
        if not chunk:
            raise SystemExit(f"EOF after {len(out)} of {n} bytes")
        out += chunk
        if slow and len(out) % (256 * 1024) < 4096:
            time.sleep(0.01)
    return bytes(out)

assert exactly(6) == b"hello\n"
received, sent, seed = 6, 0, 0

def ask(sizes, slow=False):
    global received, sent, seed
    wanted = []
    request = b""
    for size in sizes:
        seed += 1
        request += b"%d %d\n" % (size, seed)
        wanted.append((size, seed))
    sock.sendall(request)
    sent += len(request)
    for size, s in wanted:
        got = exactly(size, slow)
        if got != random.Random(s).randbytes(size):
            raise SystemExit(f"reply {s} ({size} B) differs from what the server sent")
        received += size

for i in range(40):  # the connection moves from copy to the sockmap
    ask([1 + i * 37])
for size in (1, 100, 4096, 65536, 200000, 1, 7):
    ask([size])
ask([3 << 20], slow=True)  # the budget runs out mid-reply: the rest by TCP
for size in (1, 5000, 1 << 20, 2):  # armed again by the next request
    ask([size])
ask([10, 100000, 1, 70000])  # pipelined
ask([2 << 20], slow=True)
ask([3])

def overlapped(first, part, second):
    # The next request while a reply is still coming by TCP and unread:
    # its reply must not overtake the rest of the first one.
    global received, sent, seed
    seeds = (seed + 1, seed + 2)
    seed += 2
    sock.sendall(b"%d %d\n" % (first, seeds[0]))
    head = exactly(part, slow=True)
    sock.sendall(b"%d %d\n" % (second, seeds[1]))
    sent += len(b"%d %d\n" % (first, seeds[0])) + len(b"%d %d\n" % (second, seeds[1]))
    if head + exactly(first - part) != random.Random(seeds[0]).randbytes(first):
        raise SystemExit(f"reply {seeds[0]} ({first} B) differs from what the server sent")
    if exactly(second) != random.Random(seeds[1]).randbytes(second):
        raise SystemExit(f"reply {seeds[1]} ({second} B) differs from what the server sent")
    received += first + second

overlapped(8 << 20, 1 << 20, 50000)  # past any receive buffer: the rest by TCP
ask([1])
overlapped(8 << 20, 7 << 20, 3)
ask([2])
sock.close()
print(json.dumps({"sent": sent, "received": received}))
"""


SHORT = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)

def exactly(n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise SystemExit("EOF")
        out += chunk
    return out

assert exactly(6) == b"hello\n"
sock.sendall(b"3 1\n")
exactly(3)
sock.close()
"""


@pytest.fixture(params=["replies", "no-replies"])
def replies_agent(request, mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    extra = ["--sockmap-msg", *(["--sockmap-replies"] if request.param == "replies" else [])]
    agent = start_agent(mesh_env, "--datapath", "sockmap", *extra)
    status = agent.request("status")
    if not status["datapaths"]["sockmap"]["msg"]:
        agent.stop()
        notes = [n for n in status.get("notes", []) if "sk_msg" in n]
        pytest.skip(f"no sk_msg fast path on this kernel: {notes or status['datapaths']}")
    agent.attach(client)
    try:
        yield agent, client, server, request.param == "replies"
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.kernel_matrix
def test_replies_reach_the_pod_whole_and_in_order_and_are_counted(mesh_env, replies_agent):
    agent, client, server, replies = replies_agent
    proc = mesh_env.popen(server, ["python3", "-c", SERVER, str(PORT)], stdout=-1, text=True)
    assert json.loads(proc.stdout.readline()) == {"listening": True}
    before = agent.decisions()
    ends = json.loads(mesh_env.script(client, CLIENT, server.ip4, str(PORT)).splitlines()[-1])
    server_end = json.loads(proc.stdout.readline())
    assert (server_end["sent"], server_end["received"]) == (ends["received"], ends["sent"])

    def record():
        conns = agent.request("connections")["connections"]
        done = [c for c in conns if c["orig_dst"] == f"{server.ip4}:{PORT}" and c["ended"]]
        return done[-1] if done else None

    conn = wait_for(record, what="the connection's record")
    assert conn["datapath"] == "sockmap", conn
    # The agent's count is the application's, also for the bytes that
    # never passed the forwarder's sockets.
    assert (conn["bytes_out"], conn["bytes_in"]) == (ends["sent"], ends["received"]), conn
    after = agent.decisions()
    went = {k: after.get(k, 0) - before.get(k, 0) for k in ("msg_ingress", "reply_held")}
    if replies:
        assert went["msg_ingress"] > 0, went
        # The slow reads ran the budget out: some replies took the TCP path.
        assert went["reply_held"] > 0, went
    else:
        assert went == {"msg_ingress": 0, "reply_held": 0}, went
    # The connection's entries went with it (counted in the kernel's maps).
    assert {spec.name: entries(mesh_env, spec) for spec in (abi.REPLY, abi.RARM)} == {
        "mesh_reply": 0,
        "mesh_rarm": 0,
    }
    if replies:
        # Short connections, carried by copy to their end: their entries go
        # when the forwarder's upstream socket closes (sock_ops).
        for _ in range(5):
            mesh_env.script(client, SHORT, server.ip4, str(PORT))
            proc.stdout.readline()
        wait_for(lambda: entries(mesh_env, abi.REPLY) == 0, what="mesh_reply to empty")
    if not replies:  # switched on while the agent runs: the next connection's replies
        agent.request("datapath", set="sockmap", replies=True)
        mesh_env.script(client, CLIENT, server.ip4, str(PORT))
        proc.stdout.readline()
        assert agent.decisions().get("msg_ingress", 0) > 0


def entries(env, spec) -> int:
    """Entries in the agent's pinned map now."""
    from meshagent.bpf import syscall as sc
    from meshagent.bpf.pins import Pins

    fd = Pins(env.state_dir).open("maps", spec.name)
    assert fd is not None, f"no pinned {spec.name}"
    table = sc.MapFd(fd, spec)
    try:
        return table.count()
    finally:
        table.close()
