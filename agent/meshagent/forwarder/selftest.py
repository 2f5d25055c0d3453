"""`--datapath auto`: prove each data path on this kernel before using it.

Two real TCP connections in the agent's own netns, joined by the data path
under test (the same DataPath classes the forwarder uses, on a loop of
their own); both ends write 1 MiB at once and digests are compared within a
deadline. The hand-off is exercised the hard way: the client writes before
its connection is even accepted, and the server speaks before its socket
joins the data path (the sockmap path relies on such bytes passing through
the verdict on the next recv; if a kernel does not do that, auto falls back).
The server's early bytes are more than one read of the copy phase, in a
deep receive queue: a connection that starts on copy then moves after a
read that stopped inside a segment, the case where a kernel would pass
the read part to the verdict again.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable

from meshagent.forwarder.datapath import Connection, DataPath
from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode

SIZE = 1 << 20
EARLY = 32 << 10  # written before the accept
LEAD = 512 << 10  # the server's, before the join: more than one 256 KiB read
SO_RCVBUFFORCE = 33
DEADLINE = 1.0

PathFactory = Callable[[Loop], "dict[DataPathMode, DataPath]"]


def _converse(
    sock: socket.socket, data: bytes, out: dict, key: str, moved: threading.Event
) -> None:
    """Send once the pair moved (a connection that starts on copy moves on
    the server's early bytes; no FIN may come before), then FIN."""

    def send() -> None:
        try:
            moved.wait(DEADLINE / 2)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            out[key + "_error"] = str(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest = hashlib.sha256()
    try:
        while chunk := sock.recv(65536):
            digest.update(chunk)
    except OSError as exc:
        out[key + "_error"] = str(exc)
    sender.join(DEADLINE * 3)
    out[key] = digest.hexdigest()


def check(mode: DataPathMode, factory: PathFactory) -> str | None:
    """None when the data path carried 1 MiB each way intact in time, else why not."""
    loop = Loop()
    path = factory(loop).get(mode)
    if path is None:
        loop.close()
        return "not available"
    front = socket.create_server(("127.0.0.1", 0))
    back = socket.create_server(("127.0.0.1", 0))
    socks: list[socket.socket] = [front, back]
    try:
        return _carry(path, loop, front, back, socks)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        for sock in socks:
            sock.close()
        loop.close()


def _carry(path: DataPath, loop: Loop, front: socket.socket, back: socket.socket,
           socks: list[socket.socket]) -> str | None:  # fmt: skip
    """Join a pair by the path, both ends talking at once; why it failed, or None."""
    up_data, down_data = os.urandom(SIZE), os.urandom(SIZE)
    app_client, app_server, fwd_client, fwd_up, state = _pair(
        path, front, back, socks, up_data[:EARLY], down_data[:LEAD]
    )
    result: dict = {}
    moved = threading.Event()
    ends = [
        _talk(app_client, up_data[EARLY:], result, "client", moved),
        _talk(app_server, down_data[LEAD:], result, "server", moved),
    ]

    def done(_conn, reason) -> None:
        result["reason"] = reason
        loop.stop()

    conn = path.join(fwd_client, fwd_up, state, done)
    if not _run(loop, conn, moved):
        conn.finish("self-test deadline")
        return f"not done within {DEADLINE:g}s"
    for end in ends:
        end.join(DEADLINE)
    path.tick()
    if conn.mode != path.mode:
        return f"the sockets could not enter it (carried by {conn.mode})"
    if result.get("reason"):
        return f"connection reset: {result['reason']}"
    if result.get("client") != hashlib.sha256(down_data).hexdigest():
        return "server-to-client bytes differ"
    if result.get("server") != hashlib.sha256(up_data).hexdigest():
        return "client-to-server bytes differ"
    return None


def _pair(path: DataPath, front: socket.socket, back: socket.socket, socks: list[socket.socket],
          early: bytes, lead: bytes) -> tuple:  # fmt: skip
    """(app_client, app_server, fwd_client, fwd_up, what accepted() said):
    the client's early bytes sent before the accept, the server's lead
    before the join."""
    app_client = socket.create_connection(front.getsockname(), timeout=DEADLINE * 3)
    app_client.sendall(early)  # before the accept
    fwd_client, _ = front.accept()
    socks += [app_client, fwd_client]
    fwd_client.setblocking(False)
    state = path.accepted(fwd_client)
    fwd_up = socket.socket()
    socks.append(fwd_up)
    fwd_up.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * LEAD)  # LEAD waits whole
    fwd_up.connect(back.getsockname())
    app_server, _ = back.accept()
    socks.append(app_server)
    app_server.settimeout(DEADLINE * 3)
    app_server.sendall(lead)  # the server speaks first
    fwd_up.setblocking(False)
    return app_client, app_server, fwd_client, fwd_up, state


def _talk(sock: socket.socket, data: bytes, out: dict, key: str,
          moved: threading.Event) -> threading.Thread:  # fmt: skip
    end = threading.Thread(target=_converse, args=(sock, data, out, key, moved), daemon=True)
    end.start()
    return end


def _run(loop: Loop, conn: Connection, moved: threading.Event) -> bool:
    """The loop, until the connection ends or DEADLINE; whether it ended."""

    def watch() -> None:  # copy first: the ends send on once the pair moved
        if conn.settled or conn.closed:
            moved.set()
        else:
            loop.call_later(0.002, watch)

    watch()
    timer = loop.call_later(DEADLINE, loop.stop)
    if not conn.closed:
        loop.run()
    timer.cancel()
    return conn.closed


def choose(candidates: tuple[DataPathMode, ...], factory: PathFactory) -> tuple[DataPathMode, str]:
    """auto: the first candidate whose self-test passes, and why (copy
    needs no kernel support and is not tested)."""
    notes = []
    for mode in candidates:
        if mode is DataPathMode.COPY:
            break
        problem = check(mode, factory)
        if problem is None:
            return mode, "; ".join([*notes, f"{mode} self-test passed (1 MiB each way)"])
        notes.append(f"{mode} self-test failed: {problem}")
    return DataPathMode.COPY, "; ".join([*notes, "copy needs no kernel support"])
