"""The control server without root: whatever a handler raises, the client
gets one line and the server keeps serving."""

from __future__ import annotations

import threading

import pytest

from meshagent import control
from meshagent.errors import MeshError
from meshagent.host.loop import Loop


@pytest.fixture
def server(tmp_path):
    loop = Loop()

    def dispatch(request: control.Request) -> dict:
        op = request.op()
        if op == "ping":
            return {"pong": True}
        if op == "boom":
            raise RuntimeError("a bug\nover two lines")
        if op == "oserror":
            raise PermissionError(13, "Permission denied")
        if op == "typed":
            return {"pod": request.text("pod")}
        raise MeshError(f"unknown request {op!r}")

    srv = control.ControlServer(loop, tmp_path / "agent.sock", dispatch)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield tmp_path / "agent.sock"
    loop.stop()
    thread.join(5)
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
        control.request(server, op, timeout=1.0, **args)
    assert str(info.value).startswith(expect) and "\n" not in str(info.value)
    assert control.request(server, "ping", timeout=1.0) == {"pong": True}


def test_a_second_server_on_the_same_socket_is_refused(server):
    with pytest.raises(MeshError, match="an agent already runs"):
        control.ControlServer(Loop(), server, lambda _r: {})
