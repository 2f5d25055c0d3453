"""The memory budget's arithmetic (forwarder/budget.py): fair shares, the
buffer size a pod's next connection gets, and where --memory-max auto comes
from. What the kernel holds under it is shown in
tests/integration/test_backpressure.py (the agent's sockets under
--memory-max, and auto from a real memory cgroup limit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshagent.config import parse_size
from meshagent.errors import MeshError
from meshagent.forwarder.budget import (
    BUFFER_MAX,
    BUFFER_MIN,
    FEW,
    Members,
    Shares,
    buffer_for,
    cgroup_memory_limit,
    cost,
    tier,
)


def test_a_pod_alone_may_take_the_whole_budget():
    shares = Shares(1000)
    assert shares.room(1, [1]) == 1000
    shares.hold(1, 900)
    assert shares.room(1, [1]) == 100


def test_a_greedy_pod_never_takes_another_pods_share():
    shares = Shares(1000)
    pods = [1, 2]
    assert shares.share(2) == 250
    shares.hold(1, shares.room(1, pods))  # all it may: its share and all that is lent
    assert shares.mine(1) == 750
    assert shares.room(1, pods) == 0
    assert shares.room(2, pods) == 250  # the other's share is still there
    shares.hold(2, 250)
    assert shares.used == shares.budget and shares.over(pods) == 0


def test_more_pods_make_a_pod_past_its_share_over():
    shares = Shares(1000)
    shares.hold(1, 750)
    assert shares.over([1, 2]) == 0
    # a third pod: shares 166, pool 502; pod 1 has 584 lent out of it
    assert shares.over([1, 2, 3]) == 750 - 166 - (1000 - 3 * 166)


def test_a_detached_pods_bytes_count_as_lent():
    shares = Shares(1000)
    shares.hold(7, 600)  # pod 7 detached, its connections still open
    assert shares.lent([1]) == 600
    assert shares.room(1, [1]) == 400
    shares.hold(7, -600)
    assert 7 not in shares.by_pod and shares.used == 0


def test_a_pods_first_connections_leave_room_for_more():
    room = 64 * cost(BUFFER_MIN)
    sizes, holds = [], 0
    while (b := buffer_for(len(sizes), holds, room - holds)) is not None:
        sizes.append(b)
        holds += cost(b)
    assert holds <= room
    assert len(sizes) >= FEW  # then the forwarder clamps them to make more room
    assert sizes == sorted(sizes, reverse=True)
    assert buffer_for(0, 0, 1 << 40) == BUFFER_MAX


def test_no_buffer_when_even_the_smallest_does_not_fit():
    assert buffer_for(0, 0, cost(BUFFER_MIN) - 1) is None
    assert buffer_for(0, 0, cost(BUFFER_MIN)) == BUFFER_MIN


def test_the_tier_fits_all_connections():
    for conns in (1, 3, 100, 5000):
        for budget in (cost(BUFFER_MIN), 10 << 20, 1 << 30):
            b = tier(conns, budget)
            assert BUFFER_MIN <= b <= BUFFER_MAX
            assert conns * cost(b) <= budget or b == BUFFER_MIN


@pytest.mark.parametrize(("text", "value"), [
    ("auto", None), ("512M", 512 << 20), ("2G", 2 << 30), ("1Gi", 1 << 30), ("4096", 4096),
    ("64k", 64 << 10), ("1GB", 1 << 30),
])  # fmt: skip
def test_sizes(text, value):
    assert parse_size(text, "--memory-max") == value


@pytest.mark.parametrize("text", ["", "-1", "1T", "lots", "1.5G"])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(MeshError, match="--memory-max"):
        parse_size(text, "--memory-max")


def _tree(tmp_path: Path, mounts: str, cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc, table = tmp_path / "cgroup", tmp_path / "mounts"
    proc.write_text(cgroup)
    table.write_text(mounts.replace("ROOT", str(tmp_path / "fs")))
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, table


def test_the_v2_limit_is_the_smallest_on_the_way_up(tmp_path):
    proc, table = _tree(tmp_path, "cgroup2 ROOT cgroup2 rw 0 0\n", "0::/kubepods/pod1/ctr\n", {
        "kubepods/memory.max": "max\n",
        "kubepods/pod1/memory.max": "1073741824\n",
        "kubepods/pod1/ctr/memory.max": "max\n",
    })  # fmt: skip
    assert cgroup_memory_limit(proc, table) == 1 << 30


def test_no_limit_is_none(tmp_path):
    proc, table = _tree(tmp_path, "cgroup2 ROOT cgroup2 rw 0 0\n", "0::/a\n",
                        {"a/memory.max": "max\n"})  # fmt: skip
    assert cgroup_memory_limit(proc, table) is None


def test_the_v1_memory_controller_wins_on_a_hybrid_host(tmp_path):
    mounts = "cgroup2 ROOT/unified cgroup2 rw 0 0\ncgroup ROOT/memory cgroup rw,memory 0 0\n"
    proc, table = _tree(tmp_path, mounts, "5:memory:/agent\n0::/agent\n", {
        "memory/agent/memory.limit_in_bytes": str(512 << 20),
        "memory/memory.limit_in_bytes": str((1 << 63) - 4096),  # v1's "no limit"
        "unified/agent/memory.max": "max",
    })  # fmt: skip
    assert cgroup_memory_limit(proc, table) == 512 << 20


def test_shares_kept_up_for_a_members_table_agree_with_a_recount():
    """With a Members table, Shares keeps what the pods hold within their
    shares up to date as they hold and give back, and counts again only
    when pods attach or detach: every answer must be the one a full recount
    (a plain list of the same pods) gives."""
    import random

    rng = random.Random(7)
    kept, counted = Shares(10_000), Shares(10_000)
    members = Members()
    for step in range(3000):
        action = rng.random()
        if action < 0.05:
            members[rng.randrange(20)] = None  # attach (or attach again)
        elif action < 0.08 and members:
            del members[rng.choice(list(members))]  # detach
        else:
            pod = rng.randrange(25)  # some never attached, some detached
            amount = rng.randrange(-300, 600)
            amount = max(amount, -kept.mine(pod))
            kept.hold(pod, amount)
            counted.hold(pod, amount)
        pods = list(members)
        pod = rng.randrange(25)
        assert kept.room(pod, members) == counted.room(pod, pods), step
        assert kept.lent(members) == counted.lent(pods), step
        assert kept.over(members) == counted.over(pods), step
