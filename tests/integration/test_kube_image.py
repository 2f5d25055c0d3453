"""The agent's container image, built from Debian packages by
kube/build-image (no base image can be pulled here), runs under containerd
with exactly the DaemonSet's capabilities and host mounts (read from
deploy/daemonset.yaml), and `meshagent --version` and `meshagent
probe-kernel` work in it against the running kernel.

Host paths that a node would share (/run/meshagent, the CNI dirs) are
replaced by the test's own directories; the rest are the host's, read-only
where the manifest says so. This machine's / is a private mount, so
HostToContainer propagation falls back to private here (see _shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from meshenv import DEPLOY

IMAGE_TAR = Path(__file__).resolve().parents[2] / "kube" / ".cache" / "images" / "meshagent.tar"


def _shared(path: str) -> bool:
    """Is the mount holding path shared (a node's / is, under systemd)? This
    machine's / is private, and HostToContainer needs a shared source: there
    the mount is made private (propagation is the runtime's, not the image's)."""
    best, shared = "", False
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point, optional = fields[4], fields[6 : fields.index("-")]
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, shared = point, any(o.startswith(("shared:", "master:")) for o in optional)
    return shared


CAP_BITS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_PTRACE": 19, "SYS_ADMIN": 21,
            "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39, "CHOWN": 0, "DAC_OVERRIDE": 1,
            "FOWNER": 3}  # fmt: skip


def _in_bounding_set(cap: str) -> bool:
    status = Path("/proc/self/status").read_text()
    bounding = int(status.split("CapBnd:")[1].split()[0], 16)
    return bool(bounding >> CAP_BITS[cap] & 1)


def agent_container() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()))
    spec = docs[0]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container, {v["name"]: v for v in spec["volumes"]}


def test_the_image_runs_version_and_probe_kernel_with_the_daemonsets_privileges(
    mesh_env, kube_node
):
    import meshagent

    if not IMAGE_TAR.exists():
        pytest.fail(f"{IMAGE_TAR} is not built: run kube/prepare (make test does)")
    node = kube_node("labelled")
    node.ctr("images", "import", "--base-name", "localhost/meshagent", str(IMAGE_TAR))
    pb = node.pb
    container, volumes = agent_container()
    own = {"/run/meshagent": mesh_env.state_dir, "/opt/cni/bin": node.dir / "cni-bin",
           "/etc/cni/net.d": node.dir / "cni-conf"}  # fmt: skip
    mounts = []
    for mount in container["volumeMounts"]:
        if "hostPath" not in volumes[mount["name"]]:
            continue  # the mesh's projected token: the kubelet's to make, and no mesh here
        host = volumes[mount["name"]]["hostPath"]["path"]
        if host == "/run/xtables.lock":
            Path(host).touch(exist_ok=True)  # FileOrCreate, as the kubelet does
        propagation = (pb.PROPAGATION_HOST_TO_CONTAINER
                       if mount.get("mountPropagation") == "HostToContainer" and _shared(host)
                       else pb.PROPAGATION_PRIVATE)  # fmt: skip
        mounts.append(pb.Mount(container_path=mount["mountPath"], host_path=str(own.get(host, host)),
                               readonly=bool(mount.get("readOnly")), propagation=propagation))  # fmt: skip
    caps = container["securityContext"]["capabilities"]
    assert all(_in_bounding_set(c) for c in caps["add"]), caps
    sandbox = node.run_pod("meshagent", "meshagent-xyz", host_network=True)
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="agent", attempt=0),
        image=pb.ImageSpec(image="localhost/meshagent:0.1.0"),
        command=["/bin/sleep", "600"],
        log_path="agent.log",
        mounts=mounts,
        linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            capabilities=pb.Capability(add_capabilities=caps["add"],
                                       drop_capabilities=caps["drop"]),
            namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.NODE),
        )),
    )  # fmt: skip
    cid = node.create_container(sandbox, config)

    code, out = node.exec(cid, ["meshagent", "--version"])
    assert code == 0 and meshagent.__version__ in out, out
    code, out = node.exec(cid, ["meshagent", "probe-kernel", "-o", "json"], timeout=120)
    assert code == 0, out
    probe = json.loads(out[out.index("{") :])
    assert probe["kernel"] == Path("/proc/sys/kernel/osrelease").read_text().strip()
    for feature in ("bcc", "kernel_headers", "cgroup2", "cgroup_sock_addr"):
        assert probe["features"][feature]["ok"], (feature, probe["features"][feature])
    host = json.loads(mesh_env.meshagent("probe-kernel", "-o", "json").stdout)
    assert probe["auto"]["backend"] == host["auto"]["backend"]
    assert probe["auto"]["programs"] == host["auto"]["programs"]
