"""Upgrade in place: `meshagent run --takeover` receives the running agent's
pods, listening sockets and every forwarded connection, and the old agent
exits without ending any of them (HAProxy's seamless reload and Envoy's hot
restart pass listeners the same way).

Who may be handed the pods: the successor first takes the state dir's
successor.lock (flock, state.py) and holds it until the handover is over;
the running agent answers `handover` only to a peer that passed the control
socket's capability check (control.py, host/peer.py) and that /proc/locks
names as the holder of that lock (host/peer.py holds_flock). A process
that merely can connect() is never sent a listener or a connection, and
two successors cannot ask at once.

The successor asks the running agent for a `handover` on its control
socket; the reply carries one end of a SOCK_SEQPACKET socketpair, and over
it the old agent sends, one message each (a JSON header line, then raw
bytes; sockets and pipes as SCM_RIGHTS):

    hello  {pid, pods, conns}
    pod    {name, pod_id, stats, and its PodRecord (state.py)} + its listeners
    conn   {pod, pod_id, record, mode, state, blobs: [sizes]} + its sockets (and splice pipes)
    blob   raw bytes a connection had read and not yet written, in pieces
    end

While it sends, the old agent's loop stops touching those sockets (the
kernel keeps splicing sockmap pairs, and connects wait in the listeners'
queues). The successor builds everything without any I/O, answers `ok`,
and only then runs; the old agent lets go (no FIN, no RST) and exits. If
the successor fails before `ok`, the old agent takes its sockets back and
serves on, as if nothing happened. The wait for `ok` runs on the loop (the
channel is registered with a deadline timer): a successor that hangs or is
killed never stalls the old agent, and the channel is closed on every path.
Sending still blocks the loop, at most SEND_WAIT for a message a successor
does not read.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from pathlib import Path

from meshagent import log
from meshagent.api import Deferred, Reply, Request
from meshagent.attachments import Attachments
from meshagent.client import request_with_fds
from meshagent.errors import MeshError
from meshagent.forwarder import Forwarder
from meshagent.forwarder.records import ConnRecord, PodSlot
from meshagent.host.loop import Loop
from meshagent.host.peer import holds_flock
from meshagent.modes import DataPathMode
from meshagent.state import PodRecord, StateDir

MAX_MESSAGE = 256 * 1024
MAX_FDS = 16  # a splice connection: 2 sockets + 2 pipes of 2 ends
PENDING_WAIT = 2.0  # seconds for in-flight upstream connects before the handover
OK_WAIT = 60.0  # seconds the old agent waits for the successor's ok
SEND_WAIT = 10.0  # seconds one message may wait for the successor to read
EXIT_WAIT = 30.0  # seconds the successor waits for the old agent to exit


# -- the running agent's side -------------------------------------------------
class Handover:
    """The `handover` request: once no upstream connect is in flight, reply
    with a socketpair end and send everything over it."""

    def __init__(
        self, loop: Loop, forwarder: Forwarder, pods: Attachments, successor_lock: Path
    ) -> None:
        self.loop = loop
        self.successor_lock = successor_lock
        self.forwarder = forwarder
        self.pods = pods
        self.under_way = False  # a successor is receiving our pods and connections
        self.done = False  # handed over: the successor has everything
        self._waiting: int | None = None  # the channel's fd while we wait for ok

    def __call__(self, request: Request) -> Deferred:
        peer = request.peer
        if peer is None or not holds_flock(peer.pid, self.successor_lock):
            raise MeshError(
                f"handover: refused: the asking process does not hold {self.successor_lock}"
                " (only `meshagent run --takeover` is handed the pods)"
            )
        if self.under_way:
            raise MeshError("handover: one is already under way")
        self.under_way = True
        self.forwarder.stop_accepting()
        reply = Deferred()
        deadline = time.monotonic() + PENDING_WAIT

        def when_quiet() -> None:
            # attach/detach jobs use a pod's netns fd, which let_go closes
            busy = not self.forwarder.handover_ready() or bool(self.pods.busy)
            if busy and time.monotonic() < deadline:
                self.loop.call_later(0.01, when_quiet)
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for end in (ours, theirs):  # a message must fit the buffers whole
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
            reply.resolve(Reply({"pid": os.getpid()}, [os.dup(theirs.fileno())]))
            theirs.close()
            self.loop.call_later(0, lambda: self._hand_over(ours))

        self.loop.call_later(0, when_quiet)
        return reply

    def _hand_over(self, chan: socket.socket) -> None:
        """Send everything, then wait for `ok` on the loop (never blocking
        it): the answer, EOF (a successor that died) or the deadline
        settles it once, and every path closes the channel."""
        fwd = self.forwarder
        fwd.suspend()
        try:
            chan.settimeout(SEND_WAIT)  # a successor that stops reading mid-send
            pods, conns = self._send_all(chan)
            chan.setblocking(False)
        except (OSError, MeshError, ValueError) as exc:
            self._settle(chan, exc)
            return
        fd = chan.fileno()
        timer = self.loop.call_later(
            OK_WAIT, lambda: self._settle(chan, MeshError(f"no ok within {OK_WAIT:g}s"))
        )

        def answered(_events: int) -> None:
            try:
                answer, fds, _payload = _recv(chan)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, MeshError, ValueError) as exc:
                self._settle(chan, exc, timer)
                return
            for got in fds:
                os.close(got)
            kind = answer.get("kind") if isinstance(answer, dict) else None
            failed = None if kind == "ok" else MeshError(f"the successor answered {kind!r}")
            self._settle(chan, failed, timer, pods, conns)

        self.loop.add(fd, select.EPOLLIN, answered)
        self._waiting = fd

    def _settle(self, chan, exc, timer=None, pods: int = 0, conns: int = 0) -> None:
        """The handover ends: let go and exit on the successor's ok, or take
        everything back and serve on."""
        if chan.fileno() < 0:
            return  # settled already
        if timer is not None:
            timer.cancel()
        if self._waiting is not None:
            self.loop.remove(self._waiting)
            self._waiting = None
        chan.close()
        fwd = self.forwarder
        if exc is not None:
            self.under_way = False
            fwd.resume()
            log.get().warning("takeover failed; serving on", extra={"reason": _why(exc)})
            return
        log.get().info(
            "handed over to the successor",
            extra={"reason": f"{pods} pods, {conns} connections; exiting"},
        )
        fwd.let_go()
        self.pods.let_go()
        self.done = True
        self.loop.stop()

    def _send_all(self, chan: socket.socket) -> tuple[int, int]:
        """hello, each pod with its listeners, each connection with its
        sockets and bytes, end: (pods, connections) sent."""
        exported = self.forwarder.exported()
        entries = list(self.pods.pods.values())
        _send(chan, {"kind": "hello", "pid": os.getpid(), "pods": len(entries),
                     "conns": len(exported)})  # fmt: skip
        for entry in entries:
            slot = entry.slot
            listeners = [s.fileno() for s in slot.listeners]
            _send(chan, {"kind": "pod", "name": entry.handle.name, **entry.record().to_dict(),
                         "pod_id": entry.handle.pod_id, "stats": slot.stats.to_dict()},
                  listeners)  # fmt: skip
        for slot, record, conn in exported:
            state, fds, blobs = conn.export()
            _send(chan, {"kind": "conn", "pod": slot.name, "pod_id": slot.pod_id,
                         "record": record.to_dict(),
                         "mode": conn.mode.value, "state": state,
                         "blobs": [len(b) for b in blobs]}, fds)  # fmt: skip
            for blob in blobs:
                for at in range(0, len(blob), MAX_MESSAGE // 2):
                    _send(chan, {"kind": "blob"}, payload=blob[at : at + MAX_MESSAGE // 2])
        _send(chan, {"kind": "end"})
        return len(entries), len(exported)


# -- the successor's side -----------------------------------------------------
def receive(socket_path: Path, pods: Attachments, forwarder: Forwarder, state: StateDir) -> dict:
    """Take the running agent's pods and connections; returns counts. The
    old agent has exited, or let go of everything, when this returns. Nothing here reads or writes a
    forwarded socket: the loop does, once it runs. The successor lock is
    held throughout: the running agent hands over only to its holder."""
    lock = state.lock_successor()
    try:
        return _receive(socket_path, pods, forwarder, state)
    finally:
        os.close(lock)


def _receive(socket_path: Path, pods: Attachments, forwarder: Forwarder, state: StateDir) -> dict:
    try:
        sock, _reply, fds, _rest = request_with_fds(
            socket_path, {"op": "handover"}, 1, timeout=OK_WAIT
        )
    except MeshError as exc:
        raise MeshError(f"--takeover: {exc}") from None
    sock.close()
    if len(fds) != 1:
        raise MeshError("--takeover: the running agent sent no handover channel")
    chan = socket.socket(fileno=fds[0])
    chan.settimeout(OK_WAIT)
    owned: list[int] = []  # fds received and not yet owned by a socket or pipe user
    slots: dict[int, PodSlot] = {}  # pod_id -> slot
    try:
        hello, _fds, _payload = _recv(chan)
        if hello.get("kind") != "hello":
            raise MeshError("the running agent spoke out of turn")
        if os.environ.get("MESHAGENT_TEST_FAIL_TAKEOVER"):  # tests: a successor that dies
            raise MeshError("failing on purpose (MESHAGENT_TEST_FAIL_TAKEOVER)")
        conns = 0
        while True:
            header, got, _payload = _recv(chan)
            owned += got
            kind = header.get("kind")
            if kind == "end":
                break
            if kind == "pod":
                listeners = [socket.socket(fileno=fd) for fd in got]
                owned = [fd for fd in owned if fd not in got]
                record = PodRecord.from_dict(header["name"], header)
                pod_id = int(header["pod_id"])
                slots[pod_id] = pods.take_over(record, pod_id, listeners, header.get("stats"))
            elif kind == "conn":
                blobs = [_blob(chan, size) for size in header["blobs"]]
                client, upstream = (socket.socket(fileno=fd) for fd in got[:2])
                owned = [fd for fd in owned if fd not in got]
                slot = _slot_of(slots, header)
                forwarder.adopt_conn(
                    slot, ConnRecord(**header["record"]), DataPathMode(header["mode"]),
                    client, upstream, header["state"], got[2:], blobs,
                )  # fmt: skip
                conns += 1
            else:
                raise MeshError(f"unexpected message {kind!r}")
        _test_hang()
        _send(chan, {"kind": "ok"})
    except BaseException as exc:
        for fd in owned:
            os.close(fd)
        chan.close()
        if isinstance(exc, (OSError, ValueError, KeyError, TypeError, MeshError)):
            raise MeshError(
                f"--takeover failed; the running agent serves on: {_why(exc)}"
            ) from None
        raise
    chan.close()
    _wait_let_go(int(hello["pid"]), state)
    pods.refresh_taken()  # saves
    return {"pods": len(slots), "conns": conns, "from_pid": hello["pid"]}


def _test_hang() -> None:
    """Tests: a successor that has everything and stops before `ok` (it
    says so on stderr, then waits to be killed; bounded)."""
    if os.environ.get("MESHAGENT_TEST_HANG_TAKEOVER"):
        import sys

        print("meshagent: test: received everything; hanging", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["MESHAGENT_TEST_HANG_TAKEOVER"]))


def _slot_of(slots: dict[int, PodSlot], header: dict) -> PodSlot:
    """A connection's pod: by its pod_id (an earlier agent sent only the name)."""
    pod_id = header.get("pod_id")
    slot = slots.get(pod_id) if pod_id is not None else None
    if slot is None and pod_id is None:
        slot = next((s for s in slots.values() if s.name == header.get("pod")), None)
    if slot is None:
        raise MeshError(f"a connection of unknown pod {header.get('pod')}")
    return slot


def _wait_let_go(pid: int, state: StateDir) -> None:
    """Until the old agent has exited, or let go of everything: the state
    dir's lock, the last thing it closes, is free (an agent run with
    --after-handover wait stays until it is stopped)."""
    deadline = time.monotonic() + EXIT_WAIT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ", 1)[1].startswith("Z"):
                    return  # exited, not yet reaped by its parent
        except (OSError, IndexError):
            return
        try:
            os.close(state.lock())
            return  # free: it has let go
        except MeshError:
            pass
        time.sleep(0.02)


def _blob(chan: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        header, _fds, payload = _recv(chan)
        if header.get("kind") != "blob":
            raise MeshError("a connection's bytes are missing")
        out += payload
    return bytes(out)


# -- framing --------------------------------------------------------------------
def _send(chan: socket.socket, header: dict, fds: list[int] = (), payload: bytes = b"") -> None:
    data = json.dumps(header).encode() + b"\n" + payload
    if len(data) > MAX_MESSAGE:
        raise MeshError(f"handover message of {len(data)} bytes is too long")
    if fds:
        socket.send_fds(chan, [data], list(fds))
    else:
        chan.send(data)  # one datagram: whole or an error


def _recv(chan: socket.socket) -> tuple[dict, list[int], bytes]:
    data, fds, _flags, _addr = socket.recv_fds(chan, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise MeshError("the other agent closed the handover channel")
    line, _, payload = data.partition(b"\n")
    return json.loads(line), fds, payload


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
