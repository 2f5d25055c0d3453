"""Where the sockmap path's bulk ceiling comes from ([P] part 4): one
iperf3 stream through meshagent's sockmap path (with and without the sk_msg
fast path), upload and download, against the direct connection, in
interleaved rounds, and how much of the stream Python carried
(`handoff_bytes` of the path's stats) rather than the kernel, with the
verdict's decisions (`spliced`: segments redirected; `handoff`: passed to
Python) and the back-pressure holds.

HANDOFF_TREES="main=.,peek=/tmp/wt-X" compares checkouts (their agent
packages, in the same rounds: bench/run.py agent_trees). Writes
bench/results/HANDOFF_RESULT.json (default handoff). Run as root:
`make bench-handoff`; BENCH_ROUNDS (default 4), BENCH_SECONDS (default 2),
HANDOFF_DIRECTIONS (default "up,down").
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


RESULT = os.environ.get("HANDOFF_RESULT", "handoff")
DIRECTIONS = os.environ.get("HANDOFF_DIRECTIONS", "up,down").split(",")


def measure(env, agent, pods, server, direction: str, i: int) -> dict:
    """One round of one path and direction: meshagent and direct, and what
    the path's stats and the verdict counted meanwhile."""
    plain, client = pods
    download = direction == "down"
    key = "gbps_down" if download else "gbps_1"
    before = agent.request("status")
    order = (plain, client) if i % 2 else (client, plain)
    gbps = {pod.name: bench.bulk(env, pod, server.ip4, 1, download=download)[key]
            for pod in order}  # fmt: skip
    after = agent.request("status")
    stats = {k: after["datapaths"]["sockmap"][k] - before["datapaths"]["sockmap"][k]
             for k in STATS}  # fmt: skip
    decided = {k: sum(after["decisions"].get(k, {}).values())
               - sum(before["decisions"].get(k, {}).values()) for k in DECISIONS}  # fmt: skip
    return {"direct_gbps": gbps["plain"], "meshagent_gbps": gbps["client"],
            "vs_direct": gbps["client"] / gbps["plain"],
            "python_share": stats["handoff_bytes"] / max(1, stats["bytes"]),
            **stats, **decided}  # fmt: skip


def main() -> int:
    if not bench.ready("handoff", "bench-handoff", ("iperf3",)):
        return 1
    trees = bench.agent_trees("HANDOFF_TREES")
    env = make_env()
    agent = None
    rows: dict[str, list[dict]] = {}
    try:
        plain, client, server = (env.create_pod(n) for n in ("plain", "client", "server"))
        for pod in (plain, client):
            bench.tune_pod(env, pod)
        env.popen(server, ["iperf3", "-s", "-p", str(bench.IPERF_PORT)],
                  stdout=subprocess.DEVNULL)  # fmt: skip
        for i in range(ROUNDS):
            for tree in list(trees) if i % 2 == 0 else list(trees)[::-1]:
                os.environ["PYTHONPATH"] = str(trees[tree][0] / "agent")
                agent = start_agent(env, "--datapath", "sockmap", "--sockmap-msg", *bench.AGENT_ARGS,
                                    log_name=f"agent-{tree}.log")  # fmt: skip
                agent.attach(client)
                msg_ok = agent.request("status")["datapaths"]["sockmap"]["msg"]
                time.sleep(1)
                for msg in (True, False) if msg_ok else (False,):
                    agent.request("datapath", set="sockmap", msg=msg)
                    path = "sockmap" if msg else "sockmap-nomsg"
                    for direction in DIRECTIONS:
                        name = (
                            f"{path} {direction}"
                            if len(trees) == 1
                            else f"{tree} {path} {direction}"
                        )
                        rows.setdefault(name, []).append(
                            measure(env, agent, (plain, client), server, direction, i)
                        )
                        print(f"handoff: {name} round {i + 1}: {rows[name][-1]}", file=sys.stderr)
                kernel = agent.request("status")["kernel"]
                agent.stop()
                agent = None
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
    summary = {
        name: {key: statistics.median(r[key] for r in runs)
               for key in ("vs_direct", "python_share", "meshagent_gbps", "direct_gbps")}
        for name, runs in rows.items()
    }  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "kernel": kernel, "cpus": os.cpu_count(),
            "cpu_model": bench.cpu_model(), "rounds": ROUNDS, "seconds": bench.SECONDS,
            "source": bench.source_tree(), "cpus_used": sorted(os.sched_getaffinity(0)),
            "trees": {name: commit for name, (_tree, commit) in trees.items()}}  # fmt: skip
    out = {"meta": meta, "summary": summary, "rounds": rows}
    (bench.RESULTS / f"{RESULT}.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
