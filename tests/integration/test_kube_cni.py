"""The chained CNI plugin on a real node: containerd 1.6 + runc run pods
through the CRI with a conflist chaining bridge + host-local + portmap +
meshagent-cni (installed by `meshagent cni install`, as the DaemonSet's init
container does), all inside a private node network namespace.

Clients and servers are busybox containers (wget, httpd) in those pods;
"steered" means the agent's forwarder took the connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from meshenv import redirect_args, start_agent, wait_for

HTTP_PORT = 8080
SERVE = [
    "/bin/sh",
    "-c",
    f"echo meshtest-ok > /tmp/index.html; exec httpd -f -p {HTTP_PORT} -h /tmp",
]


def fetch(node, container: str, ip: str) -> str:
    code, out = node.exec(
        container, ["wget", "-q", "-O", "-", f"http://{ip}:{HTTP_PORT}/index.html"]
    )
    assert code == 0, out
    return out


def plugin(node, env: dict, conf: dict, stdin: dict | None = None) -> subprocess.CompletedProcess:
    """Call the installed plugin as the runtime does."""
    data = {**node.conflist()["plugins"][0], **conf} if stdin is None else stdin
    return subprocess.run(
        [str(node.dir / "cni-bin" / "meshagent-cni")],
        input=json.dumps(data), capture_output=True, text=True, timeout=30,
        env={"PATH": os.environ["PATH"], **env},
    )  # fmt: skip


def our_entry(node) -> dict:
    conf = json.loads((node.dir / "cni-conf" / "10-meshtest.conflist").read_text())
    return conf["plugins"][-1]


def test_cri_pods_are_recorded_attached_and_steered_and_removal_leaves_nothing(
    mesh_env, kube_node, redirect
):
    agent = start_agent(mesh_env, *redirect_args(*redirect))
    node = kube_node("all")
    web = node.run_pod("default", "web")
    node.run_container(web, "httpd", SERVE)
    client = node.run_pod("default", "client")
    sleeper = node.run_container(client, "main", ["/bin/sleep", "600"])

    record = json.loads((mesh_env.state_dir / "cni" / "default_client.json").read_text())
    assert record["netns"] == client.netns and record["uid"] == client.uid
    assert record["ips"] == [client.ip] and record["attach"] is True

    wait_for(lambda: agent.pod_status("default/client") is not None, 20, "client attached")
    status = agent.pod_status("default/client")
    assert status["source"] == "cni" and status["auto"] is True
    assert status["backend"] == redirect[0]
    before = agent.forwarded()
    tracer = subprocess.Popen(
        [sys.executable, "-m", "meshagent", "trace", "-o", "json", "--pod", "default/client",
         "--seconds", "6"],
        env=mesh_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    mesh_env.procs.append(tracer)
    wait_for(lambda: agent.request("status")["tracing"], what="the trace to start")
    assert fetch(node, sleeper, web.ip).strip() == "meshtest-ok"
    assert agent.forwarded() == before + 1
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    closed = [e for e in events if e["source"] == "forwarder" and e["event"] == "closed"]
    assert [(e["pod"], e["orig_dst"]) for e in closed] == [
        ("default/client", f"{web.ip}:{HTTP_PORT}")
    ]
    if redirect[0] == "ebpf":  # kernel events name the pod by its netns cookie
        steered = [e for e in events if e["source"] == "kernel" and e["event"] == "steered"]
        assert [e["pod"] for e in steered] == ["default/client"]

    # CHECK as the runtime would call it: the record matches the sandbox.
    env = {"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": client.id, "CNI_NETNS": client.netns,
           "CNI_IFNAME": "eth0", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;"
           f"K8S_POD_NAME=client;K8S_POD_UID={client.uid}"}  # fmt: skip
    conf = {
        **our_entry(node),
        "cniVersion": "1.0.0",
        "name": "meshtest",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": f"{client.ip}/24"}]},
    }
    checked = plugin(node, env, {}, stdin=conf)
    assert checked.returncode == 0, checked.stdout

    node.remove_pod(client)  # StopPodSandbox + RemovePodSandbox: CNI DEL
    assert not (mesh_env.state_dir / "cni" / "default_client.json").exists()
    wait_for(lambda: agent.pod_status("default/client") is None, 20, "client detached")
    assert not os.path.exists(client.netns)

    # DEL again (the spec requires it to succeed) and CHECK of a gone pod.
    again = plugin(node, {**env, "CNI_COMMAND": "DEL"}, {}, stdin=conf)
    assert again.returncode == 0, again.stdout
    gone = plugin(node, env, {}, stdin=conf)
    assert gone.returncode != 0 and json.loads(gone.stdout)["code"] == 3
    assert agent.stop() == 0


def test_pods_recorded_while_no_agent_runs_are_attached_at_start(mesh_env, kube_node):
    node = kube_node("all")
    web = node.run_pod("default", "web")
    node.run_container(web, "httpd", SERVE)
    client = node.run_pod("default", "client")
    sleeper = node.run_container(client, "main", ["/bin/sleep", "600"])
    system = node.run_pod("kube-system", "dns")  # excluded by the plugin's config
    assert (mesh_env.state_dir / "cni" / "default_client.json").exists()

    agent = start_agent(mesh_env)
    wait_for(lambda: agent.pod_status("default/client") is not None, 20, "client attached")
    assert agent.pod_status("default/web") is not None
    assert agent.pod_status(f"kube-system/{system.name}") is None
    before = agent.forwarded()
    assert fetch(node, sleeper, web.ip).strip() == "meshtest-ok"
    assert agent.forwarded() == before + 1
    assert agent.stop() == 0


def test_a_late_del_of_an_old_sandbox_keeps_the_new_ones_record(mesh_env, kube_node):
    node = kube_node("labelled")
    first = node.run_pod("default", "web")
    uid = first.uid
    node.remove_pod(first)
    second = node.run_pod("default", "web", uid=uid)  # the pod's sandbox, re-made
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": first.id, "CNI_NETNS": "",
           "CNI_IFNAME": "eth0",
           "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID={uid}"}  # fmt: skip
    conf = {**our_entry(node), "cniVersion": "1.0.0", "name": "meshtest"}
    late = plugin(node, env, {}, stdin=conf)
    assert late.returncode == 0, late.stdout
    record = json.loads((mesh_env.state_dir / "cni" / "default_web.json").read_text())
    assert record["container_id"] == second.id and record["attach"] is False
