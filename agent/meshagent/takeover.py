"""Upgrade in place: `meshagent run --takeover` receives the running agent's
pods, listening sockets and every forwarded connection, and the old agent
exits without ending any of them (HAProxy's seamless reload and Envoy's hot
restart pass listeners the same way).

The successor asks the running agent for a `handover` on its control
socket; the reply carries one end of a SOCK_SEQPACKET socketpair, and over
it the old agent sends, one message each (a JSON header line, then raw
bytes; sockets and pipes as SCM_RIGHTS):

    hello  {pid, pods, conns}
    pod    {name, backend, netns, netns_id, pod_id, since, draining, stats} + its listeners
    conn   {pod, record, mode, state, blobs: [sizes]} + its sockets (and splice pipes)
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

from meshagent.errors import MeshError

MAX_MESSAGE = 256 * 1024
MAX_FDS = 16  # a splice connection: 2 sockets + 2 pipes of 2 ends
PENDING_WAIT = 2.0  # seconds for in-flight upstream connects before the handover
OK_WAIT = 60.0  # seconds the old agent waits for the successor's ok
EXIT_WAIT = 30.0  # seconds the successor waits for the old agent to exit


# -- the running agent's side -------------------------------------------------
def serve(agent, _request):
    """The `handover` request: once no upstream connect is in flight, reply
    with a socketpair end and send everything over it."""
    from meshagent.control import Deferred

    if agent.handing_over:
        raise MeshError("handover: one is already under way")
    agent.handing_over = True
    agent.forwarder.stop_accepting()
    reply = Deferred()
    deadline = time.monotonic() + PENDING_WAIT

    def when_quiet() -> None:
        if not agent.forwarder.handover_ready() and time.monotonic() < deadline:
            agent.loop.call_later(0.01, when_quiet)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (ours, theirs):  # a message must fit the buffers whole
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_MESSAGE)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_MESSAGE)
        reply.resolve({"pid": os.getpid(), "_fds": [os.dup(theirs.fileno())]})
        theirs.close()
        agent.loop.call_later(0, lambda: _hand_over(agent, ours))

    agent.loop.call_later(0, when_quiet)
    return reply


def _hand_over(agent, chan: socket.socket) -> None:
    log = agent.log
    fwd = agent.forwarder
    fwd.suspend()
    try:
        chan.settimeout(OK_WAIT)
        exported = fwd.exported()
        entries = list(agent.pods.pods.values())
        _send(chan, {"kind": "hello", "pid": os.getpid(), "pods": len(entries),
                     "conns": len(exported)})  # fmt: skip
        for entry in entries:
            name = entry.handle.name
            slot = fwd.pods.get(name) or next((s for s, _r, _c in exported if s.name == name), None)
            listeners = [s.fileno() for s in slot.listeners] if slot is not None else []
            dev, ino = entry.handle.netns_id
            _send(chan, {
                "kind": "pod", "name": name, "backend": entry.backend.name.value,
                "netns": entry.handle.netns_name, "netns_id": f"{dev}:{ino}",
                "pod_id": entry.handle.pod_id, "since": entry.since, "draining": entry.draining,
                "source": entry.source, "auto": entry.auto,
                "stats": slot.stats.to_dict() if slot is not None else None,
            }, listeners)  # fmt: skip
        for slot, record, conn in exported:
            state, fds, blobs = conn.export()
            _send(chan, {"kind": "conn", "pod": slot.name, "record": record.to_dict(),
                         "mode": conn.mode.value, "state": state,
                         "blobs": [len(b) for b in blobs]}, fds)  # fmt: skip
            for blob in blobs:
                for at in range(0, len(blob), MAX_MESSAGE // 2):
                    _send(chan, {"kind": "blob"}, payload=blob[at : at + MAX_MESSAGE // 2])
        _send(chan, {"kind": "end"})
        answer, _fds, _payload = _recv(chan)
        if answer.get("kind") != "ok":
            raise MeshError(f"the successor answered {answer.get('kind')!r}")
    except (OSError, MeshError, ValueError) as exc:
        chan.close()
        agent.handing_over = False
        fwd.resume()
        log.warning("takeover failed; serving on", extra={"reason": _why(exc)})
        return
    chan.close()
    log.info(
        "handed over to the successor",
        extra={"reason": f"{len(entries)} pods, {len(exported)} connections; exiting"},
    )
    agent.handed_over = True
    fwd.let_go()
    agent.pods.let_go()
    agent.loop.stop()


# -- the successor's side -----------------------------------------------------
def receive(agent) -> dict:
    """Take the running agent's pods and connections; returns counts. The
    old agent has exited when this returns. Nothing here reads or writes a
    forwarded socket: the loop does, once it runs."""
    from meshagent import control
    from meshagent.forwarder.records import ConnRecord
    from meshagent.modes import DataPathMode

    try:
        sock, _reply, fds, _rest = control.request_with_fds(
            agent.cfg.socket_path, {"op": "handover"}, 1, timeout=OK_WAIT
        )
    except MeshError as exc:
        raise MeshError(f"--takeover: {exc}") from None
    sock.close()
    if len(fds) != 1:
        raise MeshError("--takeover: the running agent sent no handover channel")
    chan = socket.socket(fileno=fds[0])
    chan.settimeout(OK_WAIT)
    owned: list[int] = []  # fds received and not yet owned by a socket or pipe user
    slots: dict[str, object] = {}
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
                slots[header["name"]] = agent.pods.take_over(header, listeners)
            elif kind == "conn":
                blobs = [_blob(chan, size) for size in header["blobs"]]
                client, upstream = (socket.socket(fileno=fd) for fd in got[:2])
                owned = [fd for fd in owned if fd not in got]
                slot = slots.get(header["pod"])
                if slot is None:
                    raise MeshError(f"a connection of unknown pod {header['pod']}")
                agent.forwarder.adopt_conn(
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
    agent.pods.save()
    return {"pods": len(slots), "conns": conns, "from_pid": hello["pid"]}


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
