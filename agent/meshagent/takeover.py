"""Upgrade in place: `meshagent run --takeover` receives the running agent's
pods, listening sockets and every forwarded connection, and the old agent
exits without ending any of them (HAProxy's seamless reload and Envoy's hot
restart pass listeners the same way).

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
serves on, as if nothing happened.
"""

from __future__ import annotations

import json
import os
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
from meshagent.modes import DataPathMode
from meshagent.state import PodRecord

MAX_MESSAGE = 256 * 1024
MAX_FDS = 16  # a splice connection: 2 sockets + 2 pipes of 2 ends
PENDING_WAIT = 2.0  # seconds for in-flight upstream connects before the handover
OK_WAIT = 60.0  # seconds the old agent waits for the successor's ok
EXIT_WAIT = 30.0  # seconds the successor waits for the old agent to exit


# -- the running agent's side -------------------------------------------------
class Handover:
    """The `handover` request: once no upstream connect is in flight, reply
    with a socketpair end and send everything over it."""

    def __init__(self, loop: Loop, forwarder: Forwarder, pods: Attachments) -> None:
        self.loop = loop
        self.forwarder = forwarder
        self.pods = pods
        self.under_way = False  # a successor is receiving our pods and connections

    def __call__(self, _request: Request) -> Deferred:
        if self.under_way:
            raise MeshError("handover: one is already under way")
        self.under_way = True
        self.forwarder.stop_accepting()
        reply = Deferred()
        deadline = time.monotonic() + PENDING_WAIT

        def when_quiet() -> None:
            if not self.forwarder.handover_ready() and time.monotonic() < deadline:
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
        fwd = self.forwarder
        fwd.suspend()
        try:
            chan.settimeout(OK_WAIT)
            pods, conns = self._send_all(chan)
            answer, _fds, _payload = _recv(chan)
            if answer.get("kind") != "ok":
                raise MeshError(f"the successor answered {answer.get('kind')!r}")
        except (OSError, MeshError, ValueError) as exc:
            chan.close()
            self.under_way = False
            fwd.resume()
            log.get().warning("takeover failed; serving on", extra={"reason": _why(exc)})
            return
        chan.close()
        log.get().info(
            "handed over to the successor",
            extra={"reason": f"{pods} pods, {conns} connections; exiting"},
        )
        fwd.let_go()
        self.pods.let_go()
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
def receive(socket_path: Path, pods: Attachments, forwarder: Forwarder) -> dict:
    """Take the running agent's pods and connections; returns counts. The
    old agent has exited when this returns. Nothing here reads or writes a
    forwarded socket: the loop does, once it runs."""
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
    _wait_exit(int(hello["pid"]))
    pods.save()
    return {"pods": len(slots), "conns": conns, "from_pid": hello["pid"]}


def _slot_of(slots: dict[int, PodSlot], header: dict) -> PodSlot:
    """A connection's pod: by its pod_id (an earlier agent sent only the name)."""
    pod_id = header.get("pod_id")
    slot = slots.get(pod_id) if pod_id is not None else None
    if slot is None and pod_id is None:
        slot = next((s for s in slots.values() if s.name == header.get("pod")), None)
    if slot is None:
        raise MeshError(f"a connection of unknown pod {header.get('pod')}")
    return slot


def _wait_exit(pid: int) -> None:
    deadline = time.monotonic() + EXIT_WAIT
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ", 1)[1].startswith("Z"):
                    return  # exited, not yet reaped by its parent
        except (OSError, IndexError):
            return
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
