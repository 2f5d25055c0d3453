"""What the forwarder's budgets cost per connection as pods add up ([P]
part 1): the arithmetic a new connection does on one budget (room, lent,
and a hold given back), for N attached pods, counted again over every pod
(what the forwarder did before Members, and still does for a plain list)
or kept up between attaches (a Members table). Pure Python, no root.

Writes bench/results/budget-cost.json: `make bench-budget-cost`.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "agent"))
sys.path.insert(0, str(ROOT / "bench"))

from run import save_results  # noqa: E402

from meshagent.forwarder.budget import Members, Shares  # noqa: E402

PODS = (1, 10, 100, 300)
CALLS = 5000
REPEATS = 5


def per_connection(pods, n: int) -> float:
    """Microseconds for one connection's budget arithmetic (median of REPEATS)."""
    shares = Shares(1 << 30)
    for pod in range(n):
        shares.hold(pod, 1 << 20)

    def one() -> None:
        shares.room(0, pods)
        shares.lent(pods)
        shares.hold(0, 4096)
        shares.hold(0, -4096)

    times = timeit.repeat(one, number=CALLS, repeat=REPEATS)
    return statistics.median(times) / CALLS * 1e6


def main() -> int:
    rows = {}
    for n in PODS:
        members = Members()
        for pod in range(n):
            members[pod] = None
        rows[str(n)] = {"recounted_us": per_connection(list(range(n)), n),
                        "kept_up_us": per_connection(members, n)}  # fmt: skip
        print(f"{n:4} pods: recounted {rows[str(n)]['recounted_us']:7.1f} us,"
              f" kept up {rows[str(n)]['kept_up_us']:5.1f} us per connection")  # fmt: skip
    meta = {"calls": CALLS, "repeats": REPEATS, "python": sys.version.split()[0],
            "what": "Shares.room + lent + hold + hold, one budget"}  # fmt: skip
    path = save_results("budget-cost", meta, {"pods": rows})
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
