"""Shared fixtures. Everything a fixture makes, it removes, even on failure:
its cgroup, pods (netns, veth, bridge), agent processes and state dir.
Tests attach only at a cgroup of their own, never at the root."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TCPTOOL = TESTS / "helpers" / "tcptool.py"
AGENT_READY_TIMEOUT = 120.0


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root: BPF, netns, cgroups")


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
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def next(self, timeout: float = 60) -> dict:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"server printed nothing within {timeout}s") from None
        assert item is not None, f"server exited {self.proc.poll()}"
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
        )

    def store(self):
        from meshagent.pods.store import PodStore

        return PodStore(self.state_dir)

    def create_pod(self, name: str, ip: str | None = None):
        from meshagent.pods.standalone import create_pod

        return create_pod(self.store(), name, ip, self.node())

    def popen(self, pod, argv, **kwargs) -> subprocess.Popen:
        from meshagent.pods.standalone import popen

        proc = popen(pod, argv, **kwargs)
        self.procs.append(proc)
        return proc

    def tcptool(self, pod, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("text", True)
        return self.popen(pod, [sys.executable, str(TCPTOOL), *args], **kwargs)

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
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
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


_TAGS: set[str] = set()  # the sandboxes this test process made (the residue check's scope)


def make_env() -> MeshEnv:
    from meshagent.host import cgroup

    tag = secrets.token_hex(3)
    _TAGS.add(tag)
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


@pytest.fixture
def mesh_env() -> Iterator[MeshEnv]:
    if not is_root():
        pytest.skip("needs root: BPF, netns, cgroups")
    env = make_env()
    try:
        yield env
    finally:
        env.cleanup()


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
) -> AgentProc:
    """Start `meshagent run` attached at env's cgroup. With in_cgroup the agent
    itself runs inside that cgroup, so its own upstream sockets pass through
    the hooks (the no-loop rule is then really exercised). nofile: the
    agent's RLIMIT_NOFILE (soft and hard)."""
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

    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshagent", "run", "--cgroup", env.cgroup_rel, *extra],
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


@pytest.fixture
def agent(mesh_env: MeshEnv) -> Iterator[AgentProc]:
    proc = start_agent(mesh_env)
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"agent exited {code}: {proc.log()}"


@pytest.fixture(params=REDIRECTS, ids=lambda p: "-".join(x for x in p if x))
def redirect(request) -> tuple[str, str | None]:
    return request.param


@pytest.fixture
def any_agent(mesh_env: MeshEnv, redirect) -> Iterator[AgentProc]:
    """An agent with each redirect backend (and iptables flavour) in turn."""
    proc = start_agent(mesh_env, *redirect_args(*redirect))
    proc.backend = redirect[0]
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"agent exited {code}: {proc.log()}"


def _residue() -> set[str]:
    """What a test could leave behind on this machine, by the tests' own
    prefixes: netns, links, cgroups, pinned BPF objects, processes naming a
    sandbox; and, not tagged, so checked as "new since the test began":
    our iptables chain in the host's namespace, listeners on the
    forwarder's port in the host's namespace, and namespace or BPF fds held
    by this test process."""
    from meshagent.host import cgroup

    found: set[str] = set()
    for kind, path, prefix in (
        ("netns", Path("/run/netns"), "mt"),
        ("link", Path("/sys/class/net"), "mt"),
    ):
        if path.is_dir():
            found |= {f"{kind} {name}" for name in os.listdir(path) if name.startswith(prefix)}
    try:
        root = cgroup.cgroup2_mount()
        found |= {f"cgroup {p.name}" for p in root.iterdir() if p.name.startswith("meshtest-")}
    except Exception:
        pass
    for line in Path("/proc/mounts").read_text().splitlines():  # runc's v1 cgroups (hybrid)
        fields = line.split()
        if fields[2] == "cgroup" and Path(fields[1]).is_dir():
            found |= {f"cgroup v1 {p}" for p in Path(fields[1]).iterdir()
                      if p.name.startswith("meshtest-")}  # fmt: skip
    pinned = Path("/sys/fs/bpf/meshagent")
    if pinned.is_dir():
        found |= {f"pinned {pinned / p.name}" for p in pinned.iterdir()}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for tag in re.findall(r"meshtest-([0-9a-f]{6})", cmdline):
                found.add(f"process {proc.name} of meshtest-{tag}: {cmdline[:80]}")
    return found


def _untagged_residue() -> set[str]:
    from meshagent.config import AgentConfig
    from meshagent.redirect.rules import CHAIN

    found: set[str] = set()
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
                 "ip6tables-nft-save"):  # fmt: skip
        try:
            out = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True,
                                 timeout=20).stdout  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if CHAIN in out:
            found.add(f"iptables chain {CHAIN} in the host's namespace ({tool})")
    netns_dir = Path("/run/netns")  # the runtime's pod namespaces (tests/helpers/cri.py)
    if netns_dir.is_dir():
        found |= {f"netns {p}" for p in os.listdir(netns_dir) if p.startswith("cni-")}
    if Path("/run/containerd").exists():
        found.add("/run/containerd (the test node's shims)")
    port = f"{AgentConfig().port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[1].endswith(f":{port}"):
                found.add(f"a listener on the forwarder's port in the host's namespace ({table})")
    own = os.readlink("/proc/self/ns/net")  # host/netns.py keeps one per thread, by design
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        held = target.startswith(("net:[", "/run/netns/", "anon_inode:bpf")) or "/ns/net" in target
        if held and target != own:
            found.add(f"this test process holds fd {fd.name}: {target}")
    return found


@pytest.fixture(autouse=True)
def no_residue():
    """After every test: nothing of the tests' own is left on the machine."""
    if not is_root():
        yield
        return
    before = _residue()
    untagged = _untagged_residue()
    yield
    # Only what this process's sandboxes made: another run may share the machine.
    left = {item for item in _residue() - before if any(tag in item for tag in _TAGS)}
    left |= _untagged_residue() - untagged
    assert not left, f"the test left behind: {sorted(left)}"


# -- Kubernetes: a real API server and a containerd node (tests/helpers) --------
sys.path.insert(0, str(TESTS / "helpers"))
DEPLOY = TESTS.parent / "deploy"


@pytest.fixture(scope="session")
def kube_api():
    """kube-apiserver v1.20.2 + etcd on 127.0.0.1 for the whole session, with
    deploy/'s namespace and RBAC applied (the agent's identity is its
    ServiceAccount's). Watches end every 5-10 s (--min-request-timeout), so
    every test also exercises the watch's resumption."""
    if not is_root():
        pytest.skip("needs root: the API server's tests run pods through containerd")
    from kubeapi import APISERVER, ApiServer

    if not APISERVER.exists():
        pytest.fail(f"{APISERVER} is not built: run kube/prepare (make test does)")
    api = ApiServer(min_request_timeout=5).start()
    try:
        for name in ("namespace.yaml", "rbac.yaml"):
            api.kubectl("apply", "-f", str(DEPLOY / name))
        yield api
    finally:
        api.stop()


@pytest.fixture
def kube_node(mesh_env):
    """A containerd node (its own netns, CNI chain with meshagent-cni) whose
    pods' cgroups are under mesh_env's cgroup. make(attach=...) starts it."""
    from cri import Node

    nodes = []

    def make(attach: str = "all") -> Node:
        octet = 10 + secrets.randbelow(200)
        node = Node(mesh_env.tag, mesh_env.state_dir / "node", mesh_env.state_dir,
                    mesh_env.cgroup_rel, f"10.251.{octet}.0/24", attach)  # fmt: skip
        nodes.append(node)
        return node.start()

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()
