"""Where the sockmap path's bulk ceiling comes from ([P] part 4): one
iperf3 stream through meshagent's sockmap path (with and without the sk_msg
fast path) against the direct connection, in interleaved rounds, and how
much of the stream Python carried (`handoff_bytes` of the path's stats)
rather than the kernel, with the verdict's decisions (`spliced`: segments
redirected; `handoff`: passed to Python) and the back-pressure holds.

Writes bench/results/handoff.json. Run as root: `make bench-handoff`;
BENCH_ROUNDS (default 4) and BENCH_SECONDS (default 2).
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

import run as bench  # noqa: E402
from meshenv import make_env, start_agent  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "4"))
STATS = ("handoff_bytes", "bytes", "throttles")
DECISIONS = ("spliced", "handoff", "throttled", "msg_spliced")


def main() -> int:
    if os.geteuid() != 0:
        print("handoff: run as root (make bench-handoff)", file=sys.stderr)
        return 1
    env = make_env()
    agent = None
    try:
        plain, client, server = (env.create_pod(n) for n in ("plain", "client", "server"))
        for pod in (plain, client):
            bench.tune_pod(env, pod)
        env.popen(server, ["iperf3", "-s", "-p", str(bench.IPERF_PORT)],
                  stdout=subprocess.DEVNULL)  # fmt: skip
        agent = start_agent(env, "--datapath", "sockmap")
        agent.attach(client)
        msg_ok = agent.request("status")["datapaths"]["sockmap"]["msg"]
        time.sleep(1)
        rows: dict[str, list[dict]] = {}
        for msg in (True, False) if msg_ok else (False,):
            agent.request("datapath", set="sockmap", msg=msg)
            name = "sockmap" if msg else "sockmap-nomsg"
            for i in range(ROUNDS):
                before = agent.request("status")
                order = (plain, client) if i % 2 else (client, plain)
                gbps = {pod.name: bench.bulk(env, pod, server.ip4, 1)["gbps_1"] for pod in order}
                after = agent.request("status")
                stats = {k: after["datapaths"]["sockmap"][k] - before["datapaths"]["sockmap"][k]
                         for k in STATS}  # fmt: skip
                decided = {
                    k: sum(after["decisions"].get(k, {}).values())
                    - sum(before["decisions"].get(k, {}).values())
                    for k in DECISIONS
                }
                rows.setdefault(name, []).append({
                    "direct_gbps": gbps["plain"], "meshagent_gbps": gbps["client"],
                    "vs_direct": gbps["client"] / gbps["plain"],
                    "python_share": stats["handoff_bytes"] / max(1, stats["bytes"]),
                    **stats, **decided,
                })  # fmt: skip
                print(f"handoff: {name} round {i + 1}: {rows[name][-1]}", file=sys.stderr)
        summary = {
            name: {key: statistics.median(r[key] for r in runs)
                   for key in ("vs_direct", "python_share", "meshagent_gbps", "direct_gbps")}
            for name, runs in rows.items()
        }  # fmt: skip
        status = agent.request("status")
        meta = {"date": time.strftime("%Y-%m-%d"), "kernel": status["kernel"],
                "cpus": os.cpu_count(), "cpu_model": bench.cpu_model(), "rounds": ROUNDS,
                "seconds": bench.SECONDS, "source": bench.source_tree()}  # fmt: skip
        out = {"meta": meta, "summary": summary, "rounds": rows}
        (bench.RESULTS / "handoff.json").write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()


if __name__ == "__main__":
    sys.exit(main())
