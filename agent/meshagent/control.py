"""The running agent's local API: JSON lines on a root-only unix socket.

Request:  {"op": "attach", "pod": "client"}\n
Response: {"ok": true, ...}\n  or  {"ok": false, "error": "one line"}\n

Every request gets an answer: a malformed one (not JSON, wrong types, too
long) and one whose handler fails in any way get a one-line error, and the
agent keeps serving.
"""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path

from meshagent import log
from meshagent.config import check_socket_path
from meshagent.errors import MeshError
from meshagent.host.loop import Loop
from meshagent.modes import parse, values

MAX_REQUEST = 64 * 1024


class Request:
    """One decoded request, with typed access that fails as one line."""

    def __init__(self, data: dict, conn: socket.socket | None = None) -> None:
        self.data = data
        self.conn = conn  # for a reply that streams (trace)

    def op(self) -> str:
        return self.text("op")

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise MeshError(f"{self.data.get('op', 'request')}: {key!r} must be a non-empty string")
        return value

    def optional_text(self, key: str) -> str | None:
        return None if self.data.get(key) is None else self.text(key)

    def optional_int(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise MeshError(f"{self.data.get('op', 'request')}: {key!r} must be an integer")
        return value

    def optional_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise MeshError(f"{self.data.get('op', 'request')}: {key!r} must be true or false")
        return value

    def choice(self, key: str, enum, optional: bool = False):
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise MeshError(
                f"{self.data.get('op')}: {key!r} must be one of {', '.join(values(enum))}"
            )
        return parse(enum, value, f"{self.data.get('op')}: {key!r}")


class Deferred:
    """A reply that comes later, for work that runs off the loop: the
    dispatcher returns one, and resolve() or fail() (on the loop) sends it.
    Until then the connection's further requests wait, so replies keep the
    order of their requests."""

    def __init__(self) -> None:
        self.reply: dict | None = None
        self._then: Callable[[dict], None] | None = None

    def resolve(self, reply: dict) -> None:
        self._settle({"ok": True, **reply})

    def fail(self, exc: BaseException, op: str = "") -> None:
        self._settle(error_reply(exc, op))

    def _settle(self, reply: dict) -> None:
        if self.reply is not None:
            return
        self.reply = reply
        if self._then is not None:
            self._then(reply)

    def then(self, fn: Callable[[dict], None]) -> None:
        self._then = fn
        if self.reply is not None:
            fn(self.reply)


def error_reply(exc: BaseException, op: object = "") -> dict:
    """A failed request's one-line answer; a bug is logged with its traceback."""
    if isinstance(exc, MeshError):
        return {"ok": False, "error": _one_line(str(exc))}
    log.get().error(
        "control request failed", exc_info=exc, extra={"reason": f"op={op!r}"}
    )  # fmt: skip
    return {
        "ok": False,
        "error": _one_line(f"internal error in {op!r}: {type(exc).__name__}: {exc}"),
    }


Dispatch = Callable[[Request], "dict | Deferred"]
MAX_UNSENT = 4 << 20  # bytes of replies a client may leave unread before it is dropped


class _Client:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.waiting = False  # a Deferred reply is due before the next request
        self.closed = False


class ControlServer:
    def __init__(self, loop: Loop, path: Path, dispatch: Dispatch) -> None:
        self.loop = loop
        self.path = path
        self.dispatch = dispatch
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

    def _accept(self, _events: int) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            client = _Client(conn)
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
            reply = self._handle(line, client.conn)
            if isinstance(reply, Deferred):
                client.waiting = True
                reply.then(lambda r, c=client: self._settled(c, r))
            else:
                self._answer(client, reply)

    def _settled(self, client: _Client, reply: dict) -> None:
        client.waiting = False
        if client.closed:
            return
        self._answer(client, reply)
        self._process(client)

    def _answer(self, client: _Client, reply: dict) -> None:
        fds = reply.pop("_fds", ())
        closer = reply.pop("_on_close", None)
        if closer is not None:
            self.closers[client.conn.fileno()] = closer
        try:
            self._send(client, reply, fds)
        finally:
            for fd in fds:  # the dispatcher's copies: the client has its own now
                os.close(fd)

    def _handle(self, line: bytes, conn: socket.socket) -> dict | Deferred:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: not JSON ({exc})"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: not a JSON object"}
        try:
            reply = self.dispatch(Request(request, conn))
        except Exception as exc:
            return error_reply(exc, request.get("op"))
        return reply if isinstance(reply, Deferred) else {"ok": True, **reply}

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
    raise MeshError(f"an agent already runs at {path}: stop it first, or use another --state-dir")


def connect(socket_path: Path, timeout: float = 30.0) -> socket.socket:
    """A connection to the running agent; MeshError (one line) if there is none."""
    check_socket_path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise MeshError(f"no agent at {socket_path}: start one with `meshagent run`") from None
    except PermissionError:
        sock.close()
        raise MeshError(f"no permission for {socket_path}: run as root") from None
    return sock


def request(socket_path: Path, op: str, timeout: float = 30.0, **args: object) -> dict:
    """Ask the running agent; MeshError with its one-line answer on failure."""
    sock = connect(socket_path, timeout)
    try:
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise MeshError(f"the agent at {socket_path} closed the connection")
            data += chunk
    except TimeoutError:
        raise MeshError(f"the agent at {socket_path} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise MeshError(f"the agent at {socket_path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise MeshError(f"the agent at {socket_path} answered something that is not JSON") from None
    if not isinstance(reply, dict):
        raise MeshError(f"the agent at {socket_path} answered something that is not an object")
    if not reply.pop("ok", False):
        raise MeshError(reply.get("error", "the agent refused the request"))
    return reply


def request_with_fds(
    socket_path: Path, request: dict, max_fds: int = 1, timeout: float = 30.0
) -> tuple[socket.socket, dict, list[int], bytes]:
    """A request whose reply carries fds (SCM_RIGHTS) and whose connection
    stays open: (the connection, the reply, the fds, bytes after the reply).
    MeshError with the agent's one line if it refuses."""
    sock = connect(socket_path, timeout)
    fds: list[int] = []
    try:
        sock.sendall(json.dumps(request).encode() + b"\n")
        data, fds, _flags, _addr = socket.recv_fds(sock, 65536, max_fds)
        while b"\n" not in data:
            more = sock.recv(65536)
            if not more:
                raise MeshError(f"the agent at {socket_path} closed the connection")
            data += more
        line, _, rest = data.partition(b"\n")
        reply = json.loads(line)
        if not reply.pop("ok", False):
            raise MeshError(reply.get("error", f"the agent refused {request.get('op')!r}"))
    except BaseException as exc:
        for fd in fds:
            os.close(fd)
        sock.close()
        if isinstance(exc, TimeoutError):
            raise MeshError(
                f"the agent at {socket_path} did not answer within {timeout:g}s"
            ) from None
        raise
    return sock, reply, fds, rest


def agent_running(socket_path: Path) -> bool:
    try:
        request(socket_path, "ping", timeout=5)
    except MeshError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())
