"""Shared fixtures. Everything a fixture makes, it removes, even on failure:
its cgroup, pods (netns, veth, bridge), agent processes and state dir.
The helpers they are made of live in tests/helpers (meshenv.py, residue.py)."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import meshenv
from meshenv import (
    DEPLOY,
    REDIRECTS,
    AgentProc,
    MeshEnv,
    is_root,
    make_env,
    redirect_args,
    start_agent,
)
from residue import residue, untagged_residue


@pytest.fixture
def mesh_env() -> Iterator[MeshEnv]:
    if not is_root():
        pytest.skip("needs root: BPF, netns, cgroups")
    env = make_env()
    try:
        yield env
    finally:
        env.cleanup()


@pytest.fixture
def agent(mesh_env: MeshEnv) -> Iterator[AgentProc]:
    proc = start_agent(mesh_env)
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"agent exited {code}: {proc.log()}"


@pytest.fixture(params=REDIRECTS, ids=lambda p: "-".join(x for x in p if x))
def redirect(request) -> tuple[str, str | None]:
    return request.param


@pytest.fixture
def any_agent(mesh_env: MeshEnv, redirect) -> Iterator[AgentProc]:
    """An agent with each redirect backend (and iptables flavour) in turn."""
    proc = start_agent(mesh_env, *redirect_args(*redirect))
    proc.backend = redirect[0]
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"agent exited {code}: {proc.log()}"


@pytest.fixture
def mesh_nodes():
    """Two nodes of a mesh on this machine (tests/helpers/meshlab.py), no agents yet."""
    if not is_root():
        pytest.skip("needs root: BPF, netns, cgroups")
    from meshlab import make_two_nodes

    made = make_two_nodes()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def mesh_pair(mesh_nodes):
    """Agents on both nodes; pod client on node-a and server on node-b,
    both attached (the server's hop listener open)."""
    from meshenv import wait_for

    a, b = mesh_nodes.start_all()
    client = mesh_nodes.envs[0].create_pod("client")
    server = mesh_nodes.envs[1].create_pod("server")
    a.attach(client)
    b.attach(server)
    wait_for(lambda: (b.pod_status("server") or {}).get("mesh", {}).get("inbound"),
             what="the server pod's hop listener")  # fmt: skip
    yield mesh_nodes, client, server
    mesh_nodes.stop_all()


@pytest.fixture(autouse=True)
def no_residue():
    """After every test: nothing of the tests' own is left on the machine."""
    if not is_root():
        yield
        return
    before = residue()
    untagged = untagged_residue()
    yield
    # Only what this process's sandboxes made: another run may share the machine.
    left = {item for item in residue() - before if any(tag in item for tag in meshenv.TAGS)}
    left |= untagged_residue() - untagged
    assert not left, f"the test left behind: {sorted(left)}"


# -- Kubernetes: a real API server and a containerd node (tests/helpers) --------
@pytest.fixture(scope="session")
def kube_api():
    """kube-apiserver v1.20.2 + etcd on 127.0.0.1 for the whole session, with
    deploy/'s namespace and RBAC applied (the agent's identity is its
    ServiceAccount's). Watches end every 5-10 s (--min-request-timeout), so
    every test also exercises the watch's resumption."""
    if not is_root():
        pytest.skip("needs root: the API server's tests run pods through containerd")
    from kubeapi import APISERVER, ApiServer

    if not APISERVER.exists():
        pytest.fail(f"{APISERVER} is not built: run kube/prepare (make test does)")
    api = ApiServer(min_request_timeout=5).start()
    try:
        for name in ("namespace.yaml", "rbac.yaml"):
            api.kubectl("apply", "-f", str(DEPLOY / name))
        yield api
    finally:
        api.stop()


@pytest.fixture
def kube_node(mesh_env):
    """A containerd node (its own netns, CNI chain with meshagent-cni) whose
    pods' cgroups are under mesh_env's cgroup. make(attach=...) starts it."""
    from cri import Node

    nodes = []

    def make(attach: str = "all") -> Node:
        octet = 10 + secrets.randbelow(200)
        node = Node(mesh_env.tag, mesh_env.state_dir / "node", mesh_env.state_dir,
                    mesh_env.cgroup_rel, f"10.251.{octet}.0/24", attach)  # fmt: skip
        nodes.append(node)
        return node.start()

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()
