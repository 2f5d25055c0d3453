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

The sockmap path must also hold a writer back (bpf/skb_verdict.c): once
the pair has moved to the kernel, a server writes as fast as it can to a
client that reads nothing; its send must block long before STUFF_CAP, and
once the client reads, every byte must arrive. A kernel whose sockmap
cannot be bounded so fails here, and auto does not pick it. The writer
waits for the move: a stream that never pauses can stay on copy for
seconds where reads never reach a segment boundary (seen in QEMU guests
without KVM, where this test then measured the copy relay's bound).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable

from meshagent.forwarder.copy_first import UPGRADE_BYTES
from meshagent.forwarder.datapath import Connection, DataPath
from meshagent.host.loop import Loop
from meshagent.modes import DataPathMode

SIZE = 1 << 20
EARLY = 32 << 10  # written before the accept
LEAD = 512 << 10  # the server's, before the join: more than one 256 KiB read
SO_RCVBUFFORCE = 33
DEADLINE = 1.0
STUFF_CAP = 256 << 20  # a writer that gets this far was never held back
STUFF_QUIET = 0.3  # seconds of EAGAIN that count as blocked
STUFF_DEADLINE = 4.0  # to move (after STUFF_LEAD), and again to be held back
STUFF_LEAD = 4 * UPGRADE_BYTES  # what the writer sends before it waits for the move

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
        problem = _carry(path, loop, front, back, socks)
        if problem is None and mode is DataPathMode.SOCKMAP:
            problem = _held_back(path, loop, front, back, socks)
        return problem
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
    if not _run(loop, path, conn, moved):
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


def _held_back(path: DataPath, loop: Loop, front: socket.socket, back: socket.socket,
               socks: list[socket.socket]) -> str | None:  # fmt: skip
    """A server writes as fast as it can; the client reads until the pair
    moved to the kernel, then stops: the server's send must block. Then the
    client reads on and every byte arrives. Why not, or None."""
    app_client, app_server, fwd_client, fwd_up, state = _pair(path, front, back, socks, b"", b"")
    app_server.setblocking(False)
    result: dict = {"read": 0}
    blocked, moved, resume = threading.Event(), threading.Event(), threading.Event()
    writer = threading.Thread(target=_stuff, args=(app_server, result, blocked, moved),
                              daemon=True)  # fmt: skip
    reader = threading.Thread(target=_count, args=(app_client, result, moved, resume), daemon=True)

    def done(_conn, reason) -> None:
        result["reason"] = reason
        loop.stop()

    conn = path.join(fwd_client, fwd_up, state, done)
    writer.start()
    reader.start()
    try:
        return _hold_and_read(path, loop, conn, result, (blocked, moved, resume), writer, reader)
    finally:
        resume.set()
        if not conn.closed:
            conn.finish(None)


def _hold_and_read(path: DataPath, loop: Loop, conn: Connection, result: dict,
                   events: tuple[threading.Event, ...], writer: threading.Thread,
                   reader: threading.Thread) -> str | None:  # fmt: skip
    blocked, moved, resume = events
    started = time.monotonic()

    def held() -> bool:
        if conn.settled and not moved.is_set():
            result["moved"] = time.monotonic() - started
            moved.set()
        return blocked.is_set() or not writer.is_alive()

    _run_until(loop, path, held, 2 * STUFF_DEADLINE)
    writer.join(STUFF_DEADLINE)
    written = result.get("written", 0)
    if result.get("reason"):
        return f"connection reset: {result['reason']}"
    if conn.mode != path.mode or not conn.settled:
        return f"the pair never moved to the kernel (carried by {conn.mode})"
    if not blocked.is_set():
        return (
            f"a writer facing a reader that reads nothing was not held back"
            f" ({written >> 20} MiB written; the pair moved to the kernel"
            f" {result.get('moved', 0.0):.1f}s after the start)"
        )
    result["want"] = written
    resume.set()
    _run_until(loop, path, lambda: not reader.is_alive())
    reader.join(0.1)
    if result["read"] != written:
        return f"held back, then {result['read']} of {written} bytes arrived"
    return None


def _run_until(loop: Loop, path: DataPath, done: Callable[[], bool],
               deadline: float = STUFF_DEADLINE) -> None:  # fmt: skip
    """Run the loop until done() or deadline seconds; the path's tick() every
    10 ms (a self-test's sockmap path finds hold-backs there)."""

    def check() -> None:
        path.tick()
        if done():
            loop.stop()
        else:
            loop.call_later(0.01, check)

    check()
    timer = loop.call_later(deadline, loop.stop)
    loop.run()
    timer.cancel()


def _stuff(sock: socket.socket, out: dict, blocked: threading.Event,
           moved: threading.Event) -> None:  # fmt: skip
    """Write STUFF_LEAD of a counting pattern, wait for the move, then write
    on until send() has said EAGAIN for STUFF_QUIET (blocked) or STUFF_CAP;
    out["written"]."""
    chunk = memoryview(bytes(range(256)) * 257)
    written, quiet_since = 0, None
    deadline = time.monotonic() + STUFF_DEADLINE
    while written < STUFF_CAP and time.monotonic() < deadline:
        if written >= STUFF_LEAD and not moved.is_set():
            if not moved.wait(max(0.0, deadline - time.monotonic())):
                break
            deadline = time.monotonic() + STUFF_DEADLINE
        try:
            start = written % 256  # the pattern goes on where a partial send stopped
            written += sock.send(chunk[start : start + 65536])
            out["written"] = written
            quiet_since = None
        except BlockingIOError:
            now = time.monotonic()
            quiet_since = quiet_since or now
            if now - quiet_since >= STUFF_QUIET:
                out["written"] = written
                blocked.set()
                return
            time.sleep(0.005)
        except OSError as exc:
            out["write_error"] = str(exc)
            break
    out["written"] = written


def _count(sock: socket.socket, out: dict, moved: threading.Event,
           resume: threading.Event) -> None:  # fmt: skip
    """Read until the pair moved, wait for resume, then read up to
    out["want"] bytes; out["read"]: how many came, each in its place of
    the pattern (-1: one was not)."""
    pattern = bytes(range(256)) * 257
    try:
        while True:
            if moved.is_set() and not resume.is_set():
                resume.wait(STUFF_DEADLINE * 2)
            if resume.is_set() and out["read"] >= out.get("want", 0):
                return
            data = sock.recv(65536)
            if not data:
                return
            start = out["read"] % 256
            if data != pattern[start : start + len(data)]:
                out["read"] = -1
                return
            out["read"] += len(data)
    except OSError:
        pass


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


def _run(loop: Loop, path: DataPath, conn: Connection, moved: threading.Event) -> bool:
    """The loop, until the connection ends or DEADLINE; whether it ended."""

    def watch() -> None:  # copy first: the ends send on once the pair moved
        path.tick()  # hold-backs (a self-test's path does not read mesh_wake)
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
            proved = "1 MiB each way" + (
                ", writer held back" if mode is DataPathMode.SOCKMAP else ""
            )
            return mode, "; ".join([*notes, f"{mode} self-test passed ({proved})"])
        notes.append(f"{mode} self-test failed: {problem}")
    return DataPathMode.COPY, "; ".join([*notes, "copy needs no kernel support"])
