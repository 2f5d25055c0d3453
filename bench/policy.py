"""What the policy costs at connect(): connect() latency and new connections
per second from an attached pod whose egress a policy governs, with 0, 100
and 10,000 rules, as ratios to the same pod with no policy (same run,
interleaved rounds).

The rules are DENY rules on /32s the bench never connects to, then one
ALLOW for the server's port: every measured connect is allowed after one
longest-prefix lookup among all the rules' entries. `connect` times the
connect() alone (the hooks, then the handshake with the pod's forwarder
listener); `conn` is a whole connection through the forwarder (connect, a
16-byte request and its echo, close).

Writes bench/results/policy.json. Run as root: `make bench-policy`
(BENCH_ROUNDS, default 5; BENCH_SECONDS, default 2).
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
from run import RR_PORT, SECONDS, build_rr, run_out, save_results, spread, tune_pod  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
COUNTS = (0, 100, 10_000)
FIGURES = {"connect_p50_us": False, "connect_cps": True, "conn_cps": True}


def policy_file(workdir: Path, rules: int) -> Path:
    """rules DENY rules (distinct /32s in 10.200.0.0/16 and 10.201...), then
    the ALLOW the measured connects meet; 0: no policy governs the pod."""
    path = workdir / f"policy-{rules}.yaml"
    if rules == 0:
        path.write_text("metadata: {name: other}\nspec:\n  selector: {pods: [nobody]}\n"
                        "  egress: []\n")  # fmt: skip
        return path
    lines = ["metadata: {name: bench}", "spec:", "  selector: {pods: [client]}", "  egress:"]
    for i in range(rules - 1):
        lines.append(f"    - {{action: DENY, to: [{{ipBlock: {{cidr: "
                     f"10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}/32}}}}]}}")  # fmt: skip
    lines.append(f"    - {{action: ALLOW, ports: [{RR_PORT}]}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(env, pod, rr_bin: Path, target: str) -> dict:
    out = json.loads(run_out(env, pod, [str(rr_bin), "connect", target, str(RR_PORT),
                                        str(SECONDS)], timeout=SECONDS + 30))  # fmt: skip
    conn = json.loads(run_out(env, pod, [str(rr_bin), "conn", target, str(RR_PORT),
                                         str(SECONDS)], timeout=SECONDS + 30))  # fmt: skip
    return {"connect_p50_us": out["p50_us"], "connect_cps": out["cps"], "conn_cps": conn["cps"]}


def main() -> int:
    if os.geteuid() != 0 or not shutil.which("gcc"):
        print("bench: run as root, with gcc (scripts/bootstrap bench)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-bench-policy-"))
    env = make_env()
    agent = None
    try:
        rr_bin = build_rr(workdir)
        client, server = env.create_pod("client"), env.create_pod("server")
        tune_pod(env, client)
        env.popen(server, [str(rr_bin), "serve", str(RR_PORT)], stdout=subprocess.DEVNULL)
        agent = start_agent(env, "--policy", str(policy_file(workdir, 0)))
        agent.attach(client)
        files = {n: policy_file(workdir, n) for n in COUNTS}
        samples: dict[int, list[dict]] = {n: [] for n in COUNTS}
        apply_seconds: dict[int, list[float]] = {n: [] for n in COUNTS}
        for round_no in range(ROUNDS):
            order = list(COUNTS) if round_no % 2 == 0 else list(reversed(COUNTS))
            for n in order:
                started = time.monotonic()
                env.meshagent("policy", "apply", str(files[n]))
                apply_seconds[n].append(time.monotonic() - started)
                figures = measure(env, client, rr_bin, server.ip4)
                samples[n].append(figures)
                print(f"round {round_no + 1}/{ROUNDS} rules={n}: "
                      + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)  # fmt: skip
        summary = {}
        for n, rounds in samples.items():
            summary[str(n)] = {"apply_seconds": spread(apply_seconds[n])}
            for figure in FIGURES:
                ratios = [
                    r[figure] / base[figure] for r, base in zip(rounds, samples[0], strict=True)
                ]
                summary[str(n)][figure] = {"values": [r[figure] for r in rounds],
                                           **spread([r[figure] for r in rounds]),
                                           "vs_no_policy": spread(ratios)}  # fmt: skip
        denied = agent.decisions().get("denied_policy", 0)
        meta = {"rounds": ROUNDS, "seconds": SECONDS, "rule_counts": list(COUNTS),
                "denied_during_run": denied}  # fmt: skip
        path = save_results("policy", meta, {"summary": summary})
        print(table(summary))
        print(f"wrote {path.relative_to(ROOT)}")
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def table(summary: dict) -> str:
    rows = ["| rules | connect() p50 µs | connect()/s | connections/s (whole) | apply s |",
            "|---|---|---|---|---|"]  # fmt: skip
    for n, figs in summary.items():
        cells = []
        for figure in FIGURES:
            f = figs[figure]
            r = f["vs_no_policy"]
            cells.append(f"{f['median']:.4g} ({r['median']:.2f}x, {r['min']:.2f}-{r['max']:.2f})")
        rows.append(
            f"| {int(n):,} | " + " | ".join(cells) + f" | {figs['apply_seconds']['median']:.2f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
