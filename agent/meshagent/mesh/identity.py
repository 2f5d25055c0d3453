"""Workload and node identities: SPIFFE IDs.

- A Kubernetes pod: spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICEACCOUNT
- A standalone pod: spiffe://TRUST_DOMAIN/node/NODE/pod/POD (a standalone
  pod belongs to the node that made it; its name is unique there)
- A node's forwarder (its certificate): spiffe://TRUST_DOMAIN/meshagent/node/NODE

A node's certificate names the node, never a workload: the hop carries the
source workload's ID, and the receiving node checks that the mesh places
that workload on the node whose certificate it saw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshagent.errors import MeshError

_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,253}[a-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,252}")


def check_trust_domain(domain: str) -> str:
    if not _DOMAIN.fullmatch(domain or ""):
        raise MeshError(f"trust domain {domain!r}: lower-case letters, digits, '-' and '.'")
    return domain


def check_segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value or ""):
        raise MeshError(f"{what} {value!r}: letters, digits, '-', '_' and '.'")
    return value


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: tuple[str, ...]

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/" + "/".join(self.path)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not text.startswith("spiffe://"):
            raise MeshError(f"{text!r} is not a SPIFFE ID (spiffe://DOMAIN/PATH)")
        domain, _, rest = text[len("spiffe://") :].partition("/")
        check_trust_domain(domain)
        parts = tuple(rest.split("/")) if rest else ()
        for part in parts:
            check_segment(part, f"SPIFFE ID {text!r}: path segment")
        return cls(domain, parts)

    @property
    def node(self) -> str | None:
        """The node of a node's ID or of a standalone pod's ID."""
        if len(self.path) == 3 and self.path[:2] == ("meshagent", "node"):
            return self.path[2]
        if len(self.path) == 4 and self.path[0] == "node" and self.path[2] == "pod":
            return self.path[1]
        return None

    @property
    def is_node(self) -> bool:
        return len(self.path) == 3 and self.path[:2] == ("meshagent", "node")


def node_id(trust_domain: str, node: str) -> SpiffeId:
    return SpiffeId(trust_domain, ("meshagent", "node", check_segment(node, "node name")))


def standalone_pod_id(trust_domain: str, node: str, pod: str) -> SpiffeId:
    return SpiffeId(trust_domain, ("node", node, "pod", check_segment(pod, "pod name")))


def kube_pod_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId(trust_domain, ("ns", namespace, "sa", service_account))
