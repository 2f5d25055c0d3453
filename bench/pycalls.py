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
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from meshenv import wait_for  # noqa: E402
from run import REDIS_PORT, ready  # noqa: E402
from syscalls import REQUESTS, count_runs  # noqa: E402

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


def count_calls(env, pod, target: str, pid: int, keep: str, workdir: Path) -> dict:
    calls = per_request(env, pod, target, pid, keep, workdir / "calls.json")
    top = {name: round(n, 2) for name, n in list(calls.items())[:SHOWN]}
    return {"total": round(sum(calls.values()), 1), "top": top}


def prepare(workdir: Path, agent_dir: Path | None) -> None:
    """The agent loads cProfile from workdir's sitecustomize.py."""
    (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(workdir)] + ([str(agent_dir)] if agent_dir is not None else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.environ["MESHAGENT_PYCALLS_OUT"] = str(workdir / "calls.json")


def main() -> int:
    if not ready("pycalls", "bench-pycalls", ("redis-server", "redis-benchmark")):
        return 1
    return count_runs("pycalls", count_calls, prepare)


if __name__ == "__main__":
    sys.exit(main())
