"""`meshagent probe POD DEST:PORT`: where does this pod's connection to
DEST actually go?

A worker process joins the pod (its netns and cgroup, so the connect hooks
see it as the pod's), starts a scapy capture on every interface of the pod,
lo included, makes one real connection (or, with --syn, sends one crafted
SYN), and reports the packets it saw. While it runs, a trace session with
the agent (if one runs) collects the kernel's decision and the forwarder's
events; they are joined to this exact connection by its socket cookie and
client port.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from meshagent.addrs import format_endpoint
from meshagent.errors import MeshError
from meshagent.state import StateDir

Echo = Callable[[str], None]
SO_COOKIE = 57


def parse_target(text: str) -> tuple[str, int]:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    import ipaddress

    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise MeshError(f"{text!r}: use ADDRESS:PORT, e.g. 10.244.0.3:80 or [fd00::1]:80") from None
    if not 1 <= number <= 65535:
        raise MeshError(f"{text!r}: {number} is not a TCP port")
    return host, number


# -- the worker, inside the pod ----------------------------------------------
def worker(host: str, port: int, syn: bool, timeout: float) -> dict:
    """Capture on the pod's interfaces while connecting (or sending a SYN).

    The capture is one AF_PACKET socket for every interface of the netns,
    opened before the first packet (so nothing is missed, unlike a sniffer
    thread that starts when it starts), with the kernel's receive
    timestamps; scapy decodes what it caught and crafts the --syn probe."""
    from scapy.all import TCP, sr1
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    capture.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    capture.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    capture.setblocking(False)
    result: dict = {"target": format_endpoint(host, port)}
    started = time.monotonic()
    wall = time.time()
    if syn:
        layer = IPv6(dst=host) if ":" in host else IP(dst=host)
        answer = sr1(layer / TCP(dport=port, flags="S"), timeout=timeout, verbose=False)
        flags = str(answer[TCP].flags) if answer is not None and TCP in answer else ""
        result["answer"] = (
            "SYN-ACK" if "S" in flags and "A" in flags else "RST" if "R" in flags else "nothing"
        )
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        result["socket_cookie"] = int.from_bytes(
            sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little"
        )
        try:
            sock.connect((host, port))
            result["connected"] = True
            result["peer_seen_by_app"] = format_endpoint(*sock.getpeername()[:2])
            result["local"] = format_endpoint(*sock.getsockname()[:2])
        except OSError as exc:
            result["connected"] = False
            result["error"] = exc.strerror or type(exc).__name__
        result["connect_ms"] = round((time.monotonic() - started) * 1000, 3)
        sock.close()
    time.sleep(0.5)  # the forwarder's upstream and the closes are captured too
    result["packets"] = _drain(capture, wall)
    capture.close()
    return result


ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
HOP_PORT = 15008  # mesh/hop.py
# A segment that starts a TLS record: its content type (RFC 8446 5.1).
TLS_RECORDS = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
SO_TIMESTAMPNS = 35


def _drain(capture: socket.socket, wall: float) -> list[dict]:
    """What the capture socket holds, as TCP segments with the kernel's
    timestamps (lo shows each one twice, sent and received: the received
    copy is kept)."""
    import struct

    from scapy.all import TCP, Ether

    out = []
    while True:
        try:
            raw, ancillary, _flags, address = capture.recvmsg(65536, 64)
        except BlockingIOError:
            break
        ifname, _proto, pkttype = address[:3]
        if ifname == "lo" and pkttype == PACKET_OUTGOING:
            continue
        pkt = Ether(raw)
        if TCP not in pkt:
            continue
        stamp = next((struct.unpack("=qq", data[:16]) for level, kind, data in ancillary
                      if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)  # fmt: skip
        when = stamp[0] + stamp[1] / 1e9 if stamp else time.time()
        tcp = pkt[TCP]
        payload = bytes(tcp.payload)
        out.append({
            "t_ms": round((when - wall) * 1000, 3),
            "iface": ifname,
            "src": format_endpoint(tcp.underlayer.src, tcp.sport),
            "dst": format_endpoint(tcp.underlayer.dst, tcp.dport),
            "flags": str(tcp.flags),
            "len": len(payload),
            "tls": TLS_RECORDS.get(payload[0]) if len(payload) > 2 and payload[1] == 3 else None,
        })  # fmt: skip
    return out


def _worker_main() -> None:
    host, port, syn, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
    print(json.dumps(worker(host, port, syn, timeout)), flush=True)


# -- the command ---------------------------------------------------------------
def run(state_dir: Path, pod_name: str, target: str, syn: bool, timeout: float) -> dict:
    from meshagent.pods.standalone import popen
    from meshagent.pods.store import PodStore

    host, port = parse_target(target)
    pod = PodStore(state_dir).get(pod_name)
    socket_path = StateDir(state_dir).socket
    listener_port = _listener_port(socket_path)
    events, stop = _trace(socket_path, pod_name, port)
    try:
        proc = popen(pod, [sys.executable, "-m", "meshagent.conn_probe", host, str(port),
                           "1" if syn else "0", str(timeout)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        out, err = proc.communicate(timeout=timeout + 30)
        if proc.returncode != 0 or not out.strip():
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
            raise MeshError(f"probe in pod {pod_name} failed: {last}")
        result = json.loads(out.strip().splitlines()[-1])
        time.sleep(0.3)  # the forwarder's close reaches the trace
    finally:
        stop()
    result["pod"] = pod_name
    result["pod_ip"] = pod.ip6 if ":" in host else pod.ip4
    result["listener_port"] = listener_port
    return _verdict(result, events)


def _listener_port(socket_path: Path) -> int:
    """The port of the running agent's forwarder listeners (its `status`
    says, whatever `run --port` was); with no agent, the default."""
    from meshagent.client import request
    from meshagent.config import AgentConfig

    if socket_path.exists():
        try:
            return int(request(socket_path, "status", timeout=10)["port"])
        except MeshError:
            pass
    return AgentConfig.port


def _trace(socket_path: Path, pod: str, port: int) -> tuple[list[dict], Callable[[], None]]:
    """Collect trace events in a thread while the probe runs (if an agent runs)."""
    from meshagent import trace

    events: list[dict] = []
    done = threading.Event()
    if not socket_path.exists():
        return events, done.set

    def collect() -> None:
        try:
            trace.run(socket_path, lambda line: events.append(json.loads(line)), pod, port,
                      None, True, 0, stop=done)  # fmt: skip
        except MeshError as exc:
            events.append({"error": str(exc)})

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    time.sleep(0.5)  # the trace is set up before the first packet

    def stop() -> None:
        done.set()
        thread.join(5)

    return events, stop


def _verdict(result: dict, events: list[dict]) -> dict:
    """Join the packets and the trace to this connection."""
    target = result["target"]
    packets = result.get("packets", [])
    to_listener = f":{result['listener_port']}"
    listener = [p for p in packets if p["flags"] == "S" and p["dst"] != target
                and p["dst"].endswith(to_listener)]  # fmt: skip
    upstream = [p for p in packets if p["flags"] == "S" and p["dst"] == target]
    cookie = result.get("socket_cookie")
    kernel = [e for e in events if e.get("source") == "kernel" and e.get("socket_cookie") == cookie]
    local = result.get("local")
    forwarder = [e for e in events if e.get("source") == "forwarder" and local
                 and e.get("client") == local]  # fmt: skip
    result["kernel"] = kernel[0] if kernel else None
    result["forwarder"] = forwarder
    host = target.rpartition(":")[0]
    hop_dst = f"{host}:{HOP_PORT}"
    hop = [p for p in packets if hop_dst in (p["dst"], p["src"])]
    if hop:  # the mesh's hop to the destination's node: what the wire carried
        mtls = next((e.get("mtls") for e in forwarder if e.get("mtls")), None) or {}
        result["hop"] = {
            "to": hop_dst,
            "node": mtls.get("node"),
            "peer": mtls.get("peer"),
            "tls_records": sorted({p["tls"] for p in hop if p.get("tls")}),
            "payload_bytes": sum(p.get("len", 0) for p in hop),
            "segments_not_tls": sum(1 for p in hop if p.get("len") and not p.get("tls")),
        }
    if result.get("answer"):
        result["verdict"] = f"crafted SYN: {result['answer']}"
    elif listener and result.get("hop"):
        result["verdict"] = "steered, then over the mesh's mutual-TLS hop"
    elif listener:
        result["verdict"] = "steered"
    elif upstream:
        result["verdict"] = "direct"
    else:
        result["verdict"] = "no SYN seen"
    result["upstream_syn"] = upstream[0] if upstream else None
    errors = [e["error"] for e in events if "error" in e]
    if errors:
        result["trace_error"] = errors[0]
    return result


def show(result: dict, echo: Echo) -> None:
    echo(f"probe {result['pod']} -> {result['target']}: {result['verdict']}")
    if "connected" in result:
        state = "connected" if result["connected"] else f"failed ({result.get('error')})"
        echo(f"  connect: {state} in {result.get('connect_ms')} ms; the application sees"
             f" {result.get('peer_seen_by_app', '-')}")  # fmt: skip
    for pkt in result.get("packets", []):
        echo(f"  {pkt['t_ms']:9.3f} ms  {pkt['iface'] or '?':6} {pkt['src']:>26} > {pkt['dst']:26}"
             f" {pkt['flags']}")  # fmt: skip
    kernel = result.get("kernel")
    if kernel:
        why = kernel.get("reason") or kernel["event"]
        echo(f"  kernel: {kernel['event']} ({why}) for this socket")
    for event in result.get("forwarder", []):
        echo(f"  forwarder: {event['event']} via {event.get('datapath')}")
    hop = result.get("hop")
    if hop:
        echo(f"  hop: to {hop['to']} (node {hop['node']}, proven {hop['peer']}): TLS records"
             f" {', '.join(hop['tls_records']) or 'none'}, {hop['payload_bytes']} bytes,"
             f" {hop['segments_not_tls']} segments that start no TLS record")  # fmt: skip
    upstream = result.get("upstream_syn")
    if upstream:
        echo(
            f"  the SYN that left for {result['target']} came from {upstream['src']}"
            f" on {upstream['iface']} (the pod's address: {result['pod_ip']})"
        )


if __name__ == "__main__":
    _worker_main()
