"""The mesh's pure parts: the mesh file, SPIFFE IDs, the CA, the strict
rules' text, and the mutual-TLS hop itself between socket pairs on a real
event loop (no kernel features beyond sockets)."""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import ssl
import threading

import pytest

from meshagent.errors import MeshError
from meshagent.host.loop import Loop
from meshagent.mesh import ca, meshfile, strict
from meshagent.mesh.certs import NodeCerts
from meshagent.mesh.hop import Hop, Refused, tls_reason
from meshagent.mesh.identity import SpiffeId, node_id, standalone_pod_id

DOC = {
    "trustDomain": "mesh.test",
    "nodes": [
        {"name": "a", "podCIDRs": ["10.1.0.0/16", "10.1.5.0/24", "fd00:1::/64"]},
        {"name": "b", "podCIDRs": ["10.2.0.0/24"]},
    ],
}


def test_the_mesh_file_places_addresses_on_nodes():
    doc = {**DOC, "nodes": [DOC["nodes"][0] | {"podCIDRs": ["10.1.0.0/16"]}, DOC["nodes"][1]]}
    view = meshfile.parse(doc, "a")
    assert view.node_of("10.1.9.9").name == "a"
    assert view.remote("10.1.9.9") is None  # this node's own
    assert view.remote("10.2.0.7").name == "b"
    assert view.remote("10.3.0.1") is None  # outside the mesh
    assert view.remote("not an address") is None


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"trustDomain": "Bad Domain"}, "trustDomain"),
        ({"nodes": []}, "at least one"),
        ({"nodes": [{"name": "a", "podCIDRs": ["10.1.0.1/16"]}]}, "host bits set"),
        (
            {
                "nodes": [
                    {"name": "a", "podCIDRs": ["10.0.0.0/8"]},
                    {"name": "b", "podCIDRs": ["10.2.0.0/24"]},
                ]
            },
            "overlaps",
        ),
        (
            {"nodes": [{"name": "a", "podCIDRs": ["10.1.0.0/16"]}, {"name": "a", "podCIDRs": []}]},
            "listed twice",
        ),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_a_bad_mesh_file_is_refused_with_the_entry(change, expected):
    doc = {**DOC, "nodes": [{"name": "a", "podCIDRs": ["10.1.0.0/16"]}], **change}
    with pytest.raises(MeshError, match=expected):
        meshfile.parse(doc, "a")


def test_this_node_must_be_in_the_mesh_file():
    with pytest.raises(MeshError, match="this node, 'c', is not listed"):
        meshfile.parse(DOC | {"nodes": [DOC["nodes"][1]]}, "c")


def test_spiffe_ids():
    assert str(node_id("mesh.test", "a")) == "spiffe://mesh.test/meshagent/node/a"
    pod = standalone_pod_id("mesh.test", "a", "web")
    assert SpiffeId.parse(str(pod)) == pod and pod.node == "a" and not pod.is_node
    assert SpiffeId.parse("spiffe://mesh.test/meshagent/node/b").node == "b"
    assert SpiffeId.parse("spiffe://mesh.test/ns/default/sa/web").node is None
    for bad in ("http://x/y", "spiffe://UPPER/x", "spiffe://d/a//b", "spiffe://d/a b"):
        with pytest.raises(MeshError):
            SpiffeId.parse(bad)


def test_strict_rules_go_on_and_off_whole():
    on = strict.render(True, 0, False)
    assert "-I INPUT 1 -j MESHAGENT-STRICT" in on and "--dport 15008 -j RETURN" in on
    assert on.rstrip().endswith("COMMIT") and "-D INPUT" not in on
    again = strict.render(True, 1, True)  # made twice: one jump
    assert again.count("-I INPUT") == 1 and again.count("-D INPUT") == 1
    off = strict.render(False, 2, True)
    assert off.count("-D INPUT -j MESHAGENT-STRICT") == 2 and "-X MESHAGENT-STRICT" in off
    assert strict.render(False, 0, False) == "*filter\nCOMMIT\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca.init(root / "ca", "mesh.test")
    ca.init(root / "other", "mesh.test")
    for node in ("a", "b"):
        ca.issue(root / "ca", node, root / node)
    ca.issue(root / "other", "a", root / "foreign")
    (root / "foreign" / "ca.crt").write_bytes((root / "ca" / "ca.crt").read_bytes())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=5)
    ca.issue(root / "ca", "a", root / "expired", hours=1, not_before=past)
    return root


def test_the_ca_keeps_its_key_and_refuses_to_be_overwritten(pki):
    assert (pki / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    assert (pki / "a" / "node.key").stat().st_mode & 0o077 == 0
    assert not (pki / "a" / "ca.key").exists()
    assert ca.describe(pki / "a" / "node.crt")["identity"] == "spiffe://mesh.test/meshagent/node/a"
    with pytest.raises(MeshError, match="a CA is there already"):
        ca.init(pki / "ca", "mesh.test")
    with pytest.raises(MeshError, match="not node b"):
        NodeCerts(pki / "a", "mesh.test", "b")
    with pytest.raises(MeshError, match="missing"):
        NodeCerts(pki / "nowhere", "mesh.test", "a")


class Pair:
    """A client hop and a server hop joined by a socket pair (the wire),
    each with a plain end the test holds (the pod, the application)."""

    def __init__(self, pki, client_certs="a", check_server=None, check_client=None) -> None:
        self.loop = Loop()
        wire_a, wire_b = socket.socketpair()
        self.pod, pod_side = socket.socketpair()
        app_side, self.app = socket.socketpair()
        for sock in (wire_a, wire_b, pod_side, app_side):
            sock.setblocking(False)
        self.ends: dict[str, str | None] = {}
        self.headers: list[dict] = []
        self.versions: list[str | None] = []  # the TLS version each header came on
        client_ctx = NodeCerts(pki / client_certs, "mesh.test", "a").contexts.client
        server_ctx = NodeCerts(pki / "b", "mesh.test", "b").contexts.server

        def on_header(hop: Hop, header: dict) -> None:
            self.headers.append(header)
            self.versions.append(hop.tls.version())
            hop.connected(app_side)

        def done(name):
            def record(_hop, reason):
                self.ends[name] = reason

            return record

        self.loop.post(lambda: self._start(wire_a, wire_b, pod_side, client_ctx, server_ctx,
                                           done, on_header, check_server, check_client))  # fmt: skip
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def _start(self, wire_a, wire_b, pod_side, cctx, sctx, done, on_header, cs, cc):
        self.client = Hop(self.loop, wire_a, cctx, False, done("client"), cs or (lambda h: None),
                          plain=pod_side, header={"dst": "10.2.0.7:80", "src": "x"})  # fmt: skip
        self.server = Hop(self.loop, wire_b, sctx, True, done("server"), cc or (lambda h: None),
                          on_header=on_header)  # fmt: skip

    def wait_ends(self, timeout: float = 20) -> dict:
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if len(self.ends) == 2:
                break
            deadline.wait(0.05)
        self.loop.post(self.loop.stop)
        self.thread.join(10)
        return self.ends


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(20)
    out = bytearray()
    while chunk := sock.recv(1 << 16):
        out += chunk
    return bytes(out)


def test_the_hop_carries_both_ways_and_half_closes(pki):
    pair = Pair(pki)
    up = bytes(range(256)) * 4096  # 1 MiB
    down = b"\x07" * (3 << 20)
    sender = threading.Thread(
        target=lambda: (pair.pod.sendall(up), pair.pod.shutdown(socket.SHUT_WR))
    )
    sender.start()
    got_up = _read_all(pair.app)  # ends at the pod's half-close: close_notify, FIN
    # After the client's end, the other way (sent while the pod reads).
    back = threading.Thread(
        target=lambda: (pair.app.sendall(down), pair.app.shutdown(socket.SHUT_WR))
    )
    back.start()
    got_down = _read_all(pair.pod)
    back.join(10)
    sender.join(10)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert got_down == down
    assert pair.wait_ends() == {"client": None, "server": None}
    assert pair.headers == [{"dst": "10.2.0.7:80", "src": "x"}]
    assert pair.versions == ["TLSv1.3"]
    assert pair.client.peer == "spiffe://mesh.test/meshagent/node/b"
    assert pair.server.peer == "spiffe://mesh.test/meshagent/node/a"
    assert (pair.client.bytes_out, pair.client.bytes_in) == (len(up), len(down))
    assert (pair.server.bytes_out, pair.server.bytes_in) == (len(up), len(down))


@pytest.mark.parametrize("certs,reason", [("foreign", "unknown_ca"), ("expired", "expired")])
def test_a_bad_client_certificate_is_refused_by_reason(pki, certs, reason):
    pair = Pair(pki, client_certs=certs)
    ends = pair.wait_ends()
    assert ends["server"].startswith(reason + ":"), ends
    assert ends["client"] is not None
    assert pair.headers == []
    pair.pod.settimeout(5)
    try:
        assert pair.pod.recv(10) == b""  # the pod's side ends: nothing of a stream
    except ConnectionResetError:
        pass


def test_a_peer_check_that_refuses_ends_both_sides(pki):
    def not_you(hop: Hop) -> None:
        raise Refused("wrong_node", f"{hop.peer} is not the destination's node")

    pair = Pair(pki, check_server=not_you)
    ends = pair.wait_ends()
    assert ends["client"].startswith("wrong_node:"), ends
    assert ends["server"] is not None and pair.headers == []


class Reuse:
    """Client and server hops that take reuse (the OpenSSL mode's framed
    streams), as mesh/node.py makes them: each stream's end gives back its
    link; the next client hop goes on it, and the server takes it again."""

    def __init__(self, pki, server_reuses: bool = True) -> None:
        self.loop = Loop()
        self.cctx = NodeCerts(pki / "a", "mesh.test", "a").contexts.client
        self.sctx = NodeCerts(pki / "b", "mesh.test", "b").contexts.server
        self.server_reuses = server_reuses
        self.ends: list[tuple[str, str | None]] = []
        self.headers: list[dict] = []
        self.client_links: list = []
        self.server_hops: list[Hop] = []
        self.apps: list[socket.socket] = []  # the application's end of each stream
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def _done(self, name):
        return lambda _hop, reason: self.ends.append((name, reason))

    def _serve(self, wire, link=None) -> None:
        def on_header(hop: Hop, header: dict) -> None:
            self.headers.append(header)
            app_side, app = socket.socketpair()
            app_side.setblocking(False)
            self.apps.append(app)
            hop.connected(app_side)

        more = {"link": link, "on_idle": lambda nxt: self._serve(nxt.wire, nxt)}
        hop = Hop(self.loop, wire, self.sctx, True, self._done("server"), lambda h: None,
                  on_header=on_header, **(more if self.server_reuses else {}))  # fmt: skip
        self.server_hops.append(hop)

    def stream(self, n: int) -> tuple[socket.socket, Hop]:
        """Stream n from a new pod socket: on an idle link if one is back."""
        pod, pod_side = socket.socketpair()
        pod_side.setblocking(False)
        made: list[Hop] = []

        def start() -> None:
            link = self.client_links.pop() if self.client_links else None
            if link is None:
                wire_a, wire_b = socket.socketpair()
                wire_a.setblocking(False)
                wire_b.setblocking(False)
                self._serve(wire_b)
            made.append(Hop(self.loop, link.wire if link else wire_a, self.cctx, False,
                            self._done("client"), lambda h: None, plain=pod_side,
                            header={"dst": f"10.2.0.7:{n}", "src": "x"}, link=link,
                            on_idle=self.client_links.append))  # fmt: skip

        self.loop.post(start)
        for _ in range(200):
            if made:
                break
            threading.Event().wait(0.01)
        return pod, made[0]

    def wait(self, what, timeout: float = 20) -> None:
        for _ in range(int(timeout / 0.02)):
            if what():
                return
            threading.Event().wait(0.02)
        raise AssertionError(f"timed out: {self.ends}")

    def stop(self) -> None:
        self.loop.post(self.loop.stop)
        self.thread.join(10)


def _exchange(pair: Reuse, pod: socket.socket, app_index: int, up: bytes, down: bytes) -> None:
    sender = threading.Thread(target=lambda: (pod.sendall(up), pod.shutdown(socket.SHUT_WR)))
    sender.start()
    pair.wait(lambda: len(pair.apps) > app_index)
    app = pair.apps[app_index]
    assert _read_all(app) == up
    app.sendall(down)
    app.shutdown(socket.SHUT_WR)
    assert _read_all(pod) == down
    sender.join(10)
    app.close()
    pod.close()


def test_a_link_carries_the_next_stream_without_a_handshake(pki):
    """Framed streams: both ways end cleanly, the link comes back, and the
    next stream goes on it (the same TLS session), header and all; a chunk
    boundary anywhere, 1 B to 1 MiB, arrives whole."""
    pair = Reuse(pki)
    try:
        first_pod, first = pair.stream(1)
        _exchange(pair, first_pod, 0, bytes(range(256)) * 4096, b"\x07" * 100_000)
        pair.wait(lambda: len(pair.client_links) == 1 and len(pair.ends) == 2)
        assert sorted(pair.ends) == [("client", None), ("server", None)]
        assert first.framed and not first.reused
        tls = pair.client_links[0].tls
        for n, (up, down) in enumerate([(b"x", b"y"), (b"", b"z" * 3), (b"q" * (1 << 20), b"")]):
            pod, hop = pair.stream(2 + n)
            _exchange(pair, pod, 1 + n, up, down)
            pair.wait(lambda n=n: len(pair.client_links) == 1 and len(pair.ends) == 4 + 2 * n)
            assert hop.reused and hop.tls is tls
            assert (hop.bytes_out, hop.bytes_in) == (len(up), len(down))
        assert [h["dst"] for h in pair.headers] == [f"10.2.0.7:{n}" for n in (1, 2, 3, 4)]
        assert all(reason is None for _, reason in pair.ends), pair.ends
        assert pair.server_hops[-1].idle  # waiting for a fifth
    finally:
        pair.stop()


def test_a_server_that_does_not_reuse_gets_a_stream_per_connection(pki):
    """The offer declined (`OK`, as an agent before reuse answers): the
    stream is TLS's own, ended by close_notify, and no link comes back."""
    pair = Reuse(pki, server_reuses=False)
    try:
        pod, hop = pair.stream(1)
        _exchange(pair, pod, 0, b"a" * 70_000, b"b" * 70_000)
        pair.wait(lambda: len(pair.ends) == 2)
        assert not hop.framed and hop.close_notify == {"sent": True, "received": True}
        assert pair.client_links == [] and all(r is None for _, r in pair.ends), pair.ends
    finally:
        pair.stop()


def test_both_hop_kinds_answer_what_the_mesh_asks():
    """mesh/node.py drives Hop (OpenSSL) and KtlsHop (the kernel's TLS)
    alike: every attribute it reads of a hop is on both (the kernel-TLS
    mode runs only in the guests, so a missing one would show only there)."""
    from meshagent.mesh.ktls import KtlsHop

    for name in ("begin", "reused", "idle", "resumed", "new_session", "close_notify",
                 "connected", "refuse", "reset", "finish", "limit", "holds", "phase"):  # fmt: skip
        assert hasattr(Hop, name) or name == "phase", name  # phase: set per instance
        assert hasattr(KtlsHop, name) or name in ("resumed", "phase"), name
    assert KtlsHop.reused is False and KtlsHop.idle is False


def test_tls_reasons():
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "certificate has expired"
    assert tls_reason(err) == "expired"
    err.verify_message = "unable to get local issuer certificate"
    assert tls_reason(err) == "unknown_ca"
    assert (
        tls_reason(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")) == "not_tls"
    )
    assert tls_reason(ssl.SSLError(1, "something new")) == "handshake"
