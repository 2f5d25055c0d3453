"""Python function calls the agent's loop makes per request ([P] part 1):
the same load as bench/syscalls.py (redis GET from an attached pod, 20
clients, a connection per request and keep-alive, sockmap and copy), the
agent's main thread (the loop: accept, connect, the data paths) under
cProfile. Calls, not times: like system calls they do not depend on what
else the machine is doing, and each Python call costs the interpreter
roughly the same, so fewer calls per request is less CPU per request.
C functions count too (socket.accept, setsockopt: cProfile sees them).

The agent gets cProfile from a sitecustomize.py this script writes into a
temporary directory put first on its PYTHONPATH; SIGUSR2 makes it write
its counts so far, taken before and after each load (the difference is
the load's). Adds one entry to bench/results/pycalls.json, named by
PYCALLS_LABEL (default: the commit); PYCALLS_AGENT_TREE=DIR measures the
agent package of DIR (a worktree of an older commit).
Run as root: `make bench-pycalls`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from meshenv import make_env, start_agent, wait_for  # noqa: E402
from run import REDIS_PORT, RESULTS, cpu_model, ready, redis_pods, source_tree  # noqa: E402

REQUESTS = int(os.environ.get("PYCALLS_REQUESTS", "2000"))
DATAPATHS = ("sockmap", "copy")
WORKLOADS = {"conn": "0", "ka": "1"}  # redis-benchmark -k
SHOWN = int(os.environ.get("PYCALLS_SHOWN", "40"))  # functions listed per workload

# Loaded by the agent's interpreter at start (site imports sitecustomize).
SITECUSTOMIZE = r"""
import cProfile, json, os, signal
_out = os.environ.get("MESHAGENT_PYCALLS_OUT")
if _out:
    _prof = cProfile.Profile()
    def _dump(*_):
        _prof.disable()
        _prof.create_stats()
        calls = {f"{os.path.basename(f)}:{n}({fn})": nc
                 for (f, n, fn), (cc, nc, tt, ct, callers) in _prof.stats.items()}
        tmp = _out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(calls, fh)
        os.rename(tmp, _out)
        _prof.enable()
    signal.signal(signal.SIGUSR2, _dump)
    _prof.enable()
"""


def snapshot(pid: int, out: Path) -> Counter:
    """The agent's calls so far, by function."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    wait_for(out.exists, 20, "the agent's call counts")
    return Counter(json.loads(out.read_text()))


def per_request(env, pod, target: str, pid: int, keep: str, out: Path) -> dict[str, float]:
    before = snapshot(pid, out)
    env.popen(pod, ["redis-benchmark", "-h", target, "-p", str(REDIS_PORT), "-t", "get", "-n",
                    str(REQUESTS), "-c", "20", "-k", keep, "-q"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait(timeout=300)  # fmt: skip
    time.sleep(0.5)
    after = snapshot(pid, out)
    after.subtract(before)
    return {name: n / REQUESTS for name, n in after.most_common() if n > 0}


def measured_tree() -> tuple[dict, Path | None]:
    tree = os.environ.get("PYCALLS_AGENT_TREE")
    if not tree:
        return source_tree(), None
    path = Path(tree).resolve()
    commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {"commit": commit, "agent_code_changed": None}, path / "agent"


def main() -> int:
    if not ready("pycalls", "bench-pycalls", ("redis-server", "redis-benchmark")):
        return 1
    source, agent_dir = measured_tree()
    label = os.environ.get("PYCALLS_LABEL") or source["commit"]
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-pycalls-"))
    (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(workdir)] + ([str(agent_dir)] if agent_dir is not None else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    out = workdir / "calls.json"
    os.environ["MESHAGENT_PYCALLS_OUT"] = str(out)
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
                calls = per_request(env, client, server.ip4, agent.proc.pid, keep, out)
                total = sum(calls.values())
                entry[f"{workload}-{datapath}"] = {
                    "total": round(total, 1),
                    "top": {name: round(n, 2) for name, n in list(calls.items())[:SHOWN]},
                }
                print(f"{label} {workload}-{datapath}: {total:.1f} Python calls per request")
            agent.stop()
            agent = None
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    path = RESULTS / "pycalls.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["runs"][label] = {"date": time.strftime("%Y-%m-%d"), "kernel": os.uname().release,
                           "cpu_model": cpu_model(), "requests": REQUESTS, **source,
                           "workload": "redis GET, 20 clients", **entry}  # fmt: skip
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
