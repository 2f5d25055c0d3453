"""Two nodes of a mesh on this machine, for tests and the bench: a Lab
(meshagent/mesh/lab.py: two node namespaces and a wire), a CA, a mesh
file, and per node a MeshEnv whose bridge lives in that node's namespace
and an agent with its own state dir and cgroup. cleanup() removes all."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import meshenv
from meshenv import AgentProc, MeshEnv, make_env, start_agent

HELPERS = Path(__file__).resolve().parent
TRUST_DOMAIN = "mesh.test"


@dataclass
class TwoNodes:
    lab: object  # meshagent.mesh.lab.Lab
    dir: Path  # CA, certificates, mesh file
    envs: list[MeshEnv] = field(default_factory=list)
    agents: list[AgentProc | None] = field(default_factory=list)

    @property
    def mesh_file(self) -> Path:
        return self.dir / "mesh.yaml"

    @property
    def ca(self) -> Path:
        return self.dir / "ca"

    def certs(self, i: int) -> Path:
        return self.dir / self.lab.nodes[i].name

    def node_name(self, i: int) -> str:
        return self.lab.nodes[i].name

    def issue(self, i: int, hours: float = 24.0, ca: Path | None = None, out: Path | None = None,
              not_before=None) -> Path:  # fmt: skip
        from meshagent.mesh import ca as mesh_ca

        out = out or self.certs(i)
        mesh_ca.issue(ca or self.ca, self.node_name(i), out, hours, not_before)
        return out

    def start(self, i: int, *extra: str) -> AgentProc:
        agent = start_agent(self.envs[i], "--mesh", str(self.mesh_file), "--certs",
                            str(self.certs(i)), "--node-name", self.node_name(i), *extra)  # fmt: skip
        self.agents[i] = agent
        return agent

    def start_all(self, *extra: str) -> list[AgentProc]:
        return [self.start(i, *extra) for i in range(2)]

    def stop_all(self) -> None:
        for i, agent in enumerate(self.agents):
            if agent is not None:
                code = agent.stop()
                assert code == 0, f"agent of {self.node_name(i)} exited {code}: {agent.log()}"
                self.agents[i] = None

    def capture(self, out: Path) -> Capture:
        """A scapy capture on the wire (in the first node's namespace)."""
        return Capture.start(self.lab.nodes[0].netns, self.lab.wire, out)

    def cleanup(self) -> None:
        for agent in self.agents:
            if agent is not None:
                agent.stop()
        for env in self.envs:
            env.cleanup()
        self.lab.remove()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_two_nodes() -> TwoNodes:
    import secrets

    import yaml

    from meshagent.mesh import ca as mesh_ca
    from meshagent.mesh.lab import Lab, free_octet

    tag = secrets.token_hex(3)
    meshenv.TAGS.add(tag)  # the residue check's scope: netns mt<tag>-a, -b
    lab = Lab.plan(f"mt{tag}", free_octet())
    lab.create()
    nodes = TwoNodes(lab, Path(tempfile.mkdtemp(prefix=f"meshtest-{tag}-lab-")))
    try:
        mesh_ca.init(nodes.ca, TRUST_DOMAIN)
        nodes.mesh_file.write_text(yaml.safe_dump(lab.mesh_file(TRUST_DOMAIN)))
        for i, node in enumerate(lab.nodes):
            nodes.issue(i)
            env = make_env()
            env.bridge, env.cidr4, env.cidr6 = node.bridge, node.cidr4, node.cidr6
            env.node_netns = node.netns
            nodes.envs.append(env)
            nodes.agents.append(None)
    except BaseException:
        nodes.cleanup()
        raise
    return nodes


CAPTURE = r"""
import os, sys, time
from scapy.all import TCP, AsyncSniffer, wrpcap
iface, out, stop = sys.argv[1:4]
# No BPF filter: it needs libpcap, which this machine need not have.
sniffer = AsyncSniffer(iface=iface, lfilter=lambda p: TCP in p, store=True,
                       started_callback=lambda: print("ready", flush=True))
sniffer.start()
deadline = time.monotonic() + 300
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.3)
packets = sniffer.stop()
wrpcap(out, packets)
print(len(packets), flush=True)
"""


@dataclass
class Capture:
    proc: subprocess.Popen
    out: Path
    stop_file: Path

    @classmethod
    def start(cls, netns: str, iface: str, out: Path) -> Capture:
        stop = out.with_suffix(".stop")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", CAPTURE, iface, str(out), str(stop)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        line = proc.stdout.readline()
        if line.strip() != "ready" or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the capture did not start: {line!r} {proc.stderr.read()}")
        return cls(proc, out, stop)

    def stop(self) -> list:
        """The packets captured (scapy's)."""
        from scapy.all import rdpcap

        self.stop_file.touch()
        try:
            self.proc.communicate(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return list(rdpcap(str(self.out)))


def payloads(packets: list, port: int | None = None) -> list[bytes]:
    """The TCP payloads of the packets (to or from port, if given)."""
    from scapy.layers.inet import TCP

    out = []
    for packet in packets:
        if TCP not in packet:
            continue
        tcp = packet[TCP]
        if port is not None and port not in (tcp.sport, tcp.dport):
            continue
        data = bytes(tcp.payload)
        if data:
            out.append(data)
    return out
