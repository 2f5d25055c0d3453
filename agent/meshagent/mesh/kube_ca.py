"""The identity service on Kubernetes (`meshagent ca serve`, the Deployment
of deploy/mesh.yaml): the only holder of the mesh CA's key, which it keeps
in a Secret. It signs a node agent's key for that agent's node, and for
nothing else, after asking the API server who is asking:

1. the request carries the agent's ServiceAccount token, projected with
   the audience `meshagent-ca` (the kubelet binds it to the agent's pod);
2. a TokenReview (audience meshagent-ca) says it is valid, that its user
   is the agent's ServiceAccount, and names the pod it is bound to;
3. that pod (same UID) runs on node N: the certificate says
   spiffe://DOMAIN/meshagent/node/N, whatever the request asked.

The agent sends a CSR (PKCS#10): its key never leaves its node. The
service's own TLS certificate is signed by the same CA for the name
meshagent-ca.NAMESPACE.svc; agents trust the CA certificate the service
publishes in the ConfigMap meshagent-ca-root (read through the API
server, which they already trust). Refusals are counted by reason and
logged with the pod and node they name.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshagent import log
from meshagent.errors import MeshError
from meshagent.mesh import ca as mesh_ca
from meshagent.mesh.identity import check_trust_domain, node_id

AUDIENCE = "meshagent-ca"
PORT = 15012
SECRET = "meshagent-ca"  # ca.key, ca.crt
ROOT_CONFIGMAP = "meshagent-ca-root"  # ca.crt, trustDomain
SERVICE = "meshagent-ca"
APP_LABEL = "app.kubernetes.io/name=meshagent-ca"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"
MAX_BODY = 16384


def service_name(namespace: str) -> str:
    """The DNS name in the service's certificate, checked by agents."""
    return f"{SERVICE}.{namespace}.svc"


class Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass
class Authority:
    key: object
    cert: object
    cert_pem: bytes
    trust_domain: str


def _client():
    from lightkube import Client, KubeConfig

    return Client(config=KubeConfig.from_env(), field_manager="meshagent-ca")


def ensure_ca(client, namespace: str, trust_domain: str) -> Authority:
    """The CA from the Secret; made (once, by whichever replica is first)
    when there is none. Its certificate is published in the ConfigMap."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from lightkube import ApiError
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import ConfigMap, Secret

    check_trust_domain(trust_domain)
    try:
        secret = client.get(Secret, SECRET, namespace=namespace)
    except ApiError as exc:
        if exc.status.code != 404:
            raise
        with tempfile.TemporaryDirectory() as tmp:
            mesh_ca.init(Path(tmp) / "ca", trust_domain)
            data = {name: base64.b64encode((Path(tmp) / "ca" / name).read_bytes()).decode()
                    for name in (mesh_ca.CA_KEY, mesh_ca.CA_CERT)}  # fmt: skip
        meta = ObjectMeta(name=SECRET, namespace=namespace,
                          labels={"app.kubernetes.io/name": "meshagent-ca"})  # fmt: skip
        try:
            client.create(Secret(metadata=meta, type="Opaque", data=data))
        except ApiError as exc2:
            if exc2.status.code != 409:  # another replica made it first: take that one
                raise
        secret = client.get(Secret, SECRET, namespace=namespace)
    data = secret.data or {}
    try:
        key_pem = base64.b64decode(data[mesh_ca.CA_KEY])
        cert_pem = base64.b64decode(data[mesh_ca.CA_CERT])
        key = serialization.load_pem_private_key(key_pem, None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (KeyError, ValueError) as exc:
        raise MeshError(f"Secret {namespace}/{SECRET}: no usable CA ({exc})") from None
    domain = mesh_ca.trust_domain_of(cert)
    if domain != trust_domain:
        raise MeshError(
            f"Secret {namespace}/{SECRET} holds a CA of {domain}, not {trust_domain}:"
            " delete the Secret to make a new CA, or give --trust-domain " + domain
        )
    root = ConfigMap(
        metadata=ObjectMeta(name=ROOT_CONFIGMAP, namespace=namespace,
                            labels={"app.kubernetes.io/name": "meshagent-ca"}),
        data={"ca.crt": cert_pem.decode(), "trustDomain": domain},
    )  # fmt: skip
    try:
        client.create(root)
    except ApiError as exc:
        if exc.status.code != 409:
            raise
        client.replace(root)
    return Authority(key, cert, cert_pem, domain)


class Signer:
    """Checks a request's token and signs the node certificate it may have."""

    def __init__(self, client, authority: Authority, agent_user: str, hours: float) -> None:
        self.client = client
        self.authority = authority
        self.agent_user = agent_user  # system:serviceaccount:NS:SA
        self.hours = hours
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.log = log.get()

    def node_of(self, token: str) -> tuple[str, str]:
        """(node, pod) the token is bound to, or Refused."""
        from lightkube import ApiError
        from lightkube.models.authentication_v1 import TokenReviewSpec
        from lightkube.resources.authentication_v1 import TokenReview
        from lightkube.resources.core_v1 import Pod

        review = self.client.create(TokenReview(spec=TokenReviewSpec(token=token,
                                                                     audiences=[AUDIENCE])))  # fmt: skip
        status = review.status
        if status is None or not status.authenticated:
            why = (status.error if status is not None else None) or "not authenticated"
            raise Refused(401, "token_invalid", f"the token is not valid for {AUDIENCE}: {why}")
        user = status.user
        if user.username != self.agent_user:
            raise Refused(
                403, "not_agent", f"{user.username} is not the node agent ({self.agent_user})"
            )
        extra = user.extra or {}
        pod_name = (extra.get(POD_NAME_KEY) or [""])[0]
        pod_uid = (extra.get(POD_UID_KEY) or [""])[0]
        if not pod_name:
            raise Refused(
                403,
                "token_unbound",
                "the token is bound to no pod (project it with audience meshagent-ca)",
            )
        namespace = self.agent_user.split(":")[2]
        try:
            pod = self.client.get(Pod, pod_name, namespace=namespace)
        except ApiError as exc:
            raise Refused(
                403, "pod_unknown", f"pod {namespace}/{pod_name}: {exc.status.code}"
            ) from None
        if pod.metadata.uid != pod_uid:
            raise Refused(
                403, "pod_replaced", f"pod {namespace}/{pod_name} is not the token's (UID)"
            )
        node = (pod.spec.nodeName if pod.spec is not None else None) or ""
        if not node:
            raise Refused(403, "pod_unscheduled", f"pod {namespace}/{pod_name} has no node")
        return node, f"{namespace}/{pod_name}"

    def sign(self, token: str, csr_pem: bytes) -> dict:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise Refused(400, "bad_csr", "the body is no PEM certificate request") from None
        if not csr.is_signature_valid:
            raise Refused(400, "bad_csr", "the request's signature does not match its key")
        node, pod = self.node_of(token)
        a = self.authority
        ident = str(node_id(a.trust_domain, node))
        cert = mesh_ca.sign(a.key, a.cert, csr.public_key(), node, uri=ident, hours=self.hours)
        end = cert.not_valid_after.replace(tzinfo=dt.UTC).isoformat(timespec="seconds")
        self.log.info("signed a node certificate",
                      extra={"node": node, "pod": pod, "identity": ident, "not_after": end})  # fmt: skip
        return {
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
            "ca": a.cert_pem.decode(),
            "identity": ident,
            "node": node,
            "not_after": end,
        }

    def count(self, result: str) -> None:
        with self.lock:
            self.counts[result] += 1


def _handler(signer: Signer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # the TLS handshake and the request, in the handler's thread

        def log_message(self, fmt: str, *args) -> None:  # the service logs its own lines
            return

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._reply(200, {"ok": True})
            elif self.path == "/stats":
                with signer.lock:
                    self._reply(200, dict(signer.counts))
            else:
                self._reply(404, {"error": "not_found"})

        def do_POST(self) -> None:
            if self.path != "/v1/sign":
                self._reply(404, {"error": "not_found"})
                return
            auth = self.headers.get("Authorization", "")
            length = int(self.headers.get("Content-Length") or 0)
            if not auth.startswith("Bearer ") or not 0 < length <= MAX_BODY:
                signer.count("bad_request")
                self._reply(400, {"error": "bad_request",
                                  "detail": "POST a PEM CSR with Authorization: Bearer TOKEN"})  # fmt: skip
                return
            body = self.rfile.read(length)
            try:
                result = signer.sign(auth[len("Bearer ") :].strip(), body)
            except Refused as exc:
                signer.count(exc.reason)
                signer.log.warning("refused a certificate request",
                                   extra={"reason": exc.reason, "detail": exc.detail,
                                          "peer": self.client_address[0]})  # fmt: skip
                self._reply(exc.status, {"error": exc.reason, "detail": exc.detail})
                return
            except Exception as exc:  # the API server failed us: say so, keep serving
                signer.count("internal")
                signer.log.warning("certificate request failed",
                                   extra={"reason": "internal", "detail": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                self._reply(503, {"error": "internal", "detail": str(exc)})
                return
            signer.count("signed")
            self._reply(200, result)

    return Handler


def serve(namespace: str, trust_domain: str, agent_account: str, port: int = PORT,
          hours: float = 24.0) -> None:  # fmt: skip
    """Run until killed."""
    client = _client()
    authority = ensure_ca(client, namespace, trust_domain)
    own_key = mesh_ca._key()
    own = mesh_ca.sign(authority.key, authority.cert, own_key.public_key(), SERVICE,
                       dns=service_name(namespace), hours=24 * 365)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        key_path, cert_path = Path(tmp) / "tls.key", Path(tmp) / "tls.crt"
        mesh_ca._write(key_path, mesh_ca._pem_key(own_key), secret=True)
        mesh_ca._write(cert_path, mesh_ca._pem_cert(own), secret=False)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert_path, key_path)
    signer = Signer(client, authority, f"system:serviceaccount:{agent_account}", hours)
    server = ThreadingHTTPServer(("", port), _handler(signer))
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    signer.log.info("identity service ready",
                    extra={"trust_domain": authority.trust_domain, "port": port,
                           "agents": agent_account, "pid": os.getpid()})  # fmt: skip
    server.serve_forever()
