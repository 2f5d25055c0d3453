"""This node's certificate, key and CA bundle (a directory: node.crt,
node.key, ca.crt, as `meshagent ca issue` writes them), made into TLS
contexts; read again when the files change, for new connections only."""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from meshagent.errors import MeshError
from meshagent.mesh.ca import CA_CERT, NODE_CERT, NODE_KEY, describe
from meshagent.mesh.identity import SpiffeId

LOOK_EVERY = 1.0  # seconds between two looks at the files' times


@dataclass
class Contexts:
    client: ssl.SSLContext
    server: ssl.SSLContext
    identity: SpiffeId
    not_after: str
    serial: str
    stamp: tuple


def _stamp(directory: Path) -> tuple:
    out = []
    for name in (NODE_CERT, NODE_KEY, CA_CERT):
        try:
            st = os.stat(directory / name)
        except FileNotFoundError:
            raise MeshError(f"{directory / name} is missing (meshagent ca issue)") from None
        out.append((st.st_mtime_ns, st.st_ino, st.st_size))
    return tuple(out)


def _context(side: int, directory: Path, kernel_tls: bool = False) -> ssl.SSLContext:
    from meshagent.mesh.ktls import tune

    ctx = ssl.SSLContext(side)
    tune(ctx, kernel_tls)  # 1.3 in OpenSSL, or 1.2 with the kernel's TLS
    ctx.verify_mode = ssl.CERT_REQUIRED
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # peers are named by SPIFFE ID, checked by the hop
    else:
        # Sessions resume (a ticket per handshake): TLS 1.2 sends its ticket
        # within the handshake; TLS 1.3 after it, which the kernel's TLS
        # would take for the stream, so only the OpenSSL mode asks for one.
        ctx.num_tickets = 0 if kernel_tls else 1
    try:
        ctx.load_cert_chain(directory / NODE_CERT, directory / NODE_KEY)
        ctx.load_verify_locations(cafile=str(directory / CA_CERT))
    except ssl.SSLError as exc:
        raise MeshError(f"certificates in {directory}: {exc.reason or exc}") from None
    except OSError as exc:
        raise MeshError(f"certificates in {directory}: {exc.strerror}: {exc.filename}") from None
    return ctx


class NodeCerts:
    """The node's TLS contexts, current with the files."""

    def __init__(
        self, directory: Path, trust_domain: str, node: str, kernel_tls: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.kernel_tls = kernel_tls
        self.trust_domain = trust_domain
        self.node = node
        self.loaded_at = 0.0
        self.reloads = 0
        self.reload_errors = 0
        self.last_error: str | None = None
        self.contexts = self._load()

    def _load(self) -> Contexts:
        stamp = _stamp(self.directory)
        info = describe(self.directory / NODE_CERT)
        ident = SpiffeId.parse(info["identity"] or "")
        if ident.trust_domain != self.trust_domain or ident.node != self.node or not ident.is_node:
            raise MeshError(
                f"{self.directory / NODE_CERT} is {ident}, not node {self.node} of trust"
                f" domain {self.trust_domain} (meshagent ca issue {self.node})"
            )
        client = _context(ssl.PROTOCOL_TLS_CLIENT, self.directory, self.kernel_tls)
        server = _context(ssl.PROTOCOL_TLS_SERVER, self.directory, self.kernel_tls)
        self.loaded_at = time.monotonic()
        return Contexts(client, server, ident, info["not_after"], info["serial"], stamp)

    def current(self) -> Contexts:
        """The contexts for a new connection: loaded again when the files
        changed; while new files are bad, the last good ones stay."""
        now = time.monotonic()
        if now - self.loaded_at < LOOK_EVERY:
            return self.contexts
        self.loaded_at = now
        try:
            if _stamp(self.directory) != self.contexts.stamp:
                self.contexts = self._load()
                self.reloads += 1
                self.last_error = None
        except (MeshError, ValueError, OSError) as exc:
            self.reload_errors += 1
            self.last_error = str(exc)
        return self.contexts

    def not_after_epoch(self) -> float:
        import datetime as dt

        return dt.datetime.fromisoformat(self.contexts.not_after).timestamp()

    def snapshot(self) -> dict:
        c = self.contexts
        return {
            "identity": str(c.identity),
            "not_after": c.not_after,
            "serial": c.serial,
            "directory": str(self.directory),
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
            "last_error": self.last_error,
        }
