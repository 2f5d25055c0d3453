"""The mesh CA of a standalone mesh (`meshagent ca init`, `meshagent ca
issue`): ECDSA P-256 keys, X.509 certificates whose only name is a SPIFFE
ID (a URI SAN). The CA key stays where `ca init` wrote it; a node gets its
own key, its certificate and the CA's certificate, nothing else.

A node's certificate is short-lived (24 hours unless asked): issue a new
one before it ends; the agent reads the files again when they change, and
connections already running keep going (a TLS session does not need the
certificate once it is up).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.mesh.identity import SpiffeId, check_trust_domain, node_id

CA_KEY, CA_CERT = "ca.key", "ca.crt"
NODE_KEY, NODE_CERT = "node.key", "node.crt"
SKEW = dt.timedelta(minutes=5)  # certificates start a little in the past: clocks differ


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write whole or not at all; a secret is never readable by others."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def init(directory: Path, trust_domain: str, days: int = 365) -> Path:
    """A new CA in directory (ca.key, ca.crt); refuses to overwrite one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    check_trust_domain(trust_domain)
    if not 1 <= days <= 3650:
        raise MeshError("--days: between 1 and 3650")
    directory = Path(directory)
    if (directory / CA_KEY).exists():
        raise MeshError(f"{directory / CA_KEY} exists: a CA is there already")
    directory.mkdir(parents=True, exist_ok=True)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    # Two CAs of one trust domain never share a name: a certificate of the
    # other is then "of an unknown CA", not "of a bad signature".
    tag = os.urandom(4).hex()
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"meshagent CA {trust_domain} {tag}")]
    )
    uri = x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _pem_key(key), secret=True)
    _write(directory / CA_CERT, _pem_cert(cert), secret=False)
    return directory


@dataclass
class Issued:
    identity: str
    not_after: str
    directory: Path


def _load_ca(directory: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise MeshError(
            f"no CA at {directory}: {exc.filename} is missing (meshagent ca init)"
        ) from None
    except ValueError as exc:
        raise MeshError(f"CA at {directory}: {exc}") from None
    return key, cert


def trust_domain_of(cert) -> str:
    from cryptography import x509

    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise MeshError("the CA certificate names no trust domain (URI SAN)") from None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://") :].rstrip("/")
    raise MeshError("the CA certificate names no trust domain (spiffe:// URI SAN)")


def sign(
    ca_key,
    ca_cert,
    public_key,
    name: str,
    uri: str | None = None,
    dns: str | None = None,
    hours: float = 24.0,
    not_before: dt.datetime | None = None,
):
    """A certificate for public_key, signed by the CA: its name a SPIFFE
    URI (a node) or a DNS name (the identity service's own)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = not_before or dt.datetime.now(dt.UTC) - SKEW
    end = start + SKEW + dt.timedelta(hours=hours)
    names: list = [x509.UniformResourceIdentifier(uri)] if uri else []
    names += [x509.DNSName(dns)] if dns else []
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=bool(uri))
        .sign(ca_key, hashes.SHA256())
    )


def write_node(out: Path, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
    """A node's three files, each replaced whole; the key first, so that a
    reader that sees the new certificate finds its key."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / NODE_KEY, key_pem, secret=True)
    _write(out / CA_CERT, ca_pem, secret=False)
    _write(out / NODE_CERT, cert_pem, secret=False)


def issue(
    ca_dir: Path,
    node: str,
    out: Path,
    hours: float = 24.0,
    not_before: dt.datetime | None = None,
) -> Issued:
    """Node NODE's key and certificate, and the CA's certificate, into out
    (node.key, node.crt, ca.crt), each file replaced whole."""
    if not 0 < hours <= 24 * 366:
        raise MeshError("--hours: more than 0, at most a year")
    ca_dir = Path(ca_dir)
    ca_key, ca_cert = _load_ca(ca_dir)
    ident = node_id(trust_domain_of(ca_cert), node)
    key = _key()
    cert = sign(ca_key, ca_cert, key.public_key(), node, uri=str(ident), hours=hours,
                not_before=not_before)  # fmt: skip
    write_node(out, _pem_key(key), _pem_cert(cert), (ca_dir / CA_CERT).read_bytes())
    end = cert.not_valid_after.replace(tzinfo=dt.UTC)
    return Issued(str(ident), end.isoformat(timespec="seconds"), Path(out))


def describe(cert_path: Path) -> dict:
    """What a node certificate says: its identity and validity."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    ident = SpiffeId.parse(uris[0]) if uris else None
    return {
        "identity": str(ident) if ident else None,
        "not_before": cert.not_valid_before.replace(tzinfo=dt.UTC).isoformat(),
        "not_after": cert.not_valid_after.replace(tzinfo=dt.UTC).isoformat(),
        "serial": format(cert.serial_number, "x"),
    }
