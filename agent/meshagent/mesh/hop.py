"""The mutual-TLS hop between two nodes' forwarders: one TLS 1.3 connection
per forwarded connection, from the client pod's netns to port 15008 of the
destination pod (docs/architecture.md says why not HBONE's pooled HTTP/2).

Inside TLS, before the stream:

    client -> server   MESH/1 {"dst": "IP:PORT", "src": "SPIFFE ID"}\\n
    server -> client   OK\\n                 (then the stream)
                       NO <reason>\\n        (and the end)

The client sends its stream right after its header (no round trip waits
for OK); the server holds those bytes until the application accepted.
A Hop is a forwarder Connection (forwarder/datapath.py) from its start:
its end, clean or not, goes to on_done with the reason.

Half-close is TLS's own: close_notify, then the TCP FIN. A TCP end without
close_notify is a cut stream, and resets the other side.

Reuse (the OpenSSL mode): a client that offers it (`"reuse": true` in its
header, and no stream bytes until the reply) and a server that takes it
(`OK reuse`) frame the stream instead: each chunk is a 4-byte length and
its bytes, and a chunk of length 0 ends the stream one way (where
close_notify would). When both ways have ended cleanly, the TLS
connection (a Link) goes back to the client's node, idle, for the next
connection from the same pod to the same destination pod: its header
comes on the same TLS session, with no TCP or TLS handshake. Anything
unclean (a reset, an error, a timeout) ends the link with the stream.

Here OpenSSL in this process carries the bytes, on the socket itself
(no memory BIOs: a copy less each way, measured 40% less CPU per GB in the
hop); a half-close sends close_notify with one SSL_shutdown
(mesh/openssl.py says why not unwrap()). Where the kernel has TLS the same
hop hands the keys to it (mesh/ktls.py).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshagent.forwarder.budget import kernel_holds, set_buffers
from meshagent.forwarder.copy import orderly_close, reset_close
from meshagent.host.loop import Loop
from meshagent.mesh.openssl import send_close_notify

PORT = 15008
MAGIC = b"MESH/1 "
LINE_MAX = 4096
HIGH = 1 << 20
CHUNK = 256 * 1024
HANDSHAKE_TIMEOUT = (
    30.0  # a handshake waits this long for its peer (200 at once under emulation: 20 s)
)
IDLE_TIMEOUT = 60.0  # a reused link waits this long for its next header (server side)
LINK_MAX_AGE = 600.0  # a link carries no new stream after this long
FRAME = struct.Struct("!I")
STREAM_END = FRAME.pack(0)
RECORD = 16384  # TLS's largest record: a read that filled one may have more behind it
_FROM_WIRE = bytearray(CHUNK)  # decrypted, until given to plain (one loop, one thread)
_FROM_WIRE_VIEW = memoryview(_FROM_WIRE)
_FROM_PLAIN = bytearray(FRAME.size + CHUNK)  # a chunk's length, then the chunk
_FROM_PLAIN_VIEW = memoryview(_FROM_PLAIN)

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_BAD = select.EPOLLERR | select.EPOLLHUP

HANDSHAKE, HEADER, CONNECTING, REPLY, RELAY = "handshake", "header", "connecting", "reply", "relay"


class Refused(Exception):
    """The hop cannot go on: the reason, short, as counted (a metrics label)
    and a message for the log."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def tls_reason(exc: ssl.SSLError) -> str:
    """A handshake failure's reason, as counted."""
    text = f"{getattr(exc, 'verify_message', '') or ''} {getattr(exc, 'reason', '') or ''} {exc}".lower()
    for needle, reason in (
        ("expired", "expired"),
        ("not yet valid", "not_yet_valid"),
        ("unknown_ca", "unknown_ca"),
        ("unknown ca", "unknown_ca"),
        ("local issuer", "unknown_ca"),
        ("self-signed", "unknown_ca"),
        ("self signed", "unknown_ca"),
        ("signature failure", "unknown_ca"),  # another CA of the same name
        ("certificate required", "no_certificate"),
        ("peer did not return a certificate", "no_certificate"),
        ("wrong version", "not_tls"),
        ("http request", "not_tls"),
        ("protocol version", "protocol_version"),
        ("unsupported protocol", "protocol_version"),
        ("bad certificate", "bad_certificate"),
        ("decrypt", "bad_record"),
        ("bad record mac", "bad_record"),
    ):
        if needle in text:
            return reason
    return "handshake"


def parse_header(line: bytes) -> dict:
    """The client's header line (without its newline), or Refused."""
    if not line.startswith(MAGIC):
        raise Refused("bad_header", "not a meshagent hop (no MESH/1 header)")
    try:
        header = json.loads(line[len(MAGIC) :])
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise Refused("bad_header", f"header: {exc}") from None
    return header


def check_reply(line: bytes) -> bool:
    """The server's reply line: OK (True: it took reuse, `OK reuse`), or
    Refused with its reason."""
    if line in (b"OK", b"OK reuse"):
        return line == b"OK reuse"
    reason = line[3:].decode(errors="replace") if line.startswith(b"NO ") else "bad_reply"
    raise Refused(f"refused_{reason}" if reason != "bad_reply" else reason,
                  f"the destination node refused: {reason}")  # fmt: skip


def peer_uri(tls: ssl.SSLObject) -> str | None:
    cert = tls.getpeercert()
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI":
            return value
    return None


def check_resumed(tls) -> None:
    """A resumed session skipped the certificate check: the certificate it
    was made with must still be in its time (a ticket outlives none)."""
    if not tls.session_reused:
        return
    cert = tls.getpeercert() or {}
    try:
        ends = ssl.cert_time_to_seconds(cert["notAfter"])
    except (KeyError, ValueError):
        raise Refused("bad_certificate", "a resumed session without its certificate") from None
    if ends < time.time():
        raise Refused("expired", "a resumed session of a certificate that has expired")


def resumable(session: ssl.SSLSession | None) -> ssl.SSLSession | None:
    return session if session is not None and session.has_ticket else None


@dataclass
class Link:
    """A TLS connection between two nodes whose last stream ended cleanly,
    framed: what the next Hop on it takes over."""

    wire: ssl.SSLSocket
    peer: str | None
    after: bytes = b""  # decrypted bytes past the last stream's end (the next header)
    streams: int = 1  # streams carried so far
    born: float = 0.0  # time.monotonic() of its handshake

    def fit(self, ctx_now: ssl.SSLContext, ctx: ssl.SSLContext) -> bool:
        """Fit for another stream: made with this node's current certificate
        (a new one: new links), the peer's still in its time, and younger
        than LINK_MAX_AGE."""
        if ctx_now is not ctx or time.monotonic() - self.born > LINK_MAX_AGE:
            return False
        try:
            ends = ssl.cert_time_to_seconds((self.wire.getpeercert() or {})["notAfter"])
        except (KeyError, ValueError):
            return False
        return ends > time.time()

    @property
    def tls(self) -> ssl.SSLSocket:
        return self.wire

    def close(self) -> None:
        """close_notify if it goes out at once, then the FIN."""
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            send_close_notify(self.wire)
        orderly_close(self.wire)


class Startable:
    """A hop whose handshake may wait (start=False) for the first hop to its
    node, to resume that one's session (mesh/node.py); shared by Hop and
    KtlsHop, whose begin() starts their own."""

    closed: bool
    tls: ssl.SSLSocket

    def _start_or_wait(self, loop: Loop, start: bool) -> None:
        self.timer = None
        self.started = False
        if start:
            self.begin()
        else:  # the first hop's end starts it; should that never come, this does
            self.timer = loop.call_later(HANDSHAKE_TIMEOUT, self.begin)

    def _starting(self, session: ssl.SSLSession | None) -> bool:
        """Whether begin() goes on: not closed, not started yet."""
        if self.closed or self.started:
            return False
        if session is not None:
            self.tls.session = session  # ValueError: made in another context
        self.started = True
        self._cancel_timer()
        return True

    def begin(self, session: ssl.SSLSession | None = None) -> None:
        raise NotImplementedError

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Hop(Startable):
    """One connection across the hop: wire (TLS, to or from the other node)
    and plain (the pod's socket on the client side, the application's on the
    server side)."""

    handoff_bytes = 0
    settled = True
    mode = "tls"

    def __init__(
        self,
        loop: Loop,
        wire: socket.socket,
        ctx: ssl.SSLContext,
        server_side: bool,
        on_done: Callable,
        check_peer: Callable[[Hop], None],
        plain: socket.socket | None = None,
        header: dict | None = None,
        on_header: Callable[[Hop, dict], None] | None = None,
        on_up: Callable[[Hop], None] | None = None,
        session: ssl.SSLSession | None = None,
        start: bool = True,
        link: Link | None = None,
        on_idle: Callable[[Link], None] | None = None,
    ) -> None:
        self.loop = loop
        self.plain = plain
        self.server_side = server_side
        self.on_done = on_done
        self.check_peer = check_peer
        self.on_header = on_header
        self.on_up = on_up  # the stream flows: the hop is up
        self.on_idle = on_idle  # set: the link may carry another stream after this one
        self.link = link  # the link this hop goes on with (no handshake), if any
        # Framed (see the module's doc): on a link, or once the reply took reuse.
        self.framed = link is not None
        self.frame_left = 0  # bytes of the chunk being read still to come
        self.frame_head = bytearray()  # a chunk's length, while incomplete
        self.after = bytearray()  # decrypted past the stream's end: the next header
        if link is None:  # the TLS socket takes wire's fd over (wire is detached)
            self.tls = ctx.wrap_socket(wire, server_side=server_side, session=session,
                                       do_handshake_on_connect=False,
                                       suppress_ragged_eofs=False)  # fmt: skip
        else:
            self.tls = link.wire
        self.wire: ssl.SSLSocket = self.tls
        self.born = time.monotonic() if link is None else link.born
        self.phase = HANDSHAKE if link is None else HEADER
        self.header = header
        self.peer: str | None = None if link is None else link.peer  # the peer node's SPIFFE ID
        self.source: str | None = None  # the client workload's (server side)
        self.line = bytearray() if link is None else bytearray(link.after)
        self.to_plain = bytearray()  # decrypted, for plain
        self.to_wire = bytearray()  # for TLS to encrypt: what a write left (it must come again)
        self.wire_more = True  # wire may have bytes to decrypt (until TLS wants a read)
        self.wants_write = False  # TLS must write before it goes on (a full socket)
        self.high = HIGH
        self.most = CHUNK
        self.wire_eof = False  # nothing more comes from wire (close_notify or its end)
        self.tls_eof = False  # the peer's stream ended (close_notify, or a frame of 0)
        self.plain_eof = False
        self.notify_sent = False  # our stream's end is in to_wire (framed) or sent
        self.wire_shut = False
        self.plain_shut = False
        self.closed = False
        self.closed_by: str | None = None
        self.bytes_out = 0  # client pod -> server application
        self.bytes_in = 0
        self.registered: set[int] = set()
        self._start_or_wait(loop, start)

    def begin(self, session: ssl.SSLSession | None = None) -> None:
        """The handshake starts (a hop made with start=False waits for
        this: the first hop to a node, whose session it may resume)."""
        if not self._starting(session):
            return
        self._register(self.wire, self._on_wire)
        if self.plain is not None:
            self._register(self.plain, self._on_plain)
        wait = HANDSHAKE_TIMEOUT
        if self.link is not None and self.server_side:
            wait = IDLE_TIMEOUT  # an idle link: the client's next stream, or nothing
        elif self.link is not None:
            self._send_header()
        self.timer = self.loop.call_later(wait, self._too_slow)
        self.loop.call_later(0, self._pump)  # the client's hello (or nothing yet)

    @property
    def reused(self) -> bool:
        return self.link is not None

    @property
    def idle(self) -> bool:
        """A reused link's server side that is waiting for a header: its
        end (the client let the link go, or it stayed idle) is no failure."""
        return self.link is not None and self.server_side and self.phase == HEADER

    # -- the Connection interface ----------------------------------------
    @property
    def close_notify(self) -> dict:
        """TLS's half-close each way: ours sent, the peer's received."""
        return {"sent": self.notify_sent, "received": self.tls_eof}

    @property
    def resumed(self) -> bool:
        return self.tls.session_reused

    def new_session(self) -> ssl.SSLSession | None:
        """The session to resume the next hop to the same node with (TLS
        1.3: once the ticket that follows the handshake has been read)."""
        return resumable(self.tls.session)

    def limit(self, buffer: int, sockets: bool = True) -> None:  # the wire's are not set yet
        for sock in (self.wire, self.plain):
            if sock is not None:
                set_buffers(sock, buffer)
        self.high, self.most = min(HIGH, buffer), min(CHUNK, buffer)

    def holds(self) -> int:
        held = len(self.to_plain) + len(self.to_wire) + self.tls.pending() + kernel_holds(self.wire)
        return held + (kernel_holds(self.plain) if self.plain is not None else 0)

    def export(self):
        raise NotImplementedError("a TLS hop's session lives in this process")

    def suspend(self) -> None:
        for fd in list(self.registered):
            self.loop.modify(fd, 0)

    def resume(self) -> None:
        if self.started:
            self._update()

    def finish(self, reason: str | None) -> None:
        self._end(reason, orderly_close)

    def reset(self, reason: str) -> None:
        self._end(reason, reset_close)

    # -- the server side: the application connected ----------------------
    def connected(self, plain: socket.socket) -> None:
        """The application accepted: OK, and the stream."""
        if self.closed:
            reset_close(plain)
            return
        self.plain = plain
        self._register(plain, self._on_plain)
        self.to_wire += b"OK reuse\n" if self.framed else b"OK\n"
        self._up()
        self._pump()

    def refuse(self, reason: str, message: str) -> None:
        """NO, and the end (server side)."""
        if self.closed:
            return
        self.to_wire += b"NO " + reason.encode() + b"\n"
        with contextlib.suppress(OSError):  # the peer may have given up (reset) already
            self._flush_wire()
        self.reset(f"{reason}: {message}")

    # -- events -----------------------------------------------------------
    def _register(self, sock: socket.socket, handler: Callable[[int], None]) -> None:
        self.loop.add(sock.fileno(), EPOLLIN, handler)
        self.registered.add(sock.fileno())

    def _on_wire(self, events: int) -> None:
        self._pump(wire=events)

    def _on_plain(self, events: int) -> None:
        self._pump(plain=events)

    def _too_slow(self) -> None:
        self.timer = None
        if self.idle:
            self.finish("idle")
            return
        if self.phase in (HANDSHAKE, HEADER, REPLY):
            self._failed(Refused("timeout", f"no {self.phase} within {HANDSHAKE_TIMEOUT:.0f}s"))

    def _failed(self, exc: Refused) -> None:
        with contextlib.suppress(OSError):  # the peer may be gone already (EPIPE)
            self._flush_wire()  # an alert, or NO, on its way
        self.reset(f"{exc.reason}: {exc}")

    def _pump(self, wire: int = 0, plain: int = 0) -> None:
        if self.closed:
            return
        try:
            if wire & (EPOLLIN | EPOLL_BAD):
                self.wire_more = True
            if wire & EPOLLOUT:
                self.wants_write = False
            if wire & EPOLL_BAD and self.phase == CONNECTING:
                raise OSError(0, "the other node hung up before the application accepted")
            if self.phase == HANDSHAKE:
                self._handshake()
            if self.phase in (HEADER, REPLY):
                self._read_line()
            if self.phase == RELAY and (self.wire_more or plain & EPOLLOUT):
                self._to_plain()
            if self.phase in (REPLY, RELAY) and self.plain is not None:
                if plain & (EPOLLIN | EPOLL_BAD) and not self._offering:
                    self._read_plain()
                self._maybe_notify()
            self._flush_wire()
            self._hung_up(wire, plain)
        except Refused as exc:
            self._failed(exc)
            return
        except ssl.SSLError as exc:
            if self.phase == HANDSHAKE:
                self._failed(Refused(tls_reason(exc), f"TLS handshake: {exc.reason or exc}"))
            else:
                self.reset(f"tls: {exc.reason or exc}")
            return
        except OSError as exc:
            self.reset(f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        if self.plain_shut and self.wire_shut:
            self.finish(None)
            return
        if self._stream_done:
            self._recycle()
            return
        self._update()

    @property
    def _offering(self) -> bool:
        """The client offered reuse on a new link: no stream bytes until the
        reply says whether they are framed."""
        return self.phase == REPLY and self.offer

    @property
    def offer(self) -> bool:
        return not self.server_side and self.on_idle is not None and self.link is None

    @property
    def _stream_done(self) -> bool:
        """Framed, and ended cleanly both ways: the link can carry another."""
        return (
            self.framed
            and self.phase == RELAY
            and self.plain_eof
            and self.notify_sent
            and not self.to_wire
            and self.plain_shut
        )

    def _recycle(self) -> None:
        """The stream ended cleanly both ways: its end goes to on_done, and
        the TLS connection, idle, to on_idle."""
        self._unhook()
        orderly_close(self.plain)
        streams = self.link.streams + 1 if self.link is not None else 1
        link = Link(self.wire, self.peer, bytes(self.after), streams, self.born)
        self.on_done(self, None)
        self.on_idle(link)

    def _hung_up(self, wire: int, plain: int) -> None:
        """A side closed both ways (EPOLLHUP, reported whatever the mask):
        done with it if nothing more was owed to it, else a cut stream."""
        if wire & select.EPOLLHUP and self.wire_eof and not self.wire_shut:
            if self.to_wire or (self.phase == RELAY and not self.plain_eof):
                raise OSError(0, "the other node hung up with bytes owed to it")
            self.wire_shut = True
        if plain & select.EPOLLHUP and self.plain_eof and not self.plain_shut:
            if self.to_plain or not self.tls_eof:
                raise OSError(0, "the plain side hung up with bytes owed to it")
            self.plain_shut = True

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise Refused("handshake", "the peer closed during the TLS handshake") from None
        self.peer = peer_uri(self.tls)
        check_resumed(self.tls)
        self.check_peer(self)  # Refused if it is not who it must be
        if self.server_side:
            self.phase = HEADER
        else:
            self._send_header()

    def _send_header(self) -> None:
        header = {**self.header, "reuse": True} if self.offer else self.header
        self.to_wire += MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n"
        self.phase = REPLY

    def _read_line(self) -> None:
        """The header (server) or the reply (client), up to its newline."""
        while b"\n" not in self.line:
            try:
                data = self.tls.read(LINE_MAX + 1 - len(self.line))
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self.wants_write = True
                return
            if not data:
                self.wire_eof = True
                raise Refused("closed", f"the peer closed before its {self.phase}")
            self.line += data
            if len(self.line) > LINE_MAX and b"\n" not in self.line:
                raise Refused("bad_header", f"no {self.phase} line within {LINE_MAX} bytes")
        line, _, rest = bytes(self.line).partition(b"\n")
        self.line = bytearray()
        if self.server_side:
            header = parse_header(line)
            if header.pop("reuse", False) is True and self.on_idle is not None:
                self.framed = True
            self.phase = CONNECTING
            self._take_plain(
                memoryview(rest)
            )  # the client's first bytes: held until the app accepts
            self._cancel_timer()
            self.on_header(self, header)
            return
        took = check_reply(line)
        if self.offer:
            self.framed = took
            if not took:
                self.on_idle = None  # the server keeps to a connection per stream
        self._take_plain(memoryview(rest))
        self._cancel_timer()
        self._up()

    def _up(self) -> None:
        self.phase = RELAY
        if self.on_up is not None:
            self.on_up(self)

    def _unhook(self) -> None:
        """Closed: no timer, no events."""
        self.closed = True
        self._cancel_timer()
        for fd in self.registered:
            self.loop.remove(fd)
        self.registered.clear()

    def _to_plain(self) -> None:
        """Decrypt and give plain what it takes, for as long as it takes it
        all: what OpenSSL holds decrypted has no event of its own (the peer
        may be waiting for our answer: a stall seen with redis pipelining
        20 SETs of 200 KB)."""
        self._write_plain()
        while not self.to_plain and self.wire_more and not self.tls_eof:
            if not self._decrypt():
                break
        self._write_plain()

    def _decrypt(self) -> int:
        """Decrypt one buffer's worth, as far as TLS has it, and give it to
        plain (what plain does not take waits in to_plain). How many bytes
        came out of TLS (0: nothing more for now)."""
        got = 0
        while got < CHUNK:
            try:
                n = self.tls.recv_into(_FROM_WIRE_VIEW[got:], CHUNK - got)
            except ssl.SSLWantReadError:
                self.wire_more = False
                break
            except ssl.SSLWantWriteError:
                self.wants_write = True
                self.wire_more = False
                break
            except ssl.SSLZeroReturnError:  # close_notify (Python may also say 0)
                n = 0
            except ssl.SSLEOFError:
                raise OSError(0, "the peer's stream ended without close_notify") from None
            if n == 0:
                if self.framed:
                    raise OSError(0, "the peer's link ended within a stream")
                self.wire_eof = True
                self.wire_more = False
                self._peer_ended()
                break
            got += n
            if n < RECORD and not self.tls.pending():
                self.wire_more = False  # a short record: epoll says if more came (no EAGAIN read)
                break
        if got:
            self._take_plain(_FROM_WIRE_VIEW[:got])
        return got

    def _peer_ended(self) -> None:
        self.tls_eof = True
        if self.closed_by is None:
            self.closed_by = "pod" if self.server_side else "upstream"

    def _take_plain(self, data: memoryview) -> int:
        """Decrypted bytes for plain: as they are, or unframed (and what
        follows the stream's end kept for the next stream). How many."""
        if not self.framed:
            self._give_plain(data)
            self._count(len(data), inbound=True)
            return len(data)
        if self.tls_eof:
            self.after += data
            return 0
        pos, took = 0, 0
        while pos < len(data):
            if self.frame_left:
                n = min(self.frame_left, len(data) - pos)
                self._give_plain(data[pos : pos + n])
                self.frame_left -= n
                pos += n
                took += n
                continue
            need = FRAME.size - len(self.frame_head)
            self.frame_head += data[pos : pos + need]
            pos += min(need, len(data) - pos)
            if len(self.frame_head) < FRAME.size:
                break
            (self.frame_left,) = FRAME.unpack(self.frame_head)
            self.frame_head.clear()
            if self.frame_left == 0:  # the stream's end, this way
                self._peer_ended()
                self.after += data[pos:]
                break
        self._count(took, inbound=True)
        return took

    def _give_plain(self, data: memoryview) -> None:
        """To plain at once if nothing waits before it, else after it."""
        if not self.to_plain and self.phase == RELAY and self.plain is not None:
            try:
                sent = self.plain.send(data)
            except BlockingIOError:
                sent = 0
            data = data[sent:]
        if data:
            self.to_plain += data

    def _count(self, n: int, inbound: bool) -> None:
        """inbound: bytes that came over the wire."""
        if inbound == self.server_side:
            self.bytes_out += n
        else:
            self.bytes_in += n

    def _write_plain(self) -> None:
        if self.to_plain:
            try:
                sent = self.plain.send(self.to_plain)
            except BlockingIOError:
                sent = 0
            del self.to_plain[:sent]
        if self.tls_eof and not self.to_plain and not self.plain_shut:
            self.plain_shut = True
            if not self.wire_shut:
                self.plain.shutdown(socket.SHUT_WR)

    def _read_plain(self) -> None:
        """Read plain and encrypt, for as long as TLS writes it all at once
        (what a write left must be offered again as it was: to_wire)."""
        head = FRAME.size if self.framed else 0
        while not self.plain_eof and not self.to_wire:
            try:
                n = self.plain.recv_into(_FROM_PLAIN_VIEW[FRAME.size :], self.most)
            except BlockingIOError:
                return
            if not n:
                self.plain_eof = True
                if self.closed_by is None:
                    self.closed_by = "upstream" if self.server_side else "pod"
                return
            self._count(n, inbound=False)
            FRAME.pack_into(_FROM_PLAIN, 0, n)
            data = _FROM_PLAIN_VIEW[FRAME.size - head : FRAME.size + n]
            if not self._write_tls(data):
                self.to_wire += data  # offered again as it was
            if n < self.most:
                return  # drained, most likely: epoll says if more came

    def _write_tls(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether TLS took all of data (it takes all or, the socket full,
        wants the same bytes again)."""
        try:
            self.tls.send(data)
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return False
        except ssl.SSLWantReadError:
            return False
        return True

    def _maybe_notify(self) -> None:
        """The plain side ended: the stream's end, after what it sent."""
        if self.plain_eof and not self.notify_sent and self.framed:
            self.to_wire += STREAM_END  # the stream's end, not the link's
            self.notify_sent = True

    def _flush_wire(self) -> None:
        if self.to_wire and self._write_tls(self.to_wire):
            self.to_wire.clear()
        if self.to_wire or self.framed:
            return
        if self.plain_eof and not self.notify_sent:
            if send_close_notify(self.tls):
                self.notify_sent = True
            else:
                self.wants_write = True
        if self.notify_sent and not self.wire_shut:
            self.wire_shut = True
            if not self.plain_shut:
                socket.socket.shutdown(self.wire, socket.SHUT_WR)  # not SSLSocket's: it drops TLS

    def _update(self) -> None:
        wire = 0
        reading = self.phase != CONNECTING and (
            self.phase != RELAY or len(self.to_plain) < self.high
        )
        if reading and not self.wire_eof:
            wire |= EPOLLIN
        if self.to_wire or self.wants_write:
            wire |= EPOLLOUT
        self.loop.modify(self.wire.fileno(), wire)
        if self.plain is not None and self.plain.fileno() in self.registered:
            plain = 0
            if (
                not self.plain_eof
                and not self.to_wire
                and self.phase in (REPLY, RELAY)
                and not self._offering
            ):
                plain |= EPOLLIN
            if self.to_plain and self.phase == RELAY:
                plain |= EPOLLOUT
            self.loop.modify(self.plain.fileno(), plain)

    def _end(self, reason: str | None, close: Callable[[socket.socket], None]) -> None:
        if self.closed:
            return
        self._unhook()
        close(self.wire)
        if self.plain is not None:
            close(self.plain)
        self.on_done(self, reason)
