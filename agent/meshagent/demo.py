"""`meshagent demo`: two pods, nginx, an agent, curl steered, then cleanup.

The demo never touches the host's own traffic: if no agent runs, it starts
one attached at the pods' own cgroup, not at the root.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from meshagent.client import agent_running, request
from meshagent.errors import MeshError
from meshagent.state import StateDir

Echo = Callable[[str], None]
DEMO_PODS = ("client", "server")


def nginx_conf(prefix: Path, body: str) -> str:
    """A self-contained nginx config: everything under prefix, port 80 on v4 and v6."""
    return textwrap.dedent(
        f"""
        daemon off;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log;
        events {{ worker_connections 128; }}
        http {{
            access_log {prefix}/access.log;
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            server {{
                listen 80;
                listen [::]:80;
                location / {{ return 200 "{body}\\n"; }}
            }}
        }}
        """
    )


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise MeshError(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def _curl(pod, url: str) -> tuple[int, str]:
    from meshagent.pods.standalone import popen

    proc = popen(pod, ["curl", "-sS", "--max-time", "10", url], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out.strip()


def run_demo(state_dir: Path, echo: Echo) -> None:
    from meshagent.pods.model import NodeConfig
    from meshagent.pods.standalone import create_pod, delete_pod, popen
    from meshagent.pods.store import PodStore

    for tool in ("curl", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise MeshError(f"demo needs {tool}: run scripts/bootstrap")
    store = PodStore(state_dir)
    taken = [name for name in DEMO_PODS if store.find(name)]
    if taken:
        raise MeshError(
            f"pod {taken[0]} already exists: delete it, or give the demo a state dir of its"
            " own (meshagent --state-dir DIR demo)"
        )
    sock = StateDir(state_dir).socket
    started = time.monotonic()
    with ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="meshagent-demo-"))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        node = store.node() or NodeConfig()
        echo(f"1. pods: creating client and server on bridge {node.bridge} ({node.cidr4})")
        pods = {}
        for name in DEMO_PODS:
            pods[name] = create_pod(store, name)
            cleanup.callback(delete_pod, store, name)
            echo(f"   {name:7} {pods[name].ip4:12} {pods[name].ip6}  netns {pods[name].netns}")
        client, server = pods["client"], pods["server"]

        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, "hello from the server pod"))
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        popen(server, [nginx_bin, "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
        _wait(lambda: (workdir / "nginx.pid").exists(), 10, "nginx in the server pod")
        echo(f"2. server: nginx listening on {server.ip4}:80 and [{server.ip6}]:80")

        if agent_running(sock):
            echo(f"3. agent: using the agent already running at {sock}")
        else:
            cg = node.cgroup_parent
            echo(f"3. agent: starting one, attached at cgroup {cg} (the pods' own, not the root)")
            log_file = open(workdir / "agent.log", "w")  # noqa: SIM115
            cleanup.callback(log_file.close)
            agent = subprocess.Popen(
                [sys.executable, "-m", "meshagent", "--state-dir", str(state_dir), "run",
                 "--cgroup", cg, "--metrics-addr", "127.0.0.1:0"],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
            cleanup.callback(_stop, agent, state_dir)
            _wait(lambda: agent.poll() is not None or agent_running(sock), 120, "the agent")
            if agent.poll() is not None:
                raise MeshError(f"demo: the agent failed: {(workdir / 'agent.log').read_text()}")

        chosen = request(sock, "status")["plan"]
        echo(f"   plan: backend {chosen['backend']} ({chosen['backend_reason']})")
        echo(f"         data path {chosen['datapath']} ({chosen['datapath_reason']})")
        reply = request(sock, "attach", pod="client")
        how = "one map update" if reply["backend"] == "ebpf" else "rules in its netns"
        echo(f"4. attach: client is attached ({reply['backend']}: {how}; nothing restarted)")
        for url in (f"http://{server.ip4}/", f"http://[{server.ip6}]/"):
            code, body = _curl(client, url)
            if code != 0:
                raise MeshError(f"demo: curl {url} from client failed (exit {code})")
            echo(f"   curl {url:32} -> {body!r}")

        status = request(sock, "status")
        stats = next(p for p in status["pods"] if p["name"] == "client")
        conns = [c for c in request(sock, "connections")["connections"] if c["pod"] == "client"]
        echo(
            "5. steered: each connect() went to the pod's forwarder, which knew where it was going:"
        )
        for conn in conns[-2:]:
            echo(
                f"   {conn['client']:>18} -> forwarder -> original destination {conn['orig_dst']}"
                f"  ({conn['bytes_out']} B out, {conn['bytes_in']} B in)"
            )
        access = (workdir / "access.log").read_text().split("\n")
        peers = [line.split()[0] for line in access if line]
        echo(f"   nginx saw the client pod's own addresses: {', '.join(peers)}")

        request(sock, "detach", pod="client")
        code, _ = _curl(client, f"http://{server.ip4}/")
        after = request(sock, "status")
        echo(
            f"6. detach: client talks directly again (curl exit {code});"
            f" agent pods attached now: {len(after['pods'])}"
        )
    elapsed = time.monotonic() - started
    echo(
        f"\nSummary: {stats['connections_total']} connections from pod client were steered"
        f" through the forwarder ({stats['bytes_out']} B out, {stats['bytes_in']} B in),"
        f" with the {status['backend']} backend and the {status['datapath']} data path"
        f" ({status['datapath_reason']}). Everything the demo made is removed. {elapsed:.1f}s."
    )


def _stop(proc: subprocess.Popen, state_dir: Path) -> None:
    """Stop the demo's own agent, then remove what a stopped agent keeps
    for its successor (the demo leaves nothing)."""
    from meshagent.cleanup import cleanup

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    cleanup(state_dir)
