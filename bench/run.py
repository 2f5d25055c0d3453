"""meshagent benchmarks: every path measured in the same run, in interleaved
rounds, each figure reported as the median (and spread) of its per-round
ratio to the direct connection of that same round.

Paths: `direct` (pod `plain`, never attached, to pod `server`), `haproxy`
(`plain` to HAProxy at its defaults, threads = CPUs, in pod `proxy`),
`haproxy-splice` (the same with `option splice-auto`, pod `proxys`), and
meshagent's data paths (pod `client`, attached, to `server`; the data path
is switched with `datapath set` before each measurement): sockmap (with
the sk_msg fast path where the kernel has it), sockmap-nomsg,
sockmap-replies (with sk_msg, and the server's replies straight into the
pod's socket: `datapath set sockmap --replies`), splice, copy;
and `meshagent kernel` (pod `kclient`, attached in kernel mode: direct, with
the policy hook and sock_ops's accounting).

Workloads: iperf3 bulk (1 and 4 streams, with whole-machine CPU per GB;
and 1 stream the other way, `-R`: a download, carried by the stream verdict),
request/response with bench/rr.c (1 B and 1 KiB, p50 latency), new
connections per second (rr conn), redis-server with redis-benchmark
(GET; keep-alive and a connection per request, 1 and 20 clients; and 16
pipelined requests per round trip: many small messages), each with
whole-machine CPU per request, and PostgreSQL with pgbench (select-only,
10 clients, keep-alive and a connection per transaction).

Writes bench/results/latest.json (every sample) and latest.png (the
ratios), prints the table and puts it in docs/benchmarks.md between the
bench markers. Run as root: `make bench`; BENCH_ROUNDS (default 5) and
BENCH_SECONDS (default 2) set the rounds and the length of each timed run.
For a quick look (never written to docs/benchmarks.md): BENCH_PATHS (e.g.
"direct,haproxy,meshagent sockmap") and BENCH_WORKLOADS (bulk, rr, redis, pg);
its results go to bench/results/partial.json, or BENCH_RESULT.json.
BENCH_PIN=1 pins every client to CPU 0 and every server to CPU 1 (the
proxies, HAProxy and the agent, are left to the scheduler), to see
whether pinning lowers the spread.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

from meshenv import MeshEnv, make_env, start_agent, wait_for  # noqa: E402
from pgserver import PORT as PG_PORT  # noqa: E402
from pgserver import missing_tools, pg_bin, postgres_in  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
RR_PORT, IPERF_PORT, REDIS_PORT = 7000, 5201, 6379
MESH_PATHS = ("sockmap", "sockmap-nomsg", "sockmap-replies", "splice", "copy")
ONLY_PATHS = [p for p in os.environ.get("BENCH_PATHS", "").split(",") if p]
ALL_WORKLOADS = ("bulk", "rr", "redis", "pg")
WORKLOADS = [w for w in os.environ.get("BENCH_WORKLOADS", ",".join(ALL_WORKLOADS)).split(",") if w]
PIN = os.environ.get("BENCH_PIN") == "1"
AGENT_ARGS = os.environ.get("BENCH_AGENT_ARGS", "").split()  # e.g. "--sockmap-sndbuf 0"
RESULT = os.environ.get("BENCH_RESULT", "partial")  # a partial run's result file
PARTIAL = bool(ONLY_PATHS) or set(WORKLOADS) != set(ALL_WORKLOADS) or PIN or bool(AGENT_ARGS)


def client_cpu(argv: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *argv] if PIN else argv


def server_cpu(argv: list[str]) -> list[str]:
    return ["taskset", "-c", "1", *argv] if PIN else argv


RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# name: (redis-benchmark arguments, requests per run)
REDIS = {
    "redis_ka_20": (["-c", "20", "-k", "1"], 40000),
    "redis_ka_1": (["-c", "1", "-k", "1"], 10000),
    "redis_conn_20": (["-c", "20", "-k", "0"], 6000),
    "redis_conn_1": (["-c", "1", "-k", "0"], 2000),
    "redis_pipe_20": (["-c", "20", "-k", "1", "-P", "16"], 200000),
}
# figure: (what it is, higher is better)
FIGURES = {
    "gbps_1": ("1 stream Gbit/s", True),
    "gbps_4": ("4 streams Gbit/s", True),
    "gbps_down": ("1 stream download (iperf3 -R) Gbit/s", True),
    "cpu_per_gb": ("machine CPU s/GB, 1 stream", False),
    "p50_1": ("RR 1 B p50 µs", False),
    "p50_1024": ("RR 1 KiB p50 µs", False),
    "cps": ("new connections/s", True),
    "redis_ka_20": ("redis GET/s, keep-alive, 20 clients", True),
    "redis_ka_1": ("redis GET/s, keep-alive, 1 client", True),
    "redis_conn_20": ("redis GET/s, a connection per request, 20 clients", True),
    "redis_conn_1": ("redis GET/s, a connection per request, 1 client", True),
    "redis_pipe_20": ("redis GET/s, 16 pipelined, 20 clients", True),
    "redis_ka_20_cpu_us": ("machine CPU µs/request, redis keep-alive 20", False),
    "redis_conn_20_cpu_us": ("machine CPU µs/request, redis conn/request 20", False),
    "pg_ka_10": ("pgbench select-only TPS, keep-alive, 10 clients", True),
    "pg_conn_10": ("pgbench select-only TPS, a connection per transaction, 10 clients", True),
}
PG_SCALE = 2  # pgbench's tables: 200,000 accounts


def build_rr(workdir: Path) -> Path:
    binary = workdir / "rr"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(ROOT / "bench" / "rr.c")], check=True)
    return binary


def ready(name: str, target: str, tools: tuple[str, ...]) -> bool:
    """Root, and the tools a bench runs; else one line that says what to do."""
    if os.geteuid() != 0:
        print(f"{name}: run as root (make {target})", file=sys.stderr)
        return False
    for tool in tools:
        if not shutil.which(tool):
            print(f"{name}: {tool} is missing: run scripts/bootstrap bench", file=sys.stderr)
            return False
    return True


def redis_pods(env: MeshEnv, workdir: Path) -> tuple:
    """A client pod (tuned like the bench's) and a pod running redis-server."""
    client, server = env.create_pod("client"), env.create_pod("server")
    tune_pod(env, client)
    env.popen(server, ["redis-server", "--port", str(REDIS_PORT), "--bind", "*",
                       "--protected-mode", "no", "--save", "", "--appendonly", "no",
                       "--dir", str(workdir)], stdout=subprocess.DEVNULL)  # fmt: skip
    return client, server


def agent_trees(variable: str) -> dict[str, tuple[Path, str]]:
    """Checkouts whose agent package a bench runs, named: "name=DIR,..." in
    the environment variable (default: this checkout); name -> (DIR, its
    commit). Older commits: `git worktree add DIR COMMIT`."""
    out = {}
    for item in os.environ.get(variable, f"this={ROOT}").split(","):
        name, _, path = item.partition("=")
        tree = Path(path or ".").resolve()
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        if not (tree / "agent" / "meshagent").is_dir() or not commit:
            raise SystemExit(f"{variable}: {tree} is not a checkout of this project")
        out[name.strip()] = (tree, commit)
    return out


def measured_tree(variable: str) -> tuple[dict, Path | None]:
    """The agent tree a counting bench measures: (its commit fields, its
    agent package dir or None for this checkout), from the environment
    variable (a worktree of an older commit: `git worktree add`)."""
    tree = os.environ.get(variable)
    if not tree:
        return source_tree(), None
    path = Path(tree).resolve()
    commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {"commit": commit, "agent_code_changed": None}, path / "agent"


def machine_cpu() -> float:
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / CLK_TCK


def run_out(env: MeshEnv, pod, argv: list[str], timeout: float) -> str:
    """A client run in pod (on CPU 0 with BENCH_PIN=1)."""
    proc = env.popen(pod, client_cpu(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{argv[0]} in pod {pod.name} took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed in pod {pod.name}: {err.strip() or out.strip()}")
    return out


def tune_pod(env: MeshEnv, pod) -> None:
    """Room for many short connections: wide port range, TIME_WAIT reuse."""
    for setting in ("net.ipv4.ip_local_port_range=1024 65000", "net.ipv4.tcp_tw_reuse=1"):
        env.popen(pod, ["sysctl", "-qw", setting]).wait(timeout=10)


def haproxy_conf(workdir: Path, server_ip: str, splice: bool) -> Path:
    conf = workdir / f"haproxy{'-splice' if splice else ''}.cfg"
    listens = "".join(
        f"listen {name}\n    bind :::{port} v4v6\n    server s {server_ip}:{port}\n"
        for name, port in (
            ("rr", RR_PORT),
            ("iperf", IPERF_PORT),
            ("redis", REDIS_PORT),
            ("pg", PG_PORT),
        )
    )
    # Its defaults: as many threads as CPUs, maxconn from the fd limit.
    conf.write_text(
        textwrap.dedent(
            f"""\
            defaults
                mode tcp
                timeout connect 5s
                timeout client 60s
                timeout server 60s
            {"    option splice-auto" if splice else ""}
            """
        )
        + listens
    )
    return conf


def bulk(env, pod, target: str, streams: int, download: bool = False) -> dict:
    """iperf3 from pod to target (download: target sends, `-R`)."""
    cpu0 = machine_cpu()
    out = json.loads(run_out(env, pod, ["iperf3", "-c", target, "-p", str(IPERF_PORT), "-t",
                                        str(SECONDS), "-P", str(streams), "-J",
                                        *(["-R"] if download else [])],
                             timeout=SECONDS + 60))  # fmt: skip
    if "error" in out or "sum_received" not in out.get("end", {}):
        raise RuntimeError(f"iperf3 to {target}: {out.get('error', 'no result')}")
    received = out["end"]["sum_received"]
    if download:
        return {"gbps_down": received["bits_per_second"] / 1e9}
    figures = {f"gbps_{streams}": received["bits_per_second"] / 1e9}
    if streams == 1:
        figures["cpu_per_gb"] = (machine_cpu() - cpu0) / (received["bytes"] / 1e9)
    return figures


def rr(env, pod, rr_bin: Path, target: str) -> dict:
    figures = {}
    for size in (1, 1024):
        line = run_out(env, pod, [str(rr_bin), "rr", target, str(RR_PORT), str(size),
                                  str(SECONDS)], timeout=SECONDS + 30)  # fmt: skip
        figures[f"p50_{size}"] = json.loads(line.strip().splitlines()[-1])["p50_us"]
    line = run_out(env, pod, [str(rr_bin), "conn", target, str(RR_PORT), str(SECONDS)],
                   timeout=SECONDS + 30)  # fmt: skip
    figures["cps"] = json.loads(line.strip().splitlines()[-1])["cps"]
    return figures


def redis(env, pod, target: str) -> dict:
    figures = {}
    for name, (args, requests) in REDIS.items():
        cpu0 = machine_cpu()
        out = run_out(env, pod, ["redis-benchmark", "-h", target, "-p", str(REDIS_PORT), "-t",
                                 "get", "-n", str(requests), "--csv", *args],
                      timeout=120)  # fmt: skip
        cpu = machine_cpu() - cpu0
        rows = [row for row in csv.reader(io.StringIO(out)) if row and row[0] == "GET"]
        if not rows:
            raise RuntimeError(f"redis-benchmark to {target} ({name}) printed no GET row: {out}")
        figures[name] = float(rows[0][1])
        if name in ("redis_ka_20", "redis_conn_20"):
            figures[f"{name}_cpu_us"] = cpu / requests * 1e6
    return figures


def pgbench(env, pod, target: str) -> dict:
    binary = pg_bin("pgbench")
    figures = {}
    for name, extra in (("pg_ka_10", []), ("pg_conn_10", ["-C"])):
        out = run_out(env, pod, [binary, "-h", target, "-p", str(PG_PORT), "-U", "postgres",
                                 "-S", "-n", "-c", "10", "-j", "2", "-T", f"{SECONDS:g}", *extra,
                                 "postgres"], timeout=SECONDS + 60)  # fmt: skip
        tps = [line for line in out.splitlines() if line.startswith("tps = ")]
        if not tps:
            raise RuntimeError(f"pgbench to {target} ({name}) printed no tps line: {out}")
        figures[name] = float(tps[-1].split()[2])
    return figures


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(samples: dict[str, list[dict]]) -> dict:
    """Per path and figure: the raw values, and the per-round ratio to
    direct (and to HAProxy) as median, min and max."""
    out: dict = {}
    for path, rounds in samples.items():
        out[path] = {}
        for figure in FIGURES:
            values = [r[figure] for r in rounds if figure in r]
            if not values:
                continue
            entry = {"values": values, **spread(values)}
            for anchor in ("direct", "haproxy"):
                ratios = [
                    mine[figure] / base[figure]
                    for mine, base in zip(rounds, samples[anchor], strict=True)
                    if base.get(figure) and figure in mine
                ]
                if ratios:
                    entry[f"vs_{anchor}"] = spread(ratios)
            out[path][figure] = entry
    return out


def table(summary: dict, meta: dict, name: str = "latest") -> str:
    paths = list(summary)
    lines = [
        f"`make bench`, {meta['date']}: kernel {meta['kernel']}, {meta['cpus']} vCPUs"
        f" ({meta['cpu_model']}), {meta['rounds']} interleaved rounds of {meta['seconds']:g} s"
        " runs. Each cell: the median per-round ratio to direct (min-max), then"
        f" the median value. Source: `bench/results/{name}.json`.",
        "",
        "| figure | " + " | ".join(paths) + " |",
        "|---|" + "---|" * len(paths),
    ]
    for figure, (what, higher) in FIGURES.items():
        cells = []
        for path in paths:
            entry = summary[path].get(figure)
            if entry is None:
                cells.append("-")
                continue
            ratio = entry.get("vs_direct", {"median": 1.0, "min": 1.0, "max": 1.0})
            value = entry["median"]
            shown = f"{value:.1f}" if value < 100 else f"{value:,.0f}"
            cells.append(f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) {shown}")
        arrow = "↑" if higher else "↓"
        lines.append(f"| {what} {arrow} | " + " | ".join(cells) + " |")
    for figure, what in (("redis_ka_20", "redis keep-alive, 20 clients"),
                         ("pg_ka_10", "pgbench keep-alive, 10 clients")):  # fmt: skip
        hap = [
            f"{path}: {summary[path][figure]['vs_haproxy']['median']:.2f}x"
            for path in paths
            if path.startswith("meshagent") and "vs_haproxy" in summary[path].get(figure, {})
        ]
        if hap:
            lines += ["", f"{what}, against HAProxy: " + ", ".join(hap) + "."]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: no matplotlib (scripts/bootstrap bench installs it): no plot",
              file=sys.stderr)  # fmt: skip
        return False
    figures = list(FIGURES)
    paths = [p for p in summary if p != "direct"]
    width = 0.8 / len(paths)
    fig, ax = plt.subplots(figsize=(14, 5))
    for i, name in enumerate(paths):
        med, low, high = [], [], []
        for figure in figures:
            ratio = summary[name].get(figure, {}).get("vs_direct")
            m = ratio["median"] if ratio else 0.0
            med.append(m)
            low.append(m - ratio["min"] if ratio else 0.0)
            high.append(ratio["max"] - m if ratio else 0.0)
        xs = [x + i * width for x in range(len(figures))]
        ax.bar(xs, med, width, yerr=[low, high], label=name, capsize=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(figures))])
    ax.set_xticklabels([f"{FIGURES[f][0]} {'↑' if FIGURES[f][1] else '↓'}" for f in figures],
                       rotation=35, ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("ratio to direct (median of rounds; bars: min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def update_doc(text: str) -> None:
    """Put the table in docs/benchmarks.md, between its bench markers."""
    doc = ROOT / "docs" / "benchmarks.md"
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    body = doc.read_text()
    if begin in body and end in body:
        head, _, rest = body.partition(begin)
        _, _, tail = rest.partition(end)
        doc.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def save_results(name: str, meta: dict, data: dict) -> Path:
    """bench/results/NAME.json: what the run measured and where, for the docs to cite."""
    path = RESULTS / f"{name}.json"
    machine = {"date": time.strftime("%Y-%m-%d"), "kernel": os.uname().release,
               "cpus": os.cpu_count(), "cpu_model": cpu_model(),
               "loadavg_5min": os.getloadavg()[1], **source_tree()}  # fmt: skip
    text = json.dumps({"meta": {**machine, **meta}, **data}, indent=1) + "\n"
    if os.environ.get("MESHAGENT_GUEST"):  # a guest's checkout is read-only: the host keeps it
        print(f"==BENCH-RESULT {name} {json.dumps(json.loads(text))}==", flush=True)
        return path
    RESULTS.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def source_tree() -> dict:
    """The commit measured, and whether the agent's code differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    changed = git("status", "--porcelain", "--", "agent", "bpf")
    return {"commit": git("rev-parse", "--short", "HEAD"), "agent_code_changed": bool(changed)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    if not ready("bench", "bench", ("iperf3", "haproxy", "gcc", "redis-server",
                                     "redis-benchmark")):  # fmt: skip
        return 1
    if "pg" in WORKLOADS and missing_tools():
        print(f"bench: {', '.join(missing_tools())} missing: run scripts/bootstrap",
              file=sys.stderr)  # fmt: skip
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-bench-"))
    env = make_env()
    agent = None
    servers = contextlib.ExitStack()
    try:
        rr_bin = build_rr(workdir)
        plain, client, server, proxy, proxys, kclient = (
            env.create_pod(n) for n in ("plain", "client", "server", "proxy", "proxys", "kclient")
        )
        for pod in (plain, client, proxy, proxys, kclient):
            tune_pod(env, pod)
        env.popen(server, server_cpu([str(rr_bin), "serve", str(RR_PORT)]),
                  stdout=subprocess.DEVNULL)  # fmt: skip
        env.popen(server, server_cpu(["iperf3", "-s", "-p", str(IPERF_PORT)]),
                  stdout=subprocess.DEVNULL)  # fmt: skip
        env.popen(server, server_cpu(["redis-server", "--port", str(REDIS_PORT), "--bind", "*",
                                      "-::*", "--protected-mode", "no", "--save", "",
                                      "--appendonly", "no", "--dir", str(workdir)]),
                  stdout=subprocess.DEVNULL)  # fmt: skip
        if "pg" in WORKLOADS:
            pg = servers.enter_context(postgres_in(env, server, prefix=tuple(server_cpu([]))))
            pg.init_pgbench(PG_SCALE)
        for pod, splice in ((proxy, False), (proxys, True)):
            env.popen(pod, ["haproxy", "-db", "-f", str(haproxy_conf(workdir, server.ip4, splice))],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        # sk_msg on where the kernel has it (off by default): the sockmap
        # paths switch it per round.
        agent = start_agent(env, "--datapath", "copy", "--sockmap-msg", *AGENT_ARGS)
        agent.attach(client)
        agent.request("attach", pod=kclient.name, mode="kernel")
        msg_ok = agent.request("status")["datapaths"]["sockmap"]["msg"]
        time.sleep(1.0)
        paths = {
            "direct": (plain, server.ip4, None),
            "haproxy": (plain, proxy.ip4, None),
            "haproxy-splice": (plain, proxys.ip4, None),
            **{f"meshagent {p}": (client, server.ip4, p) for p in MESH_PATHS},
            "meshagent kernel": (kclient, server.ip4, None),
        }
        if ONLY_PATHS:
            paths = {name: paths[name] for name in ("direct", "haproxy", *ONLY_PATHS)}
        samples: dict[str, list[dict]] = {name: [] for name in paths}
        order = list(paths)
        started = time.monotonic()
        for round_no in range(ROUNDS):
            random.Random(round_no).shuffle(order)  # no path always first or last
            for name in order:
                pod, target, datapath = paths[name]
                if datapath:
                    mode, _, variant = datapath.partition("-")
                    extra = {}
                    if mode == "sockmap" and msg_ok:
                        extra = {"msg": variant != "nomsg", "replies": variant == "replies"}
                    agent.request("datapath", set=mode, **extra)
                figures = {}
                if "bulk" in WORKLOADS:
                    figures.update({**bulk(env, pod, target, 1), **bulk(env, pod, target, 4),
                                    **bulk(env, pod, target, 1, download=True)})  # fmt: skip
                if "rr" in WORKLOADS:
                    figures.update(rr(env, pod, rr_bin, target))
                if "redis" in WORKLOADS:
                    figures.update(redis(env, pod, target))
                if "pg" in WORKLOADS:
                    figures.update(pgbench(env, pod, target))
                samples[name].append(figures)
                if pod in (client, kclient):
                    wait_for(lambda n=pod.name: agent.pod_status(n)["connections_active"] == 0, 60,
                             "the benchmark's connections to end")  # fmt: skip
            print(f"bench: round {round_no + 1}/{ROUNDS} done"
                  f" ({time.monotonic() - started:.0f} s)", file=sys.stderr)  # fmt: skip
        status = agent.request("status")
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "kernel": status["kernel"],
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "rounds": ROUNDS,
            "seconds": SECONDS,
            # at the end: its "msg" is the last path's setting (False after a
            # sockmap-nomsg round); msg_available says whether sk_msg could be on
            "sockmap": status["datapaths"]["sockmap"],
            "msg_available": msg_ok,
        }
        summary = summarise(samples)
        RESULTS.mkdir(exist_ok=True)
        name = RESULT if PARTIAL else "latest"  # a quick look keeps the last full run
        (RESULTS / f"{name}.json").write_text(
            json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n"
        )
        text = table(summary, meta, name)
        if not PARTIAL and plot(summary, RESULTS / "latest.png"):
            text += "\n\n![ratios to direct](../bench/results/latest.png)"
        print(text)
        if not PARTIAL:
            update_doc(text)
        return 0
    finally:
        if agent is not None:
            agent.stop()
        servers.close()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
