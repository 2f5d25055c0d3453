"""Finding a pod by its cgroup ([S] item 13): only where the kubelet puts
pods (kubepods* roots, reached through directories root owns), and only a
netns every process of the pod agrees on, never the node's. The cgroup tree
is a fake one in tmp; the processes and their netns are real."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from meshagent.errors import MeshError
from meshagent.pods.kubelet import cgroup_of_uid, kubepods_roots, netns_of_cgroup

UID = "0a1b2c3d-1111-2222-3333-444455556666"
ME = os.getuid()


def test_only_the_kubelets_roots_are_searched(tmp_path):
    mount = tmp_path / "v2"
    real = mount / "kubepods" / "burstable" / f"pod{UID}"
    real.mkdir(parents=True)
    assert kubepods_roots(mount, ME) == [mount / "kubepods"]
    assert cgroup_of_uid(mount, UID, ME) == real


def test_a_pod_cgroup_anywhere_else_is_not_the_pod(tmp_path):
    mount = tmp_path / "v2"
    (mount / "user.slice" / f"pod{UID}").mkdir(parents=True)  # not under kubepods
    (mount / "a" / "b" / "c" / "kubepods" / f"pod{UID}").mkdir(parents=True)  # too deep
    other = mount / "kubepods" / "besteffort" / "podffff"
    (other / "ctr" / f"pod{UID}").mkdir(parents=True)  # planted inside another pod
    assert cgroup_of_uid(mount, UID, ME) is None


@pytest.mark.skipif(ME != 0, reason="chown to another user needs root")
def test_a_users_delegated_subtree_is_not_searched(tmp_path):
    mount = tmp_path / "v2"
    delegated = mount / "user.slice" / "user@1000.service"
    (delegated / "kubepods" / f"pod{UID}").mkdir(parents=True)
    for path in (delegated, delegated / "kubepods", delegated / "kubepods" / f"pod{UID}"):
        os.chown(path, 1000, 1000)
    mount_two = tmp_path / "v2b"
    (mount_two / "kubepods" / f"pod{UID}").mkdir(parents=True)
    os.chown(mount_two / "kubepods", 1000, 1000)  # a kubepods root root does not own
    assert cgroup_of_uid(mount, UID) is None and cgroup_of_uid(mount_two, UID) is None


def _procs(cgroup: Path, *pids: int) -> None:
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "cgroup.procs").write_text("".join(f"{pid}\n" for pid in pids))


@pytest.fixture
def private_netns():
    """Two real processes sharing one private netns (a user namespace makes
    it: no root needed); both are killed at the end."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare")
    proc = subprocess.Popen(["unshare", "-rn", "sh", "-c", "sleep 60 & exec sleep 60"])
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    kids: list[str] = []
    for _ in range(200):  # bounded poll: until the shell has forked and exec'd sleep
        kids = children.read_text().split() if children.exists() else []
        if kids and os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):
            break
        time.sleep(0.02)
    if not kids or proc.poll() is not None:
        proc.kill()
        proc.wait()
        pytest.skip("unshare -rn did not run here (user namespaces off?)")
    try:
        yield proc.pid, int(kids[0])
    finally:
        for pid in (int(kids[0]),):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


def test_processes_that_agree_name_the_pods_netns(tmp_path, private_netns):
    pause, app = private_netns
    pod = tmp_path / f"pod{UID}"
    _procs(pod / "sandbox", pause)
    _procs(pod / "app", app)
    path = netns_of_cgroup(pod)
    assert os.stat(path).st_ino == os.stat(f"/proc/{pause}/ns/net").st_ino


def test_a_decoy_in_another_netns_is_refused(tmp_path, private_netns):
    """The sandbox is in the host's netns here (as if hostNetwork) and one
    process in a private one: which is the pod's cannot be told, so neither."""
    pod = tmp_path / f"pod{UID}"
    _procs(pod / "sandbox", os.getpid())
    _procs(pod / "app", private_netns[1])
    with pytest.raises(MeshError, match="2 network namespaces"):
        netns_of_cgroup(pod)


def test_a_pod_in_the_nodes_netns_is_refused(tmp_path):
    pod = tmp_path / f"pod{UID}"
    _procs(pod / "sandbox", os.getpid())
    with pytest.raises(MeshError, match="node's own network namespace"):
        netns_of_cgroup(pod)


def test_an_empty_pod_cgroup_says_so(tmp_path):
    pod = tmp_path / f"pod{UID}"
    _procs(pod / "sandbox")
    with pytest.raises(MeshError, match="no process"):
        netns_of_cgroup(pod)
