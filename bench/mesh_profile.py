"""Where the machine's CPU goes on the mesh hop: a single iperf3 stream
from a pod on node A to a server on node B, through both agents (the
OpenSSL mode on a kernel without TLS), then through the HAProxy TLS pair
of `bench/mesh.py`, while `perf record -a` samples the whole machine
(software cpu-clock).

Writes bench/results/mesh-profile.json: the share of busy samples by
process and object (the kernel, libcrypto, the Python interpreter...),
the figure that says what a faster hop could still save. Run as root:
`make bench-mesh-profile` (BENCH_SECONDS, default 8).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("BENCH_SECONDS", "8")

from mesh import haproxy_pair  # noqa: E402
from meshlab import make_two_nodes  # noqa: E402
from run import IPERF_PORT, SECONDS, bulk, save_results, tune_pod  # noqa: E402

LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+(.+?)\s*$")


def shares(data: Path) -> list[dict]:
    """Busy samples (the idle task left out) by process and object, in %."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                          "--sort", "comm,dso", "-q"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        m = LINE.match(line)
        if m and m.group(2) != "swapper":
            rows.append({"process": m.group(2), "object": m.group(3), "pct": float(m.group(1))})
    busy = sum(r["pct"] for r in rows) or 1.0
    for r in rows:
        r["pct_of_busy"] = round(100 * r["pct"] / busy, 2)
    return [r for r in rows if r["pct_of_busy"] >= 0.2]


def main() -> int:
    if os.geteuid() != 0 or not shutil.which("perf") or not shutil.which("iperf3"):
        print("bench: run as root, with perf and iperf3 (scripts/bootstrap bench)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-bench-mprof-"))
    nodes = make_two_nodes()
    try:
        env_a, env_b = nodes.envs
        a, b = nodes.start_all()
        client, plain, hpa = (env_a.create_pod(n) for n in ("client", "plain", "hpa"))
        server, hpb = env_b.create_pod("server"), env_b.create_pod("hpb")
        for pod in (client, plain, hpa):
            tune_pod(env_a, pod)
        tune_pod(env_b, hpb)
        env_b.popen(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
        conf_a, conf_b = haproxy_pair(workdir, nodes.ca, server.ip4, hpb.ip4)
        for env, pod, conf in ((env_b, hpb, conf_b), (env_a, hpa, conf_a)):
            env.popen(pod, ["haproxy", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)  # fmt: skip
        a.attach(client)
        b.attach(server)
        results = {}
        for name, pod, target in (
            ("meshagent", client, server.ip4),
            ("haproxy-tls", plain, hpa.ip4),
        ):
            bulk(env_a, pod, target, 1)  # warm: the first connection's handshake
            data = workdir / f"{name}.data"
            perf = subprocess.Popen(["perf", "record", "-a", "-e", "cpu-clock", "-F", "499",
                                     "-o", str(data), "--", "sleep", str(max(SECONDS - 2, 2))],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            figures = bulk(env_a, pod, target, 1)
            perf.wait(timeout=SECONDS + 60)
            results[name] = {"bulk": figures, "shares": shares(data)}
            print(f"{name}: {figures}")
            for r in results[name]["shares"]:
                print(f"  {r['pct_of_busy']:6.2f}%  {r['process']:10} {r['object']}")
        hop = b.request("status")["mesh"]["kernel_tls"]
        meta = {"seconds": SECONDS, "hop": hop["why"], "workload": "iperf3, 1 stream, A to B"}
        path = save_results("mesh-profile", meta, results)
        print(f"wrote {path.relative_to(ROOT)}")
    finally:
        nodes.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
