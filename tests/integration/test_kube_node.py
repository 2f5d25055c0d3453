"""The DaemonSet on a real kubelet (kube/cluster: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kubelet v1.20.2, containerd 1.6 +
runc, Debian's CNI plugins), installed, used, killed and removed with the
commands of docs/install-kubernetes.md and docs/uninstall-upgrade.md.

The agent attaches "at the root cgroup" as in production: the node's
cgroup namespace makes that root the cluster's own cgroup (kube-NAME), so
the hooks never see the host's other processes. Pods are made by the
kubelet from `kubectl run` and Deployments; the tests play no kubelet here.

The tests run in order and share the cluster: each leaves the agent
installed and ready for the next.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from kubecluster import (
    AGENT_NS,
    AGENT_SELECTOR,
    BIN,
    IMAGE_TAR,
    ROOT,
    KubeCluster,
    doc_commands,
    sysctls,
    wait_for,
)

INSTALL_DOC = ROOT / "docs" / "install-kubernetes.md"
BUSYBOX = "localhost/busybox:meshtest"
LABEL = "meshagent.io/attach"
SERVE = "echo meshtest-ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"


@pytest.fixture(scope="module")
def kube():
    if os.geteuid() != 0:
        pytest.fail("the kubelet cluster needs root (CI runs as root)")
    for command in ("kube-apiserver", "kubelet", "kube-controller-manager", "kube-scheduler",
                    "kubectl"):  # fmt: skip
        if not (BIN / command).exists():
            pytest.fail(f"{BIN / command} is not built: run kube/prepare (make test does)")
    if not IMAGE_TAR.exists():
        pytest.fail(f"{IMAGE_TAR} is not built: run kube/prepare (make test does)")
    cluster = KubeCluster(f"mt{os.getpid() % 100000}")
    try:
        yield cluster.up()
    finally:
        left = cluster.down()
    assert not left, f"kube/cluster down left: {left}"


def _serve(kube: KubeCluster, namespace: str, labelled: bool) -> str:
    """A namespace with an HTTP server (a Deployment) and a client pod;
    returns the server's URL."""
    kube.kubectl("create", "namespace", namespace)
    if labelled:
        kube.kubectl("label", "namespace", namespace, f"{LABEL}=true")
    kube.kubectl("-n", namespace, "create", "deployment", "web", f"--image={BUSYBOX}", "--",
                 "sh", "-c", SERVE)  # fmt: skip
    kube.kubectl("-n", namespace, "run", "client", f"--image={BUSYBOX}", "--restart=Never",
                 "--", "sleep", "3600")  # fmt: skip
    wait_for(lambda: len(kube.json("-n", namespace, "get", "pods")["items"]) == 2, 60, "pods")
    kube.wait_pods_ready(namespace)
    url = f"http://{kube.pod_ip(namespace, 'app=web')}:8080/index.html"
    wait_for(lambda: kube.fetch(namespace, "client", url).stdout.strip() == "meshtest-ok", 30,
             f"the server of {namespace}")  # fmt: skip
    return url


def _client_conns(kube: KubeCluster, namespace: str) -> int | None:
    pod = kube.attached().get(f"{namespace}/client")
    return None if pod is None else pod["connections_total"]


def test_a_pod_that_starts_before_the_agent_is_meshed_once_the_documented_install_runs(kube):
    """Pods started before the DaemonSet (no CNI entry yet) go direct; the
    install as documented makes the DaemonSet ready, and the agent finds
    them by the kubelet's cgroup and steers their new connections."""
    url = _serve(kube, "early", labelled=True)
    assert kube.fetch("early", "client", url).stdout.strip() == "meshtest-ok"  # direct

    for block in (0, 1):  # the image, then the manifests
        for command in doc_commands(INSTALL_DOC, "## Install", block=block):
            kube.sh(command)

    (agent,) = kube.agent_pods()
    probe = agent["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz" and probe["host"] == "127.0.0.1"
    wait_for(lambda: len([n for n in kube.attached() if n.startswith("early/")]) == 2, 60,
             "the early pods attached")  # fmt: skip
    pods = kube.attached()
    assert pods["early/client"]["source"] == "cgroup" and pods["early/client"]["auto"]
    # The kubelet's cgroupfs layout, as the agent sees it through its mounts.
    assert kube.agent_status()["cgroup"] == "/sys/fs/cgroup/unified"
    before = _client_conns(kube, "early")
    assert kube.fetch("early", "client", url).stdout.strip() == "meshtest-ok"
    assert _client_conns(kube, "early") == before + 1


def test_a_labelled_namespaces_pods_are_steered_and_removing_the_label_detaches(kube):
    url = _serve(kube, "shop", labelled=True)
    wait_for(lambda: {"shop/client"} <= set(kube.attached()), 60, "shop/client attached")
    pods = kube.attached()
    web = next(name for name in pods if name.startswith("shop/web-"))
    for name in ("shop/client", web):  # made after the plugin was chained: recorded at ADD
        assert pods[name]["source"] == "cni" and pods[name]["auto"], pods[name]
        # containerd made this netns file after the agent's container started:
        # the agent sees it through HostToContainer propagation of /var/run/netns.
        assert pods[name]["netns"].startswith("/var/run/netns/cni-"), pods[name]
    before = _client_conns(kube, "shop")
    assert kube.fetch("shop", "client", url).stdout.strip() == "meshtest-ok"
    assert _client_conns(kube, "shop") == before + 1

    kube.kubectl("label", "namespace", "shop", f"{LABEL}-")
    wait_for(lambda: not any(n.startswith("shop/") for n in kube.attached()), 30, "detached")
    total = sum(p["connections_total"] for p in kube.attached().values())
    assert kube.fetch("shop", "client", url).stdout.strip() == "meshtest-ok"  # direct again
    assert sum(p["connections_total"] for p in kube.attached().values()) == total
    kube.kubectl("label", "namespace", "shop", f"{LABEL}=true")
    wait_for(lambda: "shop/client" in kube.attached(), 30, "attached again")


def test_a_killed_agent_fails_open_and_a_deleted_agent_pod_hands_over(kube):
    """SIGKILL of the agent's process (the kubelet restarts the container):
    meanwhile the meshed pods' connects go direct, none fails, and the
    restarted agent adopts them. Then `kubectl delete pod`: the DaemonSet's
    new pod takes the node over from the old one."""
    url = f"http://{kube.pod_ip('shop', 'app=web')}:8080/index.html"
    agent = kube.wait_agent_ready()
    pid = kube.agent_status()["pid"]  # in the node's PID namespace (hostPID)
    kube.node_exec("kill", "-KILL", str(pid))
    fetched = 0

    def back() -> bool:
        nonlocal fetched
        proc = kube.fetch("shop", "client", url)
        assert proc.stdout.strip() == "meshtest-ok", f"a connect failed: {proc.stderr}"
        fetched += 1
        pods = kube.agent_pods()
        return bool(pods) and pods[0]["status"]["containerStatuses"][0]["restartCount"] >= 1

    wait_for(back, 120, "the agent restarted by the kubelet")
    kube.wait_agent_ready()
    wait_for(lambda: "shop/client" in kube.attached(), 60, "shop/client adopted")
    before = _client_conns(kube, "shop")
    assert kube.fetch("shop", "client", url).stdout.strip() == "meshtest-ok"
    assert _client_conns(kube, "shop") == before + 1
    assert fetched >= 1

    kube.kubectl("-n", AGENT_NS, "delete", "pod", "-l", AGENT_SELECTOR, "--wait=false")
    wait_for(lambda: kube.fetch("shop", "client", url).stdout.strip() == "meshtest-ok"
             and kube.wait_agent_ready(not_uid=agent["metadata"]["uid"]), 180, "a new agent pod")  # fmt: skip
    wait_for(lambda: {"shop/client", "early/client"} <= set(kube.attached()), 60, "adopted")
    # The deleted pod's preStop handed the node over (early/client, found by
    # its cgroup, included): the new agent took over, it did not adopt.
    took = kube.agent_status()["took_over"]
    assert took and took["pods"] >= 4, took
    assert kube.attached()["early/client"]["source"] == "cgroup"
    before = _client_conns(kube, "shop")
    assert kube.fetch("shop", "client", url).stdout.strip() == "meshtest-ok"
    assert _client_conns(kube, "shop") == before + 1


def test_the_node_keeps_the_host_as_it_was(kube):
    """The kubelet checks its six sysctls (protectKernelDefaults) and finds
    them bind-mounted in the node's mount namespace; the host's are as
    before. The node's bpffs is its own: the agent's pins are not in the
    host's /sys/fs/bpf."""
    assert sysctls() == kube.host_sysctls
    inside = kube.node_exec("cat", "/proc/sys/vm/overcommit_memory").stdout.strip()
    assert inside == "1"
    pins = kube.node_exec("ls", "/sys/fs/bpf/meshagent").stdout.split()
    assert pins, "the agent pins nothing in the node's bpffs"
    host_pins = (
        os.listdir("/sys/fs/bpf/meshagent") if Path("/sys/fs/bpf/meshagent").exists() else []
    )
    assert not set(pins) & set(host_pins)


# The node's own client: requests to a service of the node, on loopback and
# on the node's address, every 0.1 s for SECONDS; JSON {ok, failed, errors}.
NODE_CLIENT = """
import json, sys, time, urllib.request
ok, failed, errors = 0, 0, []
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    for host in ("127.0.0.1", sys.argv[1]):
        try:
            with urllib.request.urlopen(f"http://{host}:18080/", timeout=10) as resp:
                resp.read()
            ok += 1
        except OSError as exc:
            failed += 1
            errors.append(repr(exc))
    time.sleep(0.1)
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:5]}))
"""


def _heartbeat(kube: KubeCluster) -> str:
    """The kubelet's last renewal of its node lease (every 10 s), the node Ready."""
    node = kube.json("get", "node", kube.name)
    (ready,) = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "True", ready
    return kube.json("-n", "kube-node-lease", "get", "lease", kube.name)["spec"]["renewTime"]


def test_the_nodes_own_traffic_is_untouched_at_the_production_attach_point(kube):
    """The DaemonSet's agent attaches at the root cgroup, as in production:
    here the root of the node's cgroup namespace, below which the kubelet,
    containerd, etcd and the API server run, in the node's own netns. A
    service of the node and its client (node processes, not pods), the
    kubelet's heartbeats and the API server's etcd traffic go on, untouched,
    while a pod is steered, through a SIGKILL of the agent and a hand-over:
    every request succeeds and the kernel counts each connect not_attached."""
    status = kube.agent_status()
    assert status["cgroup"] == "/sys/fs/cgroup/unified"  # the node's root: nothing above
    node_ip = kube.json("get", "node", kube.name)["status"]["addresses"][0]["address"]
    server = kube.node_exec("sh", "-c", "python3 -m http.server 18080 --bind 0.0.0.0"
                            " >/dev/null 2>&1 & echo $!").stdout.strip()  # fmt: skip
    url = f"http://{kube.pod_ip('shop', 'app=web')}:8080/index.html"
    try:
        wait_for(lambda: kube.node_exec("python3", "-c", NODE_CLIENT, node_ip, "0.1",
                                        check=False).returncode == 0, 20, "the node's service")  # fmt: skip
        before = kube.agent_status()["decisions"].get("not_attached", {})
        quiet = json.loads(kube.node_exec("python3", "-c", NODE_CLIENT, node_ip, "2").stdout)
        after = kube.agent_status()["decisions"].get("not_attached", {})
        assert quiet["failed"] == 0 and quiet["ok"] >= 10, quiet
        assert sum(after.values()) - sum(before.values()) >= quiet["ok"], (before, after)
        heartbeat = _heartbeat(kube)

        client = subprocess.Popen(
            [str(ROOT / "kube" / "cluster"), "exec", "--name", kube.name, "--", "python3", "-c",
             NODE_CLIENT, node_ip, "40"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:

            def restarts() -> int:
                return kube.agent_pods()[0]["status"]["containerStatuses"][0]["restartCount"]

            restarted = restarts()
            kube.node_exec("kill", "-KILL", str(kube.agent_status()["pid"]))
            wait_for(lambda: restarts() > restarted, 120, "the agent restarted")
            old = kube.wait_agent_ready()
            kube.kubectl("-n", AGENT_NS, "delete", "pod", old["metadata"]["name"], "--wait=false")
            kube.wait_agent_ready(not_uid=old["metadata"]["uid"])
            out, err = client.communicate(timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        assert result.get("ok", 0) >= 100 and result["failed"] == 0, (result, err)
        wait_for(lambda: _heartbeat(kube) != heartbeat, 60, "a new heartbeat")
        wait_for(lambda: "shop/client" in kube.attached(), 60, "shop/client attached")
        before = _client_conns(kube, "shop")
        assert kube.fetch("shop", "client", url).stdout.strip() == "meshtest-ok"
        assert _client_conns(kube, "shop") == before + 1
    finally:
        kube.node_exec("kill", server, check=False)


UNINSTALL_DOC = ROOT / "docs" / "uninstall-upgrade.md"
LOAD = Path(__file__).resolve().parents[1] / "helpers" / "kube_load.py"
AGENT_IMAGE = "localhost/meshagent:0.1.0"


def test_an_upgrade_as_documented_ends_no_connection(kube):
    """docs/uninstall-upgrade.md's Kubernetes upgrade (IMAGE: a second tag of
    the image) while a meshed pod sends for 30 s on one connection and opens
    a new one every 0.1 s: the digests match, no connect fails, the new agent
    took the connection over and the old pod is gone without a failed hook."""
    kube.kubectl("create", "namespace", "up")
    kube.kubectl("label", "namespace", "up", f"{LABEL}=true")
    source = LOAD.read_text()
    kube.kubectl("-n", "up", "run", "server", f"--image={AGENT_IMAGE}", "--restart=Never",
                 "--command", "--", "python3", "-c", source, "server")  # fmt: skip
    kube.kubectl("-n", "up", "run", "client", f"--image={AGENT_IMAGE}", "--restart=Never",
                 "--command", "--", "sleep", "3600")  # fmt: skip
    wait_for(lambda: len(kube.json("-n", "up", "get", "pods")["items"]) == 2, 60, "pods")
    kube.wait_pods_ready("up")
    wait_for(lambda: "up/client" in kube.attached(), 60, "up/client attached")
    server = kube.json("-n", "up", "get", "pod", "server")["status"]["podIP"]
    kube.node_exec("ctr", "-n", "k8s.io", "images", "tag", AGENT_IMAGE, "localhost/meshagent:next")
    old = kube.wait_agent_ready()
    load = subprocess.Popen(
        [str(BIN / "kubectl"), "-n", "up", "exec", "client", "--", "python3", "-c", source,
         "client", server, "30"],
        env=kube.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: kube.attached()["up/client"]["connections_active"] >= 1, 20,
                 "the transfer forwarded")  # fmt: skip
        for command in doc_commands(UNINSTALL_DOC, "## Kubernetes", "### Upgrade"):
            kube.sh(command.replace("IMAGE", "localhost/meshagent:next"))
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    assert result.get("digest") and result["digest"] == result.get("server_digest"), (result, err)
    assert result["failed"] == 0 and not result["errors"], result
    assert result["connects"] >= 100 and result["sent"] > 10_000_000, result

    status = kube.agent_status()
    logs = kube.kubectl("-n", AGENT_NS, "logs", "-l", AGENT_SELECTOR, "--tail=30").stdout
    assert status["took_over"] and status["took_over"]["conns"] >= 1, (status["took_over"], logs)
    (new,) = kube.agent_pods()
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert new["spec"]["containers"][0]["image"] == "localhost/meshagent:next"
    # The kubelet may keep the old pod Terminating up to its grace period (90 s).
    wait_for(lambda: len(kube.json("-n", AGENT_NS, "get", "pods")["items"]) == 1, 120,
             "the old agent pod gone")  # fmt: skip
    events = kube.json("-n", AGENT_NS, "get", "events")["items"]
    assert not [e["message"] for e in events if e["reason"] == "FailedPreStopHook"]
    assert kube.attached()["up/client"]["resets"] == 0


def test_with_when_no_agent_wait_a_pod_starts_only_once_an_agent_runs(kube):
    """`meshagent cni install --when-no-agent wait` in the DaemonSet's init
    container: a pod of a labelled namespace that comes while no agent runs
    waits (the plugin fails its ADD with "try again later", the kubelet
    retries its sandbox) and starts once an agent runs, its very first
    connection steered. kube-system's pods start anyway."""
    patch = [{"op": "add", "path": "/spec/template/spec/initContainers/0/command/-",
              "value": value} for value in ("--when-no-agent", "wait")]  # fmt: skip
    kube.kubectl("-n", AGENT_NS, "patch", "daemonset", "meshagent", "--type=json", "-p",
                 json.dumps(patch))  # fmt: skip
    kube.kubectl("-n", AGENT_NS, "rollout", "status", "daemonset/meshagent", "--timeout=5m",
                 timeout=320)  # fmt: skip
    conf = json.loads(kube.node_exec("cat", "/etc/cni/net.d/10-bridge.conflist").stdout)
    assert conf["plugins"][-1]["whenNoAgent"] == "wait", conf
    ds = kube.json("-n", AGENT_NS, "get", "daemonset", "meshagent")
    saved = {"apiVersion": "apps/v1", "kind": "DaemonSet", "spec": ds["spec"],
             "metadata": {k: ds["metadata"][k] for k in ("name", "namespace", "labels")}}  # fmt: skip
    kube.kubectl("-n", AGENT_NS, "delete", "daemonset", "meshagent", "--cascade=foreground",
                 timeout=200)  # fmt: skip
    url = f"http://{kube.pod_ip('shop', 'app=web')}:8080/index.html"
    kube.kubectl("-n", "shop", "run", "late", f"--image={BUSYBOX}", "--restart=Never", "--",
                 "sh", "-c", f"wget -q -O - {url}; sleep 3600")  # fmt: skip
    kube.kubectl("-n", "kube-system", "run", "system", f"--image={BUSYBOX}", "--restart=Never",
                 "--", "sleep", "3600")  # fmt: skip
    try:
        kube.kubectl("-n", "kube-system", "wait", "--for=condition=Ready", "pod/system",
                     "--timeout=60s", timeout=70)  # fmt: skip

        def waiting() -> bool:
            events = kube.json("-n", "shop", "get", "events")["items"]
            return any(e["involvedObject"]["name"] == "late"
                       and "no meshagent agent runs" in e["message"] for e in events)  # fmt: skip

        wait_for(waiting, 60, "the late pod's sandbox refused for want of an agent")
        assert kube.json("-n", "shop", "get", "pod", "late")["status"]["phase"] == "Pending"

        kube.kubectl("create", "-f", "-", stdin=json.dumps(saved))
        kube.wait_agent_ready()
        kube.kubectl("-n", "shop", "wait", "--for=condition=Ready", "pod/late", "--timeout=180s",
                     timeout=190)  # fmt: skip
        logs = kube.kubectl("-n", "shop", "logs", "late").stdout
        assert "meshtest-ok" in logs, logs
        late = kube.attached()["shop/late"]
        assert late["source"] == "cni" and late["connections_total"] >= 1, late  # the first one
    finally:
        kube.kubectl("-n", "shop", "delete", "pod", "late", "--wait=false", check=False)
        kube.kubectl("-n", "kube-system", "delete", "pod", "system", "--wait=false", check=False)


def test_the_documented_uninstall_leaves_the_node_clean_and_the_pods_working(kube):
    """docs/uninstall-upgrade.md's Kubernetes uninstall, word for word: no
    pinned object, no program at the node's cgroup, no CNI entry, plugin or
    record, no state dir; the pods that were meshed connect directly."""
    url = f"http://{kube.pod_ip('shop', 'app=web')}:8080/index.html"
    assert kube.node_exec("ls", "/sys/fs/bpf/meshagent").stdout.split()  # installed
    for command in doc_commands(UNINSTALL_DOC, "## Kubernetes", "### Uninstall"):
        kube.sh(command)

    assert "meshagent" not in kube.node_exec("ls", "/sys/fs/bpf").stdout.split()
    programs = kube.node_exec("bpftool", "-j", "cgroup", "show", "/sys/fs/cgroup/unified").stdout
    assert programs.strip() in ("", "[]"), programs
    assert kube.node_exec("test", "-e", "/run/meshagent", check=False).returncode == 1
    assert kube.node_exec("test", "-e", "/opt/cni/bin/meshagent-cni", check=False).returncode == 1
    conf = kube.node_exec("cat", "/etc/cni/net.d/10-bridge.conflist").stdout
    assert "meshagent" not in conf and '"bridge"' in conf
    assert not kube.json("get", "daemonsets", "--all-namespaces")["items"]
    for namespace in ("shop", "early"):
        url = f"http://{kube.pod_ip(namespace, 'app=web')}:8080/index.html"
        assert kube.fetch(namespace, "client", url).stdout.strip() == "meshtest-ok"
