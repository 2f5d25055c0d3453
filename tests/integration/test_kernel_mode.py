"""Kernel mode (`attach --mode kernel`) against the kernel: the pod's
connections go direct, yet the policy still decides at connect, and each
connection is accounted from sock_ops at its close (bytes each way, who
closed first, how it ended) exactly as both ends counted; destinations
the forwarder has work for (pods with ingress rules) are still forwarded."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from meshenv import Server, start_agent, wait_for

PORT, CLOSED_PORT = 18100, 18109

# One connection per line of argv: "HOW:HOST:PORT[:SIZE]". HOW says who
# does what (the server reads the first byte for it):
#   S  the server sends 1000 bytes and closes first
#   C  the client sends SIZE bytes after "C", half-closes, reads to EOF
#   R  the server resets after 10 bytes
#   A  the client sends SIZE bytes after "C", then aborts (RST)
#   X  connect only (a port nobody listens on)
CLIENT = r"""
import errno, json, socket, struct, sys, time
out = []
for arg in sys.argv[1:]:
    how, rest = arg.split(":", 1)
    if how in "CA":
        host, port, size = rest.rsplit(":", 2)
    else:
        host, port = rest.rsplit(":", 1)
        size = "0"
    host, port, size = host.strip("[]"), int(port), int(size)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(20)
    rec = {"how": how, "sent": 0, "rcvd": 0}
    try:
        s.connect((host, port))
        rec["local_port"] = s.getsockname()[1]
        if how == "S":
            s.sendall(b"S"); rec["sent"] = 1
        elif how == "R":
            s.sendall(b"R" * 10); rec["sent"] = 10
        else:
            body = b"C" + bytes(range(256)) * (size // 256) + b"z" * (size % 256)
            s.sendall(body); rec["sent"] = len(body)
            if how == "A":
                time.sleep(0.3)  # acked by then
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                out.append(rec)
                continue
            s.shutdown(socket.SHUT_WR)
        while True:
            d = s.recv(65536)
            if not d:
                break
            rec["rcvd"] += len(d)
    except OSError as exc:
        rec["error"] = errno.errorcode.get(exc.errno, str(exc))
        if "local_port" not in rec:
            rec["local_port"] = s.getsockname()[1]
    s.close()
    out.append(rec)
print(json.dumps(out))
"""

SERVER = r"""
import json, socket, struct, sys, threading
port = int(sys.argv[1])
srv = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
print(json.dumps({"listening": port}), flush=True)
lock = threading.Lock()  # print() from threads interleaves without it
def handle(conn, peer):
    # Every connection gets its line, whatever happened to it (the pod's
    # abort may come before this thread reads a byte).
    how, got, sent = b"", 0, 0
    try:
        how = conn.recv(1)
        got = len(how)
        if how == b"S":
            conn.sendall(b"s" * 1000); sent = 1000
        elif how == b"R":
            while got < 10:
                d = conn.recv(10 - got)
                if not d:
                    break
                got += len(d)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            while True:
                d = conn.recv(65536)
                if not d:
                    break
                got += len(d)
            conn.sendall(b"c" * 500); sent = 500
    except OSError:
        pass
    conn.close()
    with lock:
        print(json.dumps({"how": how.decode(), "got": got, "sent": sent,
                          "peer_port": peer[1]}), flush=True)
while True:
    c, p = srv.accept()
    threading.Thread(target=handle, args=(c, p), daemon=True).start()
"""


def ep(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def serve(env, pod, port: int = PORT) -> Server:
    proc = env.popen(pod, [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE,
                     text=True)  # fmt: skip
    server = Server(proc)
    assert "listening" in server.next(timeout=30)
    return server


def run_client(env, pod, *cases: str) -> list[dict]:
    return json.loads(env.script(pod, CLIENT, *cases).strip().splitlines()[-1])


def kernel_records(agent, ports: set[int], timeout: float = 20) -> dict[int, dict]:
    """The agent's kernel-mode records of these client ports, once all came."""
    found: dict[int, dict] = {}

    def all_in() -> bool:
        for rec in agent.request("connections")["connections"]:
            port = int(rec["client"].rsplit(":", 1)[1])
            if rec["datapath"] == "kernel" and port in ports:
                found[port] = rec
        return set(found) == ports

    wait_for(all_in, timeout, "the kernel-mode records")
    return found


@pytest.mark.kernel_matrix
def test_kernel_mode_goes_direct_and_accounts_each_byte(mesh_env):
    server_pod = mesh_env.create_pod("server")
    client = mesh_env.create_pod("client")
    server = serve(mesh_env, server_pod)
    agent = start_agent(mesh_env, "--redirect", "ebpf")  # kernel mode is the hooks'; else skipped
    try:
        reply = agent.request("attach", pod="client", mode="kernel")
        assert reply["mode"] == "kernel"
        status = agent.pod_status("client")
        assert status["mode"] == "kernel", status
        before = agent.decisions()
        sizes = (0, 1, 65535, 3 << 20)
        cases = [f"C:{ep(ip, PORT)}:{n}" for ip in (server_pod.ip4, server_pod.ip6)
                 for n in sizes]  # fmt: skip
        cases += [f"S:{ep(server_pod.ip4, PORT)}", f"S:{ep(server_pod.ip6, PORT)}",
                  f"R:{ep(server_pod.ip4, PORT)}", f"A:{ep(server_pod.ip6, PORT)}:70000",
                  f"X:{ep(server_pod.ip4, CLOSED_PORT)}"]  # fmt: skip
        results = run_client(mesh_env, client, *cases)
        served = {}
        for _ in range(len(cases) - 1):  # X never reaches it
            line = server.next()
            served[line["peer_port"]] = line
        records = kernel_records(agent, {r["local_port"] for r in results})
        after = agent.decisions()
        # Direct: the forwarder carried none of them; the hook decided each.
        assert not [r for r in agent.request("connections")["connections"]
                    if r["datapath"] != "kernel"]  # fmt: skip
        assert after.get("kernel", 0) - before.get("kernel", 0) == len(cases)
        assert after.get("steered", 0) == before.get("steered", 0)
        for res in results:
            rec = records[res["local_port"]]
            what = f"{res['how']} {rec}"
            assert rec["pod"] == "client", what
            assert rec["ended"] >= rec["started"], what
            if res["how"] == "X":
                assert rec["state"] == "failed", what
                assert rec["reason"] == "connect: ECONNREFUSED", what
                assert (rec["bytes_out"], rec["bytes_in"]) == (0, 0), what
                continue
            srv = served[res["local_port"]]
            # What the pod sent is what the server got; what it got, the server sent.
            assert rec["bytes_out"] == res["sent"], what
            assert rec["bytes_in"] == res["rcvd"] == srv["sent"], what
            if res["how"] == "A":  # its RST drops what the server had not read yet
                assert srv["got"] <= res["sent"], what
            else:
                assert srv["got"] == res["sent"], what
            if res["how"] == "C":
                assert (rec["state"], rec["closed_by"]) == ("closed", "pod"), what
            elif res["how"] == "S":
                assert (rec["state"], rec["closed_by"]) == ("closed", "upstream"), what
            elif res["how"] == "R":
                assert rec["state"] == "reset", what
                assert rec["reason"] == "reset by upstream (ECONNRESET)", what
            elif res["how"] == "A":
                assert (rec["state"], rec["reason"]) == ("reset", "reset by pod"), what
        # The same in the pod's stats and the metrics.
        stats = agent.pod_status("client")
        assert stats["bytes_out"] == sum(r["sent"] for r in results if r["how"] != "X")
        addr = agent.request("status")["metrics_addr"]
        want = sum(r["sent"] for r in results if r["how"] != "X")
        labels = {"datapath": "kernel", "direction": "out", "pod": "client"}

        def scraped() -> bool:  # the metrics read a snapshot taken once a second
            from prometheus_client.parser import text_string_to_metric_families

            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            return any(s.name == "meshagent_bytes_total" and s.labels == labels and s.value == want
                       for f in text_string_to_metric_families(text) for s in f.samples)  # fmt: skip

        wait_for(scraped, 10, f"meshagent_bytes_total{labels} == {want}")
    finally:
        agent.stop()


POLICY = """apiVersion: meshagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: server-in}}
spec:
  selector: {{pods: [server]}}
  ingress:
    - action: ALLOW
      from: [{{workload: {{pod: client}}}}]
      ports: [{port}]
---
apiVersion: meshagent.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: client-out}}
spec:
  selector: {{pods: [client]}}
  egress:
    - action: DENY
      to: [{{ipBlock: {{cidr: {other}/32}}}}]
    - action: ALLOW
      to: [{{ipBlock: {{cidr: 0.0.0.0/0}}}}, {{ipBlock: {{cidr: "::/0"}}}}]
"""


def test_kernel_mode_keeps_policy_and_forwards_where_the_forwarder_has_work(mesh_env):
    """Egress DENY still refuses at connect (EPERM); a destination pod with
    ingress rules is reached through the forwarder, which checks them; a
    pod's mode changes in place and survives a restart."""
    server_pod = mesh_env.create_pod("server")
    other = mesh_env.create_pod("other")
    client = mesh_env.create_pod("client")
    intruder = mesh_env.create_pod("intruder")
    serve(mesh_env, server_pod)
    serve(mesh_env, other)
    mesh_env.state_dir.mkdir(parents=True, exist_ok=True)
    path = mesh_env.state_dir / "policy.yaml"
    path.write_text(POLICY.format(port=PORT, other=other.ip4))
    agent = start_agent(mesh_env, "--policy", str(path))
    try:
        agent.attach(server_pod)  # its ingress rules: the forwarder checks them
        for pod in (client, intruder):
            agent.request("attach", pod=pod.name, mode="kernel")
        tracer, seen = agent.trace("client")
        res = run_client(mesh_env, client, f"X:{ep(other.ip4, PORT)}",
                         f"C:{ep(server_pod.ip4, PORT)}:100", f"C:{ep(other.ip6, PORT)}:7")  # fmt: skip
        assert res[0].get("error") == "EPERM", res
        assert res[1]["rcvd"] == 500, res
        assert res[2]["rcvd"] == 500, res

        # The trace says what carried each connection, and why.
        def traced(kind: str, dst: str, **want) -> bool:
            return any(e["event"] == kind and e.get("orig_dst") == dst and
                       all(e.get(k) == v for k, v in want.items()) for e in seen)  # fmt: skip

        to_server, to_other = ep(server_pod.ip4, PORT), ep(other.ip6, PORT)
        wait_for(lambda: traced("closed", to_other, datapath="kernel", bytes_out=8,
                                bytes_in=500, closed_by="pod"), 20, "the kernel record traced")  # fmt: skip
        assert traced("denied", ep(other.ip4, PORT), reason="denied_policy"), seen
        assert traced("direct", to_other, mode="kernel"), seen
        assert traced("closed", to_other, mode="kernel", source="kernel"), seen
        steered = [e for e in seen if e["event"] == "steered" and e["orig_dst"] == to_server]
        assert steered and steered[0]["mode"] == "forward" and "ingress" in steered[0]["why"]
        tracer.terminate()
        conns = agent.request("connections")["connections"]
        through = [r for r in conns if r["pod"] == "client" and r["datapath"] != "kernel"]
        assert len(through) == 1, conns  # forwarded: the server's ingress rules
        res = run_client(mesh_env, intruder, f"C:{ep(server_pod.ip4, PORT)}:100")
        assert res[0]["rcvd"] == 0 and res[0].get("error") == "ECONNRESET", res
        assert agent.pod_status("intruder")["denied_policy"] == 1
        # Back to forward, in place: the next connection is the forwarder's.
        agent.request("attach", pod="intruder", mode="forward")
        assert agent.pod_status("intruder")["mode"] == "forward"
        agent.request("attach", pod="intruder", mode="kernel")
        agent.stop()
        agent = start_agent(mesh_env, "--policy", str(path))
        assert agent.pod_status("intruder")["mode"] == "kernel"  # adopted as it was
        assert agent.pod_status("client")["mode"] == "kernel"
    finally:
        agent.stop()
