"""The control API answers every request, malformed or failing, with one
line within a second, and the agent keeps serving."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import strategies as st
from meshenv import start_agent, wait_for

from meshagent.client import agent_running

MALFORMED = [
    (b"not json", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"attach"', "not a JSON object"),
    (b"{}", "'op' must be a non-empty string"),
    (b'{"op": 5}', "'op' must be a non-empty string"),
    (b'{"op": "warp"}', "unknown request 'warp'"),
    (b'{"op": "attach"}', "'pod' must be a non-empty string"),
    (b'{"op": "attach", "pod": ["client"]}', "'pod' must be a non-empty string"),
    (b'{"op": "attach", "pod": {"name": "x"}}', "'pod' must be a non-empty string"),
    (b'{"op": "attach", "pod": "client", "redirect": 7}', "'redirect' must be one of ebpf"),
    (b'{"op": "attach", "pod": "client", "redirect": "warp"}', "'redirect' must be one of"),
    (
        b'{"op": "attach", "pod": "../../etc/passwd"}',
        "use NAMESPACE/NAME",
    ),  # has a slash: a Kubernetes name
    (b'{"op": "attach", "pod": "nosuch"}', "pod nosuch: no such pod"),
    (b'{"op": "detach", "pod": 1.5}', "'pod' must be a non-empty string"),
    (b'{"op": "datapath", "set": "warp"}', "'set' must be one of sockmap"),
    (b'{"op": "datapath", "set": ["copy"]}', "'set' must be one of"),
    (b'{"op": "attach", "pod": "default/x", "pid": "12"}', "'pid' must be an integer"),
    (b'{"op": "attach", "pod": "default/x", "netns": 5}', "'netns' must be a non-empty string"),
    (b'{"op": "attach", "pod": "default/x", "pid": 7, "netns": "/x"}', "not both"),
    (b'{"op": "cni-add", "pod": "client"}', "use NAMESPACE/NAME"),
    (b'{"op": "cni-del", "pod": "default/Bad"}', "DNS-1123"),
]


def ask(path, line: bytes) -> dict:
    """Send one raw line; the reply must come within a second."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20.0)  # a bound, not a timing: guests are slow
        sock.connect(str(path))
        sock.sendall(line + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"the agent closed the connection without answering {line!r}"
            data += chunk
    assert data.count(b"\n") == 1
    return json.loads(data)


@pytest.fixture
def control(mesh_env):
    mesh_env.create_pod("client")
    agent = start_agent(mesh_env)
    try:
        yield agent, mesh_env.state_dir / "agent.sock"
    finally:
        assert agent.stop() == 0, agent.log()


def test_every_malformed_request_gets_one_line_and_the_agent_keeps_serving(control):
    agent, path = control
    for line, expect in MALFORMED:
        reply = ask(path, line)
        assert reply["ok"] is False, line
        assert expect in reply["error"] and "\n" not in reply["error"], (line, reply)
        assert agent.request("ping")["pid"] == agent.proc.pid
    assert agent.request("status")["pods"] == []


def test_a_failing_handler_and_an_oversized_request_get_one_line(control, mesh_env):
    agent, path = control
    # A truncated pod record: reading it fails inside the handler.
    (mesh_env.state_dir / "pods" / "broken.json").write_text('{"name": "broken", "netns"')
    reply = ask(path, b'{"op": "attach", "pod": "broken"}')
    assert (
        reply["ok"] is False and "pod broken" in reply["error"] and "unreadable" in reply["error"]
    )
    # A record of the wrong shape (valid JSON, not a pod).
    (mesh_env.state_dir / "pods" / "shape.json").write_text("[1, 2, 3]")
    reply = ask(path, b'{"op": "attach", "pod": "shape"}')
    assert reply["ok"] is False and "pod shape" in reply["error"]
    # Longer than a request may be, with no newline: answered, then closed.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20.0)  # a bound, not a timing: guests are slow
        sock.connect(str(path))
        sock.sendall(b"x" * (70 * 1024))
        data = sock.recv(65536)
    assert json.loads(data)["error"].startswith("request longer than")
    # Several requests on one connection, the bad one in the middle.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20.0)  # a bound, not a timing: guests are slow
        sock.connect(str(path))
        sock.sendall(b'{"op": "ping"}\n{"op": 1}\n{"op": "attach", "pod": "client"}\n')
        data = b""
        while data.count(b"\n") < 3:
            data += sock.recv(65536)
    replies = [json.loads(line) for line in data.splitlines()]
    assert [r["ok"] for r in replies] == [True, False, True]
    assert agent.pod_status("client")["backend"] == agent.request("status")["backend"]
    # A record naming a namespace that is not its pod's (here with a NUL):
    # refused as untrusted, in one line.
    record = {"name": "nul", "netns": "mesh-\u0000x", "ip4": "10.0.0.9", "ip6": "fd00::9",
              "host_veth": "meshnul", "cgroup": "x/nul", "bridge": "x"}  # fmt: skip
    (mesh_env.state_dir / "pods" / "nul.json").write_text(json.dumps(record))
    reply = ask(path, b'{"op": "attach", "pod": "nul"}')
    assert reply["ok"] is False and "its record names netns" in reply["error"]
    assert agent.request("status")["pods"][0]["name"] == "client"


def test_a_state_dir_too_long_for_a_unix_socket_is_one_line(mesh_env):
    long_dir = mesh_env.state_dir / ("d" * 120)
    for args in (["status"], ["attach", "client"], ["run", "--cgroup", mesh_env.cgroup_rel]):
        proc = subprocess.run(
            [sys.executable, "-m", "meshagent", "--state-dir", str(long_dir), *args],
            env=mesh_env.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "more than a unix socket path allows" in lines[0], lines[0]
    assert not long_dir.exists()


def test_two_agents_started_at_once_one_runs_the_other_says_why(mesh_env):
    argv = [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel]
    procs = [
        subprocess.Popen(
            argv, env=mesh_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    mesh_env.procs.extend(procs)
    try:
        loser = None
        for _ in range(600):
            done = [p for p in procs if p.poll() is not None]
            if done:
                loser = done[0]
                break
            time.sleep(0.1)
        assert loser is not None, "neither agent refused the other"
        _out, err = loser.communicate(timeout=10)
        assert loser.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "another agent runs" in lines[0] or "an agent already runs" in lines[0]
        winner = next(p for p in procs if p is not loser)
        wait_for(lambda: agent_running(mesh_env.state_dir / "agent.sock"), 120,
                 "the other agent")  # fmt: skip
        assert winner.poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)  # fmt: skip
OPS = st.sampled_from(["ping", "attach", "detach", "status", "connections", "datapath",
                       "trace", "nosuch", ""])  # fmt: skip
REQUESTS = JSON | st.fixed_dictionaries(
    {"op": OPS},
    optional={"pod": JSON | st.sampled_from(["client", "nosuch", "../x", ""]),
              "redirect": JSON | st.sampled_from(["ebpf", "iptables", "auto"]),
              "set": JSON | st.sampled_from(["copy", "splice", "sockmap", "auto"]),
              "port": JSON},
)  # fmt: skip


def test_no_request_crashes_or_hangs_the_agent(control):
    """Property: whatever JSON arrives, one line comes back within a second
    and the agent still answers a ping."""
    from hypothesis import HealthCheck, given, settings

    agent, path = control

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(REQUESTS)
    def check(request):
        reply = ask(path, json.dumps(request).encode())
        assert reply["ok"] in (True, False)
        if not reply["ok"]:
            assert reply["error"] and "\n" not in reply["error"]

    check()
    assert agent.request("ping")["pid"] == agent.proc.pid
    assert agent.request("status")["loop_errors"] == 0
