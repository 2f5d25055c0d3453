"""A node agent's certificate on Kubernetes (`meshagent run --mesh kube`):
asked of the identity service (mesh/kube_ca.py), kept current.

In a thread of its own, the agent
1. reads the ConfigMap meshagent-ca-root through the API server: the
   mesh's CA certificate and trust domain;
2. finds a running identity service pod (label
   app.kubernetes.io/name=meshagent-ca in the agent's namespace) and
   connects to it by address, verifying its certificate against that CA
   for the name meshagent-ca.NAMESPACE.svc;
3. makes a new key, sends a CSR with its projected ServiceAccount token
   (audience meshagent-ca), and writes node.key, node.crt, ca.crt into its
   certificate directory, where NodeCerts reads them (new connections take
   them; running ones keep going);
4. does it again at half the certificate's life, sooner after a failure
   (backoff 1 s doubling to 30 s; each distinct reason logged once).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from meshagent import log
from meshagent.mesh import ca as mesh_ca
from meshagent.mesh import kube_ca

TOKEN = Path("/var/run/secrets/meshagent/token")
BACKOFF_MAX = 30.0
TIMEOUT = 10.0


@dataclass
class Enrolled:
    trust_domain: str
    identity: str
    not_after: float  # epoch seconds


class EnrollError(Exception):
    pass


class Enroller:
    def __init__(self, client, namespace: str, out: Path, token: Path, on_cert,
                 cached_until: float | None = None) -> None:  # fmt: skip
        self.client = client
        # A certificate left by an earlier agent of this node, good until
        # then (epoch seconds): renewed at half its remaining life, not at
        # once (restarts do not all ask the identity service at once).
        self.cached_until = cached_until  # lightkube Client (the agent's ServiceAccount)
        self.namespace = namespace
        self.out = Path(out)
        self.token = Path(token)
        self.on_cert = on_cert  # called (in this thread) with an Enrolled
        self.stopping = threading.Event()
        self.state = "starting"
        self.last: Enrolled | None = None
        self.enrolments = 0
        self.failures = 0
        self.log = log.get()

    def start(self) -> None:
        threading.Thread(target=self._run, name="mesh-enroll", daemon=True).start()

    def close(self) -> None:
        self.stopping.set()

    def snapshot(self) -> dict:
        return {"state": self.state, "enrolments": self.enrolments, "failures": self.failures,
                "service": f"{kube_ca.SERVICE}.{self.namespace}"}  # fmt: skip

    def _run(self) -> None:
        backoff = 1.0
        said = ""
        if self.cached_until is not None:
            self.state = "using the certificate an earlier agent of this node got"
            self.stopping.wait(max(0.0, (self.cached_until - time.time()) / 2))
        while not self.stopping.is_set():
            try:
                got = self.enroll_once()
            except Exception as exc:  # keep trying whatever happens; say why once
                self.failures += 1
                why = str(exc) if isinstance(exc, EnrollError) else f"{type(exc).__name__}: {exc}"
                self.state = f"retrying: {why}"
                if why != said:
                    self.log.warning("no node certificate from the identity service yet",
                                     extra={"reason": why})  # fmt: skip
                    said = why
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff, said = 1.0, ""
            self.last = got
            self.enrolments += 1
            self.state = f"enrolled until {dt.datetime.fromtimestamp(got.not_after, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
            self.on_cert(got)
            # Again at half the remaining life (at least 5 s apart).
            self.stopping.wait(max(5.0, (got.not_after - time.time()) / 2))

    # -- one round -------------------------------------------------------------
    def root(self) -> tuple[bytes, str]:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import ConfigMap

        try:
            cm = self.client.get(ConfigMap, kube_ca.ROOT_CONFIGMAP, namespace=self.namespace)
        except ApiError as exc:
            raise EnrollError(
                f"ConfigMap {self.namespace}/{kube_ca.ROOT_CONFIGMAP}: {exc.status.code}"
                " (is the identity service of deploy/mesh.yaml running?)"
            ) from None
        data = cm.data or {}
        if "ca.crt" not in data or "trustDomain" not in data:
            raise EnrollError(f"ConfigMap {kube_ca.ROOT_CONFIGMAP} lacks ca.crt or trustDomain")
        return data["ca.crt"].encode(), data["trustDomain"]

    def addresses(self) -> list[str]:
        from lightkube.resources.core_v1 import Pod

        out = []
        for pod in self.client.list(Pod, namespace=self.namespace, labels={
                "app.kubernetes.io/name": "meshagent-ca"}):  # fmt: skip
            st = pod.status
            ready = (
                any(c.type == "Ready" and c.status == "True" for c in (st.conditions or []))
                if st
                else False
            )
            if st is not None and st.podIP and ready:
                out.append(st.podIP)
        if not out:
            raise EnrollError(f"no ready identity service pod in namespace {self.namespace}")
        return out

    def enroll_once(self) -> Enrolled:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        try:
            token = self.token.read_text().strip()
        except OSError as exc:
            raise EnrollError(
                f"{self.token}: {exc.strerror} (the projected token volume)"
            ) from None
        ca_pem, domain = self.root()
        key = mesh_ca._key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
        reply = None
        errors = []
        for ip in self.addresses():
            try:
                reply = self._post(ip, ca_pem, token, csr)
                break
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                errors.append(f"{ip}: {exc}")
        if reply is None:
            raise EnrollError("identity service unreachable: " + "; ".join(errors))
        cert_pem = reply["certificate"].encode()
        cert = x509.load_pem_x509_certificate(cert_pem)
        mesh_ca.write_node(self.out, mesh_ca._pem_key(key), cert_pem, ca_pem)
        end = cert.not_valid_after.replace(tzinfo=dt.UTC).timestamp()
        self.log.info("node certificate from the identity service",
                      extra={"identity": reply["identity"], "not_after": reply["not_after"]})  # fmt: skip
        return Enrolled(domain, reply["identity"], end)

    def _post(self, ip: str, ca_pem: bytes, token: str, csr: bytes) -> dict:
        ctx = ssl.create_default_context()
        ctx.load_verify_locations(cadata=ca_pem.decode())
        name = kube_ca.service_name(self.namespace)
        conn = http.client.HTTPSConnection(ip, kube_ca.PORT, timeout=TIMEOUT, context=ctx)
        # The address is the pod's; the name checked is the service's.
        conn.sock = ctx.wrap_socket(
            socket.create_connection((ip, kube_ca.PORT), timeout=TIMEOUT), server_hostname=name
        )
        try:
            conn.request("POST", "/v1/sign", body=csr, headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/pkcs10"})  # fmt: skip
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        try:
            doc = json.loads(body)
        except ValueError:
            raise EnrollError(f"identity service at {ip}: {resp.status}, not JSON") from None
        if resp.status != 200:
            raise EnrollError(
                f"identity service refused ({resp.status} {doc.get('error')}): {doc.get('detail')}"
            )
        return doc
