"""The mesh as the Kubernetes API shows it: every meshed pod of the cluster
(opted in by meshagent.io/attach, on itself or its namespace), its node,
its addresses and its ServiceAccount. Fed by the agent's API watch (all
pods, all namespaces, when the mesh is on); read on the agent's loop.

A connection to a meshed pod on another node crosses the mutual-TLS hop;
the receiving node checks that the TCP source is a pod the API places on
the sending node and that the asserted identity is that pod's
(spiffe://DOMAIN/ns/NS/sa/SA). A pod's inbound mode comes from the label
meshagent.io/mtls (strict | permissive) on the pod, else its namespace.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from meshagent.kube.autoattach import PodView, opted_in
from meshagent.mesh.identity import SpiffeId, kube_pod_id
from meshagent.mesh.meshfile import MeshNode, MeshView

MTLS_LABEL = "meshagent.io/mtls"
MODES = ("permissive", "strict")
# Under the state dir: the labels' modes, for the CNI plugin, which makes a
# strict pod's rules at ADD, before anything in the pod runs, also while no
# agent runs (the file stays): strict fails closed from the pod's start.
MODES_FILE = "mesh-modes.json"


@dataclass(frozen=True)
class Peer:
    """A meshed pod somewhere in the cluster."""

    name: str  # NAMESPACE/NAME
    node: str
    service_account: str


def mode_of(pod_labels: dict[str, str], ns_labels: dict[str, str]) -> str:
    """strict or permissive: the pod's label, else its namespace's."""
    for labels in (pod_labels, ns_labels):
        value = labels.get(MTLS_LABEL)
        if value in MODES:
            return value
    return "permissive"


class KubeMeshView(MeshView):
    def __init__(self, trust_domain: str, me: str) -> None:
        super().__init__(trust_domain, me, source="the Kubernetes API")
        self.pods: dict[str, PodView] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.by_ip: dict[str, Peer] = {}
        self.state_dir: Path | None = None  # where MODES_FILE is kept (the agent's)
        self._modes_written: dict | None = None

    # -- fed by the watch --------------------------------------------------
    def replace_all(self, pods: dict[str, PodView], namespaces: dict[str, dict[str, str]]) -> None:
        self.pods, self.namespaces = dict(pods), dict(namespaces)
        self._index()

    def pod_event(self, kind: str, name: str, view: PodView) -> None:
        if kind == "DELETED":
            self.pods.pop(name, None)
        else:
            self.pods[name] = view
        self._index()

    def namespace_event(self, kind: str, namespace: str, labels: dict[str, str]) -> None:
        if kind == "DELETED":
            self.namespaces.pop(namespace, None)
        else:
            self.namespaces[namespace] = labels
        self._index()

    def _index(self) -> None:
        by_ip: dict[str, Peer] = {}
        nodes: dict[str, MeshNode] = {}
        for name, view in self.pods.items():
            if not view.node or view.host_network or view.phase in ("Succeeded", "Failed"):
                continue
            namespace = name.split("/", 1)[0]
            if not opted_in(view.labels, self.namespaces.get(namespace, {})):
                continue
            peer = Peer(name, view.node, view.service_account or "default")
            for ip in view.ips:
                by_ip[ip] = peer
            nodes.setdefault(view.node, MeshNode(view.node, ()))
        nodes.setdefault(self.me, MeshNode(self.me, ()))
        self.by_ip, self.nodes = by_ip, nodes
        self._write_modes()

    def _write_modes(self) -> None:
        if self.state_dir is None:
            return
        modes = {
            "namespaces": {ns: labels[MTLS_LABEL] for ns, labels in sorted(self.namespaces.items())
                           if labels.get(MTLS_LABEL) in MODES},
            "pods": {name: view.labels[MTLS_LABEL] for name, view in sorted(self.pods.items())
                     if view.labels.get(MTLS_LABEL) in MODES},
        }  # fmt: skip
        if modes == self._modes_written:
            return
        path = self.state_dir / MODES_FILE
        tmp = path.with_name(f".{MODES_FILE}.tmp")
        tmp.write_text(json.dumps(modes, indent=1))
        os.replace(tmp, path)
        self._modes_written = modes

    # -- read by the mesh ----------------------------------------------------
    def node_of(self, ip: str) -> MeshNode | None:
        peer = self.by_ip.get(ip.split("%")[0])
        return self.nodes.get(peer.node) if peer is not None else None

    def holds(self, node: MeshNode, ip: str) -> bool:
        peer = self.by_ip.get(ip)
        return peer is not None and peer.node == node.name

    def workload(self, pod: str) -> str:
        view = self.pods.get(pod)
        namespace = pod.split("/", 1)[0]
        account = (view.service_account if view is not None else "") or "default"
        return str(kube_pod_id(self.trust_domain, namespace, account))

    def check_source(self, peer_node: str, peer_ip: str, claimed: SpiffeId) -> str | None:
        peer = self.by_ip.get(peer_ip)
        if peer is None or peer.node != peer_node:
            return f"{peer_ip} is no meshed pod of node {peer_node}"
        namespace = peer.name.split("/", 1)[0]
        if str(claimed) != str(kube_pod_id(self.trust_domain, namespace, peer.service_account)):
            return f"node {peer_node} asserted {claimed} for {peer.name}, whose identity it is not"
        return None

    def mode(self, pod: str) -> str:
        view = self.pods.get(pod)
        namespace = pod.split("/", 1)[0]
        return mode_of(view.labels if view else {}, self.namespaces.get(namespace, {}))

    def to_dict(self) -> dict:
        out = super().to_dict()
        per_node: dict[str, int] = {}
        for peer in self.by_ip.values():
            per_node[peer.node] = per_node.get(peer.node, 0) + 1
        out["nodes"] = {
            name: {"meshed_addresses": count} for name, count in sorted(per_node.items())
        }
        return out


def strict_at_add(state_dir: Path, namespace: str, name: str) -> bool:
    """Is pod NAMESPACE/NAME strict, as the agent last wrote the labels?"""
    try:
        modes = json.loads((Path(state_dir) / MODES_FILE).read_text())
    except (OSError, ValueError):
        return False
    own = (modes.get("pods") or {}).get(f"{namespace}/{name}")
    if own in MODES:
        return own == "strict"
    return (modes.get("namespaces") or {}).get(namespace) == "strict"
