"""Talking to the running agent over its control socket (the CLI, the CNI
plugin, `run --takeover`): JSON lines, see control.py for the server."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from meshagent.config import check_socket_path
from meshagent.errors import CODES, MeshError, NoAgent


def connect(socket_path: Path, timeout: float = 30.0) -> socket.socket:
    """A connection to the running agent; MeshError (one line) if there is none."""
    check_socket_path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NoAgent(f"no agent at {socket_path}: start one with `meshagent run`") from None
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
        raise CODES.get(reply.get("code"), MeshError)(
            reply.get("error", "the agent refused the request")
        )
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
