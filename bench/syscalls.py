"""System calls the agent makes per request ([P] part 1): redis GET from an
attached pod to redis-server in another pod, 20 clients, a connection per
request and keep-alive, on the sockmap and copy paths, counted with
`strace -c -f` on the agent. Counts, not times: they do not depend on
what else the machine is doing, so they compare commits on any machine.

Adds one entry to bench/results/syscalls.json, named by SYSCALLS_LABEL
(default: the commit). SYSCALLS_AGENT_TREE=DIR measures the agent package
in DIR/agent (a worktree of an older commit: `git worktree add`) with
this script, so a change's before and after come from the same load.
Run as root: `make bench-syscalls`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from meshenv import make_env, start_agent  # noqa: E402
from run import REDIS_PORT, RESULTS, cpu_model, measured_tree, ready, redis_pods  # noqa: E402

REQUESTS = int(os.environ.get("SYSCALLS_REQUESTS", "2000"))  # also bench/pycalls.py's
DATAPATHS = ("sockmap", "copy")
WORKLOADS = {"conn": "0", "ka": "1"}  # redis-benchmark -k


def per_request(env, pod, target: str, pid: int, keep: str, workdir: Path) -> dict[str, float]:
    """The agent's system calls per request, by name (every thread), while
    redis-benchmark makes REQUESTS requests."""
    out = workdir / "strace.txt"
    tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                              stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)
    env.popen(pod, ["redis-benchmark", "-h", target, "-p", str(REDIS_PORT), "-t", "get", "-n",
                    str(REQUESTS), "-c", "20", "-k", keep, "-q"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=120)  # fmt: skip
    time.sleep(0.5)
    tracer.send_signal(2)
    tracer.wait(timeout=30)
    counts = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3]) / REQUESTS
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def table(counts: dict[str, float]) -> list[str]:
    """Lines for a profile: the calls made at least every other request."""
    rows = [f"{n:6.1f}  {name}" for name, n in counts.items() if n >= 0.5]
    return [f"strace: the agent's system calls per request ({REQUESTS} requests;"
            f" {sum(counts.values()):.0f} in all, every thread)", *rows]  # fmt: skip


def count_runs(name: str, count, prepare=None) -> int:
    """The counting benches' run (this one and bench/pycalls.py): for each
    data path an agent with the client pod attached, for each workload
    count(env, pod, target, agent pid, keep-alive, workdir) -> {what: per
    request}; one entry, named by NAME_LABEL (default: the commit), added
    to bench/results/NAME.json. The agent tree: NAME_AGENT_TREE. prepare
    (workdir, agent package dir or None) sets the agent's environment."""
    var = name.upper()
    source, agent_dir = measured_tree(f"{var}_AGENT_TREE")
    label = os.environ.get(f"{var}_LABEL") or source["commit"]
    workdir = Path(tempfile.mkdtemp(prefix=f"meshagent-{name}-"))
    if prepare is not None:
        prepare(workdir, agent_dir)
    elif agent_dir is not None:
        os.environ["PYTHONPATH"] = str(agent_dir)  # the agent's `python -m meshagent`
    env = make_env()
    agent = None
    entry: dict = {}
    try:
        client, server = redis_pods(env, workdir)
        for datapath in DATAPATHS:
            agent = start_agent(env, "--datapath", datapath, log_name=f"agent-{datapath}.log")
            agent.attach(client)
            time.sleep(1.0)
            for workload, keep in WORKLOADS.items():
                entry[f"{workload}-{datapath}"] = count(env, client, server.ip4, agent.proc.pid,
                                                        keep, workdir)  # fmt: skip
                total = entry[f"{workload}-{datapath}"]["total"]
                print(f"{label} {workload}-{datapath}: {total:.1f} per request")
            agent.stop()
            agent = None
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    path = RESULTS / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["runs"][label] = {"date": time.strftime("%Y-%m-%d"), "kernel": os.uname().release,
                           "cpu_model": cpu_model(), "requests": REQUESTS, **source,
                           "workload": "redis GET, 20 clients", **entry}  # fmt: skip
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({label})")
    return 0


def count_syscalls(env, pod, target: str, pid: int, keep: str, workdir: Path) -> dict:
    counts = per_request(env, pod, target, pid, keep, workdir)
    return {"total": round(sum(counts.values()), 1), "by_call": counts}


def main() -> int:
    if not ready("syscalls", "bench-syscalls", ("strace", "redis-server", "redis-benchmark")):
        return 1
    return count_runs("syscalls", count_syscalls)


if __name__ == "__main__":
    sys.exit(main())
