"""What a forwarded connection costs the agent ([P] part 1), commit against
commit: redis GET with a connection per request, 20 clients, from an
attached pod through the sockmap path, and the agent's own CPU time
(utime + stime of its process, every thread, and each of them) per
request, with the requests per second. The trees are measured in interleaved rounds in the
same minutes, so a change's before and after meet the same machine.

    CONN_COST_TREES="before=/tmp/wt-OLD,after=." bench/conn_cost.py

A tree is a checkout (an older commit: `git worktree add`); its agent
package is what the agent runs (PYTHONPATH), this script the rest.
CONN_COST_ROUNDS (default 6), CONN_COST_REQUESTS (default 20000),
CONN_COST_CPU: run everything on this CPU only (taskset), e.g. when
something else keeps the other one busy. HAProxy (at its defaults, in a
pod of its own, between a pod `plain` and the same redis-server) is
measured in the same rounds the same way, its process's CPU per request
(CONN_COST_HAPROXY=0: not). Writes bench/results/conn-cost.json
(CONN_COST_RESULT=NAME: NAME.json). Run as
root: `make bench-conn-cost`.
"""

from __future__ import annotations

import csv
import io
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

from meshenv import make_env, start_agent  # noqa: E402
from run import (  # noqa: E402
    REDIS_PORT,
    agent_trees,
    cpu_model,
    haproxy_conf,
    ready,
    redis_pods,
    run_out,
    save_results,
    tune_pod,
)

ROUNDS = int(os.environ.get("CONN_COST_ROUNDS", "6"))
REQUESTS = int(os.environ.get("CONN_COST_REQUESTS", "20000"))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the process, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def benchmark(env, pod, target: str, requests: int) -> float:
    out = run_out(env, pod, ["redis-benchmark", "-h", target, "-p", str(REDIS_PORT), "-t", "get",
                             "-n", str(requests), "-c", "20", "-k", "0", "--csv"],
                  timeout=600)  # fmt: skip
    rows = [row for row in csv.reader(io.StringIO(out)) if row and row[0] == "GET"]
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no GET row: {out}")
    return float(rows[0][1])


def main() -> int:
    pin = os.environ.get("CONN_COST_CPU")
    if pin and os.environ.get("CONN_COST_PINNED") != "1":
        os.environ["CONN_COST_PINNED"] = "1"
        os.execvp("taskset", ["taskset", "-c", pin, sys.executable, *sys.argv])
    if not ready("conn_cost", "bench-conn-cost", ("redis-server", "redis-benchmark")):
        return 1
    chosen = agent_trees("CONN_COST_TREES")
    with_haproxy = os.environ.get("CONN_COST_HAPROXY", "1") != "0" and shutil.which("haproxy")
    names_all = [*chosen, *(["haproxy"] if with_haproxy else [])]
    samples: dict[str, dict[str, list[float]]] = {
        n: {"us": [], "user_us": [], "sys_us": [], "rps": []} for n in names_all
    }
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-conn-cost-"))
    env = make_env()
    agent = None
    try:
        client, server = redis_pods(env, workdir)
        if with_haproxy:
            plain, proxy = env.create_pod("plain"), env.create_pod("proxy")
            tune_pod(env, plain)
            tune_pod(env, proxy)  # its upstream connects: the ports and TIME_WAIT reuse
            haproxy = env.popen(proxy, ["haproxy", "-db", "-f",
                                        str(haproxy_conf(workdir, server.ip4, False))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(1.0)
        for i in range(ROUNDS):
            names = names_all if i % 2 == 0 else names_all[::-1]
            for name in names:
                if name == "haproxy" and name not in chosen:
                    pod, target, pid = plain, proxy.ip4, haproxy.pid
                else:
                    os.environ["PYTHONPATH"] = str(chosen[name][0] / "agent")
                    agent = start_agent(env, "--datapath", "sockmap", log_name=f"agent-{name}.log")
                    agent.attach(client)
                    pod, target, pid = client, server.ip4, agent.proc.pid
                benchmark(env, pod, target, 2000)  # warm
                user0, sys0 = cpu_seconds(pid)
                rps = benchmark(env, pod, target, REQUESTS)
                user1, sys1 = cpu_seconds(pid)
                if agent is not None:
                    agent.stop()
                    agent = None
                user, system = (user1 - user0) / REQUESTS * 1e6, (sys1 - sys0) / REQUESTS * 1e6
                samples[name]["us"].append(user + system)
                samples[name]["user_us"].append(user)
                samples[name]["sys_us"].append(system)
                samples[name]["rps"].append(rps)
                print(f"round {i + 1} {name}: {user + system:.1f} us of its CPU per request"
                      f" ({user:.1f} user, {system:.1f} system), {rps:.0f} requests/s",
                      flush=True)  # fmt: skip
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {}
    for name, figures in samples.items():
        summary[name] = {"commit": chosen[name][1] if name in chosen else None}
        for key, values in figures.items():
            summary[name][key] = {"median": statistics.median(values), "min": min(values),
                                  "max": max(values), "values": values}  # fmt: skip
        print(f"{name} ({summary[name]['commit']}): {summary[name]['us']['median']:.1f} us per request"
              f" (min {summary[name]['us']['min']:.1f}, max {summary[name]['us']['max']:.1f}),"
              f" {summary[name]['rps']['median']:.0f} requests/s")  # fmt: skip
    first = next(iter(samples))
    anchors = [first, *(["haproxy"] if "haproxy" in samples and first != "haproxy" else [])]
    for name, figures in samples.items():  # round by round: the load drifts between rounds
        for anchor in anchors:
            ratios = [a / b for a, b in zip(figures["us"], samples[anchor]["us"], strict=True)]
            summary[name]["us_vs_" + anchor] = {"median": statistics.median(ratios),
                                                "min": min(ratios), "max": max(ratios)}  # fmt: skip
        print(
            f"{name}: user {summary[name]['user_us']['median']:.1f} us, system"
            f" {summary[name]['sys_us']['median']:.1f} us per request (medians)"
            + "".join(f", {summary[name]['us_vs_' + a]['median']:.2f}x {a}" for a in anchors)
        )
    meta = {"rounds": ROUNDS, "requests": REQUESTS, "cpu_model": cpu_model(), "pinned_cpu": pin,
            "workload": "redis GET, a connection per request, 20 clients, sockmap"}  # fmt: skip
    path = save_results(os.environ.get("CONN_COST_RESULT", "conn-cost"), meta, {"trees": summary})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
