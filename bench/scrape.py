"""Does a Prometheus scrape stall the forwarder's loop? (make bench-scrape)

An agent forwards 1,000 idle connections from a pod. The loop's
responsiveness is measured by control `ping`s (each one is answered on the
loop): alone, beside two CPU-bound processes (what a busy 2-CPU machine
does by itself), and while a process of its own scrapes /metrics back to
back. Printed, over ROUNDS rounds: ping latency p50/p99/max and each
round's p99, and how long a scrape takes; written to
bench/results/scrape.json. Run as root.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

import doctables  # noqa: E402
from meshenv import make_env, start_agent, wait_for  # noqa: E402
from run import save_results  # noqa: E402

CONNS = 1000
PINGS = 2000
ROUNDS = 3
ROWS = ("loop ping, nothing else", "loop ping, 2 CPU burners", "loop ping, scraping nonstop",
        "one scrape of /metrics")  # fmt: skip
HOLD = """
import socket, sys, time
socks = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]
print("held", flush=True)
time.sleep(3600)
"""
# A neighbour that only burns CPU (bounded in time): what the machine's two
# CPUs alone do to ping latency, to tell from what a scrape does.
BURNER = """
import sys, time
deadline = time.monotonic() + float(sys.argv[1])
print("burning", flush=True)
while time.monotonic() < deadline:
    pass
"""
# The scraper is a process of its own, so its Python never competes with
# the pinging thread for the bench's GIL (that would show up as loop stall).
SCRAPER = """
import sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as reply:
        reply.read()
    print((time.perf_counter() - started) * 1000, flush=True)
"""


def pings(agent, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        agent.request("ping")
        out.append((time.perf_counter() - started) * 1000)
    return out


def figures(rounds: list[list[float]]) -> dict:
    """Over all rounds (ms): p50, p99 and max; the spread is each round's p99."""
    values = sorted(v for r in rounds for v in r)
    return {"p50": statistics.median(values), "p99": percentile(values, 0.99), "max": values[-1],
            "n": len(values), "p99_by_round": [percentile(sorted(r), 0.99) for r in rounds]}  # fmt: skip


def summary(name: str, row: dict) -> str:
    p99s = " ".join(f"{p99:.2f}" for p99 in row["p99_by_round"])
    return (f"{name:28} p50 {row['p50']:7.3f} ms  p99 {row['p99']:7.3f} ms"
            f"  max {row['max']:7.3f} ms  (n={row['n']}; p99 by round: {p99s})")  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    return values[max(int(len(values) * q) - 1, 0)]


@contextlib.contextmanager
def neighbours(commands: list[list[str]]):
    """Processes that run beside the pings (each prints a line once it is
    busy); yields a list that holds their output once they are stopped."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    out: list[str] = []
    try:
        for proc in procs:
            proc.stdout.readline()
        yield out
    finally:
        for proc in procs:
            proc.terminate()
        out.extend(proc.communicate(10)[0] for proc in procs)


def main() -> int:
    if os.geteuid() != 0:
        print("bench/scrape.py: run as root", file=sys.stderr)
        return 1
    env = make_env()
    agent = None
    try:
        client, server = env.create_pod("client"), env.create_pod("server")
        env.server(server, 7000)
        agent = start_agent(env)
        agent.attach(client)
        holder = env.popen(client, [sys.executable, "-c", HOLD, server.ip4, "7000", str(CONNS)],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert holder.stdout.readline().strip() == "held"
        wait_for(lambda: agent.pod_status("client")["connections_active"] == CONNS, 60,
                 "the connections")  # fmt: skip
        url = f"http://{agent.request('status')['metrics_addr']}/metrics"
        rows: dict[str, list[list[float]]] = {name: [] for name in ROWS}
        for _ in range(ROUNDS):
            rows["loop ping, nothing else"].append(pings(agent, PINGS))
            with neighbours([[sys.executable, "-c", BURNER, "120"]] * 2) as _out:
                rows["loop ping, 2 CPU burners"].append(pings(agent, PINGS))
            with neighbours([[sys.executable, "-c", SCRAPER, url, "120"]]) as out:
                rows["loop ping, scraping nonstop"].append(pings(agent, PINGS))
            rows["one scrape of /metrics"].append([float(line) for line in out[0].split()])
        status = agent.request("status")
        print(f"\nscrape stall, kernel {status['kernel']}, {CONNS} forwarded idle connections,"
              f" {os.cpu_count()} CPUs, {ROUNDS} rounds\n")  # fmt: skip
        results = {name: figures(rounds) for name, rounds in rows.items()}
        for name, row in results.items():
            print(summary(name, row))
        meta = {"connections": CONNS, "pings": PINGS, "rounds": ROUNDS}
        path = save_results("scrape", meta, {"rows": results})
        doctables.update("scrape")  # docs/benchmarks.md's table, from the file
        print(f"\nwritten to {path.relative_to(ROOT)}")
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()


if __name__ == "__main__":
    sys.exit(main())
