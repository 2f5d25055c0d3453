"""Kernel mode's pure parts: what mesh_kfwd holds, and how a record's end
reads (closed, reset or failed; who closed first)."""

from __future__ import annotations

import errno
import ipaddress

from meshagent.bpf import abi
from meshagent.forwarder.kernel_conns import forwarded_networks, outcome
from meshagent.mesh.kubeview import KubeMeshView, Peer
from meshagent.mesh.meshfile import MeshNode, MeshView


def test_other_nodes_pods_and_pods_with_ingress_rules_are_forwarded():
    net = ipaddress.ip_network
    view = MeshView("mesh.test", "node-a", {
        "node-a": MeshNode("node-a", (net("10.244.1.0/24"),)),
        "node-b": MeshNode("node-b", (net("10.244.2.0/24"), net("fd00:2::/64"))),
    })  # fmt: skip
    assert forwarded_networks(view, ["10.244.1.7"]) == ["10.244.2.0/24", "fd00:2::/64",
                                                        "10.244.1.7"]  # fmt: skip
    kube = KubeMeshView("cluster.local", "node-a")
    kube.by_ip = {"10.0.0.5": Peer("shop/db", "node-b", "db"),
                  "10.0.0.6": Peer("shop/web", "node-a", "web")}  # fmt: skip
    assert forwarded_networks(kube, []) == ["10.0.0.5"]  # not this node's own
    assert forwarded_networks(None, []) == []  # no mesh, no ingress rules: all direct


def test_a_records_end_reads_as_a_forwarded_connections_would():
    up, fin_out, fin_in, exact = abi.KC_UP, abi.KC_FIN_OUT, abi.KC_FIN_IN, abi.KC_EXACT
    assert outcome(up | fin_out | fin_in | exact, 0, 1, 5) == ("closed", None, "pod")
    assert outcome(up | fin_in | exact, 0, 2, 9) == ("closed", None, "upstream")
    assert outcome(up | exact, errno.ECONNRESET, 0, 1) == (
        "reset",
        "reset by upstream (ECONNRESET)",
        "upstream",
    )
    assert outcome(up | exact, 0, 0, 1) == ("reset", "reset by pod", "pod")
    assert outcome(up, 0, 0, 1) == ("reset", "reset (from established)", None)  # no BTF
    assert outcome(exact, errno.ECONNREFUSED, 0, 2) == ("failed", "connect: ECONNREFUSED", None)
    assert outcome(0, 0, 0, 2) == ("failed", "connect: closed before it was up", None)
