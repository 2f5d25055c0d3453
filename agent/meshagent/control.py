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

    def choice(self, key: str, enum, optional: bool = False):
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise MeshError(
                f"{self.data.get('op')}: {key!r} must be one of {', '.join(values(enum))}"
            )
        return parse(enum, value, f"{self.data.get('op')}: {key!r}")


Dispatch = Callable[[Request], dict]


class ControlServer:
    def __init__(self, loop: Loop, path: Path, dispatch: Dispatch) -> None:
        self.loop = loop
        self.path = path
        self.dispatch = dispatch
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
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
            self.clients[conn.fileno()] = (conn, bytearray())
            self.loop.add(conn.fileno(), select.EPOLLIN, self._reader(conn))

    def _reader(self, conn: socket.socket) -> Callable[[int], None]:
        def handle(_events: int) -> None:
            _sock, buf = self.clients[conn.fileno()]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                return
            buf += data
            while b"\n" in buf and conn.fileno() >= 0:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                self._answer(conn, line)
            if len(buf) > MAX_REQUEST and conn.fileno() >= 0:
                self._reply(
                    conn, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
                )
                self._drop(conn)

        return handle

    def _answer(self, conn: socket.socket, line: bytes) -> None:
        reply = self._handle(line, conn)
        fds = reply.pop("_fds", ())
        closer = reply.pop("_on_close", None)
        if closer is not None:
            self.closers[conn.fileno()] = closer
        try:
            self._reply(conn, reply, fds)
        finally:
            for fd in fds:  # the dispatcher's copies: the client has its own now
                os.close(fd)

    def _handle(self, line: bytes, conn: socket.socket) -> dict:
        try:
            request = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: not JSON ({exc})"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: not a JSON object"}
        try:
            return {"ok": True, **self.dispatch(Request(request, conn))}
        except MeshError as exc:
            return {"ok": False, "error": _one_line(str(exc))}
        except Exception as exc:
            op = request.get("op")
            log.get().exception("control request failed", extra={"reason": f"op={op!r}"})
            return {
                "ok": False,
                "error": _one_line(f"internal error in {op!r}: {type(exc).__name__}: {exc}"),
            }

    def _reply(self, conn: socket.socket, reply: dict, fds=()) -> None:
        conn.setblocking(True)
        try:
            conn.settimeout(5)
            data = json.dumps(reply, default=str).encode() + b"\n"
            if fds:  # passed with the first byte (SCM_RIGHTS), the rest follows
                socket.send_fds(conn, [data[:1]], list(fds))
                data = data[1:]
            conn.sendall(data)
        except OSError:
            self._drop(conn)
            return
        conn.settimeout(None)
        conn.setblocking(False)

    def _drop(self, conn: socket.socket) -> None:
        if conn.fileno() < 0:
            return
        self.clients.pop(conn.fileno(), None)
        closer = self.closers.pop(conn.fileno(), None)
        if closer is not None:
            closer()
        self.loop.remove(conn.fileno())
        conn.close()

    def close(self) -> None:
        for conn, _buf in list(self.clients.values()):
            self._drop(conn)
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


def agent_running(socket_path: Path) -> bool:
    try:
        request(socket_path, "ping", timeout=5)
    except MeshError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())
