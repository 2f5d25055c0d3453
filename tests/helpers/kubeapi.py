"""A real Kubernetes API server for the tests: etcd 3.4 (Debian's) and
kube-apiserver v1.20.2 (built from Debian's source by kube/build-kube.sh),
on 127.0.0.1 only, with static tokens, RBAC + Node authorization and a
service-account key pair. No controllers and no kubelet run: the tests
play the kubelet (create Pod objects, run sandboxes, patch status).

Users (tokens in tokens.csv):
- admin (system:masters): the tests' own client and kubectl;
- the agent's ServiceAccount, meshagent/meshagent, by name (a static token
  user named system:serviceaccount:meshagent:meshagent is subject to the
  RBAC bound to that ServiceAccount, exactly as its real token would be);
- nobody: authenticated, no RBAC at all (403s).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _log(path: Path):
    """A log file for a child process (the child keeps its own descriptor)."""
    return open(path, "w")


APISERVER = ROOT / "kube" / ".cache" / "bin" / "kube-apiserver"
AGENT_SA = ("meshagent", "meshagent")  # namespace, name (deploy/rbac.yaml)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiServer:
    def __init__(self, min_request_timeout: int = 1800) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="meshtest-kube-"))
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.tokens = {
            "admin": secrets.token_hex(16),
            "agent": secrets.token_hex(16),
            "nobody": secrets.token_hex(16),
        }
        self.min_request_timeout = min_request_timeout
        self.etcd: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        d = self.dir
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout",
                        "-out", str(d / "sa.pub")], check=True, capture_output=True)  # fmt: skip
        ns, name = AGENT_SA
        (d / "tokens.csv").write_text(
            f'{self.tokens["admin"]},admin,admin,"system:masters"\n'
            f"{self.tokens['agent']},system:serviceaccount:{ns}:{name},agent-uid,"
            f'"system:serviceaccounts,system:serviceaccounts:{ns}"\n'
            f"{self.tokens['nobody']},nobody,nobody-uid\n"
        )
        try:
            self._start_etcd()
            self._start_api()
        except BaseException:
            self.stop()  # etcd, and whatever else started, goes with a failed start
            raise
        return self

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = subprocess.Popen(
            ["etcd", "--name", "meshtest", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"meshtest={peer}", "--log-level", "error"],
            stdout=_log(self.dir / "etcd.log"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def _start_api(self) -> None:
        d = self.dir
        self.api = subprocess.Popen(
            [str(APISERVER),
             f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={self.port}", "--insecure-port=0",
             f"--cert-dir={d / 'certs'}",
             f"--token-auth-file={d / 'tokens.csv'}",
             "--authorization-mode=Node,RBAC",
             f"--service-account-key-file={d / 'sa.pub'}",
             f"--service-account-signing-key-file={d / 'sa.key'}",
             "--service-account-issuer=https://kubernetes.default.svc",
             "--service-cluster-ip-range=10.96.0.0/16",
             # No controller manager creates namespaces' default ServiceAccounts.
             "--disable-admission-plugins=ServiceAccount",
             f"--min-request-timeout={self.min_request_timeout}",
             "--logtostderr", "--v=0"],
            stdout=_log(d / "apiserver.log"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise AssertionError(f"kube-apiserver exited: {self.log()[-2000:]}")
            try:
                if self.get("/readyz", raw=True) == "ok":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"kube-apiserver not ready in {timeout}s: {self.log()[-2000:]}")

    def stop_api(self) -> None:
        """Stop the API server only (etcd keeps the objects): the watch breaks."""
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            self.api.wait(timeout=30)

    def restart_api(self) -> None:
        self.stop_api()
        self._start_api()

    def log(self) -> str:
        try:
            return (self.dir / "apiserver.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        for proc in (self.api, self.etcd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients -----------------------------------------------------------
    def kubeconfig(self, user: str = "admin") -> Path:
        path = self.dir / f"kubeconfig-{user}"
        if not path.exists():
            config = {
                "apiVersion": "v1", "kind": "Config", "current-context": "meshtest",
                "clusters": [{"name": "meshtest", "cluster": {
                    "server": self.url, "insecure-skip-tls-verify": True}}],
                "users": [{"name": user, "user": {"token": self.tokens[user]}}],
                "contexts": [{"name": "meshtest", "context": {"cluster": "meshtest",
                                                               "user": user}}],
            }  # fmt: skip
            path.write_text(json.dumps(config))
            os.chmod(path, 0o600)
        return path

    def get(self, path: str, raw: bool = False, user: str = "admin"):
        return self.request("GET", path, None, raw=raw, user=user)

    def request(self, method: str, path: str, body: dict | None = None, raw: bool = False,
                user: str = "admin", content_type: str = "application/json"):  # fmt: skip
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(
            self.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.tokens[user]}",
                     "Content-Type": content_type},
        )  # fmt: skip
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            text = resp.read().decode()
        return text if raw else json.loads(text)

    def kubectl(
        self, *args: str, user: str = "admin", check: bool = True, stdin: str | None = None
    ):
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig(user)), *args],
            capture_output=True, text=True, timeout=60, input=stdin,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc

    # -- playing kubelet ---------------------------------------------------
    def create_namespace(self, name: str, labels: dict | None = None) -> dict:
        body = {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels or {}}}  # fmt: skip
        return self.request("POST", "/api/v1/namespaces", body)

    def create_pod(self, namespace: str, name: str, node: str, labels: dict | None = None) -> dict:
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node,
                     "containers": [{"name": "main", "image": "localhost/busybox:meshtest"}]},
        }  # fmt: skip
        return self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body)

    def label(self, kind: str, name: str, labels: dict, namespace: str | None = None) -> dict:
        """Set (value) or remove (None) labels with a merge patch."""
        path = (f"/api/v1/namespaces/{namespace}/pods/{name}" if kind == "pod"
                else f"/api/v1/namespaces/{name}")  # fmt: skip
        return self.request("PATCH", path, {"metadata": {"labels": labels}},
                            content_type="application/merge-patch+json")  # fmt: skip

    def set_pod_running(self, namespace: str, name: str, ip: str) -> dict:
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
        return self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                            status, content_type="application/merge-patch+json")  # fmt: skip

    def delete_pod(self, namespace: str, name: str) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0")
