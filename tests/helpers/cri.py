"""A Kubernetes node without kubelet, for the tests: containerd 1.6 + runc
driven through the CRI (gRPC stubs made by kube/prepare), inside a private
"node" network namespace, with a CNI conflist chaining bridge + host-local +
portmap + meshagent-cni exactly as a node's runtime runs it. Deleting the
node namespace removes the bridge, host-local's leases and the plugins'
iptables chains with it.

Pods' cgroups go under the test's cgroup (kubepods/pod<UID>, the cgroupfs
layout), where the test's agent is attached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _log(path: Path):
    """A log file for a child process (the child keeps its own descriptor)."""
    return open(path, "w")


CACHE = ROOT / "kube" / ".cache"
CNI_PLUGINS = ("bridge", "host-local", "portmap", "loopback")  # Debian's, in /usr/lib/cni


def _stubs():
    sys.path.insert(0, str(CACHE / "cri"))
    import api_pb2
    import api_pb2_grpc

    return api_pb2, api_pb2_grpc


@dataclass
class Sandbox:
    id: str
    namespace: str
    name: str
    uid: str
    ip: str
    netns: str


class Node:
    def __init__(self, tag: str, workdir: Path, state_dir: Path, cgroup_rel: str,
                 subnet: str, attach: str = "all") -> None:  # fmt: skip
        self.tag = tag
        self.dir = workdir
        self.state_dir = state_dir
        self.cgroup_rel = cgroup_rel
        self.subnet = subnet
        self.attach = attach
        self.netns = f"mt{tag}-node"
        self.proc: subprocess.Popen | None = None
        self.sandboxes: dict[str, Sandbox] = {}
        self.pb, self.grpc_stubs = _stubs()
        self.channel = None

    @property
    def socket(self) -> Path:
        return self.dir / "c.sock"

    def conflist(self) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": "meshtest",
            "plugins": [
                {"type": "bridge", "bridge": f"mt{self.tag}cni", "isGateway": True,
                 "ipMasq": False, "ipam": {"type": "host-local",
                                           "ranges": [[{"subnet": self.subnet}]],
                                           "dataDir": str(self.dir / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }  # fmt: skip

    def start(self) -> Node:
        from pyroute2 import IPRoute
        from pyroute2 import netns as pyr_netns

        d = self.dir
        for sub in ("cni-bin", "cni-conf", "root", "state", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for plugin in CNI_PLUGINS:
            os.symlink(f"/usr/lib/cni/{plugin}", d / "cni-bin" / plugin)
        (d / "cni-conf" / "10-meshtest.conflist").write_text(json.dumps(self.conflist()))
        # As the DaemonSet's init container does it: the plugin and its chaining.
        subprocess.run(
            [sys.executable, "-m", "meshagent", "--state-dir", str(self.state_dir), "cni",
             "install", "--bin-dir", str(d / "cni-bin"), "--conf-dir", str(d / "cni-conf"),
             "--attach", self.attach],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        (d / "config.toml").write_text(f"""version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:meshtest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
""")
        self.made_run_dir = not Path("/run/containerd").exists()
        pyr_netns.create(self.netns)
        with IPRoute(netns=self.netns, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "containerd", "--config",
             str(d / "config.toml"), "--log-level", "warn"],
            stdout=_log(d / "containerd.log"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"containerd did not start: {self.log()[-2000:]}")
            time.sleep(0.1)
        for image in ("pause", "busybox"):
            self.ctr("images", "import", "--base-name", f"localhost/{image}",
                     str(CACHE / "images" / f"{image}.tar"))  # fmt: skip
        import grpc

        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.runtime = self.grpc_stubs.RuntimeServiceStub(self.channel)
        self.runtime.Version(self.pb.VersionRequest(), timeout=30)
        return self

    def _kill_shims(self) -> None:
        """Shims outlive containerd by design: stop ours (their command line
        names our socket), by PID."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "containerd-shim" in cmdline and str(self.socket) in cmdline:
                try:
                    os.kill(int(proc.name), 9)
                except ProcessLookupError:
                    pass

    def ctr(self, *args: str) -> str:
        proc = subprocess.run(["ctr", "-a", str(self.socket), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, f"ctr {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def log(self) -> str:
        try:
            return (self.dir / "containerd.log").read_text()
        except OSError:
            return ""

    # -- CRI ----------------------------------------------------------------
    def run_pod(self, namespace: str, name: str, uid: str | None = None,
                host_network: bool = False) -> Sandbox:  # fmt: skip
        """host_network: the node's netns (here the private node netns), no CNI."""
        pb = self.pb
        uid = uid or str(uuid.uuid4())
        security = None
        if host_network:
            security = pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.NODE)
            )
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            hostname="" if host_network else name,
            log_directory=str(self.dir / "logs" / uid),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/{self.cgroup_rel}/kubepods/pod{uid}",
                security_context=security,
            ),
        )
        reply = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=120)
        status = self.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=reply.pod_sandbox_id, verbose=True),
            timeout=30,
        )
        info = json.loads(status.info.get("info", "{}"))
        netns = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
        path = next((n.get("path", "") for n in netns if n.get("type") == "network"), "")
        sandbox = Sandbox(reply.pod_sandbox_id, namespace, name, uid,
                          status.status.network.ip, path)  # fmt: skip
        self.sandboxes[sandbox.id] = sandbox
        self._configs = getattr(self, "_configs", {})
        self._configs[sandbox.id] = config
        return sandbox

    def run_container(self, sandbox: Sandbox, name: str, argv: list[str]) -> str:
        pb = self.pb
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image="localhost/busybox:meshtest"),
            command=argv,
            log_path=f"{name}.log",
        )
        return self.create_container(sandbox, config)

    def create_container(self, sandbox: Sandbox, config) -> str:
        pb = self.pb
        created = self.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=sandbox.id, config=config,
                                      sandbox_config=self._configs[sandbox.id]),
            timeout=60,
        )  # fmt: skip
        self.runtime.StartContainer(
            pb.StartContainerRequest(container_id=created.container_id), timeout=60
        )
        return created.container_id

    def exec(self, container_id: str, argv: list[str], timeout: int = 30) -> tuple[int, str]:
        reply = self.runtime.ExecSync(
            self.pb.ExecSyncRequest(container_id=container_id, cmd=argv, timeout=timeout),
            timeout=timeout + 10,
        )
        return reply.exit_code, (reply.stdout + reply.stderr).decode(errors="replace")

    def remove_pod(self, sandbox: Sandbox) -> None:
        pb = self.pb
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.id),
                                    timeout=120)  # fmt: skip
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id),
                                      timeout=120)  # fmt: skip
        self.sandboxes.pop(sandbox.id, None)

    def stop(self) -> None:
        for sandbox in list(self.sandboxes.values()):
            try:
                self.remove_pod(sandbox)
            except Exception as exc:  # keep cleaning
                print(f"cleanup: sandbox {sandbox.namespace}/{sandbox.name}: {exc}",
                      file=sys.stderr)  # fmt: skip
        if self.channel is not None:
            self.channel.close()
        self._kill_shims()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        from pyroute2 import netns as pyr_netns

        if os.path.exists(f"/run/netns/{self.netns}"):
            pyr_netns.remove(self.netns)
        self._remove_cgroups()
        if getattr(self, "made_run_dir", False):  # the shims' socket dir, if we made it
            for path in ("/run/containerd/s", "/run/containerd/runc/k8s.io",
                         "/run/containerd/runc", "/run/containerd"):  # fmt: skip
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_cgroups(self) -> None:
        """runc removes each container's cgroup; the kubepods/pod<UID> parents
        are the kubelet's to remove (in every hierarchy, on hybrid hosts)."""
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[2] not in ("cgroup", "cgroup2"):
                continue
            top = Path(fields[1]) / self.cgroup_rel / "kubepods"
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            if fields[2] == "cgroup":
                try:
                    os.rmdir(top.parent)  # the test's own cgroup exists only in v2
                except OSError:
                    pass
