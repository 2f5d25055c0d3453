"""Soak: does anything grow while the agent forwards for minutes? (make soak)

One pod runs a mixed load through the agent against an echo server in
another pod, for SOAK_SECONDS (default 300): LONG connections held open
and exchanging 16 KiB each half second (a quarter of them replaced every
30 s), and SHORT_WORKERS threads opening, using and closing connections at
SHORT_RATE per second in all. Every byte is checked against what was sent. Every
SAMPLE_SECONDS the agent's RSS, open fds, forwarded connections and BPF map
entries are sampled and printed as a table; at the end, the first and
last minute are compared; all of it is written to
bench/results/soak.json. SOAK_AGENT_ARGS passes options to
`meshagent run`. Not part of `make test` (it takes minutes). Run
as root.
"""

from __future__ import annotations

import json
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

MANY = ROOT / "tests" / "helpers" / "many.py"
SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
# e.g. "--datapath splice"; the log is JSON so its warnings can be counted
AGENT_ARGS = ["--log-format", "json", *os.environ.get("SOAK_AGENT_ARGS", "").split()]
SAMPLE_SECONDS = 10.0
PORT = 7300
LONG = 200
SHORT_WORKERS = 4
# Short connections per second, paced. Each one leaves a TIME_WAIT socket for
# 60 s on the upstream side (the forwarder closes first, as a direct client
# would), and a pod has ~28,000 ephemeral ports per destination: above ~450/s
# to one server, upstream connects fail with EADDRNOTAVAIL, meshed or not.
SHORT_RATE = 300

# The load, run inside the client pod. Bounded by its deadline; prints one
# JSON line of totals.
LOAD = r"""
import errno, hashlib, json, os, socket, sys, threading, time

host, port, seconds, long_count, workers, short_rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
deadline = time.monotonic() + seconds
totals = {"short": 0, "short_errors": 0, "long_exchanges": 0, "long_errors": 0, "bad_bytes": 0,
          "long_replaced": 0}
lock = threading.Lock()

def add(key, n=1):
    with lock:
        totals[key] = totals.get(key, 0) + n

def exchange(sock, size):
    data = os.urandom(size)
    sock.sendall(data)
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            raise ConnectionError("closed early")
        got += chunk
    if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
        add("bad_bytes")

def short_worker():
    gap = workers / short_rate  # each worker's share of the paced rate
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        next_at += gap
        time.sleep(max(0.0, next_at - time.monotonic()))
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                exchange(sock, 1024)
            add("short")
        except OSError as exc:
            add("short_errors")
            add("error " + (type(exc).__name__ if not exc.errno else errno.errorcode.get(exc.errno, str(exc.errno))))
            time.sleep(0.1)

def long_worker(index):
    sock, since = None, 0.0
    while time.monotonic() < deadline:
        try:
            if sock is None:
                sock, since = socket.create_connection((host, port), timeout=10), time.monotonic()
            exchange(sock, 16384)
            add("long_exchanges")
            # a quarter of them are replaced every 30 s
            if time.monotonic() - since > 30 and index % 4 == int(time.monotonic() // 30) % 4:
                sock.close()
                sock = None
                add("long_replaced")
        except OSError as exc:
            add("long_errors")
            add("error " + (type(exc).__name__ if not exc.errno else errno.errorcode.get(exc.errno, str(exc.errno))))
            if sock is not None:
                sock.close()
            sock = None
        time.sleep(0.5)
    if sock is not None:
        sock.close()

threads = [threading.Thread(target=short_worker) for _ in range(workers)]
threads += [threading.Thread(target=long_worker, args=(i,)) for i in range(long_count)]
for t in threads:
    t.start()
print("running", flush=True)
for t in threads:
    t.join()
print(json.dumps(totals), flush=True)
"""


def sample(agent, pid: int, started: float) -> dict:
    status = agent.request("status")
    with open(f"/proc/{pid}/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    pods = {p["name"]: p for p in status["pods"]}
    return {
        "t": round(time.monotonic() - started),
        "rss_mb": round(rss / 2**20, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "active": pods.get("client", {}).get("connections_active", 0),
        "total": pods.get("client", {}).get("connections_total", 0),
        **status["map_entries"],
    }


def main() -> int:
    if os.geteuid() != 0:
        print("bench/soak.py: run as root", file=sys.stderr)
        return 1
    env = make_env()
    agent = None
    try:
        client, server = env.create_pod("client"), env.create_pod("server")
        echo = env.popen(server, [sys.executable, str(MANY), "serve", str(PORT)],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert "listening" in echo.stdout.readline()
        agent = start_agent(env, *AGENT_ARGS)
        agent.attach(client)
        pid = agent.request("ping")["pid"]
        status = agent.request("status")
        started = time.monotonic()
        rows = [sample(agent, pid, started)]  # idle, before the load
        load = env.popen(
            client,
            [sys.executable, "-c", LOAD, server.ip4, str(PORT), str(SECONDS), str(LONG),
             str(SHORT_WORKERS), str(SHORT_RATE)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert load.stdout.readline().strip() == "running"
        while load.poll() is None and time.monotonic() - started < SECONDS + 60:
            time.sleep(SAMPLE_SECONDS)
            rows.append(sample(agent, pid, started))
        totals = json.loads(load.communicate(timeout=120)[0].strip().splitlines()[-1])
        wait_for(lambda: agent.pod_status("client")["connections_active"] == 0, 60, "idle")
        # Finished connections' map entries go in batches, once a second.
        deadline = time.monotonic() + 10
        while any(agent.request("status")["map_entries"].values()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        rows.append(sample(agent, pid, started))  # idle again, after the load
        print(f"\nsoak, kernel {status['kernel']}, data path {status['datapath']},"
              f" {SECONDS:.0f} s, {os.cpu_count()} CPUs: {LONG} long connections +"
              f" {SHORT_RATE:.0f} short connections/s\n")  # fmt: skip
        columns = list(rows[0])
        for row in rows[1:]:
            columns += [c for c in row if c not in columns]
        print(" ".join(f"{c:>14}" for c in columns))
        for row in rows:
            print(" ".join(f"{row.get(c, 0)!s:>14}" for c in columns))
        minute = int(60 / SAMPLE_SECONDS)
        loaded = rows[1:-1]
        if len(loaded) >= 2 * minute:
            for key in ("rss_mb", "fds"):
                first = statistics.mean(r[key] for r in loaded[:minute])
                last = statistics.mean(r[key] for r in loaded[-minute:])
                print(f"\n{key}: first minute {first:.1f}, last minute {last:.1f}"
                      f" ({(last - first) / first * 100:+.1f}%)", end="")  # fmt: skip
        print(f"\n\nload: {json.dumps(totals)}")
        print(f"idle before -> after: rss {rows[0]['rss_mb']} -> {rows[-1]['rss_mb']} MB,"
              f" fds {rows[0]['fds']} -> {rows[-1]['fds']}")  # fmt: skip
        warnings: dict[str, int] = {}
        for line in agent.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("warning", "error"):
                what = f"{entry.get('msg')}: {entry.get('reason', '')}"[:120]
                warnings[what] = warnings.get(what, 0) + 1
        for what, count in sorted(warnings.items(), key=lambda kv: -kv[1])[:10]:
            print(f"agent {count:6} x {what}")
        left = {name: n for name, n in rows[-1].items() if name.startswith("mesh_") and n}
        if left:
            print(f"soak: map entries left 10 s after the last connection: {left}")
        bad = totals["bad_bytes"] or totals["long_errors"] or totals["short_errors"]
        meta = {"datapath": status["datapath"], "seconds": SECONDS, "long": LONG,
                "short_per_second": SHORT_RATE, "agent_args": AGENT_ARGS}  # fmt: skip
        path = save_results("soak", meta, {"samples": rows, "load": totals, "warnings": warnings,
                                           "entries_left": left, "passed": not (bad or left)})  # fmt: skip
        doctables.update("soak")  # docs/benchmarks.md's table, from the file
        print(f"written to {path.relative_to(ROOT)}")
        return 1 if bad or left else 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()


if __name__ == "__main__":
    sys.exit(main())
