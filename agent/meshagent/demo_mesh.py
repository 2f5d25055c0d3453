"""`meshagent demo --nodes 2`: two nodes of a mesh on this machine, each a
network namespace with its own pod bridge and its own agent, a wire between
them; nginx on node-b, curl on node-a, and what each side and the wire saw.
Everything it makes, it removes (nothing of the host's own traffic is
touched: each agent attaches at a cgroup of the demo's own)."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from meshagent.client import agent_running, request
from meshagent.demo import Echo, _curl, _stop, _wait, nginx_conf
from meshagent.errors import MeshError
from meshagent.state import StateDir

TRUST_DOMAIN = "demo.mesh"
BODY = "hello from node-b, in plaintext only inside the pods"
ETH_P_ALL = 0x0003


class WireTap:
    """Every TCP payload on an interface of a netns (an AF_PACKET socket
    opened there, read by a thread; scapy parses the frames)."""

    def __init__(self, netns_name: str, iface: str) -> None:
        from meshagent.host import netns

        fd = netns.open_fd(netns_name)
        try:
            with netns.entered(fd):
                self.sock = socket.socket(
                    socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
                )
                self.sock.bind((iface, 0))
        finally:
            import os

            os.close(fd)
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping and len(self.frames) < 200_000:
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> list[tuple[int, int, bytes]]:
        """(sport, dport, payload) of each TCP segment with a payload."""
        from scapy.layers.inet import TCP
        from scapy.layers.l2 import Ether

        time.sleep(0.3)
        self.stopping = True
        self.thread.join(5)
        self.sock.close()
        out = []
        for frame in self.frames:
            packet = Ether(frame)
            if TCP in packet and bytes(packet[TCP].payload):
                out.append((packet[TCP].sport, packet[TCP].dport, bytes(packet[TCP].payload)))
        return out


def run_mesh_demo(echo: Echo) -> None:
    import yaml

    from meshagent.host import cgroup
    from meshagent.mesh import ca
    from meshagent.mesh.lab import Lab, free_octet
    from meshagent.pods.model import NodeConfig
    from meshagent.pods.standalone import create_pod, delete_pod, popen
    from meshagent.pods.store import PodStore

    for tool in ("curl", "nginx"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            raise MeshError(f"demo needs {tool}: run scripts/bootstrap")
    started = time.monotonic()
    tag = f"md{secrets.token_hex(2)}"
    with ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="meshagent-demo-mesh-"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        lab = Lab.plan(tag, free_octet())
        lab.create()
        cleanup.callback(lab.remove)
        a, b = lab.nodes
        echo(f"1. nodes: {a.name} (netns {a.netns}, pods {a.cidr4}) and {b.name} (netns"
             f" {b.netns}, pods {b.cidr4}), a veth wire between them")  # fmt: skip
        ca.init(work / "ca", TRUST_DOMAIN)
        mesh_file = work / "mesh.yaml"
        mesh_file.write_text(yaml.safe_dump(lab.mesh_file(TRUST_DOMAIN)))
        for node in lab.nodes:
            issued = ca.issue(work / "ca", node.name, work / node.name)
        echo(f"2. identity: a CA for spiffe://{TRUST_DOMAIN} (meshagent ca init); each node its"
             f" own key and a 24 h certificate, e.g. {issued.identity}")  # fmt: skip

        agents, stores, pods = [], [], []
        for node, pod_name in ((a, "client"), (b, "server")):
            state = work / f"state-{node.name}"
            cg = f"meshagent-demo-{tag}-{node.name}"
            cgroup.create(cgroup.cgroup2_mount() / cg)
            cleanup.callback(cgroup.remove, cgroup.cgroup2_mount() / cg)
            store = PodStore(state)
            config = NodeConfig(bridge=node.bridge, cidr4=node.cidr4, cidr6=node.cidr6,
                                cgroup_parent=f"{cg}/pods", netns_prefix=f"{tag}-{node.name[-1]}-",
                                node_netns=node.netns)  # fmt: skip
            pod = create_pod(store, pod_name, node=config)
            cleanup.callback(delete_pod, store, pod_name)
            log_file = open(work / f"agent-{node.name}.log", "w")  # noqa: SIM115
            cleanup.callback(log_file.close)
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshagent", "--state-dir", str(state), "run", "--cgroup",
                 cg, "--metrics-addr", "127.0.0.1:0", "--mesh", str(mesh_file), "--certs",
                 str(work / node.name), "--node-name", node.name],
                stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
            cleanup.callback(_stop, proc, state)
            agents.append((proc, StateDir(state).socket, work / f"agent-{node.name}.log"))
            stores.append(store)
            pods.append(pod)
        client, server = pods
        for proc, sock, log in agents:
            _wait(lambda p=proc, s=sock: p.poll() is not None or agent_running(s), 120, "an agent")
            if proc.poll() is not None:
                raise MeshError(f"demo: an agent failed: {log.read_text()[-2000:]}")
        (sock_a, sock_b) = (agents[0][1], agents[1][1])
        request(sock_a, "attach", pod="client")
        request(sock_b, "attach", pod="server")
        echo(f"3. agents: one per node, each with its own state dir and cgroup; client"
             f" ({client.ip4}) attached on {a.name}, server ({server.ip4}) on {b.name}")  # fmt: skip

        conf = work / "nginx.conf"
        nginx_dir = work / "nginx"
        nginx_dir.mkdir()
        conf.write_text(nginx_conf(nginx_dir, BODY))
        nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
        popen(server, [nginx_bin, "-c", str(conf), "-p", str(nginx_dir)], stderr=subprocess.DEVNULL)
        _wait(lambda: (nginx_dir / "nginx.pid").exists(), 10, "nginx in the server pod")
        _wait(lambda: any((p.get("mesh") or {}).get("inbound")
                          for p in request(sock_b, "status")["pods"]), 10, "the hop listener")  # fmt: skip

        tap = WireTap(a.netns, lab.wire)
        for url in (f"http://{server.ip4}/", f"http://[{server.ip6}]/"):
            code, body = _curl(client, url)
            if code != 0:
                raise MeshError(f"demo: curl {url} from client failed (exit {code})")
            echo(f"4. curl {url} on {a.name} -> {body!r}")
        segments = tap.stop()

        out = [c for c in request(sock_a, "connections")["connections"] if c.get("mtls")]
        inn = [c for c in request(sock_b, "connections")["connections"] if c.get("mtls")]
        echo("5. what each side saw:")
        for conn in out[-1:]:
            echo(f"   {a.name}: {conn['client']} -> {conn['orig_dst']} over mutual TLS; the"
                 f" peer proved it is {conn['mtls'].get('peer')}")  # fmt: skip
        for conn in inn[-1:]:
            echo(f"   {b.name}: from {conn['client']}, node {conn['mtls'].get('peer')},"
                 f" workload {conn['mtls'].get('source')}")  # fmt: skip
        access = (nginx_dir / "access.log").read_text().split("\n")
        peers = sorted({line.split()[0] for line in access if line})
        echo(f"   nginx saw the client pod's own addresses: {', '.join(peers)}")

        hop = [p for s, d, p in segments if 15008 in (s, d)]
        seen = sum(map(len, hop))
        records = sorted({f"0x{p[0]:02x}" for p in hop})
        plain = sum(BODY[:20].encode() in p for _s, _d, p in segments)
        echo(f"6. the wire: {len(hop)} segments, {seen} bytes to and from port 15008, TLS records"
             f" ({', '.join(records)} at segment starts); segments holding the page's text:"
             f" {plain}")  # fmt: skip
        if plain or not hop:
            raise MeshError("demo: the wire did not carry the hop as TLS only")
        handshakes = request(sock_b, "status")["mesh"]["handshakes"]
        done = ", ".join(f"{k}={v}" for k, v in handshakes.items())
    echo(f"\nSummary: two nodes, one mesh; {done} on {b.name}; the page crossed the wire"
         f" encrypted, both sides knew who the other was. Everything the demo made is"
         f" removed. {time.monotonic() - started:.1f}s.")  # fmt: skip
