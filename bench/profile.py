"""Where the cycles go under a real load: redis-benchmark (GET, 20 clients)
from an attached pod to redis-server in another pod, through the agent.

While the load runs, two profilers sample:
- `perf record -a` (Debian's linux-perf; software cpu-clock, so it works in
  VMs without PMU events): the whole machine's CPU by process and by
  kernel/user symbol;
- py-spy (the agent's Python stacks; `pip download py-spy` puts it in the
  benchmark's cache): self time per Python function, GIL held or not.

Prints both tables and writes them to bench/results/profile-WORKLOAD-DATAPATH.txt.
Run as root: `make bench-profile` (PROFILE_WORKLOAD=conn|ka, PROFILE_DATAPATH=
sockmap|splice|copy, PROFILE_SECONDS=10).
"""

from __future__ import annotations

import collections
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
from run import REDIS_PORT, ready, redis_pods  # noqa: E402
from syscalls import per_request, table  # noqa: E402

WORKLOAD = os.environ.get("PROFILE_WORKLOAD", "conn")
DATAPATH = os.environ.get("PROFILE_DATAPATH", "sockmap")
SECONDS = float(os.environ.get("PROFILE_SECONDS", "10"))
CACHE = ROOT / "bench" / ".cache"
TOP = 25


def py_spy() -> Path:
    """py-spy from PyPI (a static binary in a wheel), kept in bench/.cache."""
    binary = CACHE / "py-spy" / "bin" / "py-spy"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(CACHE / "py-spy"), "py-spy"], check=True)  # fmt: skip
    return binary


def load(env, pod, target: str, deadline: float) -> int:
    """redis-benchmark runs back to back until the deadline; requests made."""
    keep = "0" if WORKLOAD == "conn" else "1"
    made = 0
    while time.monotonic() < deadline:
        proc = env.popen(pod, ["redis-benchmark", "-h", target, "-p", str(REDIS_PORT), "-t",
                               "get", "-n", "5000", "-c", "20", "-k", keep, "-q"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        proc.wait(timeout=120)
        made += 5000
    return made


def python_table(raw: Path) -> list[str]:
    """Self samples per leaf function (py-spy --format raw: collapsed stacks)."""
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1] if frames else "?"
        leaves[leaf] += int(count)
        total += int(count)
    rows = [f"{n / total * 100:5.1f}%  {leaf}" for leaf, n in leaves.most_common(TOP)]
    return [f"py-spy: {total} samples of the agent's threads while running (self time)", *rows]


def perf_table(data: Path) -> list[str]:
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g",
                          "none", "--sort", "comm,dso,sym", "--percent-limit", "0.7"],
                         capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    rows = [line.rstrip() for line in out.splitlines() if line.strip() and not line.startswith("#")]
    by_comm = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                              "-g", "none", "--sort", "comm", "--percent-limit", "1"],
                             capture_output=True, text=True, timeout=300).stdout  # fmt: skip
    comms = [line.rstrip() for line in by_comm.splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    return ["perf: whole machine, by process", *comms, "", "perf: by process and symbol",
            *rows[:TOP]]  # fmt: skip


def main() -> int:
    if not ready("profile", "bench-profile", ("perf", "strace", "redis-server", "redis-benchmark")):
        return 1
    spy = py_spy()
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-profile-"))
    env = make_env()
    agent = None
    try:
        client, server = redis_pods(env, workdir)
        agent = start_agent(env, "--datapath", DATAPATH)
        agent.attach(client)
        time.sleep(1.0)
        deadline = time.monotonic() + SECONDS
        perf_data = workdir / "perf.data"
        raw = workdir / "py-spy.txt"
        perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "499", "-e", "cpu-clock",
                                 "-o", str(perf_data), "--", "sleep", str(SECONDS)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        spying = subprocess.Popen([str(spy), "record", "--pid", str(agent.proc.pid), "--format",
                                   "raw", "--rate", "250", "--duration", str(int(SECONDS)),
                                   "--nonblocking", "--threads", "-o", str(raw)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        made = load(env, client, server.ip4, deadline)
        perf.wait(timeout=SECONDS + 60)
        spying.wait(timeout=SECONDS + 60)
        keep = "0" if WORKLOAD == "conn" else "1"
        syscalls = table(per_request(env, client, server.ip4, agent.proc.pid, keep, workdir))
        status = agent.request("status")
        lines = [f"profile: redis GET, {'a connection per request' if WORKLOAD == 'conn' else 'keep-alive'},"
                 f" 20 clients, datapath {DATAPATH}, {SECONDS:.0f} s, {made} requests,"
                 f" kernel {status['kernel']}, {os.cpu_count()} CPUs", ""]  # fmt: skip
        lines += [*perf_table(perf_data), ""]
        lines += python_table(raw) if raw.exists() else ["py-spy: no samples"]
        lines += ["", *syscalls]
        text = "\n".join(lines) + "\n"
        print(text)
        out = ROOT / "bench" / "results" / f"profile-{WORKLOAD}-{DATAPATH}.txt"
        out.write_text(text)
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
