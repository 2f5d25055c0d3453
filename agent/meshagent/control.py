"""The running agent's local API: JSON lines on a root-only unix socket.

Request:  {"op": "attach", "pod": "client"}\n
Response: {"ok": true, ...}\n  or  {"ok": false, "error": "one line"}\n

Every request gets an answer: a malformed one (not JSON, wrong types, too
long) and one whose handler fails in any way get a one-line error, and the
agent keeps serving.

Who may ask what: the peer is read at accept (host/peer.py). Any uid-0
peer may read (READ_ONLY: ping, status, connections, datapath without
`set`); every other request needs cap_net_admin or cap_sys_admin in the
peer's effective set and the agent's network namespace, or it is refused
with one line that names what is missing. `handover` further needs the
successor lock (takeover.py).
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

from meshagent import log
from meshagent.api import Deferred, Failure, Handler, Outcome, Reply, Request
from meshagent.config import check_socket_path
from meshagent.errors import MeshError
from meshagent.host.loop import Loop
from meshagent.host.peer import Peer, peer_of

MAX_REQUEST = 64 * 1024


def error_reply(exc: BaseException, op: object = "") -> dict:
    """A failed request's one-line answer; a bug is logged with its traceback."""
    if isinstance(exc, MeshError):
        code = {"code": exc.code} if exc.code else {}
        return {"ok": False, "error": _one_line(str(exc)), **code}
    log.get().error(
        "control request failed", exc_info=exc, extra={"reason": f"op={op!r}"}
    )  # fmt: skip
    return {
        "ok": False,
        "error": _one_line(f"internal error in {op!r}: {type(exc).__name__}: {exc}"),
    }


MAX_UNSENT = 4 << 20  # bytes of replies a client may leave unread before it is dropped


READ_ONLY = frozenset({"ping", "status", "connections"})


def reads_only(op: str, data: dict) -> bool:
    """A request that changes nothing (any root peer may send it)."""
    if op == "datapath":
        return all(data.get(key) is None for key in ("set", "msg", "replies"))
    if op == "policy":
        return data.get("action") in ("show", "check")
    return op in READ_ONLY


def refusal(op: str, data: dict, peer: Peer) -> MeshError | None:
    """Why peer may not send this request, or None."""
    if not peer.may_read:
        return MeshError(f"{op}: refused: {peer.refused}")
    if peer.refused is not None and not reads_only(op, data):
        return MeshError(f"{op}: refused: {peer.refused}")
    return None


class _Client:
    def __init__(self, conn: socket.socket, peer: Peer) -> None:
        self.conn = conn
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.waiting = False  # a Deferred reply is due before the next request
        self.closed = False


class ControlServer:
    def __init__(
        self,
        loop: Loop,
        path: Path,
        handlers: Mapping[str, Handler],
        peer_check: Callable[[socket.socket], Peer] = peer_of,
    ) -> None:
        self.loop = loop
        self.peer_check = peer_check  # tests without root pass their own
        self.path = path
        self.handlers = dict(handlers)  # op -> handler
        self.clients: dict[int, _Client] = {}
        self.closers: dict[int, Callable[[], None]] = {}  # streaming replies: when they end
        check_socket_path(path)
        _claim_socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self.sock.listen(64)
        self.sock.setblocking(False)
        loop.add(self.sock.fileno(), select.EPOLLIN, self._accept)

    def serve(self, handlers: Mapping[str, Handler]) -> None:
        """Register more handlers (the agent claims the socket early and
        registers its handlers once it has made their parts)."""
        self.handlers.update(handlers)

    def _accept(self, _events: int) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            try:
                peer = self.peer_check(conn)  # now: the peer's pid is pinned soonest
            except OSError as exc:
                log.get().warning("control peer unreadable", extra={"reason": _one_line(str(exc))})
                conn.close()
                continue
            client = _Client(conn, peer)
            self.clients[conn.fileno()] = client
            self.loop.add(conn.fileno(), select.EPOLLIN, self._handler(client))

    def _handler(self, client: _Client) -> Callable[[int], None]:
        def handle(events: int) -> None:
            if events & select.EPOLLOUT:
                self._flush(client)
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not client.closed:
                self._read(client)

        return handle

    def _read(self, client: _Client) -> None:
        try:
            data = client.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        self._process(client)
        if len(client.inbuf) > MAX_REQUEST and not client.closed:
            self._send(client, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
            self._drop(client)

    def _process(self, client: _Client) -> None:
        """Answer the complete lines in order; stop at a reply that comes later."""
        while not client.waiting and not client.closed and b"\n" in client.inbuf:
            line, _, rest = bytes(client.inbuf).partition(b"\n")
            client.inbuf[:] = rest
            outcome = self._handle(line, client.conn, client.peer)
            if isinstance(outcome, Deferred):
                client.waiting = True
                outcome.then(lambda o, c=client: self._settled(c, o))
            else:
                self._answer(client, outcome)

    def _settled(self, client: _Client, outcome: Outcome) -> None:
        client.waiting = False
        if client.closed:
            for fd in outcome.fds if isinstance(outcome, Reply) else ():
                os.close(fd)
            return
        self._answer(client, outcome)
        self._process(client)

    def _answer(self, client: _Client, outcome: Outcome) -> None:
        if isinstance(outcome, Failure):
            self._send(client, error_reply(outcome.error, outcome.op))
            return
        if outcome.on_close is not None:
            self.closers[client.conn.fileno()] = outcome.on_close
        try:
            self._send(client, {"ok": True, **outcome.data}, outcome.fds)
        finally:
            for fd in outcome.fds:  # the handler's copies: the client has its own now
                os.close(fd)

    def _handle(self, line: bytes, conn: socket.socket, peer: Peer) -> Outcome | Deferred:
        try:
            data = json.loads(line)
        except ValueError as exc:
            return Failure(MeshError(f"bad request: not JSON ({exc})"))
        if not isinstance(data, dict):
            return Failure(MeshError("bad request: not a JSON object"))
        request = Request(data, conn, peer)
        try:
            op = request.op()
            handler = self.handlers.get(op)
            if handler is None:
                raise MeshError(f"unknown request {op!r}")
            refused = refusal(op, data, peer)
            if refused is not None:
                log.get().warning(
                    "control request refused", extra={"reason": f"op={op} {refused}"}
                )  # fmt: skip
                raise refused
            return handler(request)
        except Exception as exc:
            return Failure(exc, data.get("op"))

    def _send(self, client: _Client, reply: dict, fds=()) -> None:
        """Queue the reply and send what the socket takes now; the rest goes
        when it is writable (a client that reads slowly never blocks the loop)."""
        data = json.dumps(reply, default=str).encode() + b"\n"
        if fds:  # passed with the first byte (SCM_RIGHTS); nothing is queued before it
            try:
                socket.send_fds(client.conn, [data[:1]], list(fds), socket.MSG_DONTWAIT)
            except OSError:
                self._drop(client)
                return
            data = data[1:]
        client.outbuf += data
        if len(client.outbuf) > MAX_UNSENT:
            self._drop(client)
            return
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        while client.outbuf and not client.closed:
            try:
                sent = client.conn.send(client.outbuf, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                self._drop(client)
                return
            del client.outbuf[:sent]
        if not client.closed:
            mask = select.EPOLLIN | (select.EPOLLOUT if client.outbuf else 0)
            self.loop.modify(client.conn.fileno(), mask)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        fd = client.conn.fileno()
        self.clients.pop(fd, None)
        closer = self.closers.pop(fd, None)
        if closer is not None:
            closer()
        self.loop.remove(fd)
        client.conn.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        self.loop.remove(self.sock.fileno())
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _claim_socket_path(path: Path) -> None:
    """Refuse when another agent answers; remove a stale socket file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise MeshError(
        f"an agent already runs at {path}: stop it first, or give this one a state dir of"
        " its own (meshagent --state-dir DIR run)"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())
