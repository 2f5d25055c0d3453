"""Two nodes, one mesh (mesh/): each node a network namespace with its own
pod bridge and its own agent, joined by a veth wire. A connection from an
attached pod on node-a to a pod on node-b crosses the wire in mutual TLS
1.3; the server sees the client pod's own address; each side checks who
the other is, and refuses and counts what it must."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from meshenv import wait_for
from meshlab import payloads

PORT = 9200
MARKER = b"MESHAGENT-PLAINTEXT-MARKER-0123456789"


ECHO = r"""
import socket, sys, threading
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
l = socket.socket(family)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(64); l.settimeout(120)
print("ready", flush=True)
lock = threading.Lock()  # print() from threads interleaves without it
def serve(c, peer):
    with c:
        c.settimeout(60)
        while data := c.recv(1 << 16):
            c.sendall(data)
    with lock:
        print(peer[0], flush=True)
for _ in range(int(sys.argv[3])):
    c, peer = l.accept()
    threading.Thread(target=serve, args=(c, peer)).start()
"""

SEND_MARKERS = r"""
import socket, sys
marker = sys.argv[3].encode()
data = marker * 20000
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(data); s.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(1 << 16):
    got += chunk
assert got == data, (len(got), len(data))
print(len(got))
"""


def kernel_has_tls() -> bool:
    """This kernel offers the tls ULP (a socket not yet connected says so
    with ENOTCONN; without the module, ENOENT)."""
    import errno
    import socket

    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, 31, b"tls")
        except OSError as exc:
            return exc.errno == errno.ENOTCONN
    return True


def echo_server(env, pod, host: str, conns: int):
    proc = env.popen(pod, [sys.executable, "-c", ECHO, host, str(PORT), str(conns)],
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.kernel_matrix
def test_a_transfer_between_nodes_carries_no_plaintext_on_the_wire(mesh_pair, tmp_path):
    """The marker crosses the wire 40,000 times (20,000 each way) through the
    mesh and never appears in a captured payload; the same transfer from an
    unattached pod (direct, plaintext) shows it: the capture sees payloads."""
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    plain = env_a.create_pod("plain")  # not attached: goes direct
    srv = echo_server(env_b, server, "0.0.0.0", 2)
    capture = nodes.capture(tmp_path / "wire.pcap")
    out = env_a.script(client, SEND_MARKERS, server.ip4, str(PORT), MARKER.decode())
    assert int(out) == len(MARKER) * 20000
    assert srv.stdout.readline().strip() == client.ip4, "the server saw another address"
    env_a.script(plain, SEND_MARKERS, server.ip4, str(PORT), MARKER.decode())
    assert srv.stdout.readline().strip() == plain.ip4
    packets = capture.stop()
    meshed = payloads(packets, port=15008)
    direct = payloads(packets, port=PORT)
    # scapy in Python drops packets at a veth's pace: not every packet is
    # seen; any 74 bytes of the plaintext would hold the marker's start.
    assert sum(map(len, meshed)) > 100_000, "too few of the hop's bytes were captured"
    assert not any(MARKER[:16] in p for p in meshed), "plaintext on the wire"
    assert any(MARKER[:16] in p for p in direct), "the capture saw no plaintext at all"
    assert meshed[0][:1] == b"\x16", "the hop does not start with a TLS handshake record"
    # Both sides name each other.
    conns = nodes.agents[0].request("connections")["connections"]
    out_hop = next(c for c in conns if c["pod"] == "client")
    kernel = nodes.agents[0].request("status")["mesh"]["kernel_tls"]
    # Where the kernel has TLS, the hop must run in it: the self-test passed.
    assert kernel["on"] == kernel_has_tls(), kernel
    assert out_hop["datapath"] == ("ktls" if kernel["on"] else "tls"), out_hop
    assert out_hop["state"] == "closed", out_hop
    assert out_hop["mtls"] == {"direction": "out", "node": "node-b", "resumed": False,
                               "peer": "spiffe://mesh.test/meshagent/node/node-b",
                               "close_notify": {"sent": True, "received": True}}  # fmt: skip
    conns = nodes.agents[1].request("connections")["connections"]
    in_hop = next(c for c in conns if c["pod"] == "server")
    assert in_hop["mtls"]["source"] == "spiffe://mesh.test/node/node-a/pod/client", in_hop
    assert in_hop["mtls"]["peer"] == "spiffe://mesh.test/meshagent/node/node-a"
    assert in_hop["client"].startswith(client.ip4 + ":")


RAW_HOP = r"""
import json, socket, ssl, sys
certs, host, header = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_cert_chain(certs + "/node.crt", certs + "/node.key")
ctx.load_verify_locations(certs + "/ca.crt")
try:
    raw = socket.create_connection((host, 15008), timeout=20)
    tls = ctx.wrap_socket(raw)
    tls.sendall(b"MESH/1 " + header.encode() + b"\n")
    reply = tls.recv(200)
    print(json.dumps({"reply": reply.decode(errors="replace")}))
except (OSError, ssl.SSLError) as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
"""


@pytest.mark.kernel_matrix
def test_a_peer_that_is_not_who_it_must_be_is_refused_and_counted(mesh_pair):
    """From a pod of node-a (not attached: straight to the server pod's port
    15008): a certificate of another CA, an expired one, node-a's asserting
    a pod of node-b, node-b's used from node-a's addresses. Each is refused
    by the server's node and counted by reason; the right one passes."""
    import datetime as dt

    from meshagent.mesh import ca as mesh_ca

    nodes, _client, server = mesh_pair
    env_a = nodes.envs[0]
    raw = env_a.create_pod("raw")
    srv = echo_server(nodes.envs[1], server, "0.0.0.0", 1)
    other_ca = nodes.dir / "other-ca"
    mesh_ca.init(other_ca, "mesh.test")
    foreign = nodes.issue(0, ca=other_ca, out=nodes.dir / "foreign")
    # It trusts the mesh's CA (so it goes on to show its own certificate).
    (foreign / "ca.crt").write_bytes((nodes.ca / "ca.crt").read_bytes())
    expired = nodes.issue(0, hours=1, out=nodes.dir / "expired",
                          not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3))  # fmt: skip
    dst = f"{server.ip4}:{PORT}"

    def hop(certs, src: str) -> dict:
        header = json.dumps({"dst": dst, "src": src})
        return json.loads(env_a.script(raw, RAW_HOP, str(certs), server.ip4, header))

    mine = "spiffe://mesh.test/node/node-a/pod/raw"
    assert "error" in hop(foreign, mine)
    assert "error" in hop(expired, mine)
    assert hop(nodes.certs(0), "spiffe://mesh.test/node/node-b/pod/server")["reply"] == (
        "NO identity_not_on_node\n")  # fmt: skip
    refused = hop(nodes.certs(1), "spiffe://mesh.test/node/node-b/pod/server")
    assert "reply" not in refused or not refused["reply"].startswith("OK"), refused
    good = hop(nodes.certs(0), mine)
    assert good["reply"].startswith("OK"), good
    srv.wait(timeout=30)
    counted = nodes.agents[1].request("status")["mesh"]["handshakes"]
    for reason in ("unknown_ca", "expired", "identity_not_on_node", "not_on_node"):
        assert counted.get(f"in {reason}") == 1, (reason, counted)
    assert counted.get("in ok") == 1, counted


@pytest.mark.kernel_matrix
def test_many_connections_across_nodes_write_at_once_in_random_chunks(mesh_pair):
    """200 connections at once from node-a to node-b, both ends writing at
    once in random chunks of 1 B to 256 KiB: every byte arrives, in order."""
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    conns = 200
    size = 512 * 1024
    srv = env_b.server(server, PORT, "--random-size", str(size), "--random-chunks")
    proc = env_a.tcptool(
        client, "stress", "--host", server.ip4, "--port", str(PORT), "--conns", str(conns),
        "--random-size", str(size), "--random-chunks", "--timeout", "90",
    )  # fmt: skip
    out, _ = proc.communicate(timeout=240)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines.pop() == {"done": conns, "stuck": 0}
    by_client = {line["id"]: line for line in lines}
    by_server, broken = {}, []
    for _ in range(conns):
        try:
            seen = srv.next()
        except AssertionError:
            failed = [line for line in lines if "recv_error" in line or "connect_error" in line]
            logs = "\n".join(a.log()[-3000:] for a in nodes.agents)
            raise AssertionError((len(by_server), failed[:5], logs)) from None
        if "id" in seen:
            by_server[seen["id"]] = seen
        else:  # not even its first 8 bytes arrived
            broken.append(seen)
    logs = "\n".join(a.log()[-3000:] for a in nodes.agents)
    assert not broken, (broken, logs)
    assert sorted(by_client) == sorted(by_server) == list(range(conns))
    for conn_id, sent in by_client.items():
        got = by_server[conn_id]
        assert "recv_error" not in sent and "recv_error" not in got, (sent, got, logs)
        assert got["recv_sha"] == sent["sent_sha"], f"node-a->node-b bytes differ on {conn_id}"
        assert sent["recv_sha"] == got["sent_sha"], f"node-b->node-a bytes differ on {conn_id}"
        assert got["peer"] == client.ip4
    counted = nodes.agents[1].request("status")["mesh"]["handshakes"]
    assert sum(counted.get(f"in {how}", 0) for how in ("ok", "resumed", "reused")) == conns
    # A burst to a node with no session yet: one full handshake, and the
    # hops made meanwhile waited for it and resumed its session (or, in the
    # OpenSSL mode, went on a link that a finished connection gave back).
    counted = nodes.agents[0].request("status")["mesh"]["handshakes"]
    assert counted.get("out ok") == 1, counted
    assert counted.get("out resumed", 0) + counted.get("out reused", 0) == conns - 1, counted


@pytest.mark.kernel_matrix
def test_half_close_across_nodes_then_ten_megabytes_back(mesh_pair):
    """The client sends, shuts its side (close_notify, FIN), and the server
    sends 10 MB after it saw the end: every byte arrives."""
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    back = 10 * 1024 * 1024
    srv = env_b.server(server, PORT, "--send", str(back), "--send-after-eof")
    got = env_a.client(client, server.ip6, PORT, "--send", "100000")
    seen = srv.next()
    assert seen["recv_sha"] == got["sent_sha"] and seen["recv_bytes"] == 100000
    assert got["recv_bytes"] == back and got["recv_sha"] == seen["sent_sha"]
    assert seen["peer"] == client.ip6
    # The next hop to node-b resumes the TLS session (no certificates sent
    # or checked again), and node-b still knows who is asking.
    a, b = nodes.agents
    wait_for(lambda: a.request("status")["mesh"]["sessions"] == ["node-b"], what="a session")
    srv = env_b.server(server, PORT + 1, "--send", "1000")
    got = env_a.client(client, server.ip4, PORT + 1, "--send", "1000")
    assert srv.next()["recv_sha"] == got["sent_sha"]
    assert b.request("status")["mesh"]["handshakes"] == {"in ok": 1, "in resumed": 1}
    last = [c for c in b.request("connections")["connections"] if c.get("mtls")][-1]
    assert last["mtls"]["source"] == "spiffe://mesh.test/node/node-a/pod/client", last
    out = [c for c in a.request("connections")["connections"] if c.get("mtls")][-1]
    assert out["mtls"]["resumed"] is True and out["mtls"]["peer"].endswith("/node/node-b"), out


@pytest.mark.kernel_matrix
def test_one_connection_after_another_goes_on_one_link(mesh_pair):
    """Ten connections one after another from a pod to the same server pod:
    in the OpenSSL mode the first one's TLS connection carries all ten
    (framed streams, no TCP or TLS handshake after the first), each
    stream whole both ways and seen from the client pod's own address; in
    the kernel-TLS mode each is a connection of its own, resumed."""
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    a, b = nodes.agents
    srv = env_b.server(server, PORT, "--send", "3000")
    for n in range(10):
        got = env_a.client(client, server.ip4, PORT, "--send", str(1000 + n), "--seed", str(n))
        seen = srv.next()
        assert seen["recv_sha"] == got["sent_sha"] and seen["recv_bytes"] == 1000 + n
        assert got["recv_sha"] == seen["sent_sha"] and got["recv_bytes"] == 3000
        assert seen["peer"] == client.ip4
    mesh_a, mesh_b = a.request("status")["mesh"], b.request("status")["mesh"]
    if mesh_a["kernel_tls"]["on"]:
        assert mesh_a["handshakes"] == {"out ok": 1, "out resumed": 9}, mesh_a
        return
    assert mesh_a["handshakes"] == {"out ok": 1, "out reused": 9}, mesh_a
    assert mesh_b["handshakes"] == {"in ok": 1, "in reused": 9}, mesh_b
    assert mesh_a["links"] == {"idle": 1, "taken": 9, "ended": 0}, mesh_a
    conns = [c for c in a.request("connections")["connections"] if c.get("mtls")]
    assert len(conns) == 10 and all(c["state"] == "closed" for c in conns), conns
    assert [bool(c["mtls"].get("reused")) for c in conns] == [False] + [True] * 9, conns
    inbound = [c for c in b.request("connections")["connections"] if c.get("mtls")]
    assert [c["mtls"]["source"] for c in inbound] == [
        "spiffe://mesh.test/node/node-a/pod/client"] * 10, inbound  # fmt: skip


@pytest.mark.kernel_matrix
def test_a_node_without_kernel_tls_and_one_with_it_end_streams_cleanly_both_ways(
    mesh_nodes, tmp_path
):
    """node-a keeps the hop's bytes in OpenSSL (--ktls off), node-b in the
    kernel's TLS where it has it: they meet on TLS 1.2 and each half-close
    crosses as close_notify, then the FIN (a FIN alone would reset the
    stream: hop.py, ktls.TlsSpliceLeg). On a kernel with TLS the capture
    shows alert records (type 21, in the clear in TLS 1.2) from both sides."""
    nodes = mesh_nodes
    env_a, env_b = nodes.envs
    nodes.start(0, "--ktls", "off")
    nodes.start(1)
    client_a, server_b = env_a.create_pod("client"), env_b.create_pod("server")
    client_b, server_a = env_b.create_pod("client2"), env_a.create_pod("server2")
    nodes.agents[0].attach(client_a)
    nodes.agents[0].attach(server_a)
    nodes.agents[1].attach(client_b)
    nodes.agents[1].attach(server_b)
    for i, pod in ((1, "server"), (0, "server2")):
        wait_for(lambda i=i, pod=pod: (nodes.agents[i].pod_status(pod) or {}).get("mesh", {})
                 .get("inbound"), what=f"{pod}'s hop listener")  # fmt: skip
    # Small transfers, a pause between them, for scapy to keep up. A clean
    # end each way (either side resets a stream that ends without
    # close_notify) and each connection's record show the alerts arrived.
    capture = nodes.capture(tmp_path / "wire.pcap")
    back = 300_000
    for env_c, client, env_s, server in ((env_a, client_a, env_b, server_b),
                                         (env_b, client_b, env_a, server_a)):  # fmt: skip
        srv = env_s.server(server, PORT, "--send", str(back), "--send-after-eof")
        got = env_c.client(client, server.ip4, PORT, "--send", "2000")
        seen = srv.next()
        assert seen["recv_sha"] == got["sent_sha"] and seen["recv_bytes"] == 2000
        assert got["recv_bytes"] == back and got["recv_sha"] == seen["sent_sha"]
        time.sleep(1)
    packets = capture.stop()
    kernel = nodes.agents[1].request("status")["mesh"]["kernel_tls"]
    assert kernel["on"] == kernel_has_tls(), kernel
    for agent in nodes.agents:
        conns = [c for c in agent.request("connections")["connections"] if c.get("mtls")]
        assert len(conns) == 2 and all(c["state"] == "closed" for c in conns), conns
        for conn in conns:  # each end sent its close_notify and had the other's
            assert conn["mtls"]["close_notify"] == {"sent": True, "received": True}, conn
        assert not agent.request("status")["mesh"]["handshakes"].keys() - {"in ok", "out ok"}
    if kernel["on"]:  # TLS 1.2: the record types are in the clear
        from scapy.layers.inet import TCP

        # An alert record's header (type 21, TLS 1.2, the length of an
        # encrypted two-byte alert: AES-GCM 26, ChaCha20-Poly1305 18),
        # anywhere in a segment (it often follows the last data record).
        heads = (b"\x15\x03\x03\x00\x1a", b"\x15\x03\x03\x00\x12")
        alerts = {p[TCP].sport == 15008 for p in packets
                  if TCP in p and 15008 in (p[TCP].sport, p[TCP].dport)
                  and any(h in bytes(p[TCP].payload) for h in heads)}  # fmt: skip
        # scapy keeps only a part of the packets at a veth's pace: some alert.
        assert alerts, "no TLS alert record on the wire"


def test_same_node_and_unmeshed_destinations_go_as_before(mesh_pair):
    """A pod on node-a to another pod on node-a: no hop (the node's own
    data path); status says which pods take hops."""
    nodes, client, _server = mesh_pair
    env_a = nodes.envs[0]
    local = env_a.create_pod("local")
    srv = env_a.server(local, PORT, "--send", "1000")
    got = env_a.client(client, local.ip4, PORT, "--send", "1000")
    assert srv.next()["recv_sha"] == got["sent_sha"]
    conns = nodes.agents[0].request("connections")["connections"]
    last = [c for c in conns if c["orig_dst"] == f"{local.ip4}:{PORT}"][-1]
    assert last["datapath"] not in ("tls", "ktls") and last["mtls"] is None, last
    text = env_a.meshagent("status").stdout
    assert "the hop's bytes: " in text
    probe = json.loads(env_a.meshagent("probe-kernel", "-o", "json").stdout)
    assert probe["mesh_hop"]["kernel_tls"] == kernel_has_tls(), probe["mesh_hop"]
    assert "mesh: node node-a of mesh.test (2 nodes)" in text
    assert "client: spiffe://mesh.test/node/node-a/pod/client takes hops on 15008" in text
    # In kernel mode, the pod on this node is reached direct (the kernel
    # counts it); the pod on node-b still over mutual TLS, through the forwarder.
    agent = nodes.agents[0]
    assert agent.request("attach", pod="client", mode="kernel")["mode"] == "kernel"
    far = nodes.envs[1].server(_server, PORT, "--send", "1000")
    for host, srv_ in ((local.ip4, srv), (_server.ip4, far)):
        got = env_a.client(client, host, PORT, "--send", "3000")
        assert srv_.next()["recv_sha"] == got["sent_sha"]

    def last_to(host: str) -> dict | None:
        conns = agent.request("connections")["connections"]
        return next((c for c in reversed(conns) if c["orig_dst"] == f"{host}:{PORT}"), None)

    wait_for(lambda: (last_to(local.ip4) or {}).get("datapath") == "kernel", 10, "kernel record")
    near, hop = last_to(local.ip4), last_to(_server.ip4)
    assert (near["bytes_out"], near["bytes_in"], near["mtls"]) == (3000, 1000, None), near
    assert hop["mtls"] is not None and hop["datapath"] in ("tls", "ktls"), hop


def test_bad_mesh_files_and_certificates_are_refused_at_start(mesh_nodes, tmp_path):
    """One line, non-zero, nothing made."""
    nodes = mesh_nodes
    env = nodes.envs[0]
    cases = {
        "nodes: [": "not YAML",
        "trustDomain: mesh.test\nnodes: []\n": "at least one",
        "trustDomain: mesh.test\nnodes:\n- {name: node-x, podCIDRs: [10.9.0.0/24]}\n":
            "this node, 'node-a', is not listed",
    }  # fmt: skip
    for text, expected in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        proc = env.meshagent("run", "--cgroup", env.cgroup_rel, "--mesh", str(bad), "--certs",
                             str(nodes.certs(0)), "--node-name", "node-a", check=False)  # fmt: skip
        assert proc.returncode == 1 and expected in proc.stderr, (text, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = env.meshagent("run", "--cgroup", env.cgroup_rel, "--mesh", str(nodes.mesh_file),
                         "--certs", str(nodes.certs(1)), "--node-name", "node-a", check=False)  # fmt: skip
    assert proc.returncode == 1 and "not node node-a" in proc.stderr, proc.stderr
    proc = env.meshagent("run", "--mesh", str(nodes.mesh_file), check=False)
    assert proc.returncode == 1 and "go together" in proc.stderr, proc.stderr
    assert not (env.state_dir / "agent.sock").exists()


ROTATE_CLIENT = textwrap.dedent(r"""
    import hashlib, os, socket, sys, threading, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
    back, got = hashlib.sha256(), [0]
    def read():
        while chunk := s.recv(1 << 16):
            back.update(chunk); got[0] += len(chunk)
    reader = threading.Thread(target=read); reader.start()
    digest = hashlib.sha256()
    block = bytes(range(256)) * 256
    deadline = time.monotonic() + float(sys.argv[3])
    stop = sys.argv[4] if len(sys.argv) > 4 else ""
    sent = 0
    while time.monotonic() < deadline and not (stop and os.path.exists(stop)):
        s.sendall(block); digest.update(block); sent += len(block)
        time.sleep(0.01)
    s.shutdown(socket.SHUT_WR)
    reader.join(60)
    print(sent, got[0], digest.hexdigest() == back.hexdigest())
""")


def test_certificates_rotate_during_a_transfer_without_dropping_it(mesh_pair):
    """New certificates for both nodes while a 30 s echo transfer runs: the
    transfer completes whole; the agents take the new files up, and a new
    connection is made with them."""
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    srv = echo_server(env_b, server, "0.0.0.0", 2)  # the long transfer, then one more
    before = [a.request("status")["mesh"]["certificate"]["serial"] for a in nodes.agents]
    proc = env_a.popen(client, [sys.executable, "-c", ROTATE_CLIENT, server.ip4, str(PORT), "30"],
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(lambda: nodes.agents[1].request("status")["mesh"]["hops"] == 1, what="the hop")
    for i in range(2):
        nodes.issue(i)
    for agent, old in zip(nodes.agents, before, strict=True):
        wait_for(lambda a=agent, o=old: a.request("status")["mesh"]["certificate"]["serial"] != o,
                 what="the new certificate taken up")  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    sent, got, same = out.split()
    assert int(sent) > 0 and sent == got and same == "True", out
    env_a.script(client, SEND_MARKERS, server.ip4, str(PORT), "after-rotation")
    for agent in nodes.agents:
        cert = agent.request("status")["mesh"]["certificate"]
        assert cert["reloads"] == 1 and cert["reload_errors"] == 0, cert
    counted = nodes.agents[1].request("status")["mesh"]["handshakes"]
    assert counted == {"in ok": 2}, counted
    srv.wait(timeout=30)


def test_the_two_node_demo_shows_the_hop_and_leaves_nothing(tmp_path):
    """`meshagent demo --nodes 2`, as a newcomer runs it: curl on node-a gets
    nginx's page from node-b, each side names the other, the wire carries no
    plaintext; afterwards no namespace, cgroup or process of it is left."""
    import os

    from meshenv import is_root

    from meshagent.host import cgroup

    if not is_root():
        pytest.skip("needs root: BPF, netns, cgroups")

    def made() -> set[str]:
        nets = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
        groups = {
            p.name for p in cgroup.cgroup2_mount().iterdir() if p.name.startswith("meshagent-demo")
        }
        return nets | groups

    before = made()
    proc = subprocess.run([sys.executable, "-m", "meshagent", "--state-dir", str(tmp_path),
                           "demo", "--nodes", "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count("-> 'hello from node-b, in plaintext only inside the pods'") == 2, out
    assert "workload spiffe://demo.mesh/node/node-a/pod/client" in out, out
    assert "the peer proved it is spiffe://demo.mesh/meshagent/node/node-b" in out, out
    assert "segments holding the page's text: 0" in out, out
    assert made() == before


@pytest.mark.kernel_matrix
def test_strict_pods_take_only_the_mesh_even_while_no_agent_runs(mesh_nodes):
    """A strict pod on node-b: an unattached pod of node-a is refused in
    plaintext, an attached one passes over the hop; a same-node attached pod
    passes too (delivered from inside the strict pod, with its own
    address), an unattached same-node pod is refused. With node-b's agent
    stopped, the strict pod stays closed to all, while a permissive pod of
    node-b is reached in plaintext (the client's node falls back and says
    so)."""
    nodes = mesh_nodes
    a, b = nodes.start_all()
    env_a, env_b = nodes.envs
    client = env_a.create_pod("client")
    outsider = env_a.create_pod("outsider")
    locked = env_b.create_pod("locked", mtls="strict")
    open_ = env_b.create_pod("open")
    neighbour = env_b.create_pod("neighbour")
    loner = env_b.create_pod("loner")
    a.attach(client)
    for pod in (locked, open_, neighbour):
        b.attach(pod)
    wait_for(lambda: (b.pod_status("locked") or {}).get("mesh", {}).get("inbound"),
             what="the strict pod's hop listener")  # fmt: skip
    assert b.pod_status("locked")["mesh"]["mode"] == "strict"
    servers = {pod.name: env_b.server(pod, PORT, "--send", "100") for pod in (locked, open_)}

    def reaches(env, src, dst) -> bool:
        proc = env.tcptool(src, "client", "--host", dst.ip4, "--port", str(PORT), "--send", "10",
                           "--timeout", "10")  # fmt: skip
        out, _ = proc.communicate(timeout=60)
        line = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        ok = proc.returncode == 0 and line.get("recv_bytes") == 100
        if ok:
            seen = servers[dst.name].next()
            assert seen["peer"] == src.ip4, seen  # always the client's own address
        return ok

    assert reaches(env_a, client, locked)
    assert not reaches(env_a, outsider, locked)
    assert reaches(env_b, neighbour, locked)
    assert not reaches(env_b, loner, locked)
    assert reaches(env_a, outsider, open_)
    nodes.agents[1].stop()
    nodes.agents[1] = None
    assert not reaches(env_a, client, locked), "a strict pod took plaintext while no agent ran"
    assert not reaches(env_b, loner, locked)
    assert reaches(env_a, client, open_)
    counted = a.request("status")["mesh"]["handshakes"]
    assert counted.get("out fallback_plaintext", 0) >= 2, counted
    last = [c for c in a.request("connections")["connections"] if c["pod"] == "client"][-1]
    assert last["mtls"]["fallback"].startswith("plaintext"), last


@pytest.mark.kernel_matrix
@pytest.mark.parametrize(("node", "pod", "counted"), [(0, "client", "out ok"), (1, "server", "in ok")],
                         ids=["client-node", "server-node"])  # fmt: skip
def test_a_takeover_on_either_node_hands_over_what_it_can_and_serves_new_hops(
    mesh_pair, tmp_path, node, pod, counted
):
    """What a client sees when the agent of its node, or of the server's
    node, is upgraded in place while a cross-node connection runs. With the
    hop in OpenSSL: a reset (its TLS session lives in the old agent and
    cannot move), never a clean end of a cut stream. With the kernel's TLS
    on the client's node: nothing, the kernel holds the session and the
    spliced hop is handed over whole; on the server's node the inbound hop
    is not handed over yet: a reset. Either way the new agent opens the
    pod's port 15008 again and the next connection crosses as before."""
    from meshenv import start_agent
    from test_takeover import answers

    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    echo_server(env_b, server, "0.0.0.0", 2)
    stop = tmp_path / "stop"
    proc = env_a.popen(client, [sys.executable, "-c", ROTATE_CLIENT, server.ip4, str(PORT), "600",
                                str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)  # fmt: skip
    old = nodes.agents[node]
    wait_for(lambda: old.request("status")["mesh"]["hops"] == 1, what="the hop")
    new = start_agent(nodes.envs[node], "--mesh", str(nodes.mesh_file), "--certs",
                      str(nodes.certs(node)), "--node-name", nodes.node_name(node), "--takeover",
                      log_name="new.log")  # fmt: skip
    nodes.agents[node] = new
    wait_for(lambda: old.proc.poll() is not None, 120, "the old agent to exit")
    wait_for(lambda: answers(new), 60, "the new agent to answer")
    stop.touch()
    out, err = proc.communicate(timeout=120)
    if new.request("status")["mesh"]["kernel_tls"]["on"] and pod == "client":
        sent, got, same = out.split()
        assert proc.returncode == 0 and sent == got and same == "True", (out, err)
        assert new.request("status")["took_over"]["conns"] == 1
    else:
        reset = "ConnectionResetError" in err or "BrokenPipeError" in err
        assert proc.returncode != 0 and reset, (out, err)
    wait_for(lambda: (new.pod_status(pod) or {}).get("mesh", {}).get("inbound"),
             what="the new agent's hop listener")  # fmt: skip
    assert int(env_a.script(client, SEND_MARKERS, server.ip4, str(PORT), "after")) == 5 * 20000
    assert new.request("status")["mesh"]["handshakes"] == {counted: 1}


def test_trace_shows_each_hop_with_the_identities_on_both_nodes(mesh_pair):
    """`meshagent trace -o json` on each node: node-a's closed event names
    the hop to node-b and the peer it verified; node-b's names the client
    workload and its node."""
    import threading

    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    srv = env_b.server(server, PORT, "--send", "300")
    seen: dict[str, list] = {"a": [], "b": []}
    tracers = []
    for key, env, pod in (("a", env_a, "client"), ("b", env_b, "server")):
        tracer = subprocess.Popen([sys.executable, "-m", "meshagent", "trace", "-o", "json", "--pod",
                                   pod], env=env.env, stdout=subprocess.PIPE, text=True)  # fmt: skip
        env.procs.append(tracer)
        tracers.append(tracer)
        threading.Thread(target=lambda t=tracer, k=key: seen[k].extend(json.loads(x) for x in t.stdout),
                         daemon=True).start()  # fmt: skip
    for agent in nodes.agents:
        wait_for(lambda a=agent: a.request("status")["tracing"], what="the trace to start")
    got = env_a.client(client, server.ip4, PORT, "--send", "700")
    assert got["recv_bytes"] == 300 and srv.next()["recv_bytes"] == 700

    def closed(key: str) -> list:
        return [e for e in seen[key] if e.get("source") == "forwarder" and e["event"] == "closed"]

    try:
        wait_for(lambda: closed("a") and closed("b"), 30, "both traces to show the hop")
    except AssertionError:
        raise AssertionError(seen) from None
    for tracer in tracers:
        tracer.terminate()
    out, inn = closed("a")[0], closed("b")[0]
    assert out["mtls"] == {"direction": "out", "node": "node-b", "resumed": False,
                           "peer": "spiffe://mesh.test/meshagent/node/node-b",
                           "close_notify": {"sent": True, "received": True}}, out  # fmt: skip
    assert (out["bytes_out"], out["bytes_in"]) == (700, 300)
    inn_mtls = {k: v for k, v in inn["mtls"].items() if k != "close_notify"}
    assert inn_mtls == {"direction": "in", "peer": "spiffe://mesh.test/meshagent/node/node-a",
                        "source": "spiffe://mesh.test/node/node-a/pod/client"}, inn  # fmt: skip
    assert any(e["event"] == "forwarded" and e.get("mtls") for e in seen["b"]), seen["b"]
    assert (inn["bytes_out"], inn["bytes_in"]) == (700, 300), inn


def test_probe_shows_the_hop_on_the_wire(mesh_pair):
    """`meshagent probe client SERVER:PORT` on node-a: steered, then the hop
    to node-b's port 15008, whose segments are TLS records; the node it
    proved to be."""
    nodes, _client, server = mesh_pair
    env_a, env_b = nodes.envs
    env_b.server(server, PORT)
    proc = env_a.meshagent("probe", "client", f"{server.ip4}:{PORT}", "-o", "json")
    result = json.loads(proc.stdout)
    assert result["verdict"] == "steered, then over the mesh's mutual-TLS hop", result
    hop = result["hop"]
    assert hop["to"] == f"{server.ip4}:15008" and hop["node"] == "node-b", hop
    assert hop["peer"] == "spiffe://mesh.test/meshagent/node/node-b", hop
    assert "handshake" in hop["tls_records"] and "application_data" in hop["tls_records"], hop
    assert hop["payload_bytes"] > 0 and hop["segments_not_tls"] == 0, hop
    text = env_a.meshagent("probe", "client", f"{server.ip4}:{PORT}").stdout
    assert f"hop: to {server.ip4}:15008 (node node-b" in text, text
