"""`meshagent trace`: the kernel's decisions and the forwarder's view of
each connection, live, in the spirit of bcc's tcpconnect and tcplife.

Two sources, one stream: the BPF ring buffer (its fd comes from the agent
with the reply to the `trace` request) for every connect decision and the
life of steered connections, and JSON lines on the control connection for
what the forwarder did (all backends, iptables pods included). Closing the
connection (Ctrl-C, or this process dying in any way) ends the trace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from meshagent.addrs import format_endpoint
from meshagent.errors import MeshError

Echo = Callable[[str], None]
HEADER = f"{'TIME':12} {'POD':12} {'PID':>7} {'COMM':12} {'EVENT':11} DETAIL"


def _open(socket_path: Path, pod: str | None, port: int) -> tuple[socket.socket, dict, list, bytes]:
    from meshagent.client import request_with_fds

    request = {"op": "trace", "port": port, **({"pod": pod} if pod else {})}
    return request_with_fds(socket_path, request)


def run(
    socket_path: Path, echo: Echo, pod: str | None = None, port: int = 0,
    dst: str | None = None, as_json: bool = False, seconds: float = 0,
    stop: threading.Event | None = None,
) -> None:  # fmt: skip
    """Print events until Ctrl-C (or for `seconds`, or until stop is set)."""
    from meshagent.bpf import abi
    from meshagent.bpf.ringbuf import RingBuf

    network = ipaddress.ip_network(dst, strict=False) if dst else None
    sock, reply, fds, pending = _open(socket_path, pod, port)
    sock.setblocking(False)
    names = {int(cookie): name for cookie, name in reply["pods"].items()}
    modes = reply.get("modes", {})  # pod -> forward or kernel (an older agent: none)
    rules = {int(gen): ids for gen, ids in reply.get("rules", {}).items()}
    ring = RingBuf(fds[0]) if fds else None
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    if ring is not None:
        poller.register(ring.fd, select.EPOLLIN)
    if not as_json:
        echo(HEADER)
        if ring is None:
            echo("(no kernel events: the ebpf backend is not loaded; forwarder events only)")
    deadline = time.monotonic() + seconds if seconds else None
    buf = bytearray(pending)
    try:
        while (deadline is None or time.monotonic() < deadline) and not (stop and stop.is_set()):
            poller.poll(0.2)
            if ring is not None:
                for raw in ring.read():
                    event = abi.decode_event(raw)
                    event["pod"] = names.get(event["netns_cookie"])
                    _show(_kernel(event, rules, modes), network, as_json, echo)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                raise MeshError("the agent stopped; the trace ends")
            if data:
                buf += data
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                _show(json.loads(line), network, as_json, echo)
    except KeyboardInterrupt:
        pass
    finally:
        poller.close()
        if ring is not None:
            ring.close()
        for fd in fds:
            os.close(fd)
        sock.close()


def _kernel(event: dict, rules: dict[int, list[str]] | None = None,
            modes: dict[str, str] | None = None) -> dict:  # fmt: skip
    """A ring buffer event in the same words as the forwarder's (a policy's
    denial with its rule, by the numbers of the rule set the hook used);
    mode: what carries the connection (kernel: direct, the kernel counts it;
    forward: the pod's forwarder)."""
    out = {
        "time": time.time(),
        "source": "kernel",
        "pod": event["pod"],
        "pid": event["pid"] or None,
        "comm": event["comm"] or None,
        "socket_cookie": event["socket_cookie"],
        "netns_cookie": event["netns_cookie"],
    }
    endpoint = format_endpoint(event["addr"], event["port"])
    if event["event"] == "connect" and event["reason"] in ("denied_policy", "pod_quota"):
        out.update(event="denied", orig_dst=endpoint, reason=event["reason"])
        if event["reason"] == "denied_policy":
            out["rule"] = _rule_name(event["rule"], event["rule_gen"], rules or {})
    elif event["event"] == "connect" and event["reason"] == "kernel":
        out.update(event="direct", orig_dst=endpoint, reason=None, mode="kernel")
    elif event["event"] == "connect":
        steered = event["reason"] == "steered"
        out.update(event="steered" if steered else "passed", orig_dst=endpoint,
                   reason=None if steered else event["reason"])  # fmt: skip
        if steered:
            out["mode"] = "forward"
            if (modes or {}).get(event["pod"] or "") == "kernel":  # the forwarder has work
                out["why"] = "kernel-mode pod: the destination needs the forwarder (mTLS, ingress)"
    elif event["event"] == "established":
        out.update(event="established", orig_dst=endpoint, reason=None)
    elif event["reason"] == "kernel":  # its destination (sock_ops knows no client then)
        out.update(event="closed", orig_dst=endpoint, reason=None)
    else:
        out.update(event="closed", client=endpoint, reason=None)
    if event["event"] != "connect":
        out["mode"] = "kernel" if event["reason"] == "kernel" else "forward"
    return out


def _rule_name(number: int, gen: int, rules: dict[int, list[str]]) -> str:
    if number == 0:
        return "default-deny"
    ids = rules.get(gen)
    return ids[number - 1] if ids and number <= len(ids) else f"rule #{number} (set {gen})"


def _show(event: dict, network, as_json: bool, echo: Echo) -> None:
    target = event.get("orig_dst")
    if network is not None:
        host = (target or "").rsplit(":", 1)[0].strip("[]")
        try:
            if ipaddress.ip_address(host) not in network:
                return
        except ValueError:
            return
    if as_json:
        echo(json.dumps(event))
        return
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    stamp += f".{int(event['time'] % 1 * 1000):03d}"
    detail = _detail(event)
    pid = str(event.get("pid") or "-")
    echo(f"{stamp:12} {(event.get('pod') or '-')[:12]:12} {pid:>7}"
         f" {(event.get('comm') or '-')[:12]:12} {event['event'][:11]:11} {detail}")  # fmt: skip


def _detail(event: dict) -> str:
    kind, source = event["event"], event.get("source")
    if source == "kernel":
        if kind == "steered":
            why = f" ({event['why']})" if event.get("why") else ""
            return f"{event['orig_dst']} -> the pod's forwarder{why}"
        if kind == "direct":
            return f"{event['orig_dst']} direct (kernel mode: the kernel counts it)"
        if kind == "passed":
            return f"{event['orig_dst']} direct ({event['reason']})"
        if kind == "denied":
            why = f"{event['reason']}: {event['rule']}" if event.get("rule") else event["reason"]
            return f"{event['orig_dst']} connect() refused, EPERM ({why})"
        what = "kernel-mode" if event.get("mode") == "kernel" else "steered"
        if kind == "established":
            return f"{event['orig_dst']} {what} connection up"
        if event.get("mode") == "kernel":
            return f"{event['orig_dst']} kernel-mode connection closed"
        return f"steered connection from {event.get('client')} closed"
    if kind == "forwarded":
        return f"{event['client']} -> {event['orig_dst']} via {event.get('datapath')}"
    if kind == "refused":
        rule = f": {event['rule']}" if event.get("rule") else ""
        return f"{event['client']} -> {event.get('orig_dst')} refused ({event['reason']}{rule})"
    moved = f"out {event.get('bytes_out', 0)} B, in {event.get('bytes_in', 0)} B"
    if event.get("datapath") == "kernel":
        moved = f"kernel mode, {moved}"
    if event.get("closed_by"):
        moved += f", {event['closed_by']} closed first"
    if event.get("handoff_bytes"):
        moved += f", {event['handoff_bytes']} B carried by Python before the splice"
    why = f" ({event['reason']})" if event.get("reason") else ""
    return (
        f"{event['client']} -> {event['orig_dst']} {kind}{why}: {moved}, {event.get('seconds')} s"
    )
