"""deploy/ on a real API server (v1.20.2), which validates every object:
the manifests apply, and what was stored says what the README promises
(security context, mounts, probes, RBAC that is exactly enough)."""

from __future__ import annotations

from meshenv import DEPLOY

EXPECTED_CAPS = {"SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"}
MOUNTS = {
    "/sys/fs/bpf": "HostToContainer",
    "/var/run/netns": "HostToContainer",
    "/sys/fs/cgroup": None,
    "/run/xtables.lock": None,
    "/lib/modules": None,
    "/usr/src": None,
    "/run/meshagent": None,
    "/host/opt/cni/bin": None,
    "/host/etc/cni/net.d": None,
    "/host/proc/sys/net": None,
    "/var/run/secrets/meshagent": None,
}


def test_the_manifests_apply_and_say_what_they_promise(kube_api):
    for name in ("namespace.yaml", "rbac.yaml", "mesh.yaml", "daemonset.yaml", "policy-crd.yaml"):
        kube_api.kubectl("apply", "-f", str(DEPLOY / name))
    ds = kube_api.get("/apis/apps/v1/namespaces/meshagent/daemonsets/meshagent")
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "meshagent"
    assert spec["terminationGracePeriodSeconds"] >= 10

    (agent,) = spec["containers"]
    ctx = agent["securityContext"]
    assert ctx.get("privileged") is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert set(ctx["capabilities"]["add"]) == EXPECTED_CAPS
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "--kube" in agent["command"] and "on" in agent["command"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for path, propagation in MOUNTS.items():
        assert path in mounts, path
        if propagation:
            assert mounts[path]["mountPropagation"] == propagation
    volumes = {v["name"]: v for v in spec["volumes"]}
    token = mounts["/var/run/secrets/meshagent"]
    assert token["readOnly"] is True
    (source,) = volumes[token["name"]]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "meshagent-ca"  # not the API server's
    assert all("hostPath" in volumes[m["name"]] for m in agent["volumeMounts"] if m is not token)
    mesh_env = {e["name"]: e for e in agent["env"]}["MESHAGENT_MESH"]
    assert mesh_env["valueFrom"]["configMapKeyRef"]["optional"] is True  # no mesh.yaml: no mesh
    assert agent["lifecycle"]["preStop"]["exec"]["command"][:2] == ["meshagent", "retire"]
    assert "--takeover=auto" in agent["command"]
    assert {"POD_NAME", "POD_NAMESPACE"} <= set(env)
    (init,) = spec["initContainers"]
    assert init["command"][:3] == ["meshagent", "cni", "install"]
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]

    # The ServiceAccount may read pods and namespaces; in its own namespace it
    # may patch pods (the preStop releases its own) and get DaemonSets.
    sa = "system:serviceaccount:meshagent:meshagent"

    def can(verb: str, resource: str, *extra: str) -> bool:
        out = kube_api.kubectl("auth", "can-i", verb, resource, "--as", sa, *extra, check=False)
        return out.stdout.strip() == "yes"

    for verb in ("get", "list", "watch"):
        assert can(verb, "pods", "--all-namespaces") and can(verb, "namespaces")
    for verb, resource in (("create", "pods"), ("patch", "pods"), ("delete", "pods"),
                           ("list", "secrets"), ("get", "configmaps"), ("list", "nodes"),
                           ("patch", "namespaces")):  # fmt: skip
        assert not can(verb, resource, "--all-namespaces"), (verb, resource)
    own = ("-n", "meshagent")
    assert can("patch", "pods", *own) and can("get", "daemonsets", *own)
    for verb, resource in (("create", "pods"), ("delete", "pods"), ("patch", "daemonsets"),
                           ("list", "secrets")):  # fmt: skip
        assert not can(verb, resource, *own), (verb, resource)
    # The mesh: the agents read the published CA certificate, not the CA's Secret.
    assert can("get", "configmaps/meshagent-ca-root", *own)
    assert not can("get", "secrets/meshagent-ca", *own)
    assert not can("get", "configmaps/other", *own)

    # The identity service: TokenReview, its own Secret and ConfigMap; no other secret.
    ca_sa = "system:serviceaccount:meshagent:meshagent-ca"

    def ca_can(verb: str, resource: str, *extra: str) -> bool:
        out = kube_api.kubectl("auth", "can-i", verb, resource, "--as", ca_sa, *extra, check=False)
        return out.stdout.strip() == "yes"

    assert ca_can("create", "tokenreviews.authentication.k8s.io")
    assert ca_can("get", "secrets/meshagent-ca", *own) and ca_can("get", "pods", *own)
    assert ca_can("update", "configmaps/meshagent-ca-root", *own)
    for verb, resource, where in (("get", "secrets/other", own), ("list", "secrets", own),
                                  ("get", "pods", ("--all-namespaces",)),
                                  ("get", "secrets", ("--all-namespaces",))):  # fmt: skip
        assert not ca_can(verb, resource, *where), (verb, resource)
    (ca,) = kube_api.get("/apis/apps/v1/namespaces/meshagent/deployments/meshagent-ca")[
        "spec"]["template"]["spec"]["containers"]  # fmt: skip
    assert ca["securityContext"]["runAsUser"] != 0
    assert ca["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_a_broken_manifest_is_refused_by_the_api_server(kube_api, tmp_path):
    text = (DEPLOY / "daemonset.yaml").read_text().replace("mountPropagation: HostToContainer",
                                                           "mountPropagation: Sideways", 1)  # fmt: skip
    bad = tmp_path / "ds.yaml"
    bad.write_text(
        text.replace("name: meshagent\n  namespace", "name: meshagent-bad\n  namespace", 1)
    )
    out = kube_api.kubectl("apply", "-f", str(bad), check=False)
    assert out.returncode != 0 and "mountPropagation" in out.stderr
    missing = kube_api.kubectl("get", "ds", "-n", "meshagent", "meshagent-bad", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
