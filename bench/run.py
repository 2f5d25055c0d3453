"""meshagent benchmarks: every data path against a direct connection and
HAProxy (tcp mode, in a pod), all measured in the same run.

Topology: pod `client` -> (steered) -> forwarder -> pod `server`; `direct`
is the same pods with the client detached; `haproxy` is the client talking
to HAProxy in pod `proxy`, which connects to the server.

Prints a markdown table; each figure's ratio to direct follows it, conn/s
and CPU/GB are also given as a ratio to HAProxy. Loopback figures are noisy
(up to 2x between runs): compare within one run only. Run as root:
`make bench` (BENCH_SECONDS sets the length of each measurement).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import MeshEnv, make_env, start_agent, wait_for  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
RR_PORT, IPERF_PORT = 7000, 5201
IDLE_CONNS = 1000
PATHS = ("sockmap", "splice", "copy")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    figures: dict[str, float] = field(default_factory=dict)


def build_rr(workdir: Path) -> Path:
    binary = workdir / "rr"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(ROOT / "bench" / "rr.c")], check=True)
    return binary


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> float:
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_json(env: MeshEnv, pod, argv: list[str], timeout: float) -> dict:
    proc = env.popen(pod, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed in pod {pod.name}: {err.strip() or out.strip()}")
    return json.loads(out.strip().splitlines()[-1]) if argv[0].endswith("rr") else json.loads(out)


def tune_pod(env: MeshEnv, pod) -> None:
    """Room for many short connections: wide port range, TIME_WAIT reuse."""
    for setting in ("net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"):
        env.popen(pod, ["sysctl", "-qw", setting]).wait(timeout=10)


def haproxy_conf(workdir: Path, server_ip: str) -> Path:
    conf = workdir / "haproxy.cfg"
    conf.write_text(
        textwrap.dedent(
            f"""
            global
                maxconn 8000
                nbthread 1
            defaults
                mode tcp
                timeout connect 5s
                timeout client 60s
                timeout server 60s
            listen rr
                bind :::{RR_PORT} v4v6
                server s {server_ip}:{RR_PORT}
            listen iperf
                bind :::{IPERF_PORT} v4v6
                server s {server_ip}:{IPERF_PORT}
            """
        )
    )
    return conf


def measure(env: MeshEnv, client, target: str, rr: Path, cpu_pid: int | None) -> dict:
    figures: dict[str, float] = {}
    for streams in (1, 4):
        machine0 = machine_cpu()
        proc0 = proc_cpu(cpu_pid) if cpu_pid else 0.0
        out = run_json(
            env, client,
            ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t", str(SECONDS),
             "-P", str(streams), "-J"],
            timeout=SECONDS + 60,
        )  # fmt: skip
        if "error" in out or "sum_received" not in out.get("end", {}):
            raise RuntimeError(f"iperf3 to {target}: {out.get('error', 'no result')}")
        received = out["end"]["sum_received"]
        figures[f"gbps_{streams}"] = received["bits_per_second"] / 1e9
        if streams == 1:
            gigabytes = received["bytes"] / 1e9
            figures["machine_cpu_per_gb"] = (machine_cpu() - machine0) / gigabytes
            if cpu_pid:
                figures["proxy_cpu_per_gb"] = (proc_cpu(cpu_pid) - proc0) / gigabytes
        time.sleep(0.5)
    for size in (1, 1024):
        out = run_json(env, client, [str(rr), "rr", target, str(RR_PORT), str(size),
                                     str(SECONDS)], timeout=SECONDS + 30)  # fmt: skip
        figures[f"tps_{size}"] = out["tps"]
        figures[f"p50_{size}"] = out["p50_us"]
        figures[f"p99_{size}"] = out["p99_us"]
    out = run_json(env, client, [str(rr), "conn", target, str(RR_PORT), str(SECONDS)],
                   timeout=SECONDS + 30)  # fmt: skip
    figures["cps"] = out["cps"]
    return figures


def idle_rss(env: MeshEnv, client, target: str, rr: Path, pid: int, workdir: Path) -> float:
    """RSS of pid while the client holds IDLE_CONNS idle connections."""
    flag = workdir / "release"
    flag.unlink(missing_ok=True)
    holder = env.popen(
        client, [str(rr), "hold", target, str(RR_PORT), str(IDLE_CONNS), str(flag)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    opened = json.loads(holder.stdout.readline())["opened"]
    if opened != IDLE_CONNS:
        raise RuntimeError(f"only {opened} of {IDLE_CONNS} idle connections opened")
    time.sleep(0.5)
    value = rss_mb(pid)
    flag.write_text("")
    holder.wait(timeout=60)
    return value


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def table(results: list[Result]) -> str:
    direct = results[0].figures
    haproxy = next(r.figures for r in results if r.name == "haproxy")
    head = (
        "| path | 1 stream Gbit/s | 4 streams Gbit/s | RR 1 B tx/s | RR 1 B p50/p99 µs"
        " | RR 1 KiB tx/s | RR 1 KiB p50/p99 µs | new conn/s (vs direct, vs HAProxy)"
        " | proxy CPU s/GB (vs HAProxy) | machine CPU s/GB | RSS MB idle / 1000 conns |"
    )
    rows = [head, "|" + "---|" * 11]
    for res in results:
        f = res.figures
        cpu = (
            f"{f['proxy_cpu_per_gb']:.2f} ({ratio(f['proxy_cpu_per_gb'], haproxy['proxy_cpu_per_gb'])})"
            if "proxy_cpu_per_gb" in f
            else "-"
        )
        rss = f"{f['rss_idle']:.0f} / {f['rss_1000']:.0f}" if "rss_idle" in f else "-"
        rows.append(
            f"| {res.name} | {f['gbps_1']:.1f} ({ratio(f['gbps_1'], direct['gbps_1'])})"
            f" | {f['gbps_4']:.1f} ({ratio(f['gbps_4'], direct['gbps_4'])})"
            f" | {f['tps_1']:.0f} ({ratio(f['tps_1'], direct['tps_1'])})"
            f" | {f['p50_1']:.0f} ({ratio(f['p50_1'], direct['p50_1'])}) / {f['p99_1']:.0f}"
            f" | {f['tps_1024']:.0f} ({ratio(f['tps_1024'], direct['tps_1024'])})"
            f" | {f['p50_1024']:.0f} ({ratio(f['p50_1024'], direct['p50_1024'])})"
            f" / {f['p99_1024']:.0f}"
            f" | {f['cps']:.0f} ({ratio(f['cps'], direct['cps'])},"
            f" {ratio(f['cps'], haproxy['cps'])})"
            f" | {cpu}"
            f" | {f['machine_cpu_per_gb']:.2f} ({ratio(f['machine_cpu_per_gb'], direct['machine_cpu_per_gb'])})"
            f" | {rss} |"
        )
    return "\n".join(rows)


def main() -> int:
    if os.geteuid() != 0:
        print("bench: run as root (make bench)", file=sys.stderr)
        return 1
    for tool in ("iperf3", "haproxy", "gcc"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing: run scripts/bootstrap", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-bench-"))
    env = make_env()
    agent = None
    try:
        rr = build_rr(workdir)
        client, server, proxy = (env.create_pod(n) for n in ("client", "server", "proxy"))
        for pod in (client, proxy):
            tune_pod(env, pod)
        env.popen(server, [str(rr), "serve", str(RR_PORT)], stdout=subprocess.DEVNULL)
        env.popen(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
        haproxy = env.popen(proxy, ["haproxy", "-db", "-f", str(haproxy_conf(workdir, server.ip4))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)
        results = [Result("direct", measure(env, client, server.ip4, rr, None))]
        print("direct done", file=sys.stderr)
        hap = Result("haproxy", measure(env, client, proxy.ip4, rr, haproxy.pid))
        hap.figures["rss_idle"] = rss_mb(haproxy.pid)
        hap.figures["rss_1000"] = idle_rss(env, client, proxy.ip4, rr, haproxy.pid, workdir)
        results.append(hap)
        print("haproxy done", file=sys.stderr)
        agent = start_agent(env, "--datapath", "copy")
        agent.attach(client)
        for path in PATHS:
            agent.request("datapath", set=path)
            res = Result(f"meshagent {path}", measure(env, client, server.ip4, rr, agent.proc.pid))
            wait_for(lambda: agent.pod_status("client")["connections_active"] == 0, 30)
            res.figures["rss_idle"] = rss_mb(agent.proc.pid)
            res.figures["rss_1000"] = idle_rss(env, client, server.ip4, rr, agent.proc.pid, workdir)
            results.append(res)
            print(f"{path} done", file=sys.stderr)
        status = agent.request("status")
        print(f"\nmeshagent bench, kernel {status['kernel']}, {SECONDS:g} s per figure,"
              f" {os.cpu_count()} CPUs; ratios to direct (and HAProxy where marked)\n")  # fmt: skip
        print(table(results))
        paths = status["datapaths"]
        print(
            "\nsockmap hand-off: Python carried"
            f" {paths['sockmap']['handoff_bytes']} of {paths['sockmap']['bytes']} bytes;"
            f" stalls {paths['sockmap']['stalls']}, fallbacks {paths['sockmap']['fallbacks']}"
        )
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
