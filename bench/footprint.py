"""What the agent costs a node (make bench-footprint), against its targets
and HAProxy (one thread, room for HELD connections) from the same run.

- ready after a warm start: from exec to the first answer on the control
  socket (programs attached by then), ROUNDS starts, each one taking over
  the previous agent's pinned state;
- RSS with 10 pods attached, steady;
- attach and detach round trips, 100 cycles on one pod;
- memory per forwarded connection: RSS with HELD idle connections less RSS
  before, per connection (HAProxy: the same through it);
- CPU with 1,000 idle forwarded connections: the agent's and the whole
  machine's, over IDLE_SECONDS.

Prints a table and writes bench/results/footprint.json. Run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

import doctables  # noqa: E402
from meshenv import make_env, start_agent, wait_for  # noqa: E402
from run import (  # noqa: E402
    CLK_TCK,
    RR_PORT,
    build_rr,
    haproxy_conf,
    machine_cpu,
    save_results,
)

ROUNDS = 5
PODS = 10
CYCLES = 100
HELD = 8000
IDLE = 1000
IDLE_SECONDS = 10.0


def ready_seconds(env) -> list[float]:
    """Time to ready for ROUNDS warm starts (the first start warms the cache)."""
    start_agent(env).stop()
    out = []
    for _ in range(ROUNDS):
        started = time.monotonic()
        agent = start_agent(env)
        out.append(time.monotonic() - started)
        agent.stop()
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def one_thread_haproxy(workdir: Path, server_ip: str) -> Path:
    """The bench's HAProxy config with one thread and room for HELD connections."""
    conf = haproxy_conf(workdir, server_ip, splice=False)
    conf.write_text(f"global\n    nbthread 1\n    maxconn {HELD + 100}\n" + conf.read_text())
    return conf


def steady_rss(pid: int) -> float:
    samples = []
    for _ in range(5):
        time.sleep(0.5)
        samples.append(rss_mb(pid))
    return statistics.median(samples)


def round_trips(agent, pod) -> tuple[list[float], list[float]]:
    attach, detach = [], []
    for _ in range(CYCLES):
        started = time.perf_counter()
        agent.attach(pod)
        attach.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        agent.detach(pod)
        detach.append((time.perf_counter() - started) * 1000)
    return attach, detach


def hold(env, client, rr: Path, target: str, count: int, workdir: Path):
    """Open count idle connections from client to target; returns a release()."""
    flag = workdir / f"release-{count}-{time.monotonic_ns()}"
    holder = env.popen(client, [str(rr), "hold", target, str(RR_PORT), str(count), str(flag)],
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    opened = json.loads(holder.stdout.readline())["opened"]
    if opened != count:
        raise RuntimeError(f"only {opened} of {count} idle connections opened")

    def release() -> None:
        flag.write_text("")
        holder.wait(timeout=120)

    return release


def per_conn_kb(env, client, rr, target, pid: int, workdir: Path, settle) -> float:
    before = steady_rss(pid)
    release = hold(env, client, rr, target, HELD, workdir)
    try:
        settle(HELD)
        during = steady_rss(pid)
    finally:
        release()
    return (during - before) * 1024 / HELD


def idle_cpu(pid: int | None) -> tuple[float, float]:
    """(process CPU %, machine CPU %) over IDLE_SECONDS."""
    proc0, machine0, started = proc_cpu(pid) if pid else 0.0, machine_cpu(), time.monotonic()
    time.sleep(IDLE_SECONDS)
    elapsed = time.monotonic() - started
    proc = (proc_cpu(pid) - proc0) / elapsed * 100 if pid else 0.0
    return proc, (machine_cpu() - machine0) / elapsed * 100


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> int:
    if os.geteuid() != 0:
        print("bench/footprint.py: run as root", file=sys.stderr)
        return 1
    for tool in ("haproxy", "gcc"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing: run scripts/bootstrap", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-footprint-"))
    env = make_env()
    agent = None
    try:
        rr = build_rr(workdir)
        client, server, proxy = (env.create_pod(n) for n in ("client", "server", "proxy"))
        pods = [env.create_pod(f"p{i}") for i in range(PODS)]
        env.popen(server, [str(rr), "serve", str(RR_PORT)], stdout=subprocess.DEVNULL)
        machine_quiet = idle_cpu(None)[1]
        ready = ready_seconds(env)
        print("ready measured", file=sys.stderr)

        agent = start_agent(env, "--pod-conns-max", str(HELD + 100))  # one pod holds them all
        pid = agent.proc.pid
        for pod in pods:
            agent.attach(pod)
        rss_10 = steady_rss(pid)
        attach, detach = round_trips(agent, pods[0])
        agent.attach(client)
        print("attach measured", file=sys.stderr)

        def forwarded(count: int) -> None:
            wait_for(lambda: agent.pod_status("client")["connections_active"] == count, 120,
                     f"{count} forwarded connections")  # fmt: skip

        release = hold(env, client, rr, server.ip4, IDLE, workdir)
        forwarded(IDLE)
        agent_cpu, machine_busy = idle_cpu(pid)
        release()
        forwarded(0)
        kb = per_conn_kb(env, client, rr, server.ip4, pid, workdir, forwarded)
        status = agent.request("status")
        agent.stop()
        agent = None
        print("agent measured", file=sys.stderr)

        conf = one_thread_haproxy(workdir, server.ip4)
        haproxy = env.popen(proxy, ["haproxy", "-db", "-f", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)
        hap_rss = steady_rss(haproxy.pid)
        release = hold(env, client, rr, proxy.ip4, IDLE, workdir)
        hap_cpu, hap_machine = idle_cpu(haproxy.pid)
        release()
        hap_kb = per_conn_kb(env, client, rr, proxy.ip4, haproxy.pid, workdir, lambda _n: None)

        print(f"\nfootprint, kernel {status['kernel']}, {os.cpu_count()} CPUs, data path"
              f" {status['datapath']} ({status['backend']} backend)\n")  # fmt: skip
        print("| figure | meshagent | target | HAProxy |")
        print("|---|---|---|---|")
        rows = [
            ("ready after a warm start (s, median of "
             f"{ROUNDS}; min-max)",
             f"{statistics.median(ready):.2f} ({min(ready):.2f}-{max(ready):.2f})", "<= 2", "-",
             statistics.median(ready) <= 2),
            (f"RSS with {PODS} pods attached (MB)", f"{rss_10:.1f}", "<= 40",
             f"{hap_rss:.1f} (no pods)", rss_10 <= 40),
            (f"attach round trip p50 / p99 (ms, {CYCLES} cycles)",
             f"{pct(attach, 0.5):.2f} / {pct(attach, 0.99):.2f}", "p99 <= 10", "-",
             pct(attach, 0.99) <= 10),
            (f"detach round trip p50 / p99 (ms, {CYCLES} cycles)",
             f"{pct(detach, 0.5):.2f} / {pct(detach, 0.99):.2f}", "-", "-", True),
            (f"memory per forwarded connection (KB, {HELD} idle)", f"{kb:.2f}", "<= 2",
             f"{hap_kb:.2f}", kb <= 2),
            (f"process CPU with {IDLE} idle connections (%)", f"{agent_cpu:.2f}", "~0",
             f"{hap_cpu:.2f}", agent_cpu < 1),
            (f"machine CPU with {IDLE} idle connections (%; quiet {machine_quiet:.2f})",
             f"{machine_busy:.2f}", "~0", f"{hap_machine:.2f}", machine_busy - machine_quiet < 2),
        ]  # fmt: skip
        for name, value, target, hap, ok in rows:
            print(f"| {name} | {value} {'(met)' if ok else '(MISSED)'} | {target} | {hap} |")
        meta = {"datapath": status["datapath"], "backend": status["backend"],
                "haproxy": f"one thread, maxconn {HELD + 100}"}  # fmt: skip
        keys = ("figure", "meshagent", "target", "haproxy", "met")
        table = [dict(zip(keys, row, strict=True)) for row in rows]
        path = save_results("footprint", meta, {"rows": table})
        doctables.update("footprint")  # docs/benchmarks.md's table, from the file
        print(f"\nwritten to {path.relative_to(ROOT)}")
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
