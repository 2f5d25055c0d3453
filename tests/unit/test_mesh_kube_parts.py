"""The mesh's Kubernetes parts that need no API server: the view the watch
feeds (who is meshed where, which identity a node may assert, the modes),
the mode file the CNI plugin reads, and the identity service's checks of a
TokenReview's answer (a fake of the API client's two calls; the real API
server is in tests/integration/test_kube_mesh.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from meshagent.kube.autoattach import PodView
from meshagent.mesh import ca, kube_ca, strict
from meshagent.mesh.identity import SpiffeId
from meshagent.mesh.kubeview import MODES_FILE, KubeMeshView, strict_at_add

ATTACH = {"meshagent.io/attach": "true"}
OUT = {"meshagent.io/attach": "false"}


def _view(tmp_path=None) -> KubeMeshView:
    view = KubeMeshView("cluster.local", "node-a")
    view.state_dir = tmp_path
    view.replace_all(
        {
            "shop/web": PodView("u1", {}, "Running", "node-b", ("10.244.1.5",), "web"),
            "shop/client": PodView("u2", {}, "Running", "node-a", ("10.244.0.7",), ""),
            "shop/done": PodView("u3", {}, "Succeeded", "node-b", ("10.244.1.9",), ""),
            "plain/x": PodView("u4", {}, "Running", "node-b", ("10.244.1.6",), ""),
            "plain/opted": PodView("u5", ATTACH, "Running", "node-b", ("10.244.1.8",), ""),
            "shop/out": PodView("u6", OUT, "Running", "node-b", ("10.244.1.10",), ""),
            "shop/host": PodView("u7", {}, "Running", "node-b", ("10.250.0.2",), "", True),
        },
        {"shop": {**ATTACH, "meshagent.io/mtls": "strict"}, "plain": {}},
    )
    return view


def test_the_view_places_meshed_pods_on_their_nodes():
    view = _view()
    assert view.remote("10.244.1.5").name == "node-b"
    assert view.remote("10.244.0.7") is None  # this node's own
    assert view.remote("10.244.1.8").name == "node-b"  # opted in by its own label
    for ip in ("10.244.1.6", "10.244.1.9", "10.244.1.10", "10.250.0.2", "10.9.9.9"):
        assert view.remote(ip) is None, ip  # unmeshed, finished, opted out, host network, unknown
    view.pod_event("DELETED", "shop/web", PodView("u1"))
    assert view.remote("10.244.1.5") is None


def test_a_node_may_assert_only_the_identity_of_a_pod_the_api_places_on_it():
    view = _view()
    web = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
    assert view.check_source("node-b", "10.244.1.5", web) is None
    # the address is a pod of another node, or of none
    assert "no meshed pod of node node-a" in view.check_source("node-a", "10.244.1.5", web)
    assert "no meshed pod" in view.check_source("node-b", "10.244.1.6", web)
    # the right pod, another workload's identity
    other = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/admin")
    assert "whose identity it is not" in view.check_source("node-b", "10.244.1.5", other)
    assert view.workload("shop/client") == "spiffe://cluster.local/ns/shop/sa/default"


def test_modes_come_from_the_pod_else_its_namespace_and_reach_the_cni_plugin(tmp_path):
    view = _view(tmp_path)
    assert view.mode("shop/web") == "strict"
    assert view.mode("plain/opted") == "permissive"
    assert strict_at_add(tmp_path, "shop", "new-pod")  # the namespace's label
    assert not strict_at_add(tmp_path, "plain", "new-pod")
    view.pod_event("MODIFIED", "shop/web",
                   PodView("u1", {"meshagent.io/mtls": "permissive"}, "Running", "node-b",
                           ("10.244.1.5",), "web"))  # fmt: skip
    assert view.mode("shop/web") == "permissive"
    assert not strict_at_add(tmp_path, "shop", "web")  # the pod's own label wins
    written = json.loads((tmp_path / MODES_FILE).read_text())
    assert written == {"namespaces": {"shop": "strict"}, "pods": {"shop/web": "permissive"}}
    assert not strict_at_add(tmp_path / "nowhere", "shop", "web")  # no file: no rules


class FakeApi:
    """The identity service's two API calls: TokenReview create, Pod get."""

    def __init__(self, review: dict, pod: dict | None) -> None:
        self.review, self.pod = review, pod

    def create(self, obj):
        user = SimpleNamespace(**self.review.get("user", {}))
        return SimpleNamespace(status=SimpleNamespace(
            authenticated=self.review.get("authenticated", True), error=None, user=user))  # fmt: skip

    def get(self, _kind, name, namespace):
        assert self.pod is not None, "a refused token's pod is not asked for"
        return SimpleNamespace(metadata=SimpleNamespace(uid=self.pod["uid"]),
                               spec=SimpleNamespace(nodeName=self.pod["node"]))  # fmt: skip


AGENT = "system:serviceaccount:meshagent:meshagent"
BOUND = {kube_ca.POD_NAME_KEY: ["meshagent-x"], kube_ca.POD_UID_KEY: ["uid-1"]}


@pytest.fixture(scope="module")
def authority(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = ca.init(tmp_path_factory.mktemp("ca") / "ca", "cluster.local")
    key = serialization.load_pem_private_key((d / ca.CA_KEY).read_bytes(), None)
    pem = (d / ca.CA_CERT).read_bytes()
    return kube_ca.Authority(key, x509.load_pem_x509_certificate(pem), pem, "cluster.local")


def _csr() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(ca._key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))  # fmt: skip


@pytest.mark.parametrize(
    ("review", "pod", "reason"),
    [
        ({"authenticated": False}, None, "token_invalid"),
        ({"user": {"username": "system:serviceaccount:plain:default", "extra": BOUND}}, None,
         "not_agent"),
        ({"user": {"username": AGENT, "extra": {}}}, None, "token_unbound"),
        ({"user": {"username": AGENT, "extra": BOUND}}, {"uid": "uid-2", "node": "n1"},
         "pod_replaced"),
        ({"user": {"username": AGENT, "extra": BOUND}}, {"uid": "uid-1", "node": ""},
         "pod_unscheduled"),
    ],
)  # fmt: skip
def test_the_identity_service_refuses_what_the_token_review_does_not_bind_to_a_node(
    authority, review, pod, reason
):
    signer = kube_ca.Signer(FakeApi(review, pod), authority, AGENT, 24.0)
    with pytest.raises(kube_ca.Refused) as refused:
        signer.sign("token", _csr())
    assert refused.value.reason == reason


def test_the_identity_service_signs_for_the_tokens_pod_node_whatever_was_asked(authority):
    from cryptography import x509

    review = {"user": {"username": AGENT, "extra": BOUND}}
    signer = kube_ca.Signer(FakeApi(review, {"uid": "uid-1", "node": "n1"}), authority, AGENT, 2.0)
    reply = signer.sign("token", _csr())
    assert reply["identity"] == "spiffe://cluster.local/meshagent/node/n1"
    cert = x509.load_pem_x509_certificate(reply["certificate"].encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [reply["identity"]]
    with pytest.raises(kube_ca.Refused) as bad:
        signer.sign("token", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END")
    assert bad.value.reason == "bad_csr"


def test_strict_rules_on_kubernetes_let_the_node_in_for_the_kubelets_probes():
    text = strict.render(True, 0, False, node=("10.244.0.1",))
    lines = text.splitlines()
    allow = lines.index("-A MESHAGENT-STRICT -s 10.244.0.1 -j RETURN")
    assert allow < lines.index("-A MESHAGENT-STRICT -p tcp -j REJECT --reject-with tcp-reset")
    assert "-s " not in strict.render(True, 0, False)  # standalone: nobody but the mesh
