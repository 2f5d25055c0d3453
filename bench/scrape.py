"""Does a Prometheus scrape stall the forwarder's loop? (make bench-scrape)

An agent forwards 1,000 idle connections from a pod. The loop's
responsiveness is measured by control `ping`s (each one is answered on the
loop), first alone, then while another thread scrapes /metrics back to
back. Printed: ping latency p50/p99/max both ways, and how long a scrape
takes. Run as root.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_env, start_agent, wait_for  # noqa: E402

CONNS = 1000
PINGS = 2000
HOLD = """
import socket, sys, time
socks = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]
print("held", flush=True)
time.sleep(3600)
"""


def pings(agent, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        agent.request("ping")
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    p99 = values[int(len(values) * 0.99) - 1]
    return (f"{name:28} p50 {statistics.median(values):7.3f} ms  p99 {p99:7.3f} ms"
            f"  max {values[-1]:7.3f} ms  (n={len(values)})")  # fmt: skip


def main() -> int:
    import os
    import subprocess

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
        addr = agent.request("status")["metrics_addr"]
        alone = pings(agent, PINGS)
        scrapes: list[float] = []
        stop = threading.Event()

        def scrape() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as reply:
                    reply.read()
                scrapes.append((time.perf_counter() - started) * 1000)

        thread = threading.Thread(target=scrape, daemon=True)
        thread.start()
        busy = pings(agent, PINGS)
        stop.set()
        thread.join(10)
        status = agent.request("status")
        print(f"\nscrape stall, kernel {status['kernel']}, {CONNS} forwarded idle connections,"
              f" {os.cpu_count()} CPUs\n")  # fmt: skip
        print(summary("loop ping, no scrapes", alone))
        print(summary("loop ping, scraping nonstop", busy))
        print(summary("one scrape of /metrics", scrapes))
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()


if __name__ == "__main__":
    sys.exit(main())
