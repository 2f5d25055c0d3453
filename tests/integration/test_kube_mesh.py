"""The mesh on Kubernetes: two kubelet nodes (kube/cluster up --nodes 2:
one API server, two nodes joined by a veth wire), the DaemonSet and the
identity service of deploy/mesh.yaml installed with the commands of
docs/mesh.md, pods made by the kubelets.

- each agent gets its node's certificate from the identity service, which
  checks its pod-bound token with a TokenReview; other tokens are refused
  and counted by reason;
- a client pod on one node fetches from a server pod on the other: the hop
  is mutual TLS (the wire carries no plaintext), the server sees the
  client pod's own address, each agent shows the identity it saw;
- strict (label meshagent.io/mtls=strict): a plaintext client is reset;
  a strict pod made while its node's agent is frozen is refused in
  plaintext from its start (the CNI plugin made its rules), and meshed once
  the agent runs again.

The tests run in order and share the cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from kubecluster import BIN, IMAGE_TAR, ROOT, KubeCluster, doc_commands, wait_for
from meshlab import Capture, payloads

MESH_DOC = ROOT / "docs" / "mesh.md"
BUSYBOX = "localhost/busybox:meshtest"
MARKER = b"MESHTEST-PLAINTEXT-MARKER"
# httpd with a CGI that answers the client's address, and a file full of the marker.
SERVE = (
    "mkdir -p /tmp/cgi-bin && printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\n"
    "echo $REMOTE_ADDR\\n' > /tmp/cgi-bin/ip && chmod +x /tmp/cgi-bin/ip && "
    f"yes {MARKER.decode()} | head -c 1000000 > /tmp/big && exec httpd -f -p 8080 -h /tmp"
)


@pytest.fixture(scope="module")
def kube():
    if os.geteuid() != 0:
        pytest.fail("the kubelet cluster needs root (CI runs as root)")
    for command in ("kube-apiserver", "kubelet", "kubectl"):
        if not (BIN / command).exists():
            pytest.fail(f"{BIN / command} is not built: run kube/prepare (make test does)")
    if not IMAGE_TAR.exists():
        pytest.fail(f"{IMAGE_TAR} is not built: run kube/prepare (make test does)")
    cluster = KubeCluster(f"mm{os.getpid() % 100000}", nodes=2)
    try:
        yield cluster.up()
    finally:
        left = cluster.down()
    assert not left, f"kube/cluster down left: {left}"


def _pod(kube: KubeCluster, namespace: str, name: str, node: str, command: list[str],
         probe: bool = False) -> None:  # fmt: skip
    container = {"name": "c", "image": BUSYBOX, "command": command}
    if probe:  # the kubelet's HTTP probe, from the node, in plaintext
        container["readinessProbe"] = {"httpGet": {"path": "/cgi-bin/ip", "port": 8080},
                                       "periodSeconds": 1}  # fmt: skip
    manifest = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
                "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                         "containers": [container]}}  # fmt: skip
    kube.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))


def _status(kube: KubeCluster, node: str) -> dict:
    return json.loads(kube.agent_on(node, "status", "-o", "json").stdout)


def _mesh(kube: KubeCluster, node: str) -> dict:
    return _status(kube, node).get("mesh") or {}


def _handshakes(kube: KubeCluster, node: str, key: str) -> int:
    """Streams of kind key ("out ok"): on new connections (full handshakes,
    resumed sessions) and on reused links."""
    counted = _mesh(kube, node).get("handshakes") or {}
    return sum(counted.get(key.replace(" ok", f" {how}"), 0) for how in ("ok", "resumed", "reused"))


def _addr(text: str) -> str:
    """The address the CGI saw (httpd listens on [::]: IPv4 clients come mapped)."""
    return text.strip().removeprefix("[").removesuffix("]").removeprefix("::ffff:")


def _ip(kube: KubeCluster, namespace: str, name: str) -> str:
    return kube.json("-n", namespace, "get", "pod", name)["status"]["podIP"]


def test_the_documented_install_enrols_each_node_with_the_identity_service(kube):
    a, b = kube.node_names
    kube.sh(f"kube/cluster load-image {IMAGE_TAR}")  # docs/install-kubernetes.md's image step
    for command in doc_commands(MESH_DOC, "## On Kubernetes", "### Install"):
        kube.sh(command)
    for node in (a, b):
        mesh = wait_for(lambda n=node: _mesh(kube, n) or None, 120, f"the mesh on {node}")
        assert mesh["certificate"]["identity"] == f"spiffe://cluster.local/meshagent/node/{node}"
        assert mesh["trust_domain"] == "cluster.local" and mesh["source"] == "the Kubernetes API"
        assert mesh["enroll"]["enrolments"] >= 1, mesh["enroll"]
    logs = kube.kubectl("-n", "meshagent", "logs", "deploy/meshagent-ca").stdout
    signed = [json.loads(line) for line in logs.splitlines() if "signed a node certificate" in line]
    assert {entry["node"] for entry in signed} == {a, b}, logs[-2000:]


def test_a_pod_on_one_node_reaches_a_pod_on_the_other_over_mutual_tls(kube):
    a, b = kube.node_names
    kube.kubectl("create", "namespace", "shop")
    for command in doc_commands(MESH_DOC, "## On Kubernetes", "### Choosing pods"):
        if "mtls=strict" not in command:
            kube.sh(command)
    _pod(kube, "shop", "web", a, ["sh", "-c", SERVE])
    _pod(kube, "shop", "client", b, ["sleep", "3600"])
    kube.wait_pods_ready("shop")
    wait_for(lambda: _attached(kube, a, "shop/web"), 60, "shop/web attached")
    wait_for(lambda: _attached(kube, b, "shop/client"), 60, "shop/client attached")
    web = _ip(kube, "shop", "web")
    client = _ip(kube, "shop", "client")
    before_out = _handshakes(kube, b, "out ok")
    before_in = _handshakes(kube, a, "in ok")

    with tempfile.TemporaryDirectory() as tmp:
        capture = Capture.start(f"kube-{a}", "wire", Path(tmp) / "wire.pcap")
        try:
            seen = kube.fetch("shop", "client", f"http://{web}:8080/cgi-bin/ip")
            big = kube.fetch("shop", "client", f"http://{web}:8080/big")
        finally:
            packets = capture.stop()
    assert _addr(seen.stdout) == client, seen.stdout + seen.stderr  # the client pod's own address
    assert big.stdout.count(MARKER.decode()) > 30000, big.stderr
    hop = payloads(packets, 15008)
    # The file crossed the wire on the hop (scapy keeps a part of a fast
    # transfer's packets: enough, with the marker 38,000 times in the file)...
    assert sum(len(p) for p in hop) > 50000
    assert not any(MARKER in p for p in payloads(packets)), "plaintext on the wire"  # ...encrypted
    assert _handshakes(kube, b, "out ok") >= before_out + 2
    assert _handshakes(kube, a, "in ok") >= before_in + 2

    conns = json.loads(kube.agent_on(a, "status", "--connections", "-o", "json").stdout)
    inbound = [c for c in conns["connections"] if (c.get("mtls") or {}).get("direction") == "in"]
    assert inbound, conns
    mtls = inbound[-1]["mtls"]
    assert mtls["peer"] == f"spiffe://cluster.local/meshagent/node/{b}"
    assert mtls["source"] == "spiffe://cluster.local/ns/shop/sa/default"


def _attached(kube: KubeCluster, node: str, name: str) -> bool:
    return any(p["name"] == name for p in _status(kube, node)["pods"])


def test_strict_pods_refuse_plaintext_even_before_their_agent_runs(kube):
    a, b = kube.node_names
    for command in doc_commands(MESH_DOC, "## On Kubernetes", "### Choosing pods"):
        if "mtls=strict" in command:
            kube.sh(command)
    kube.kubectl("create", "namespace", "plain")
    _pod(kube, "plain", "client", b, ["sleep", "3600"])
    kube.wait_pods_ready("plain")
    # The running server becomes strict when its agent opens it again: a new pod.
    wait_for(lambda: "shop" in json.loads(kube.node_exec("cat", "/run/meshagent/mesh-modes.json")
                                          .stdout)["namespaces"], 30, "the mode file")  # fmt: skip

    # The node's agent frozen: the new strict pod is made by the kubelet and
    # the CNI plugin alone.
    pid = _status(kube, a)["pid"]
    kube.node_exec("kill", "-STOP", str(pid))
    try:
        # Ready only if the kubelet's probe gets through the strict rules.
        _pod(kube, "shop", "strict-web", a, ["sh", "-c", SERVE], probe=True)
        kube.wait_pods_ready("shop", timeout=90)
        url = f"http://{_ip(kube, 'shop', 'strict-web')}:8080/cgi-bin/ip"
        refused = kube.fetch("plain", "client", url)
        assert refused.returncode != 0 and "refused" in refused.stderr, refused
    finally:
        kube.node_exec("kill", "-CONT", str(pid))
    wait_for(lambda: _attached(kube, a, "shop/strict-web"), 60, "shop/strict-web attached")
    assert _addr(kube.fetch("shop", "client", url).stdout) == _ip(kube, "shop", "client")
    again = kube.fetch("plain", "client", url)
    assert again.returncode != 0 and "refused" in again.stderr, again
    pods = {p["name"]: p for p in _status(kube, a)["pods"]}
    assert pods["shop/strict-web"]["mesh"]["mode"] == "strict", pods["shop/strict-web"]


def test_a_restarted_agent_goes_on_with_its_certificate_at_once(kube):
    """The agent's certificate stays on its node (the state dir): a new
    agent (a crash, a restart, an upgrade's takeover) meshes its pods with it
    at once and renews it in the background."""
    a, _ = kube.node_names
    before = _mesh(kube, a)["certificate"]["serial"]
    old = _status(kube, a)["pid"]
    kube.node_exec("kill", "-KILL", str(old))
    wait_for(lambda: _restarted(kube, a, old), 180, "the agent restarted")
    mesh = _mesh(kube, a)
    assert mesh["certificate"]["serial"] == before, mesh["certificate"]
    assert mesh["enroll"]["enrolments"] == 0, mesh["enroll"]  # renewed at half-life, not now
    web = _ip(kube, "shop", "web")
    # Until the new agent has opened web's hop listener, a permissive pod
    # takes its clients in plaintext (the fallback): wait for the listener.
    wait_for(lambda: ({p["name"]: p for p in _status(kube, a)["pods"]}.get("shop/web") or {})
             .get("mesh", {}).get("inbound"), 60, "web's hop listener on the new agent")  # fmt: skip
    before_in = _handshakes(kube, a, "in ok")
    seen = wait_for(lambda: _addr(kube.fetch("shop", "client", f"http://{web}:8080/cgi-bin/ip")
                                  .stdout) or None, 60, "a fetch across the mesh")  # fmt: skip
    assert seen == _ip(kube, "shop", "client")
    assert _handshakes(kube, a, "in ok") >= before_in + 1


def _restarted(kube: KubeCluster, node: str, old_pid: int) -> bool:
    try:
        return _status(kube, node)["pid"] != old_pid
    except AssertionError:  # no ready agent pod for a moment
        return False


TRY_TOKEN = r"""
import json, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from meshagent.mesh import ca
from meshagent.mesh.enroll import Enroller, EnrollError
ip, ca_pem, token = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
key = ca._key()
csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
    key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
try:
    reply = Enroller(None, "meshagent", Path("/"), Path("/"), None)._post(ip, ca_pem, token, csr)
    print(json.dumps({"signed": reply["identity"]}))
except EnrollError as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def _token(kube: KubeCluster, namespace: str, account: str, audience: str) -> str:
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"audiences": [audience], "expirationSeconds": 600}}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body:
        body.write(json.dumps(request))
        body.flush()
        out = kube.kubectl("create", "--raw",
                           f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
                           "-f", body.name).stdout  # fmt: skip
    return json.loads(out)["status"]["token"]


def test_the_identity_service_signs_only_for_the_agents_pod_bound_token(kube):
    a, _ = kube.node_names
    root = kube.json("-n", "meshagent", "get", "configmap", "meshagent-ca-root")["data"]["ca.crt"]
    (ca_pod,) = kube.json("-n", "meshagent", "get", "pods", "-l",
                          "app.kubernetes.io/name=meshagent-ca")["items"]  # fmt: skip
    ip = ca_pod["status"]["podIP"]

    def attempt(token: str) -> dict:
        proc = subprocess.run(["ip", "netns", "exec", f"kube-{a}", sys.executable, "-c", TRY_TOKEN,
                               ip, root, token], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    cases = {
        # a pod's ordinary token: for the API server, not the identity service
        "token_invalid": _token(kube, "plain", "default", "https://kubernetes.default.svc"),
        # the right audience, another ServiceAccount
        "not_agent": _token(kube, "plain", "default", "meshagent-ca"),
        # the agent's ServiceAccount, but bound to no pod (so to no node)
        "token_unbound": _token(kube, "meshagent", "meshagent", "meshagent-ca"),
    }
    for reason, token in cases.items():
        result = attempt(token)
        assert "refused" in result and f" {reason})" in result["refused"], (reason, result)
    logs = kube.kubectl("-n", "meshagent", "logs", "deploy/meshagent-ca").stdout
    refused = [json.loads(line).get("reason") for line in logs.splitlines()
               if "refused a certificate request" in line]  # fmt: skip
    assert set(cases) <= set(refused), logs[-2000:]
