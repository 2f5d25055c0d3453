"""A one-node Kubernetes cluster with a real kubelet (kube/cluster), for the
tests that run the DaemonSet as a user would: `kubectl apply -f deploy/`,
kubectl exec, rollouts, deletes.

The cluster's node is a set of namespaces of this host (kube/cluster says
which); it is brought up once per test module and taken down after it, and
`down` is checked to leave nothing: no netns, no veth, no cgroup in any
hierarchy, no process, no folder, the host's sysctls as they were.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "kube" / "cluster"
BIN = ROOT / "kube" / ".cache" / "bin"
IMAGE_TAR = ROOT / "kube" / ".cache" / "images" / "meshagent.tar"
SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")  # fmt: skip
AGENT_NS = "meshagent"
AGENT_SELECTOR = "app.kubernetes.io/name=meshagent"


def sysctls() -> dict[str, str]:
    return {key: Path(f"/proc/sys/{key}").read_text().strip() for key in SYSCTLS}


def doc_commands(doc: Path, *headings: str, block: int = 0) -> list[str]:
    """The shell commands of a doc's code block (the block-th after the last
    of headings, each looked for after the one before), one per line,
    comments dropped: the tests run what the docs say."""
    text = doc.read_text()
    start = 0
    for heading in headings:
        start = text.index(heading + "\n", start)
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text[start:], flags=re.S)
    commands = []
    for line in blocks[block].splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


class KubeCluster:
    def __init__(self, name: str, nodes: int = 1) -> None:
        self.name = name
        self.nodes = nodes
        self.node_names = [name] + [f"{name}-{i + 1}" for i in range(1, nodes)]
        self.dir = ROOT / "kube" / ".cache" / "clusters" / name
        self.kubeconfig = self.dir / "kubeconfig"
        self.host_sysctls: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a user has after following `kube/cluster up`'s two lines."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "MESHAGENT_CLUSTER": self.name,
                "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # fmt: skip

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(CLUSTER), *args, "--name", self.name], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def up(self) -> KubeCluster:
        self.host_sysctls = sysctls()
        proc = self.cli("up", "--nodes", str(self.nodes))
        assert proc.returncode == 0, f"kube/cluster up: {proc.stderr[-3000:]}"
        return self

    def down(self) -> list[str]:
        """Take it down; what it left, if anything."""
        proc = self.cli("down")
        left = [] if proc.returncode == 0 else [f"kube/cluster down: {proc.stderr.strip()}"]
        for node in self.node_names:
            netns = f"kube-{node}"
            if Path(f"/run/netns/{netns}").exists():
                left.append(f"netns {netns}")
            for hierarchy in Path("/sys/fs/cgroup").iterdir():
                if (hierarchy / netns).exists():
                    left.append(f"cgroup {hierarchy / netns}")
        if Path(f"/sys/class/net/mn-{self.name}").exists():
            left.append(f"veth mn-{self.name}")
        if self.dir.exists():
            left.append(f"folder {self.dir}")
        if self.host_sysctls and sysctls() != self.host_sysctls:
            left.append(f"sysctls changed: {self.host_sysctls} -> {sysctls()}")
        return left

    def sh(self, command: str, timeout: float = 300, check: bool = True) -> str:
        """A documented command line, as a user runs it (cwd: the checkout)."""
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check:
            assert proc.returncode == 0, f"{command}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        return proc.stdout

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                stdin: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        proc = subprocess.run([str(BIN / "kubectl"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, input=stdin)  # fmt: skip
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def node_exec(self, *args: str, check: bool = True, timeout: float = 60,
                  node: int = 1) -> subprocess.CompletedProcess:  # fmt: skip
        proc = subprocess.run([str(CLUSTER), "exec", "--name", self.name, "--node", str(node),
                               "--", *args], capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check:
            assert proc.returncode == 0, f"on the node: {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc

    # -- the agent, through kubectl as an operator reaches it ----------------
    def agent_pods(self) -> list[dict]:
        items = self.json("-n", AGENT_NS, "get", "pods", "-l", AGENT_SELECTOR)["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def agent(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`meshagent ARGS` in the running agent pod (kubectl exec)."""
        every = self.agent_pods()
        pods = [p for p in every if _ready(p)]
        assert pods, f"no ready agent pod: {[_describe(p) for p in every]}"
        return self.kubectl("-n", AGENT_NS, "exec", pods[0]["metadata"]["name"], "-c", "agent",
                            "--", "meshagent", *args, check=check)  # fmt: skip

    def agent_on(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`meshagent ARGS` in the agent pod of node NODE."""
        pods = [p for p in self.agent_pods() if p["spec"].get("nodeName") == node and _ready(p)]
        assert pods, f"no ready agent pod on {node}"
        return self.kubectl("-n", AGENT_NS, "exec", pods[0]["metadata"]["name"], "-c", "agent",
                            "--", "meshagent", *args, check=check)  # fmt: skip

    def agent_status(self) -> dict:
        return json.loads(self.agent("status", "-o", "json").stdout)

    def attached(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.agent_status()["pods"]}

    def wait_agent_ready(self, timeout: float = 240, not_uid: str | None = None) -> dict:
        def ready() -> dict | None:
            for pod in self.agent_pods():
                if _ready(pod) and pod["metadata"]["uid"] != not_uid:
                    return pod
            return None

        return wait_for(ready, timeout, "a ready agent pod")

    # -- workloads -------------------------------------------------------------
    def wait_pods_ready(self, namespace: str, timeout: float = 120) -> None:
        self.kubectl("-n", namespace, "wait", "--for=condition=Ready", "pod", "--all",
                     f"--timeout={int(timeout)}s", timeout=timeout + 10)  # fmt: skip

    def pod_ip(self, namespace: str, selector: str) -> str:
        items = self.json("-n", namespace, "get", "pods", "-l", selector)["items"]
        return items[0]["status"]["podIP"]

    def fetch(self, namespace: str, client: str, url: str) -> subprocess.CompletedProcess:
        return self.kubectl("-n", namespace, "exec", client, "--", "wget", "-q",
                            "-O", "-", url, check=False, timeout=30)  # fmt: skip


def _describe(pod: dict) -> str:
    """name, phase and each container's state and restarts."""
    states = [f"{c['name']}:{next(iter(c.get('state', {})), '?')}/{c.get('restartCount', 0)}"
              for c in pod.get("status", {}).get("containerStatuses", [])]  # fmt: skip
    return f"{pod['metadata']['name']} {pod.get('status', {}).get('phase')} {' '.join(states)}"


def _ready(pod: dict) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def wait_for(probe, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except AssertionError as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what}: not in {timeout:.0f} s ({last})")
