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
wait in the upstream socket's own queue, whose window closes.

The same with 100 connections at once (the node's memory), a reader that
reads slowly, a pod that stops reading replies while it sends (an echo
server), and a server that stops reading while the pod sends (on "sockmap"
the pod's sends go through sk_msg; on "sockmap-nomsg" through the verdict
and its budget). Each stream is a per-connection pattern with a prime
period (PEER), so a lost, doubled or misplaced segment shows where."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from meshenv import MeshEnv, reap, start_agent

PORT = 7311
CAP = 256 << 20
BOUND = 64 << 20  # direct stops under 1 MiB, copy near 11 MiB (6.18)
DATAPATHS = ["copy", "splice", "sockmap", "sockmap-nomsg"]

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


@pytest.mark.kernel_matrix
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_client_that_stops_reading_stops_its_server(mesh_env, datapath):
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    mode, _, nomsg = datapath.partition("-")
    msg = ["--sockmap-msg"] if mode == "sockmap" and not nomsg else []
    agent = start_agent(mesh_env, "--datapath", mode, *msg)
    procs: list[subprocess.Popen] = []
    try:
        agent.attach(client)
        writer = mesh_env.popen(
            server, [sys.executable, "-c", WRITER, str(PORT), str(CAP)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(writer)
        assert writer.stdout.readline().strip() == "ready"
        reader = mesh_env.popen(
            client, [sys.executable, "-c", READER, server.ip4, str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(reader)
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
        for proc in procs:
            end(proc)
        assert agent.stop() == 0, agent.log()


PEER = r"""
import json, random, select, socket, sys, time
role, host, port, conns = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
PERIOD, CHUNK = 65521, 1 << 16  # connection i's bytes: pats[i] repeated; a prime
# period, so a lost, doubled or misplaced segment shows


def out(**fields):
    print(json.dumps(fields), flush=True)


if role == "listen":
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port)); lsock.listen(conns); lsock.settimeout(60)
    out(listening=port)
    socks = [None] * conns
    for _ in range(conns):
        conn, _ = lsock.accept(); conn.settimeout(60)
        socks[int.from_bytes(conn.recv(2, socket.MSG_WAITALL), "big")] = conn
else:
    socks = [socket.create_connection((host, port), timeout=60) for _ in range(conns)]
    for i, sock in enumerate(socks):
        sock.sendall(i.to_bytes(2, "big"))
for sock in socks:
    sock.setblocking(False)
bases = [random.Random(i).randbytes(PERIOD) for i in range(conns)]
pats = [memoryview((base * 3)[:PERIOD + CHUNK]) for base in bases]  # CHUNK from any offset
sent, got, bad, eof = [0] * conns, [0] * conns, {}, set()
out(ready=conns)


def send_some(i, most):
    at = sent[i] % PERIOD
    try:
        n = socks[i].send(pats[i][at:at + min(most, CHUNK)])
    except BlockingIOError:
        return 0
    sent[i] += n
    return n


def recv_some(i, most):
    try:
        data = socks[i].recv(min(most, CHUNK))
    except BlockingIOError:
        return b""
    if not data:
        eof.add(i)
        return b""
    at = got[i] % PERIOD
    if i in bad or data != pats[i][at:at + len(data)]:
        track(i, data)
    got[i] += len(data)
    return data


def track(i, data):
    # From the first wrong byte on, where each run of bytes belongs: runs of
    # [stream offset, shift] (the pattern offset is the stream's plus shift,
    # modulo PERIOD; None: found nowhere), 16 at most. Tells a reorder (a
    # shift and its way back) from a loss or a copy.
    if i not in bad:
        bad[i] = {"port": socks[i].getsockname()[1], "runs": []}
    runs = bad[i]["runs"]
    k = 0
    while k < len(data) and len(runs) < 16:
        shift = runs[-1][1] if runs else 0
        if shift is None:
            return
        at = (got[i] + k + shift) % PERIOD
        ref = pats[i][at:at + len(data) - k]
        if data[k:] == ref:
            return
        k += next(j for j, byte in enumerate(data[k:]) if byte != ref[j])
        found = pats[i].tobytes().find(data[k:k + 64])
        runs.append([got[i] + k, None if found < 0 else (found - (got[i] + k)) % PERIOD])
        if not bad[i].get("at"):
            bad[i].update(at=got[i] + k, len=len(data), shift=runs[-1][1])
        k += 1


def run(send_to=0, recv_to=None, stall=1.5, pace=None, deadline=120.0):
    # Send up to send_to (a connection stops when send() said EAGAIN for
    # `stall` s) while reading up to recv_to (pace: [bytes, seconds]).
    send_to = send_to if isinstance(send_to, list) else [send_to] * conns
    recv_to = recv_to if isinstance(recv_to, list) or recv_to is None else [recv_to] * conns
    start = time.monotonic(); end = start + deadline; tick = start
    last = [start] * conns
    sending = {i for i in range(conns) if sent[i] < send_to[i]}
    reading = {i for i in range(conns) if recv_to and got[i] < recv_to[i]}
    while (sending or reading) and time.monotonic() < end:
        now = time.monotonic(); moved = 0
        for i in list(sending):
            n = send_some(i, send_to[i] - sent[i]); moved += n
            last[i] = now if n else last[i]
            if sent[i] >= send_to[i] or now - last[i] >= stall:
                sending.discard(i)
        due = pace is None or now >= tick
        for i in list(reading) if due else ():
            want = recv_to[i] - got[i] if pace is None else min(pace[0], recv_to[i] - got[i])
            while want > 0 and (n := len(recv_some(i, want))):
                moved += n; want -= n
                if pace is None:
                    break
            if got[i] >= recv_to[i] or i in eof:
                reading.discard(i)
        if pace is not None and due:
            tick = now + pace[1]
        if not moved:
            rlist = [socks[i] for i in reading] if pace is None else []
            wait = 0.05 if pace is None else max(0.0, min(0.05, tick - time.monotonic()))
            select.select(rlist, [socks[i] for i in sending], [], wait)
    out(sent=sent, got=got, bad=bad, eof=sorted(eof))


def echo(deadline=120.0):
    # Send back all that arrives; read only when all read is sent, so a
    # blocked send stops the reading. Once, after send() said EAGAIN for
    # 1 s: what was read and sent by then.
    sock, pending, echoed, since, told = socks[0], b"", 0, None, False
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if pending:
            try:
                n = sock.send(pending[:CHUNK])
            except BlockingIOError:
                since = since or time.monotonic()
                if not told and time.monotonic() - since >= 1.0:
                    out(blocked=True, got=got[0], echoed=echoed); told = True
                select.select([], [sock], [], 0.05)
                continue
            pending, echoed, since = pending[n:], echoed + n, None
        elif 0 in eof:
            break
        else:
            pending = recv_some(0, CHUNK)
            if not pending and 0 not in eof:
                select.select([sock], [], [], 0.05)
    sock.shutdown(socket.SHUT_WR)
    out(echoed=echoed, got=got[0], bad=bad, eof=sorted(eof))


def shut():
    for sock in socks:
        sock.shutdown(socket.SHUT_WR)
    out(shut=conns)


def sndbuf(size):
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    out(sndbuf=socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd.pop("op")
    if op == "close":
        break
    {"run": run, "echo": echo, "shut": shut, "sndbuf": sndbuf}[op](**cmd)
for sock in socks:
    sock.setblocking(True); sock.close()
"""


def end(proc: subprocess.Popen) -> None:
    """Kill proc (by its PID) if it still runs, and reap it."""
    reap(proc)


class Peer:
    """PEER in a pod, `listen`ing on PORT or `connect`ing to host:PORT with
    conns connections; told ops as JSON lines, its JSON lines on a queue."""

    def __init__(self, env: MeshEnv, pod, role: str, host: str, conns: int,
                 port: int = PORT) -> None:  # fmt: skip
        self.proc = env.popen(
            pod, [sys.executable, "-c", PEER, role, host, str(port), str(conns)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def tell(self, op: str, **args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def next(self, what: str, timeout: float = 180) -> dict:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"waited {timeout}s for {what}") from None
        assert item is not None, f"waiting for {what}: the peer exited {self.proc.poll()}"
        return item

    def close(self) -> None:
        self.tell("close")
        assert self.proc.wait(timeout=30) == 0


def agent_for(env: MeshEnv, datapath: str, *args: str):
    """An agent on a DATAPATHS entry, with the default --sockmap-budget (4 MiB)
    unless args say otherwise."""
    mode, _, nomsg = datapath.partition("-")
    msg = ["--sockmap-msg"] if mode == "sockmap" and not nomsg else []
    agent = start_agent(env, "--datapath", mode, *msg, *args)
    assert agent.request("status")["datapath"] == mode
    return agent


def one_connection(env: MeshEnv, server, client, peers: list) -> tuple[Peer, Peer]:
    """A Peer listening in server and one in client connected to it (both
    added to peers, which the test ends)."""
    far = Peer(env, server, "listen", "0.0.0.0", 1)
    peers.append(far)
    assert "listening" in far.next("listening")
    near = Peer(env, client, "connect", server.ip4, 1)
    peers.append(near)
    assert far.next("accept") == near.next("connect") == {"ready": 1}
    return far, near


def held_back(agent) -> dict:
    """What the sockmap path says it holds back (empty on other paths)."""
    status = agent.request("status")
    if status["datapath"] != "sockmap":
        return {}
    path = status["datapaths"]["sockmap"]
    keys = (
        "throttles",
        "throttled_connections",
        "held_bytes",
        "budget_bytes",
        "handoff_bytes",
        "handoff_bypasses",
        "disorders",
    )
    return {**{key: path[key] for key in keys},
            "kernel_held": status["decisions"].get("throttled", {}).get("egress", 0),
            "decisions": status["decisions"]}  # fmt: skip


def sockets_of(*pods) -> str:
    """The pods' TCP sockets as ss sees them (queues, windows, memory): what
    a failure message needs to say where bytes stopped."""
    out = []
    for pod in pods:
        for argv in (["ss", "-tnmieo"], ["nstat", "-az", "TcpExt*Drop*", "TcpExt*Prune*",
                                          "TcpExtTCPTimeouts", "TcpRetransSegs"]):  # fmt: skip
            shown = subprocess.run(["ip", "netns", "exec", pod.netns, *argv],
                                   capture_output=True, text=True, timeout=10)  # fmt: skip
            out.append(f"pod {pod.name}, {argv[0]}:\n{shown.stdout.strip()}")
    return "\n".join(out)


def stall_lines(agent) -> list[str]:
    """The agent's log lines about stalls and the hand-off's order checks."""
    keys = ("stall", "order check", "never saw")
    return [line for line in agent.log().splitlines() if any(k in line for k in keys)][:20]


def order_warnings(agent) -> list[str]:
    """The agent's log lines about the sockmap hand-off's order checks."""
    return [line for line in agent.log().splitlines() if "order check" in line][:20]


def tcp_mem() -> int:
    """The node's TCP memory in bytes: /proc/net/sockstat's "TCP: ... mem N"
    (pages; every namespace's sockets count in it)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * 4096
    raise AssertionError("no TCP line in /proc/net/sockstat")


def node_mem() -> int:
    """The node's memory in use (MemTotal - MemAvailable), in bytes: it also
    sees skbs that wait in a psock queue, which TCP memory does not count."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


MANY = 100
MANY_CAP = 64 << 20
# Memory per connection nobody reads: every byte written sits in some queue.
# TCP memory seen on 6.18 (default budget, 4 MiB): direct 0.8 MiB a connection
# (80 MiB written), copy 10-12, splice 11, sockmap and sockmap-nomsg 10.5-12.5.
# With the budget at 1 GiB (no back-pressure) every writer reached MANY_CAP:
# 6.4 GiB written, node memory +6.6 GiB, yet TCP memory only +1.5 GiB (the
# node's tcp_mem pressure line): a psock queue's skbs are not TCP memory, so
# the node's memory and the writers' counts are what catch that.
MANY_MEM = 16 << 20  # BOUND / 4: the 100 connections' bound is 1.6 GiB
NODE_SLACK = 512 << 20  # the peers' own memory, and the rest of the node's


# On the kernel matrix too: its guests have 2 GiB, where tcp_mem's pressure
# line also bounds the TCP memory (6.12 guest: +176 MiB through the sockmap,
# +172 MiB through copy), but not a psock queue's skbs: the writers' counts
# and the node's memory still catch a sockmap that does not hold back.
@pytest.mark.kernel_matrix
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_many_pods_connections_that_stop_reading_stop_their_server(mesh_env, datapath):
    """100 connections from one pod, none read, the server writes to all as
    fast as it can: each writer blocks, the node's TCP memory and its memory
    stay bounded (MANY_MEM a connection), then every byte arrives, in order."""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, datapath)
    peers: list[Peer] = []
    try:
        agent.attach(client)
        writer = Peer(mesh_env, server, "listen", "0.0.0.0", MANY)
        peers.append(writer)
        assert "listening" in writer.next("listening")
        before, node_before = tcp_mem(), node_mem()
        reader = Peer(mesh_env, client, "connect", server.ip4, MANY)
        peers.append(reader)
        assert writer.next("accepts") == reader.next("connects") == {"ready": MANY}
        writer.tell("run", send_to=MANY_CAP, stall=1.5)
        written = writer.next("the writers' counts")["sent"]
        queued = tcp_mem() - before  # all writers blocked (or done)
        node_used = node_mem() - node_before
        held = held_back(agent)
        print(f"\n{datapath}: {MANY} writers wrote {sum(written) >> 20} MiB"
              f" (max {max(written) >> 20} MiB), TCP memory +{queued >> 20} MiB,"
              f" node memory +{node_used >> 20} MiB; {held}")  # fmt: skip
        # A bound, not a timing: the 6.1 guest (software emulation) read back
        # 576 MiB at about 2.5 MiB/s and ran out of the default 120 s
        reader.tell("run", recv_to=written, deadline=600.0)
        seen = reader.next("the readers' counts", timeout=660)
        after = held_back(agent)
        print(f"after reading: {after.get('disorders')}, bypasses"
              f" {after.get('handoff_bypasses')}")  # fmt: skip
        writer.close()
        reader.close()
        assert seen["got"] == written, "some bytes never arrived"
        assert seen["bad"] == {} and seen["eof"] == [], (seen, order_warnings(agent))
        capped = [i for i, n in enumerate(written) if n >= MANY_CAP]
        assert not capped, f"{len(capped)} writers never blocked ({datapath}): no back-pressure"
        assert max(written) <= BOUND
        assert queued <= MANY * MANY_MEM, (
            f"{queued >> 20} MiB of TCP memory for {MANY} connections nobody read"
        )
        assert node_used <= MANY * MANY_MEM + NODE_SLACK, (
            f"the node used {node_used >> 20} MiB more for {MANY} connections nobody read"
        )
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


SLOW_TOTAL = 16 << 20
# 64 KiB every 40 ms: about 10 s for SLOW_TOTAL; slow enough that a writer in
# a QEMU guest without KVM still outruns it by more than the budget.
SLOW_PACE = [64 << 10, 0.04]
# At the default budget SLOW_TOTAL can nearly fit in the pair's buffers (the
# pod's receive window, the sockets' send queues), so one machine throttles
# once and another never. A small budget makes every fill cross it.
SLOW_BUDGET = 256 << 10


@pytest.mark.kernel_matrix
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_slow_reader_gets_every_byte_in_order(mesh_env, datapath):
    """The server writes SLOW_TOTAL as fast as it can; the pod reads slowly.
    Every byte arrives in order; the sockmap holds bytes back on the way."""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, datapath, "--sockmap-budget", str(SLOW_BUDGET))
    peers: list[Peer] = []
    try:
        agent.attach(client)
        writer, reader = one_connection(mesh_env, server, client, peers)
        writer.tell("run", send_to=SLOW_TOTAL, stall=60)  # blocks as long as it must
        reader.tell("run", recv_to=SLOW_TOTAL, pace=SLOW_PACE)
        seen = reader.next("the reader's count")
        written = writer.next("the writer's count")
        writer.close()
        reader.close()
        held = closed_and_counted(agent) if datapath.startswith("sockmap") else {}
        print(f"\n{datapath}: slow reader got {seen['got'][0] >> 20} MiB; {held}")
        assert written["sent"] == [SLOW_TOTAL], written
        assert seen["got"] == [SLOW_TOTAL] and seen["bad"] == {}, seen
        if held:
            assert held["budget_bytes"] == SLOW_BUDGET, held
            # Once the kernel spliced anything, a reader this slow takes the
            # pair past the budget. (If the hand-off never caught up with
            # the writer, Python carried it all, held back by its own send
            # buffer: see the xfail below. CI saw that on a loaded machine.)
            if held["decisions"].get("spliced", {}).get("egress", 0):
                assert held["kernel_held"] > 0, held
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


AGAIN = 128 << 20


def closed_and_counted(agent, deadline: float = 10.0) -> dict:
    """held_back() once the sockmap path has counted its connections as
    closed (their handoff_bytes go into the path's totals then)."""
    end_at = time.monotonic() + deadline
    while True:
        path = agent.request("status")["datapaths"]["sockmap"]
        if path["connections_active"] == 0 or time.monotonic() > end_at:
            return held_back(agent)
        time.sleep(0.05)


@pytest.mark.kernel_matrix
@pytest.mark.xfail(
    strict=False,  # since the memory budget fixed the sockets' buffers it sometimes
    # catches up (1 run in 3 on 6.18 here): not yet something to rely on
    reason="[L] open: after a hold-back, against a writer that never pauses, the hand-off "
    "rarely catches up and Python carries the rest. A catch-up that fixed this (commit "
    "8412107) ran downloads at 0.4 Gbit/s (zero windows nobody announced) and was "
    "reverted; bench/results/zero-window.md",
)
@pytest.mark.parametrize("datapath", ["sockmap", "sockmap-nomsg"])
def test_after_a_hold_back_the_kernel_splices_again(mesh_env, datapath):
    """The pod reads nothing until its server blocks (a hold-back), then
    reads it all and AGAIN more while the server writes as fast as it can:
    Python carried what was held, the kernel carries most of the rest. The
    hand-off must catch up with a writer that never pauses (each byte
    Python takes would reopen the window it fills)."""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, datapath)
    peers: list[Peer] = []
    try:
        agent.attach(client)
        writer, reader = one_connection(mesh_env, server, client, peers)
        writer.tell("run", send_to=CAP, stall=1.5)
        first = writer.next("the writer's count")["sent"][0]
        # held back by the verdict, or by Python if the hand-off had not
        # caught up yet: either way the server blocked
        assert first <= BOUND, f"the server wrote {first >> 20} MiB: no back-pressure"
        total = first + AGAIN
        writer.tell("run", send_to=total, stall=60)
        reader.tell("run", recv_to=total)
        seen = reader.next("the reader's count")
        written = writer.next("the writer's count")
        writer.close()
        reader.close()
        held = closed_and_counted(agent)
        print(f"\n{datapath}: held {first >> 20} MiB, then {AGAIN >> 20} MiB more;"
              f" Python carried {held['handoff_bytes'] >> 20} MiB; {held}")  # fmt: skip
        assert written["sent"] == [total], written
        assert seen["got"] == [total] and seen["bad"] == {}, seen
        # Quiet 6.18 host: Python carried 20-25% of AGAIN; with a QEMU guest
        # busy beside it, 37%; before the catch-up, all of it.
        assert held["handoff_bytes"] <= first + AGAIN // 2, (
            f"Python carried {held['handoff_bytes'] >> 20} MiB of {total >> 20} MiB:"
            " splicing did not resume after the hold-back"
        )
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


ECHO_TOTAL = 2 * BOUND  # the pod's sends fill both ways' queues: up to BOUND each


# Without sk_msg both directions go through the verdict, and a hold-back's
# passes could wait uncharged behind the other direction's redirects in the
# accepted socket's psock queue; charged all at once, they took it past its
# receive buffer, the kernel retracted the window to 0 (NOMEM) and dropped
# what was in flight, and the pod's TCP waited out its retransmission
# backoff (rto 26 s at backoff 7; 1 run in 85 with a QEMU guest beside it,
# and once in CI). The verdict now redirects nothing into a socket that is
# itself passing (mesh_peer_passing): the retractions went from 14 in 10
# runs to 0 (bench/results/echo-stall.md). Non-strict until CI has run it
# often enough to say the rare stall is gone too.
ECHO_NOMSG_STALL = pytest.mark.xfail(
    strict=False,
    reason="believed fixed (mesh_peer_passing), kept non-strict until CI confirms: on sockmap "
    "without sk_msg, under CPU load, a two-way hold-back stalled for tens of seconds "
    "(window retracted by NOMEM, the pod's retransmission backoff); "
    "bench/results/echo-stall.md",
)


@pytest.mark.kernel_matrix
@pytest.mark.parametrize(
    "datapath",
    [p if p != "sockmap-nomsg" else pytest.param(p, marks=ECHO_NOMSG_STALL) for p in DATAPATHS],
)
def test_a_pod_that_stops_reading_replies_stops_its_own_sends(mesh_env, datapath):
    """The pod sends ECHO_TOTAL to a server that sends back all it reads,
    and reads nothing: the server's send blocks, so it stops reading, so the
    pod's send blocks. Then the pod reads: both ways every byte, in order."""
    echo_through(mesh_env, datapath, pod_sndbuf=0)


@pytest.mark.kernel_matrix
@pytest.mark.parametrize("datapath", ["sockmap", "copy"])
def test_a_pod_whose_sends_the_kernel_cuts_short_keeps_its_order(mesh_env, datapath):
    """The same with the pod's send buffer at its smallest: its 64 KiB sends
    often go into its own TCP only in part. With sk_msg the kernel then
    passes the pod's next send without running the program (it keeps the
    last verdict), and a counted P fell behind: a later redirect overtook
    bytes not yet carried (1 run in 3 in the 6.12 guest, before
    bpf/sk_msg.c read P from the socket)."""
    echo_through(mesh_env, datapath, pod_sndbuf=4096)


def echo_through(mesh_env, datapath: str, pod_sndbuf: int) -> None:
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, datapath)
    peers: list[Peer] = []
    try:
        agent.attach(client)
        echo, pod = one_connection(mesh_env, server, client, peers)
        if pod_sndbuf:
            pod.tell("sndbuf", size=pod_sndbuf)
            assert pod.next("the pod's send buffer")["sndbuf"] <= 4 * pod_sndbuf
        echo.tell("echo")
        pod.tell("run", send_to=ECHO_TOTAL, stall=1.5)
        first = pod.next("the pod's count")["sent"][0]
        blocked = echo.next("the server's send to block", timeout=30)
        held = held_back(agent)
        print(f"\n{datapath}: the pod sent {first >> 20} MiB, the server read"
              f" {blocked['got'] >> 20} MiB and sent back {blocked['echoed'] >> 20} MiB"
              f" before blocking; {held}")  # fmt: skip
        pod.tell("run", send_to=ECHO_TOTAL, recv_to=ECHO_TOTAL, stall=60)
        seen = pod.next("the pod's counts")
        # where bytes stopped, while the sockets still hold them
        stuck = "" if seen["got"] == [ECHO_TOTAL] else sockets_of(client, server)
        pod.tell("shut")
        assert pod.next("the pod's FIN") == {"shut": 1}
        echoed = echo.next("the server's counts")
        after = held_back(agent)
        echo.close()
        pod.close()
        # Both ways at once: a misplaced block the server read (the pod's
        # sends) comes back to the pod too; the server's count says which.
        assert (seen["bad"], echoed["bad"]) == ({}, {}), (
            f"misplaced bytes ({datapath}): the pod read {seen['bad']},"
            f" the server read {echoed['bad']}; {after}"
        )
        assert seen["sent"] == seen["got"] == [ECHO_TOTAL], (
            f"{seen}; the server: {echoed}; {after}\n{stuck}\n" + "\n".join(stall_lines(agent))
        )
        assert echoed["got"] == echoed["echoed"] == ECHO_TOTAL, echoed
        assert blocked["echoed"] < ECHO_TOTAL, blocked
        assert first < ECHO_TOTAL, f"the pod's sends never blocked ({datapath})"
        assert blocked["echoed"] <= BOUND
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


@pytest.mark.kernel_matrix
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_server_that_stops_reading_stops_the_pod(mesh_env, datapath):
    """The other way: the server reads nothing while the pod sends as fast as
    it can. The pod's send blocks within BOUND (on "sockmap" its sends go
    through sk_msg; on "sockmap-nomsg" through the verdict and its budget);
    then the server reads every byte, in order."""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, datapath)
    peers: list[Peer] = []
    try:
        agent.attach(client)
        reader, writer = one_connection(mesh_env, server, client, peers)
        writer.tell("run", send_to=CAP, stall=1.5)
        written = writer.next("the pod's count")["sent"]
        held = held_back(agent)
        print(f"\n{datapath}: the pod wrote {written[0] >> 20} MiB; {held}")
        reader.tell("run", recv_to=written)
        seen = reader.next("the server's count")
        writer.close()
        reader.close()
        assert seen["got"] == written and seen["bad"] == {}, seen
        assert written[0] <= BOUND, (
            f"the pod wrote {written[0] >> 20} MiB while the server read nothing"
            f" ({datapath}): no back-pressure"
        )
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


MEM_MAX = 48 << 20
MEM_CONNS = 40
MEM_ROOM = MEM_MAX // 4 + MEM_MAX // 2  # two pods: a share (1/4) and all that is lent (1/2)
SKMEM = re.compile(r"skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f\d+,w(\d+)")


def agent_holds(env: MeshEnv, pod, pid: int) -> int:
    """Bytes the kernel holds for the agent's sockets in pod (ss: each
    socket's receive queue and send queue, as SO_MEMINFO counts them)."""
    proc = env.popen(pod, ["ss", "-tmnpHO"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    total = 0
    for line in out.splitlines():
        if f"pid={pid}," in line and (found := SKMEM.search(line)):
            total += int(found[1]) + int(found[2])
    return total


@pytest.mark.parametrize("datapath", ["copy", "splice", "sockmap"])
def test_the_forwarder_holds_no_more_than_its_memory_budget(mesh_env, datapath):
    """[S] 9: with --memory-max 48M and two pods attached, one pod's 40
    connections that read nothing, from a server that writes to all as fast
    as it can, make the agent's sockets hold at most that pod's room (its
    share and all that may be lent: 36 MiB), as the kernel counts them. The
    other pod's connections still go through meanwhile; then every byte
    arrives, in order. (With the budget at 64G, the buffers as large as
    they go: see the print.)"""
    server = mesh_env.create_pod("srv")
    greedy = mesh_env.create_pod("greedy")
    other = mesh_env.create_pod("other")
    agent = agent_for(mesh_env, datapath, "--memory-max", "48M")
    peers: list[Peer] = []
    try:
        agent.attach(greedy)
        agent.attach(other)
        writer = Peer(mesh_env, server, "listen", "0.0.0.0", MEM_CONNS)
        peers.append(writer)
        assert "listening" in writer.next("listening")
        reader = Peer(mesh_env, greedy, "connect", server.ip4, MEM_CONNS)
        peers.append(reader)
        assert writer.next("accepts") == reader.next("connects") == {"ready": MEM_CONNS}
        writer.tell("run", send_to=MANY_CAP, stall=1.5)
        written = writer.next("the writers' counts")["sent"]
        holds = agent_holds(mesh_env, greedy, agent.proc.pid)
        status = agent.request("status")
        print(f"\n{datapath}: {MEM_CONNS} writers wrote {sum(written) >> 20} MiB; the agent's"
              f" sockets hold {holds >> 20} MiB; {status['memory']},"
              f" greedy {agent.pod_status('greedy')['memory_reserved'] >> 20} MiB")  # fmt: skip
        side = mesh_env.server(server, PORT + 1)
        for _ in range(2):
            out = mesh_env.client(other, server.ip4, PORT + 1, "--send", str(1 << 20))
            assert side.next()["recv_sha"] == out["sent_sha"]
        reader.tell("run", recv_to=written, deadline=600.0)
        seen = reader.next("the readers' counts", timeout=660)
        writer.close()
        reader.close()
        assert seen["got"] == written and seen["bad"] == {} and seen["eof"] == [], seen
        assert status["memory"]["max"] == MEM_MAX
        assert status["memory"]["reserved"] <= MEM_MAX
        # 36 connections at 128 KiB fill its room; the rest came as the
        # first ones shrank (36 MiB / 40: 64 KiB buffers)
        assert status["memory"]["clamped"] > 0
        assert agent.pod_status("other")["connections_total"] == 2
        assert holds <= MEM_ROOM, (
            f"the agent's sockets hold {holds >> 20} MiB for one pod ({datapath}), past"
            f" its room of {MEM_ROOM >> 20} MiB under --memory-max {MEM_MAX >> 20}M"
        )
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


def memory_cgroup(env: MeshEnv) -> tuple[Path, Path]:
    """A memory cgroup of the test's own with a limit: (its dir, its limit
    file). v1 where the memory controller is there (a hybrid host, as this
    one), else a child of the test's cgroup2 with the controller on."""
    from meshagent.host import cgroup

    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, kind, opts, *_ = line.split()
        if kind == "cgroup" and "memory" in opts.split(","):
            path = Path(mount) / f"meshagent-test-{env.tag}"
            path.mkdir()
            return path, path / "memory.limit_in_bytes"
    if "memory" not in (env.cgroup_path / "cgroup.controllers").read_text().split():
        pytest.skip("no memory cgroup controller on this machine (v1 or v2)")
    try:
        (env.cgroup_path / "cgroup.subtree_control").write_text("+memory")
    except OSError as exc:  # e.g. processes in the test's cgroup itself (v2's rule)
        pytest.skip(f"cannot enable the memory controller below the test's cgroup: {exc}")
    path = cgroup.create(env.cgroup_path / "memory-limited")
    return path, path / "memory.max"


def test_the_memory_budget_follows_the_agents_memory_limit(mesh_env):
    """--memory-max auto: an agent in a memory cgroup limited to 1 GiB (the
    DaemonSet sets such a limit) may let its connections hold 3/4 of it
    less 64 MiB; --memory-max given wins."""
    from meshagent.host import cgroup

    path, limit = memory_cgroup(mesh_env)
    try:
        limit.write_text(str(1 << 30))
        agent = start_agent(mesh_env, join=(path / "cgroup.procs",))
        try:
            memory = agent.request("status")["memory"]
            assert memory["max"] == (3 << 30) // 4 - (64 << 20)
            assert (memory["from"], memory["reserved"]) == ("cgroup limit", 0)
        finally:
            assert agent.stop() == 0, agent.log()
        agent = start_agent(mesh_env, "--memory-max", "300M", join=(path / "cgroup.procs",))
        try:
            memory = agent.request("status")["memory"]
            assert (memory["max"], memory["from"]) == (300 << 20, "--memory-max")
        finally:
            assert agent.stop() == 0, agent.log()
    finally:
        cgroup.remove(path)


TB = re.compile(r"skmem:\(r\d+,rb(\d+),t\d+,tb(\d+)")


def test_a_smaller_sockmap_send_buffer_stays_under_the_budget(mesh_env):
    """The memory budget sizes both buffers of a spliced pair; a smaller
    --sockmap-sndbuf still wins for the send buffers (the kernel doubles it)."""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, "sockmap", "--sockmap-sndbuf", "65536")
    peers: list[Peer] = []
    try:
        agent.attach(client)
        far, near = one_connection(mesh_env, server, client, peers)
        far.tell("run", send_to=4 << 20, stall=1.5)  # past the move to the sockmap
        near.tell("run", recv_to=4 << 20)
        assert near.next("the pod's count")["got"] == [4 << 20]
        far.next("the server's count")
        proc = mesh_env.popen(client, ["ss", "-tmnpHO"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=30)
        bufs = [(int(m[1]), int(m[2])) for line in out.splitlines()
                if f"pid={agent.proc.pid}," in line and (m := TB.search(line))]  # fmt: skip
        assert agent.request("status")["datapaths"]["sockmap"]["connections_active"] == 1
        # the pair (ss lists no listener without -l): receive buffers from
        # the budget (a lone connection: 4 MiB), send buffers 2 x 64 KiB
        assert bufs == [(4 << 20, 2 * 65536)] * 2, out
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


def test_sockets_a_listener_accepts_have_the_budgets_buffers(mesh_env):
    """Once the pod's listeners have the budget's buffer size, the sockets
    they accept inherit it and are not set again (two system calls fewer per
    connection): the first connection, then six more, one after another,
    all have it on both ends, as the kernel counts them."""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, "copy")
    peers: list[Peer] = []
    try:
        agent.attach(client)
        one_connection(mesh_env, server, client, peers)
        far = Peer(mesh_env, server, "listen", "0.0.0.0", 6, port=PORT + 2)
        peers.append(far)
        assert "listening" in far.next("listening")
        near = Peer(mesh_env, client, "connect", server.ip4, 6, port=PORT + 2)
        peers.append(near)
        assert far.next("accepts") == near.next("connects") == {"ready": 6}
        proc = mesh_env.popen(client, ["ss", "-tmnpHO"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=30)
        bufs = [(int(m[1]), int(m[2])) for line in out.splitlines()
                if f"pid={agent.proc.pid}," in line and (m := TB.search(line))]  # fmt: skip
        assert agent.pod_status("cli")["connections_active"] == 7
        # 7 accepted and 7 upstream sockets, each at the budget's 4 MiB
        # (a pod's first connections are sized as if it had 32)
        assert bufs == [(4 << 20, 4 << 20)] * 14, out
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()


def test_idle_connections_shrink_at_once_so_a_burst_never_waits(mesh_env):
    """100 connections opened at once under --memory-max 256M (a 2 GiB
    node's auto budget): the first ones get large buffers, and as the pod's
    share fills, its idle connections shrink and give their bytes back at
    once, so none of the burst waits in the backlog. (They used to give
    them back only at the next tick, one pause at a time: in the 6.12 guest
    the 100 stopped readers' connects were not all accepted within 60 s.)"""
    server = mesh_env.create_pod("srv")
    client = mesh_env.create_pod("cli")
    agent = agent_for(mesh_env, "copy", "--memory-max", "256M")
    peers: list[Peer] = []
    try:
        agent.attach(client)
        far = Peer(mesh_env, server, "listen", "0.0.0.0", MANY)
        peers.append(far)
        assert "listening" in far.next("listening")
        near = Peer(mesh_env, client, "connect", server.ip4, MANY)
        peers.append(near)
        assert far.next("accepts") == near.next("connects") == {"ready": MANY}
        pod = agent.pod_status("cli")
        memory = agent.request("status")["memory"]
        assert pod["connections_active"] == MANY
        assert memory["clamped"] > 0 and memory["reserved"] <= 256 << 20, memory
        assert pod["paused"] == 0, (pod, memory)
    finally:
        for peer in peers:
            end(peer.proc)
        assert agent.stop() == 0, agent.log()
