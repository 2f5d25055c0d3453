"""The tests' sandbox and the agent they start: MeshEnv (a state dir, a
cgroup, a bridge and pod networks of its own), make_env, start_agent and the
helpers around them. tests/conftest.py makes fixtures of these; bench/ uses
them directly. Everything a MeshEnv makes, its cleanup() removes. Tests
attach only at a cgroup of their own, never at the root."""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
TCPTOOL = TESTS / "helpers" / "tcptool.py"
DEPLOY = TESTS.parent / "deploy"
AGENT_READY_TIMEOUT = 120.0


def is_root() -> bool:
    return os.geteuid() == 0


def reap(proc: subprocess.Popen) -> None:
    """Kill proc (by its PID) if it still runs, and wait for it (10 s at most)."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_for(predicate, timeout: float = 20.0, what: str = "condition", interval: float = 0.02):
    """Poll until predicate() is truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Server:
    """A tcptool server; its JSON lines arrive on a queue (one per connection)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                # Say so at next() instead of dying here and leaving next()
                # to time out with nothing to say.
                self.lines.put({"unparsable": line})
        self.lines.put(None)

    def next(self, timeout: float = 60) -> dict:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"server printed nothing within {timeout}s") from None
        assert item is not None, f"server exited {self.proc.poll()}"
        assert "unparsable" not in item, f"server printed a line that is not JSON: {item}"
        return item


@dataclass
class MeshEnv:
    """One test run's sandbox: state dir, cgroup, bridge and pod networks."""

    tag: str
    state_dir: Path
    cgroup_rel: str
    bridge: str
    cidr4: str
    cidr6: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. a cache dir of its own
    node_netns: str = ""  # the netns holding the bridge: a node of a mesh lab

    @property
    def cgroup_path(self) -> Path:
        from meshagent.host import cgroup

        return cgroup.cgroup2_mount() / self.cgroup_rel

    @property
    def env(self) -> dict[str, str]:
        """Environment for meshagent CLI processes in this sandbox."""
        return {
            **os.environ,
            "MESHAGENT_STATE_DIR": str(self.state_dir),
            "MESHAGENT_BRIDGE": self.bridge,
            "MESHAGENT_POD_CIDR": self.cidr4,
            "MESHAGENT_POD_CIDR6": self.cidr6,
            "MESHAGENT_CGROUP_PARENT": f"{self.cgroup_rel}/pods",
            "MESHAGENT_NETNS_PREFIX": f"mt{self.tag}-",
            "MESHAGENT_METRICS_ADDR": "127.0.0.1:0",  # any free port: agents never collide
            "MESHAGENT_NODE_NETNS": self.node_netns,
            **self.extra_env,
        }

    def node(self):
        from meshagent.pods.model import NodeConfig

        return NodeConfig(
            bridge=self.bridge,
            cidr4=self.cidr4,
            cidr6=self.cidr6,
            cgroup_parent=f"{self.cgroup_rel}/pods",
            netns_prefix=f"mt{self.tag}-",
            node_netns=self.node_netns,
        )

    def store(self):
        from meshagent.pods.store import PodStore

        return PodStore(self.state_dir)

    def create_pod(self, name: str, ip: str | None = None, mtls: str = "permissive",
                   labels: dict[str, str] | None = None):  # fmt: skip
        from meshagent.pods.standalone import create_pod

        return create_pod(self.store(), name, ip, self.node(), mtls, labels)

    def popen(self, pod, argv, **kwargs) -> subprocess.Popen:
        from meshagent.pods.standalone import popen

        proc = popen(pod, argv, **kwargs)
        self.procs.append(proc)
        return proc

    def tcptool(self, pod, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("text", True)
        return self.popen(pod, [sys.executable, str(TCPTOOL), *args], **kwargs)

    def script(self, pod, text: str, *args: str, timeout: float = 120) -> str:
        """Run a Python script in pod; its output (it must exit 0)."""
        proc = self.popen(pod, [sys.executable, "-c", text, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"a script in pod {pod.name} failed: {out}"
        return out

    def client(self, pod, host: str, port: int, *args: str, timeout: float = 60) -> dict:
        """Run the tcptool client in pod to host:port; return its JSON line."""
        proc = self.tcptool(pod, "client", "--host", host, "--port", str(port), *args)
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"client in pod {pod.name} failed: {out!r}"
        return json.loads(out.strip().splitlines()[-1])

    def server(self, pod, port: int, *args: str) -> Server:
        proc = self.tcptool(pod, "serve", "--port", str(port), *args)
        server = Server(proc)
        first = server.next(timeout=30)
        assert "listening" in first, f"server in pod {pod.name} did not start: {first!r}"
        return server

    def meshagent(self, *args: str, check: bool = True, timeout: float = 120):
        proc = subprocess.run(
            [sys.executable, "-m", "meshagent", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert proc.returncode == 0, f"meshagent {' '.join(args)}: {proc.stderr}"
        return proc

    def cleanup(self) -> None:
        from meshagent.host import cgroup
        from meshagent.pods.standalone import delete_pod

        for proc in self.procs:
            reap(proc)
        from meshagent.cleanup import cleanup as agent_cleanup

        try:  # what a stopped agent keeps for its successor: pins, rules
            agent_cleanup(self.state_dir)
        except Exception as exc:
            print(f"cleanup: agent state: {exc}", file=sys.stderr)
        store = self.store()
        if store.pods_dir.is_dir():  # records a test planted: they would keep the node up
            for path in store.pods_dir.glob("*.json"):
                if store.find(path.stem) is None:
                    path.unlink()
        for pod in store.all():
            try:
                delete_pod(store, pod.name)
            except Exception as exc:  # keep cleaning the rest
                print(f"cleanup: pod {pod.name}: {exc}", file=sys.stderr)
        try:
            cgroup.remove(self.cgroup_path)
        except Exception as exc:
            print(f"cleanup: cgroup {self.cgroup_path}: {exc}", file=sys.stderr)
        shutil.rmtree(self.state_dir, ignore_errors=True)


TAGS: set[str] = set()  # the sandboxes this test process made (the residue check's scope)


def make_env() -> MeshEnv:
    from meshagent.host import cgroup

    tag = secrets.token_hex(3)
    TAGS.add(tag)
    octet = 100 + secrets.randbelow(100)
    env = MeshEnv(
        tag=tag,
        state_dir=Path(tempfile.mkdtemp(prefix=f"meshtest-{tag}-")),
        cgroup_rel=f"meshtest-{tag}",
        bridge=f"mt{tag}",
        cidr4=f"10.250.{octet}.0/24",
        cidr6=f"fd6d:6573:74{octet:02x}::/64",
    )
    cgroup.create(env.cgroup_path)
    return env


@dataclass
class AgentProc:
    env: MeshEnv
    proc: subprocess.Popen
    log_path: Path
    backend: str = "ebpf"

    def request(self, op: str, **args):
        from meshagent.client import request

        return request(self.env.state_dir / "agent.sock", op, **args)

    def attach(self, pod) -> dict:
        return self.request("attach", pod=pod.name)

    def detach(self, pod) -> dict:
        return self.request("detach", pod=pod.name)

    def pod_status(self, name: str) -> dict | None:
        for pod in self.request("status")["pods"]:
            if pod["name"] == name:
                return pod
        return None

    def forwarded(self) -> int:
        """Connections the forwarder has taken so far (all pods, ever)."""
        return len(self.request("connections")["connections"])

    def decisions(self) -> dict[str, int]:
        return {k: sum(v.values()) for k, v in self.request("status")["decisions"].items()}

    def trace(self, pod: str) -> tuple[subprocess.Popen, list[dict]]:
        """`meshagent trace -o json --pod POD`, running once the agent says
        so; its events arrive in the list (stopped with the sandbox)."""
        seen: list[dict] = []
        tracer = subprocess.Popen([sys.executable, "-m", "meshagent", "trace", "-o", "json",
                                   "--pod", pod], env=self.env.env, stdout=subprocess.PIPE,
                                  text=True)  # fmt: skip
        self.env.procs.append(tracer)
        threading.Thread(target=lambda: seen.extend(json.loads(x) for x in tracer.stdout),
                         daemon=True).start()  # fmt: skip
        wait_for(lambda: self.request("status")["tracing"], what="the trace to start")
        return tracer, seen

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


_CANNOT: dict[tuple[str, str], str | None] = {}


def kernel_cannot(redirect: str = "auto", datapath: str = "auto") -> str | None:
    """Why the agent cannot run so on this kernel, in its own words (its
    plan over the real probe); None when it can."""
    key = (redirect, datapath)
    if key not in _CANNOT:
        from types import SimpleNamespace

        from meshagent import kernel, plan

        config = SimpleNamespace(redirect=redirect, datapath=datapath)
        _CANNOT[key] = plan.plan(kernel.probe(), config).error
    return _CANNOT[key]


def _skip_unless_kernel_can(extra: tuple[str, ...]) -> None:
    """An agent asked for a backend or data path this kernel lacks (on the
    kernel matrix's older kernels: ebpf before 5.15, sockmap before 5.12)
    cannot start: the test is skipped, with the plan's reason. Tests that
    turn features off with --without expect the refusal themselves."""
    asked = {"--redirect": "auto", "--datapath": "auto"}
    for i, arg in enumerate(extra):
        name, _, value = arg.partition("=")
        if name in asked:
            asked[name] = value or extra[i + 1]
        if name == "--without":
            return
    if asked == {"--redirect": "auto", "--datapath": "auto"}:
        return
    why = kernel_cannot(asked["--redirect"], asked["--datapath"])
    if why:
        pytest.skip(f"kernel {os.uname().release} cannot: {why}")


def start_agent(
    env: MeshEnv,
    *extra: str,
    in_cgroup: bool = True,
    nofile: int | None = None,
    log_name: str = "agent.log",
    join: tuple[Path, ...] = (),
    at_root: bool = False,
) -> AgentProc:
    """Start `meshagent run` attached at env's cgroup. With in_cgroup the agent
    itself runs inside that cgroup, so its own upstream sockets pass through
    the hooks (the no-loop rule is then really exercised). at_root: no
    --cgroup, the production attach point (only in a vagrant/ guest). nofile: the
    agent's RLIMIT_NOFILE (soft and hard). join: more cgroup.procs files
    the agent joins before it starts (a v1 memory cgroup, say)."""
    from meshagent.client import agent_running
    from meshagent.host import cgroup

    _skip_unless_kernel_can(extra)
    agent_cg = cgroup.create(env.cgroup_path / "agent")
    log_path = env.state_dir / log_name
    procs_file = str(agent_cg / "cgroup.procs")

    def join_cgroup() -> None:
        if nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if in_cgroup:
            with open(procs_file, "w") as procs:
                procs.write("0\n")
        for path in join:
            with open(path, "w") as procs:
                procs.write("0\n")

    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshagent",
                "run",
                *(() if at_root else ("--cgroup", env.cgroup_rel)),
                *extra,
            ],
            env=env.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=join_cgroup,
        )
    env.procs.append(proc)
    agent = AgentProc(env, proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {agent.log()}")
        return agent_running(env.state_dir / "agent.sock")

    wait_for(ready, AGENT_READY_TIMEOUT, "the agent to answer on its socket", interval=0.1)
    return agent


def our_iptables(pod, flavour: str) -> list[str]:
    """The lines of our chain and jump in a pod's nat tables (both families)."""
    lines = []
    for tool in (f"iptables-{flavour}-save", f"ip6tables-{flavour}-save"):
        out = subprocess.run(
            ["ip", "netns", "exec", pod.netns, tool, "-t", "nat"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        lines += [line for line in out.splitlines() if "MESHAGENT" in line]
    return lines


# (backend, iptables flavour): every redirect backend, both iptables flavours.
REDIRECTS = [("ebpf", None), ("iptables", "legacy"), ("iptables", "nft")]


def redirect_args(backend: str, flavour: str | None) -> list[str]:
    args = ["--redirect", backend]
    if flavour:
        args += ["--iptables", flavour]
    return args
