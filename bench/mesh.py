"""Across two nodes of a mesh (tests/helpers/meshlab.py: two node
namespaces joined by a veth wire, one agent each): the hop between nodes,
measured against the same hop done by two HAProxies with TLS on both
sides, and against plaintext direct, in interleaved rounds, each figure
the median (and spread) of its per-round ratio.

Paths, all from a pod of node-a to a server pod of node-b:
- `direct`: pod `plain` (never attached), plaintext over the wire;
- `haproxy-tls`: `plain` to HAProxy in pod `hpa` on node-a, which connects
  in TLS (`ssl verify required`, a client certificate) to HAProxy in pod
  `hpb` on node-b (`bind ... ssl crt ... verify required`), which connects
  to the server: one HAProxy per node, both at their defaults otherwise;
- `meshagent`: pod `client`, attached, over the mutual-TLS hop.

Workloads: iperf3 bulk (1 stream, with machine CPU per GB), bench/rr.c
request/response p50 (1 B and 1 KiB) and new connections per second.

Writes bench/results/mesh.json and prints the table. Run as root:
`make bench-mesh`; BENCH_ROUNDS (default 5) and BENCH_SECONDS (default 2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
sys.path.insert(0, str(ROOT / "bench"))

from meshlab import make_two_nodes  # noqa: E402
from run import (  # noqa: E402
    IPERF_PORT,
    RR_PORT,
    build_rr,
    bulk,
    ready,
    rr,
    save_results,
    spread,
    tune_pod,
)

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
FIGURES = {
    "gbps_1": ("1 stream Gbit/s", True),
    "cpu_per_gb": ("machine CPU s/GB, 1 stream", False),
    "p50_1": ("RR 1 B p50 µs", False),
    "p50_1024": ("RR 1 KiB p50 µs", False),
    "cps": ("new connections/s", True),
}


def haproxy_pair(workdir: Path, ca_dir: Path, server_ip: str, hpb_ip: str) -> tuple[Path, Path]:
    """(node-a's config, node-b's): a plaintext listener on node-a whose
    server is node-b's HAProxy in TLS; node-b's takes TLS and connects to
    the server in plaintext. Certificates from the mesh's own CA."""
    from meshagent.mesh import ca

    pems = {}
    for name in ("haproxy-a", "haproxy-b"):
        out = workdir / name
        ca.issue(ca_dir, name, out)
        pem = workdir / f"{name}.pem"
        pem.write_bytes((out / "node.crt").read_bytes() + (out / "node.key").read_bytes())
        pems[name] = pem
    cafile = ca_dir / "ca.crt"
    head = textwrap.dedent("""\
        defaults
            mode tcp
            timeout connect 5s
            timeout client 60s
            timeout server 60s
        """)  # fmt: skip
    ports = (("rr", RR_PORT), ("iperf", IPERF_PORT))
    a = head + "".join(
        f"listen {name}\n    bind :::{port} v4v6\n"
        f"    server s {hpb_ip}:{port} ssl verify required ca-file {cafile} crt {pems['haproxy-a']}\n"
        for name, port in ports
    )
    b = head + "".join(
        f"listen {name}\n    bind :::{port} v4v6 ssl crt {pems['haproxy-b']} verify required"
        f" ca-file {cafile}\n    server s {server_ip}:{port}\n"
        for name, port in ports
    )
    conf_a, conf_b = workdir / "haproxy-a.cfg", workdir / "haproxy-b.cfg"
    conf_a.write_text(a)
    conf_b.write_text(b)
    return conf_a, conf_b


def main() -> int:
    if not ready("bench", "bench-mesh", ("iperf3", "haproxy", "gcc")):
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-bench-mesh-"))
    nodes = make_two_nodes()
    try:
        env_a, env_b = nodes.envs
        rr_bin = build_rr(workdir)
        a, b = nodes.start_all()
        plain, client, hpa = (env_a.create_pod(n) for n in ("plain", "client", "hpa"))
        server, hpb = (env_b.create_pod(n) for n in ("server", "hpb"))
        for pod in (plain, client, hpa):
            tune_pod(env_a, pod)
        tune_pod(env_b, hpb)
        env_b.popen(server, [str(rr_bin), "serve", str(RR_PORT)], stdout=subprocess.DEVNULL)
        env_b.popen(server, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL)
        conf_a, conf_b = haproxy_pair(workdir, nodes.ca, server.ip4, hpb.ip4)
        env_b.popen(hpb, ["haproxy", "-db", "-f", str(conf_b)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
        env_a.popen(hpa, ["haproxy", "-db", "-f", str(conf_a)], stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)  # fmt: skip
        a.attach(client)
        b.attach(server)
        time.sleep(1.0)
        paths = {
            "direct": (plain, server.ip4),
            "haproxy-tls": (plain, hpa.ip4),
            "meshagent": (client, server.ip4),
        }
        samples: dict[str, list[dict]] = {name: [] for name in paths}
        for round_no in range(ROUNDS):
            order = list(paths) if round_no % 2 == 0 else list(reversed(paths))
            for name in order:
                pod, target = paths[name]
                figures = {**bulk(env_a, pod, target, 1), **rr(env_a, pod, rr_bin, target)}
                samples[name].append(figures)
                print(f"round {round_no + 1}/{ROUNDS} {name}: "
                      + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()), flush=True)  # fmt: skip
        summary = {}
        for name, rounds in samples.items():
            summary[name] = {}
            for figure in FIGURES:
                entry = {
                    "values": [r[figure] for r in rounds],
                    **spread([r[figure] for r in rounds]),
                }
                for anchor in ("direct", "haproxy-tls"):
                    ratios = [m[figure] / base[figure]
                              for m, base in zip(rounds, samples[anchor], strict=True)]  # fmt: skip
                    entry[f"vs_{anchor}"] = spread(ratios)
                summary[name][figure] = entry
        mesh = b.request("status")["mesh"]
        kernel = mesh["kernel_tls"]
        hop = ("TLS 1.2, the kernel's TLS, spliced" if kernel["on"]
               else "TLS 1.3, OpenSSL in the agent") + f" ({kernel['why']})"  # fmt: skip
        meta = {"rounds": ROUNDS, "seconds": float(os.environ.get("BENCH_SECONDS", "2")),
                "hop": hop, "handshakes_on_node_b": mesh["handshakes"],
                "where": os.environ.get("BENCH_WHERE", "this machine")}  # fmt: skip
        name = "mesh-ktls-vm" if kernel["on"] else "mesh"
        path = save_results(os.environ.get("BENCH_NAME", name), meta, {"summary": summary})
        print(table(summary))
        print(f"wrote {path.relative_to(ROOT)}")
    finally:
        nodes.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def table(summary: dict) -> str:
    lines = ["| figure | direct | haproxy-tls pair | meshagent | meshagent / haproxy-tls |",
             "|---|---|---|---|---|"]  # fmt: skip
    for figure, (what, _higher) in FIGURES.items():
        cells = [
            f"{summary[p][figure]['median']:.3g}" for p in ("direct", "haproxy-tls", "meshagent")
        ]
        ratio = summary["meshagent"][figure]["vs_haproxy-tls"]
        lines.append(f"| {what} | {' | '.join(cells)} | {ratio['median']:.2f}"
                     f" ({ratio['min']:.2f}-{ratio['max']:.2f}) |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
