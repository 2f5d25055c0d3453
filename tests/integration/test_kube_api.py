"""The API watch against a real kube-apiserver (v1.20.2, etcd 3.4) with the
agent authenticated as deploy/rbac.yaml's ServiceAccount, and pods run by
containerd through the CRI: the test plays the kubelet (creates the Pod
object, runs its sandbox, patches its status, labels, deletes).

Opt-in is the label meshagent.io/attach=true on the pod or its namespace
(=false on the pod opts out of a labelled namespace); the plugin's config
here is "labelled", so the agent alone decides.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from meshenv import start_agent, wait_for

LABEL = "meshagent.io/attach"
HTTP_PORT = 8080
SERVE = [
    "/bin/sh",
    "-c",
    f"echo meshtest-ok > /tmp/index.html; exec httpd -f -p {HTTP_PORT} -h /tmp",
]


class Cluster:
    """One test's slice of the API server: its node name and namespace."""

    def __init__(self, api, node, env) -> None:
        self.api, self.node, self.env = api, node, env
        self.node_name = f"node-{env.tag}"
        self.namespace = f"mt{env.tag}"
        api.create_namespace(self.namespace)
        self.containers: dict[str, str] = {}
        self.sandboxes = {}

    def pod(self, name: str, labels: dict | None = None, serve: bool = False):
        """Pod object, sandbox (CNI ADD), a container, status Running."""
        obj = self.api.create_pod(self.namespace, name, self.node_name, labels)
        sandbox = self.node.run_pod(self.namespace, name, uid=obj["metadata"]["uid"])
        argv = SERVE if serve else ["/bin/sleep", "600"]
        self.containers[name] = self.node.run_container(sandbox, "main", argv)
        self.api.set_pod_running(self.namespace, name, sandbox.ip)
        self.sandboxes[name] = sandbox
        return sandbox

    def label_pod(self, name: str, value: str | None) -> None:
        self.api.label("pod", name, {LABEL: value}, namespace=self.namespace)

    def label_namespace(self, value: str | None) -> None:
        self.api.label("namespace", self.namespace, {LABEL: value})

    def fetch(self, client: str, server: str) -> str:
        ip = self.sandboxes[server].ip
        code, out = self.node.exec(self.containers[client],
                                   ["wget", "-q", "-O", "-", f"http://{ip}:{HTTP_PORT}/index.html"])  # fmt: skip
        assert code == 0, out
        return out

    def full(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def cleanup(self) -> None:
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{self.namespace}")
        except OSError:
            pass


@pytest.fixture
def cluster(kube_api, kube_node, mesh_env):
    c = Cluster(kube_api, kube_node("labelled"), mesh_env)
    try:
        yield c
    finally:
        c.cleanup()


def kube_agent(env, api, cluster, user: str = "agent", log_name: str = "agent.log"):
    return start_agent(env, "--kube", "on", "--kubeconfig", str(api.kubeconfig(user)),
                       "--node-name", cluster.node_name, log_name=log_name)  # fmt: skip


def synced(agent) -> bool:
    if agent.proc.poll() is not None:
        raise AssertionError(f"agent exited {agent.proc.returncode}: {agent.log()[-3000:]}")
    return agent.request("status")["kube"].get("synced", False)


def attached(agent, full: str) -> bool:
    return agent.pod_status(full) is not None


def test_labels_on_pods_and_namespaces_attach_and_detach(mesh_env, kube_api, cluster):
    agent = kube_agent(mesh_env, kube_api, cluster)
    cluster.pod("web", serve=True)
    cluster.pod("client")
    wait_for(lambda: synced(agent), 30, "the API watch to list")
    assert not attached(agent, cluster.full("client"))

    cluster.label_pod("client", "true")
    wait_for(lambda: attached(agent, cluster.full("client")), 30, "client attached by its label")
    status = agent.pod_status(cluster.full("client"))
    assert status["auto"] is True and status["source"] == "cni"
    before = agent.forwarded()
    assert cluster.fetch("client", "web").strip() == "meshtest-ok"
    assert agent.forwarded() == before + 1

    cluster.label_pod("client", None)
    wait_for(lambda: not attached(agent, cluster.full("client")), 30, "client detached")
    before = agent.forwarded()
    assert cluster.fetch("client", "web").strip() == "meshtest-ok"
    assert agent.forwarded() == before

    cluster.label_namespace("true")
    wait_for(lambda: attached(agent, cluster.full("client")) and attached(agent, cluster.full("web")),
             30, "the namespace's pods attached")  # fmt: skip
    cluster.label_pod("client", "false")  # opts out of its labelled namespace
    wait_for(lambda: not attached(agent, cluster.full("client")), 30, "client opted out")
    assert attached(agent, cluster.full("web"))

    # Deleting the pod: the object, then its sandbox (CNI DEL).
    kube_api.delete_pod(cluster.namespace, "web")
    cluster.node.remove_pod(cluster.sandboxes.pop("web"))
    wait_for(lambda: not attached(agent, cluster.full("web")), 30, "web detached")
    assert not (mesh_env.state_dir / "cni" / f"{cluster.namespace}_web.json").exists()
    assert agent.request("status")["kube"]["errors"] == {}
    assert agent.stop() == 0


def test_labels_set_or_removed_while_the_agent_is_down_are_honoured_at_start(
    mesh_env, kube_api, cluster
):
    cluster.pod("web", serve=True)
    cluster.pod("stays", labels={LABEL: "true"})
    cluster.pod("leaves", labels={LABEL: "true"})
    cluster.pod("joins")
    agent = kube_agent(mesh_env, kube_api, cluster)
    wait_for(lambda: attached(agent, cluster.full("stays")) and attached(agent, cluster.full("leaves")),
             30, "labelled pods attached at start")  # fmt: skip
    assert agent.stop() == 0

    cluster.label_pod("leaves", None)
    cluster.label_pod("joins", "true")
    agent = kube_agent(mesh_env, kube_api, cluster, log_name="agent2.log")
    wait_for(lambda: synced(agent), 30, "the API watch to list")
    wait_for(lambda: attached(agent, cluster.full("joins")), 30, "joins attached at start")
    wait_for(lambda: not attached(agent, cluster.full("leaves")), 30, "leaves detached at start")
    assert attached(agent, cluster.full("stays"))
    before = agent.forwarded()
    assert cluster.fetch("stays", "web").strip() == "meshtest-ok"
    assert agent.forwarded() == before + 1
    assert agent.stop() == 0


def test_the_watch_resumes_when_it_breaks_and_when_the_api_server_restarts(
    mesh_env, kube_api, cluster
):
    agent = kube_agent(mesh_env, kube_api, cluster)
    cluster.pod("client")
    wait_for(lambda: synced(agent), 30, "the API watch to list")
    # The API server ends every watch after 5-10 s here (--min-request-timeout
    # 5): past that, each watch has ended and gone on from its resourceVersion.
    time.sleep(11)
    cluster.label_pod("client", "true")
    wait_for(lambda: attached(agent, cluster.full("client")), 30, "attached after a resumed watch")
    # Both watches ended at least once and went on from their resourceVersion:
    # neither needed a second list.
    assert agent.request("status")["kube"]["api"]["relists"] == 2

    kube_api.restart_api()
    cluster.label_pod("client", None)
    wait_for(lambda: not attached(agent, cluster.full("client")), 60,
             "detached after the API server restarted")  # fmt: skip

    # Right after a restart the API server answers 403 until its RBAC caches
    # fill: the watch retries until both kinds are watched again.
    def back() -> bool:
        state = agent.request("status")["kube"]["api"]["state"]
        return state["pods"] == state["namespaces"] == "watching"

    wait_for(back, 60, "both watches back")
    assert agent.stop() == 0


def test_a_pod_without_a_cni_record_is_found_by_its_cgroup(mesh_env, kube_api, cluster):
    """A pod started before the plugin was installed: the UID from the API
    server names its cgroup (kubepods/pod<UID>), a process there its netns."""
    cluster.pod("web", serve=True)
    cluster.pod("client")
    (mesh_env.state_dir / "cni" / f"{cluster.namespace}_client.json").unlink()
    agent = kube_agent(mesh_env, kube_api, cluster)
    wait_for(lambda: synced(agent), 30, "the API watch to list")
    cluster.label_pod("client", "true")
    wait_for(lambda: attached(agent, cluster.full("client")), 30, "client attached")
    assert agent.pod_status(cluster.full("client"))["source"] == "cgroup"
    before = agent.forwarded()
    assert cluster.fetch("client", "web").strip() == "meshtest-ok"
    assert agent.forwarded() == before + 1
    assert agent.stop() == 0


def test_attach_by_name_pid_or_netns_and_what_is_refused(mesh_env, kube_node):
    agent = start_agent(mesh_env)
    node = kube_node("labelled")
    web = node.run_pod("default", "web")
    node.run_container(web, "httpd", SERVE)
    client = node.run_pod("default", "client")
    node.run_container(client, "main", ["/bin/sleep", "600"])
    (mesh_env.state_dir / "cni" / "default_client.json").unlink()

    def cli(*args):
        return mesh_env.meshagent(*args, check=False)

    no_record = cli("attach", "default/client")
    assert no_record.returncode == 1
    assert "no CNI record and no UID" in no_record.stderr and "Traceback" not in no_record.stderr

    pid = _a_pid_in(client.netns)
    done = cli("attach", "default/client", "--pid", str(pid))
    assert done.returncode == 0, done.stderr
    assert agent.pod_status("default/client")["source"] == "pid"
    cli("detach", "default/client")
    wait_for(lambda: agent.pod_status("default/client") is None, 20, "detached")
    done = cli("attach", "default/client", "--netns", client.netns)
    assert done.returncode == 0, done.stderr
    assert agent.pod_status("default/client")["source"] == "netns"

    for args, words in (
        (("attach", "default/host", "--pid", str(os.getpid())), "node's own network namespace"),
        (("attach", "default/x", "--netns", "/etc/passwd"), "not a network namespace file"),
        (("attach", "default/x", "--pid", "999999999"), "no such process"),
        (("attach", "Bad/Name"), "NAMESPACE/NAME"),
        (("attach", "default/x", "--pid", "1", "--netns", client.netns), "not both"),
    ):
        out = cli(*args)
        assert out.returncode != 0 and words in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert agent.stop() == 0


def _a_pid_in(netns_path: str) -> int:
    """A process whose network namespace is netns_path (the pod's pause)."""
    target = os.stat(netns_path)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return int(entry)
    raise AssertionError(f"no process in {netns_path}")


@pytest.mark.parametrize("trouble", ["down", "forbidden"])
def test_an_api_server_down_or_refusing_leaves_the_node_working(
    mesh_env, kube_api, kube_node, trouble
):
    node = kube_node("all")  # the CNI config attaches pods on its own
    cluster_name = f"node-{mesh_env.tag}"
    if trouble == "down":
        config = mesh_env.state_dir / "kubeconfig-down"
        text = kube_api.kubeconfig("agent").read_text()
        config.write_text(text.replace(kube_api.url, "https://127.0.0.1:1"))
        expected = "unreachable"
    else:
        config = kube_api.kubeconfig("nobody")
        expected = "refused (403"
    agent = start_agent(mesh_env, "--kube", "on", "--kubeconfig", str(config),
                        "--node-name", cluster_name)  # fmt: skip
    web = node.run_pod("default", "web")
    node.run_container(web, "httpd", SERVE)
    client = node.run_pod("default", "client")
    sleeper = node.run_container(client, "main", ["/bin/sleep", "600"])
    wait_for(lambda: agent.pod_status("default/client") is not None, 20, "client attached")
    state = agent.request("status")["kube"]["api"]["state"]
    assert expected in state["pods"], state
    assert not agent.request("status")["kube"]["synced"]
    code, out = node.exec(
        sleeper, ["wget", "-q", "-O", "-", f"http://{web.ip}:{HTTP_PORT}/index.html"]
    )
    assert code == 0 and "meshtest-ok" in out
    assert agent.log().count(expected) in (1, 2, 3)  # pods, namespaces, policies
    assert "Traceback" not in agent.log()
    assert agent.stop() == 0


def test_bad_kube_settings_are_one_line_errors(mesh_env):
    for args, words in (
        (("--kube", "on"), "no --kubeconfig and not in a cluster"),
        (("--kube", "on", "--kubeconfig", "/nonexistent"), "no such file"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel, *args],
            env={k: v for k, v in mesh_env.env.items() if k != "NODE_NAME"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1 and words in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


POLICY_CR = """apiVersion: meshagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: client-out, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: client}}}}
  egress:
    - action: {action}
      to: [{{workload: {{matchLabels: {{app: {app}}}}}}}]
      ports: [{port}]
"""


def wget(cluster, client: str, server: str) -> tuple[int, str]:
    ip = cluster.sandboxes[server].ip
    return cluster.node.exec(cluster.containers[client],
                             ["wget", "-q", "-O", "-",
                              f"http://{ip}:{HTTP_PORT}/index.html"])  # fmt: skip


def test_authorization_policies_from_the_api(mesh_env, kube_api, cluster):
    """deploy/policy-crd.yaml's objects, watched: the client (app=client)
    may reach pods labelled app=web on the HTTP port, nothing else; the
    API server refuses an object its schema does not take (the rules stay);
    a change and a deletion apply to new connections."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kube_api.kubectl("apply", "-f", os.path.join(root, "deploy", "policy-crd.yaml"))
    kube_api.kubectl("wait", "--for", "condition=established", "--timeout", "60s",
                     "crd/authorizationpolicies.meshagent.io")  # fmt: skip
    agent = kube_agent(mesh_env, kube_api, cluster)
    cluster.pod("web", labels={"app": "web"}, serve=True)
    cluster.pod("other", labels={"app": "other"}, serve=True)
    cluster.pod("client", labels={"app": "client", LABEL: "true"})
    wait_for(lambda: synced(agent), 30, "the API watch to list")
    wait_for(lambda: attached(agent, cluster.full("client")), 30, "client attached")
    text = POLICY_CR.format(ns=cluster.namespace, action="ALLOW", app="web", port=HTTP_PORT)
    kube_api.kubectl("apply", "-f", "-", stdin=text)
    wait_for(lambda: agent.request("policy", action="show")["policies"]
             == [f"{cluster.namespace}/client-out"], 30, "the policy from the API")  # fmt: skip
    assert wget(cluster, "client", "web")[0] == 0
    code, out = wget(cluster, "client", "other")
    assert code != 0 and "not permitted" in out, out
    assert agent.decisions()["denied_policy"] == 1
    # An object the schema refuses never reaches the agent: the rules stay.
    bad = kube_api.kubectl("apply", "-f", "-", check=False,
                           stdin=text.replace("action: ALLOW", "action: MAYBE"))  # fmt: skip
    assert bad.returncode != 0 and "MAYBE" in bad.stderr, bad.stderr
    assert wget(cluster, "client", "other")[0] != 0
    # A change: app=other allowed, app=web now denied by the default deny.
    version = agent.request("policy", action="show")["version"]
    kube_api.kubectl("apply", "-f", "-", stdin=text.replace("app: web", "app: other"))
    wait_for(lambda: agent.request("policy", action="show")["version"] > version, 30, "the change")
    assert wget(cluster, "client", "other")[0] == 0
    assert wget(cluster, "client", "web")[0] != 0
    # A restart: the kernel keeps the rules meanwhile, and the new agent
    # writes its own only once the watch has the pods' labels.
    assert agent.stop() == 0, agent.log()
    assert wget(cluster, "client", "web")[0] != 0
    agent = kube_agent(mesh_env, kube_api, cluster, log_name="agent2.log")
    wait_for(lambda: synced(agent), 30, "the API watch to list again")
    wait_for(lambda: not agent.request("policy", action="show")["holding"], 30, "the rules")
    assert agent.request("policy", action="show")["policies"] == [f"{cluster.namespace}/client-out"]
    assert wget(cluster, "client", "web")[0] != 0
    assert wget(cluster, "client", "other")[0] == 0
    # Deleted: nothing governs the client.
    kube_api.kubectl("delete", "authorizationpolicy", "client-out", "-n", cluster.namespace)
    wait_for(lambda: not agent.request("policy", action="show")["policies"], 30, "the deletion")
    assert wget(cluster, "client", "web")[0] == 0
    assert agent.stop() == 0, agent.log()
