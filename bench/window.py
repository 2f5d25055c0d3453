"""Where a download through the sockmap waits: one `iperf3 -R` run from an
attached pod, with the verdict's decisions counted every 100 ms and,
optionally, every packet of the upstream connection as seen in the pod
(tcpdump), summarised as the gaps where nothing moved and the window the
upstream socket advertised just before each.

    bench/window.py [--datapath sockmap-nomsg] [--seconds 3] [--dump FILE]
                    [-- AGENT ARGS...]

Run as root. --dump needs tcpdump (`apt-get install tcpdump`; not part
of scripts/bootstrap). Prints Gbit/s, the decision counts, and with --dump
every gap over 100 ms with the last advertised windows before it (w =
window the upstream socket advertised, in units of its window scale; d =
bytes of a data segment from the server). Written to find why downloads
through the catch-up (commit 8412107) ran at 0.4 Gbit/s:
bench/results/zero-window.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))

from meshenv import make_env, start_agent  # noqa: E402

PORT = 5201
PACKET = re.compile(r"\s*([\d.]+)\s+\S+\s+(In|Out)\s+IP \S+ > \S+: Flags \[\S+\],(.*)")


def packets(path: Path) -> list[tuple[float, str]]:
    """(time, 'w<window>' for our acks or 'd<bytes>' for the server's data)."""
    rows = []
    for line in path.read_text().splitlines():
        match = PACKET.match(line)
        if not match:
            continue
        when, way, rest = match.groups()
        if way == "Out":
            window = re.search(r"win (\d+)", rest)
            rows.append((float(when), f"w{window.group(1) if window else '?'}"))
        else:
            length = re.search(r"length (\d+)", rest)
            rows.append((float(when), f"d{length.group(1) if length else 0}"))
    return rows


def gaps(rows: list[tuple[float, str]], least: float = 0.1) -> list[dict]:
    found = []
    for i in range(1, len(rows)):
        if rows[i][0] - rows[i - 1][0] > least:
            found.append({
                "seconds": round(rows[i][0] - rows[i - 1][0], 3),
                "before": " ".join(r[1] for r in rows[max(0, i - 12):i]),
                "after": " ".join(r[1] for r in rows[i:i + 3]),
            })  # fmt: skip
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datapath", default="sockmap-nomsg")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dump", type=Path)
    parser.add_argument("agent_args", nargs="*")
    args = parser.parse_args()
    env = make_env()
    agent = None
    try:
        client, server = env.create_pod("client"), env.create_pod("server")
        env.popen(server, ["iperf3", "-s", "-p", str(PORT)], stdout=subprocess.DEVNULL)
        agent = start_agent(env, "--datapath", "copy", *args.agent_args)
        agent.attach(client)
        mode, _, nomsg = args.datapath.partition("-")
        agent.request("datapath", set=mode, **({"msg": not nomsg} if mode == "sockmap" else {}))
        time.sleep(1.0)
        dump = None
        if args.dump:
            dump = subprocess.Popen(["ip", "netns", "exec", client.netns, "tcpdump", "-i", "any",
                                     "-nn", "-tt", "-l", "-S", f"tcp and port {PORT}"],
                                    stdout=args.dump.open("w"), stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.0)
        counts: list[dict] = []
        done = threading.Event()

        def sample() -> None:
            before = agent.decisions()
            while not done.wait(0.1):
                now = agent.decisions()
                counts.append({k: v - before.get(k, 0) for k, v in now.items()
                               if v != before.get(k, 0)})  # fmt: skip
                before = now

        sampler = threading.Thread(target=sample)
        sampler.start()
        proc = env.popen(client, ["iperf3", "-c", server.ip4, "-p", str(PORT), "-R", "-t",
                                  f"{args.seconds:g}", "-J"], stdout=subprocess.PIPE, text=True)  # fmt: skip
        out = json.loads(proc.communicate(timeout=args.seconds + 60)[0])
        done.set()
        sampler.join()
        if dump:
            dump.terminate()
            dump.wait(timeout=10)
        received = out["end"]["sum_received"]
        totals: dict[str, int] = {}
        for row in counts:
            for key, value in row.items():
                totals[key] = totals.get(key, 0) + value
        print(f"{args.datapath} download: {received['bits_per_second'] / 1e9:.2f} Gbit/s")
        print("decisions:", json.dumps(totals))
        print("per 100 ms:", " ".join(str(r.get("spliced", 0)) for r in counts), "(spliced)")
        if args.dump:
            for gap in gaps(packets(args.dump)):
                print(json.dumps(gap))
        return 0
    finally:
        if agent is not None:
            agent.stop()
        env.cleanup()


if __name__ == "__main__":
    sys.exit(main())
