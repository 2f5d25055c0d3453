"""The control server without root: whatever a handler raises, the client
gets one line and the server keeps serving."""

from __future__ import annotations

import os
import threading

import pytest

from meshagent import control
from meshagent.api import Deferred, Reply, Request
from meshagent.client import request
from meshagent.errors import MeshError, NotAttached
from meshagent.host.loop import Loop
from meshagent.host.peer import Peer, holds_flock, peer_of

RELEASE = threading.Event()  # lets the "later" requests' work finish
ADMIN = Peer(1, 0, True, None)
PEER = [ADMIN]  # who the fixture's server sees connecting (tests without root)


@pytest.fixture
def server(tmp_path):
    from meshagent.host.worker import Worker

    loop = Loop()
    worker = Worker(loop, "test")

    def later(_request: Request):  # work off the loop; the reply when it is done
        reply = Deferred()
        worker.submit(lambda: RELEASE.wait(10), lambda ok, _e: reply.resolve({"done": ok}))
        return reply

    def boom(_request: Request):
        raise RuntimeError("a bug\nover two lines")

    def oserror(_request: Request):
        raise PermissionError(13, "Permission denied")

    def detach(_request: Request):
        raise NotAttached("pod web is not attached")

    handlers = {
        "ping": lambda _r: Reply({"pong": True}),
        "later": later,
        "huge": lambda _r: Reply({"blob": "x" * (2 << 20)}),
        "boom": boom,
        "oserror": oserror,
        "detach": detach,
        "typed": lambda r: Reply({"pod": r.text("pod")}),
    }
    srv = control.ControlServer(loop, tmp_path / "agent.sock", handlers, lambda _c: PEER[0])
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield tmp_path / "agent.sock"
    RELEASE.set()
    loop.stop()
    thread.join(5)
    worker.close()
    srv.close()
    loop.close()


@pytest.mark.parametrize(
    "op,args,expect",
    [
        ("boom", {}, "internal error in 'boom': RuntimeError: a bug over two lines"),
        ("oserror", {}, "internal error in 'oserror': PermissionError"),
        ("typed", {"pod": 3}, "typed: 'pod' must be a non-empty string"),
        ("typed", {"pod": ""}, "typed: 'pod' must be a non-empty string"),
        ("nosuch", {}, "unknown request 'nosuch'"),
    ],
)
def test_every_failure_is_one_line_and_the_server_keeps_serving(server, op, args, expect):
    with pytest.raises(MeshError) as info:
        request(server, op, timeout=1.0, **args)
    assert str(info.value).startswith(expect) and "\n" not in str(info.value)
    assert request(server, "ping", timeout=1.0) == {"pong": True}


def test_a_failure_a_caller_tells_apart_crosses_the_socket_as_its_type(server):
    """The client raises the subclass the handler raised (by its code), and
    a plain MeshError stays plain: nobody matches error text."""
    with pytest.raises(NotAttached, match="pod web is not attached"):
        request(server, "detach", timeout=1.0)
    with pytest.raises(MeshError) as info:
        request(server, "typed", timeout=1.0, pod="")
    assert type(info.value) is MeshError


def test_a_second_server_on_the_same_socket_is_refused(server):
    with pytest.raises(MeshError, match="an agent already runs"):
        control.ControlServer(Loop(), server, {})


def _send_lines(path, *ops: str):
    import json
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(b"".join(json.dumps({"op": op}).encode() + b"\n" for op in ops))
    return sock


def _read_lines(sock, count: int) -> list[dict]:
    import json

    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection"
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_a_deferred_reply_keeps_order_and_never_holds_up_others(server):
    """Work off the loop: other clients are answered meanwhile, and the same
    client's next request waits, so its replies come in request order."""
    RELEASE.clear()
    pending = _send_lines(server, "later", "ping")
    try:
        for _ in range(3):  # another client, answered while "later" is pending
            assert request(server, "ping", timeout=2.0) == {"pong": True}
        RELEASE.set()
        assert _read_lines(pending, 2) == [{"ok": True, "done": True}, {"ok": True, "pong": True}]
    finally:
        pending.close()


def test_a_client_that_does_not_read_never_blocks_the_server(server):
    """Replies go out as the socket takes them: 2 MB unread by one client,
    another client is still answered at once."""
    idle = _send_lines(server, "huge", "huge")
    try:
        for _ in range(3):
            assert request(server, "ping", timeout=2.0) == {"pong": True}
        replies = _read_lines(idle, 2)
        assert [len(r["blob"]) for r in replies] == [2 << 20, 2 << 20]
    finally:
        idle.close()


@pytest.mark.parametrize(
    "data,reads",
    [({"op": "ping"}, True), ({"op": "status"}, True), ({"op": "connections"}, True),
     ({"op": "datapath"}, True), ({"op": "datapath", "set": "copy"}, False),
     ({"op": "datapath", "msg": True}, False), ({"op": "datapath", "replies": False}, False),
     ({"op": "attach"}, False),
     ({"op": "trace"}, False), ({"op": "handover"}, False), ({"op": "cni-add"}, False)],
)  # fmt: skip
def test_what_only_reads(data, reads):
    assert control.reads_only(data["op"], data) is reads


def test_a_peer_without_capabilities_reads_and_is_refused_the_rest(server):
    PEER[0] = Peer(7, 0, True, "pid 7 has neither cap_net_admin nor cap_sys_admin")
    try:
        assert request(server, "ping") == {"pong": True}
        with pytest.raises(MeshError) as refused:
            request(server, "detach", pod="web")
        assert str(refused.value) == (
            "detach: refused: pid 7 has neither cap_net_admin nor cap_sys_admin"
        )
        PEER[0] = Peer(7, 1000, False, "uid 1000 is not root")
        with pytest.raises(MeshError, match="ping: refused: uid 1000 is not root"):
            request(server, "ping")
        assert control.refusal("ping", {}, ADMIN) is None
    finally:
        PEER[0] = ADMIN


def test_the_peer_is_read_from_the_kernel():
    import os
    import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        peer = peer_of(ours)
    assert peer.pid == os.getpid() and peer.uid == os.geteuid()
    if os.geteuid() != 0:
        assert not peer.may_read and peer.refused == f"uid {os.geteuid()} is not root"


def test_a_successor_is_known_by_the_lock_it_holds(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "successor.lock"
    lock.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1]);"
         " fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert holds_flock(holder.pid, lock)
        assert not holds_flock(os.getpid(), lock)  # someone holds it, not us
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert not holds_flock(holder.pid, lock)  # nobody holds it now
    assert not holds_flock(holder.pid, tmp_path / "missing.lock")
