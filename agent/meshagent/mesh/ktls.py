"""The hop with kernel TLS: OpenSSL makes the handshake on the socket
(TLS 1.2, AEAD ciphers with forward secrecy) and hands the keys to the
kernel in both directions (OpenSSL 3.0 does receive only for TLS 1.2);
from then on the socket reads and writes plaintext and the kernel does
the cryptography. The header, the reply and the stream use the bare
socket: the stream is spliced between the pod's socket and the TLS socket
(forwarder/splice.py), so no byte of it enters Python.

Self-tested at start (`selftest()`): a TLS pair on loopback must get the
kernel's TLS in both directions and splice through it, else the hop
stays in OpenSSL (mesh/hop.py). A node with kernel TLS offers TLS 1.2
only, one without offers 1.3 and 1.2: two such nodes meet on 1.2, where
the one with kernel TLS splices.

Not yet: a half-close is the TCP FIN alone (no close_notify alert), so a
stream cut by someone on the path between two nodes ends as if whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from meshagent.forwarder.copy import Relay, reset_close
from meshagent.forwarder.splice import SOL_TLS, TCP_ULP, TlsSpliceLeg
from meshagent.host.loop import Loop
from meshagent.mesh.hop import (
    HANDSHAKE_TIMEOUT,
    LINE_MAX,
    MAGIC,
    Refused,
    Startable,
    check_reply,
    check_resumed,
    parse_header,
    peer_uri,
    resumable,
    tls_reason,
)
from meshagent.modes import DataPathMode

TLS_TX, TLS_RX = 1, 2
OP_ENABLE_KTLS = 1 << 3  # OpenSSL 3's SSL_OP_ENABLE_KTLS (Python 3.11 has no name for it)
CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305"
)
CRYPTO_INFO_SIZES = (56, 40)  # tls12_crypto_info_aes_gcm_256, _128 and chacha20 (40)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


def tune(ctx: ssl.SSLContext, kernel: bool) -> None:
    """Both sides of every node: TLS 1.2 ciphers the kernel can take; with
    kernel TLS, 1.2 only (the version OpenSSL 3.0 hands over both ways)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    if kernel:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= OP_ENABLE_KTLS


def kernel_tls_on(sock: socket.socket) -> bool:
    """The kernel holds the keys both ways (getsockopt needs the exact size)."""
    for option in (TLS_TX, TLS_RX):
        for size in CRYPTO_INFO_SIZES:
            try:
                sock.getsockopt(SOL_TLS, option, size)
                break
            except OSError:
                continue
        else:
            return False
    return True


def kernel_offers_tls() -> tuple[bool, str]:
    """(offered, how it was found): the tls ULP on a TCP socket (one not
    yet connected answers ENOTCONN when the kernel has it, ENOENT when not)."""
    probe = socket.socket()
    try:
        probe.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False, "the kernel has no TLS (CONFIG_TLS, the tls module): setsockopt TCP_ULP"
        if exc.errno != errno.ENOTCONN:
            return False, f"the kernel's TLS: {exc.strerror}"
    finally:
        probe.close()
    return True, "setsockopt TCP_ULP tls: the kernel has TLS"


def selftest(certs_dir: Path) -> tuple[bool, str]:
    """(usable, why): a TLS 1.2 pair on loopback with this node's own
    certificate, kernel TLS both ways, and 64 KiB spliced each way."""
    offered, how = kernel_offers_tls()
    if not offered:
        return False, how
    from meshagent.mesh.ca import CA_CERT, NODE_CERT, NODE_KEY

    def context(side: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(side)
        ctx.load_cert_chain(certs_dir / NODE_CERT, certs_dir / NODE_KEY)
        ctx.load_verify_locations(cafile=str(certs_dir / CA_CERT))
        ctx.verify_mode = ssl.CERT_REQUIRED
        if side == ssl.PROTOCOL_TLS_CLIENT:
            ctx.check_hostname = False
        tune(ctx, True)
        return ctx

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    found: dict = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            tls = context(ssl.PROTOCOL_TLS_SERVER).wrap_socket(conn, server_side=True)
            found["server"] = kernel_tls_on(tls)
            raw = socket.socket(fileno=tls.detach())
            raw.settimeout(10)  # a new object over the fd: its timeout is not the old one's
            got = bytearray()
            while len(got) < 65536 and (chunk := raw.recv(65536)):
                got += chunk
            raw.sendall(bytes(got))
            raw.close()
        except (OSError, ssl.SSLError) as exc:
            found["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        conn = socket.create_connection(listener.getsockname(), timeout=10)
        tls = context(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(conn)
        client_on = kernel_tls_on(tls)
        raw = socket.socket(fileno=tls.detach())
        raw.settimeout(10)
        data = os.urandom(65536)
        r, w = os.pipe()
        try:
            sent = 0
            while sent < len(data):
                n = os.write(w, data[sent : sent + 16384])
                sent += os.splice(r, raw.fileno(), n)
        finally:
            os.close(r)
            os.close(w)
        back = bytearray()
        while len(back) < len(data) and (chunk := raw.recv(65536)):
            back += chunk
        raw.close()
    except (OSError, ssl.SSLError) as exc:
        return False, f"a TLS 1.2 pair on loopback failed: {exc}"
    finally:
        thread.join(10)
        listener.close()
    if "error" in found:
        return False, f"a TLS 1.2 pair on loopback failed: {found['error']}"
    if not (client_on and found.get("server")):
        return False, "OpenSSL did not hand the keys to the kernel (built without KTLS?)"
    if bytes(back) != data:
        return False, "64 KiB spliced through kernel TLS came back different"
    return True, "self-tested at start: TLS 1.2 with the kernel's TLS both ways, spliced"


class KtlsHop(Startable):
    """A hop until its stream runs (the handshake, the header, the reply),
    then a spliced Relay between the plain socket and the TLS socket,
    whose Connection interface it passes on."""

    handoff_bytes = 0
    reused = False  # a connection per stream: links are the OpenSSL mode's
    idle = False

    def __init__(self, loop: Loop, wire: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 on_done: Callable, check_peer: Callable, plain: socket.socket | None = None,
                 header: dict | None = None, on_header: Callable | None = None,
                 on_up: Callable | None = None,
                 session: ssl.SSLSession | None = None, start: bool = True) -> None:  # fmt: skip
        self.loop = loop
        self.server_side = server_side
        self.on_done = on_done
        self.check_peer = check_peer
        self.on_header = on_header
        self.on_up = on_up
        self.plain = plain
        self.header = header
        self.peer: str | None = None
        self.source: str | None = None
        self.phase = "handshake"
        self.relay: Relay | None = None
        self.buffer = 0
        self.closed = False
        self._closed_by: str | None = None
        self.tls = ctx.wrap_socket(wire, server_side=server_side, do_handshake_on_connect=False,
                                   session=session)  # fmt: skip
        self.resumed = False
        self.session: ssl.SSLSession | None = None  # for the next hop to the same node
        self.wire: socket.socket = self.tls  # the bare socket after the handshake
        self.fd = self.tls.fileno()  # wrap_socket took the fd over from wire
        self._start_or_wait(loop, start)

    def begin(self, session: ssl.SSLSession | None = None) -> None:
        """The handshake starts (see Hop.begin)."""
        if not self._starting(session):
            return
        self.timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._too_slow)
        self.loop.add(self.fd, EPOLLIN | EPOLLOUT, self._event)

    # -- the Connection interface: the relay's once it runs ------------------
    @property
    def mode(self):
        return DataPathMode.SPLICE if self.relay is not None else "ktls"

    @property
    def settled(self) -> bool:
        return self.relay is not None

    @property
    def closed_by(self) -> str | None:
        return self.relay.closed_by if self.relay is not None else self._closed_by

    def new_session(self) -> ssl.SSLSession | None:
        return self.session

    @property
    def close_notify(self) -> dict:
        """TLS's half-close each way: ours sent, the peer's received."""
        legs = (self.relay.out, self.relay.back) if self.relay is not None else ()
        return {"sent": any(getattr(leg, "notify_sent", False) for leg in legs),
                "received": any(getattr(leg, "notified", False) for leg in legs)}  # fmt: skip

    @property
    def bytes_out(self) -> int:
        if self.relay is None:
            return 0
        return self.relay.bytes_in if self.server_side else self.relay.bytes_out

    @property
    def bytes_in(self) -> int:
        if self.relay is None:
            return 0
        return self.relay.bytes_out if self.server_side else self.relay.bytes_in

    def limit(self, buffer: int, sockets: bool = True) -> None:  # the wire's are not set yet
        self.buffer = buffer
        if self.relay is not None:
            self.relay.limit(buffer)

    def holds(self) -> int:
        return self.relay.holds() if self.relay is not None else 0

    def export(self):
        if self.relay is None:
            raise NotImplementedError("a hop in its handshake cannot be handed over")
        return self.relay.export()

    def suspend(self) -> None:
        if self.relay is not None:
            self.relay.suspend()

    def resume(self) -> None:
        if self.relay is not None:
            self.relay.resume()

    def finish(self, reason: str | None) -> None:
        if self.relay is not None:
            self.relay.finish(reason)
        else:
            self._end(reason, reset=False)

    def reset(self, reason: str) -> None:
        if self.relay is not None:
            self.relay.reset(reason)
        else:
            self._end(reason, reset=True)

    # -- the server side: the application connected ----------------------
    def connected(self, plain: socket.socket) -> None:
        if self.closed:
            reset_close(plain)
            return
        self.plain = plain
        try:
            self.wire.send(b"OK\n")  # a few bytes into an empty send buffer
        except OSError as exc:
            self.reset(f"reply: {exc.strerror}")
            return
        self._relay()

    def refuse(self, reason: str, message: str) -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError):
            self.wire.send(b"NO " + reason.encode() + b"\n")
        self.reset(f"{reason}: {message}")

    # -- before the stream --------------------------------------------------
    def _too_slow(self) -> None:
        self.timer = None
        if self.relay is None and self.phase != "connecting":
            self.reset(f"timeout: no {self.phase} within {HANDSHAKE_TIMEOUT:.0f}s")

    def _event(self, _events: int) -> None:
        if self.closed or self.relay is not None:
            return
        try:
            if self.phase == "handshake":
                self._handshake()
            elif self.phase in ("header", "reply"):
                self._read_line()
        except Refused as exc:
            self.reset(f"{exc.reason}: {exc}")
        except ssl.SSLError as exc:
            self.reset(f"{tls_reason(exc)}: TLS handshake: {getattr(exc, 'reason', None) or exc}")
        except OSError as exc:
            self.reset(f"{type(exc).__name__}: {exc.strerror or exc}")

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.modify(self.fd, EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.loop.modify(self.fd, EPOLLOUT)
            return
        self.peer = peer_uri(self.tls)
        check_resumed(self.tls)
        self.check_peer(self)
        self.resumed = self.tls.session_reused
        if not self.server_side:
            self.session = resumable(self.tls.session)  # TLS 1.2: the ticket came in the handshake
        if not kernel_tls_on(self.tls):
            raise Refused("ktls_off", "the kernel did not take this connection's keys")
        self.wire = socket.socket(fileno=self.tls.detach())  # plaintext, the kernel's TLS
        self.wire.setblocking(False)
        self.tls = None
        if self.server_side:
            self.phase = "header"
        else:
            line = MAGIC + json.dumps(self.header, separators=(",", ":")).encode() + b"\n"
            self.wire.send(line)  # one small record into an empty send buffer
            self.phase = "reply"
        self.loop.modify(self.fd, EPOLLIN)

    def _read_line(self) -> None:
        """The header or the reply, up to its newline and no further (the
        stream's first bytes stay in the socket, for the splice)."""
        try:
            peek = self.wire.recv(LINE_MAX + 1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        if not peek:
            raise Refused("closed", f"the peer closed before its {self.phase}")
        end = peek.find(b"\n")
        if end < 0:
            if len(peek) > LINE_MAX:
                raise Refused("bad_header", f"no {self.phase} line within {LINE_MAX} bytes")
            return
        line = self.wire.recv(end + 1)[:-1]
        self._cancel_timer()
        if self.server_side:
            header = parse_header(line)
            self.phase = "connecting"
            self.loop.modify(self.fd, 0)
            self.on_header(self, header)
            return
        check_reply(line)
        self._relay()

    def _relay(self) -> None:
        """The stream: spliced both ways, the kernel's TLS on the wire."""
        self._cancel_timer()
        self.loop.remove(self.fd)
        self.phase = "relay"
        # Relay's client side is the pod's socket on the client's node, the
        # application's on the server's: "out" is its client -> upstream.
        self.relay = Relay(self.loop, self.plain, self.wire, self._relay_done, TlsSpliceLeg,
                           DataPathMode.SPLICE)  # fmt: skip
        if self.buffer:
            with contextlib.suppress(OSError):
                self.relay.limit(self.buffer)
        if self.on_up is not None:
            self.on_up(self)

    def _relay_done(self, _relay: Relay, reason: str | None) -> None:
        self.closed = True
        self.on_done(self, reason)

    def _end(self, reason: str | None, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        with contextlib.suppress(KeyError, OSError, ValueError):
            self.loop.remove(self.fd)
        sock = self.wire if self.tls is None else self.tls
        for s in (sock, self.plain):
            if s is not None:
                if reset:
                    reset_close(s)
                else:
                    s.close()
        self.on_done(self, reason)
