#!/usr/bin/env python3
"""The docs' tables for the benches that are not `make bench`'s, made from
their committed result files, so a figure in docs/benchmarks.md is always
the one its result file holds.

    python3 bench/doctables.py          rewrite every table from bench/results
    python3 bench/doctables.py --check  exit 1 if a table differs from its file

Each table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in
docs/benchmarks.md; the bench that writes NAME.json calls update(NAME).
tests/unit/test_bench_tables.py checks that the committed docs match."""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
MINUTE_SAMPLES = 6  # soak samples every 10 s


def machine(meta: dict) -> str:
    """Where and when a result was measured, from its meta."""
    load = meta.get("loadavg_5min")
    loaded = f", 5-minute load {load:.2f}" if isinstance(load, int | float) else ""
    changed = " plus uncommitted changes" if meta.get("agent_code_changed") else ""
    return (f"{meta['date']}, kernel {meta['kernel']}, {meta['cpus']} vCPUs {meta['cpu_model']},"
            f" commit {meta['commit']}{changed}{loaded}")  # fmt: skip


def footprint(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"The committed run (`bench/results/footprint.json`: {machine(meta)}; the"
        f" {meta['datapath']} data path, {meta['backend']} backend; HAProxy"
        f" {meta['haproxy']}):",
        "",
        "| figure | meshagent | target | met | HAProxy (one thread) |",
        "|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        met = "yes" if row["met"] else "**no**"
        lines.append(f"| {row['figure']} | {row['meshagent']} | {row['target']} | {met}"
                     f" | {row['haproxy']} |")  # fmt: skip
    return "\n".join(lines)


def scrape(data: dict) -> str:
    meta = data["meta"]
    lines = [
        f"The committed run (`bench/results/scrape.json`: {machine(meta)};"
        f" {meta['connections']:,} idle connections, {meta['rounds']} rounds), in ms:",
        "",
        "| | p50 | p99 | max | p99 of each round |",
        "|---|---|---|---|---|",
    ]
    for name, row in data["rows"].items():
        name = name.replace("/metrics", "`/metrics`")
        rounds = ", ".join(f"{value:.2f}" for value in row["p99_by_round"])
        lines.append(f"| {name} | {row['p50']:.2f} | {row['p99']:.2f} | {row['max']:.1f}"
                     f" | {rounds} |")  # fmt: skip
    return "\n".join(lines)


def soak(data: dict) -> str:
    meta, load, samples = data["meta"], data["load"], data["samples"]
    loaded = samples[1:-1]
    first, last = loaded[:MINUTE_SAMPLES], loaded[-MINUTE_SAMPLES:]

    def mean(rows: list[dict], key: str) -> str:
        return f"{statistics.mean(row[key] for row in rows):.1f}"

    left = data["entries_left"]
    rows = [
        ("result", "passed" if data["passed"] else "**failed**"),
        ("short connections (1 KiB each way)", f"{load['short']:,}"),
        ("long connections' exchanges (16 KiB each way)", f"{load['long_exchanges']:,}"),
        ("errors, short / long", f"{load['short_errors']} / {load['long_errors']}"),
        ("wrong bytes", f"{load['bad_bytes']}"),
        ("agent RSS, MB: idle before, first minute, last minute, idle after",
         f"{samples[0]['rss_mb']}, {mean(first, 'rss_mb')}, {mean(last, 'rss_mb')},"
         f" {samples[-1]['rss_mb']}"),
        ("agent fds: idle before, idle after", f"{samples[0]['fds']}, {samples[-1]['fds']}"),
        ("map entries of finished connections left after 10 s",
         ", ".join(f"{name} {count}" for name, count in left.items()) if left else "none"),
        ("warnings in the agent's log",
         ", ".join(f"{name} {count}" for name, count in data["warnings"].items()) or "none"),
    ]  # fmt: skip
    lines = [
        f"The committed run (`bench/results/soak.json`: {machine(meta)}; the"
        f" {meta['datapath']} data path, {meta['seconds']:.0f} s, {meta['long']} long"
        f" connections, {meta['short_per_second']} short ones a second):",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    return "\n".join(lines)


TABLES: dict[str, Callable[[dict], str]] = {
    "footprint": footprint,
    "scrape": scrape,
    "soak": soak,
}


def render(name: str) -> str:
    return TABLES[name](json.loads((RESULTS / f"{name}.json").read_text()))


def section(body: str, name: str) -> tuple[str, str, str] | None:
    """(before, the table, after) around NAME's markers; None without them."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in body or end not in body:
        return None
    head, _, rest = body.partition(begin)
    table, _, tail = rest.partition(end)
    return head + begin, table.strip("\n"), end + tail


def update(name: str, doc: Path = DOC) -> bool:
    """Put NAME's table into doc; False when doc has no markers for it (or
    in a guest, whose checkout is read-only: the host writes the file)."""
    if os.environ.get("MESHAGENT_GUEST"):
        return False
    body = doc.read_text()
    parts = section(body, name)
    if parts is None:
        return False
    head, _, tail = parts
    doc.write_text(f"{head}\n{render(name)}\n{tail}")
    return True


def stale(doc: Path = DOC) -> list[str]:
    """The tables in doc that differ from their result files (or are missing)."""
    body = doc.read_text()
    out = []
    for name in TABLES:
        parts = section(body, name)
        if parts is None or parts[1] != render(name):
            out.append(name)
    return out


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        names = stale()
        for name in names:
            print(f"docs/benchmarks.md: the {name} table differs from bench/results/{name}.json"
                  " (python3 bench/doctables.py rewrites it)", file=sys.stderr)  # fmt: skip
        return 1 if names else 0
    if argv[1:]:
        print("usage: bench/doctables.py [--check]", file=sys.stderr)
        return 2
    for name in TABLES:
        if not update(name):
            print(f"docs/benchmarks.md has no {name} markers", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
