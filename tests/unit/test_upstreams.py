"""The pods' spare upstream sockets (forwarder/upstreams.py): batches that
grow while a pod keeps emptying its pool, fall back when it does not, stay
within the fds they are given, and are closed when idle, detached or shed.
The netns part is replaced by plain sockets here; the sockets' netns is the
integration tests' (test_forwarder_upstreams.py)."""

from __future__ import annotations

import socket

import pytest

from meshagent.forwarder import upstreams as mod
from meshagent.forwarder.copy import LINGER_RESET
from meshagent.forwarder.upstreams import BATCH_MAX, BUSY, IDLE, Upstreams


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def made(monkeypatch):
    """Every socket the pool made, by batch (closed after the test)."""
    batches: list[list[socket.socket]] = []

    def sockets_in(_fd: int, family: int, kind: int, count: int) -> list[socket.socket]:
        batch = [socket.socket(family, kind) for _ in range(count)]
        batches.append(list(batch))  # the pool takes from the list it is given
        return batch

    monkeypatch.setattr(mod.netns, "sockets_in", sockets_in)
    yield batches
    for batch in batches:
        for sock in batch:
            sock.close()


def test_a_busy_pod_gets_growing_batches_an_idle_one_single_sockets(made):
    clock = Clock()
    pool = Upstreams(clock)
    taken = [pool.take(1, -1, socket.AF_INET, room=100) for _ in range(1 + 2 + 4 + 8 + 8)]
    assert [len(b) for b in made] == [1, 2, 4, BATCH_MAX, BATCH_MAX]
    assert pool.spare == 0 and pool.batches == 5 and pool.made == 23
    assert len({s.fileno() for s in taken}) == len(taken)
    # Every socket comes set up: no delay, and SO_LINGER {1,0}.
    for sock in taken:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == LINGER_RESET
        assert sock.getblocking() is False
    clock.now += BUSY + 0.1  # slow again: one at a time
    pool.take(1, -1, socket.AF_INET, room=100)
    assert len(made[-1]) == 1


def test_the_batch_stays_within_the_fds_it_may_hold(made):
    clock = Clock()
    pool = Upstreams(clock)
    for _ in range(1 + 2 + 4):
        pool.take(1, -1, socket.AF_INET, room=100)
    pool.take(1, -1, socket.AF_INET, room=2)  # 8 asked, room for 2 besides the one taken
    assert len(made[-1]) == 3 and pool.spare == 2
    pool.take(1, -1, socket.AF_INET, room=0)
    pool.take(1, -1, socket.AF_INET, room=0)
    pool.take(1, -1, socket.AF_INET, room=-5)  # none to spare: still the one it needs
    assert len(made[-1]) == 1 and pool.spare == 0


def test_pods_and_families_have_their_own_pools_closed_when_idle_detached_or_shed(made):
    clock = Clock()
    pool = Upstreams(clock)
    for _ in range(2):  # batches 1, 2: one spare left
        pool.take(1, -1, socket.AF_INET, room=100)
    for _ in range(2):
        pool.take(1, -1, socket.AF_INET6, room=100)
    for _ in range(2):
        pool.take(2, -1, socket.AF_INET, room=100)
    assert pool.spare == 3
    assert {s.family for s in made[2] + made[3]} == {socket.AF_INET6}
    pool.drop_pod(2)
    assert pool.spare == 2 and (2, socket.AF_INET) not in pool.pools
    assert made[5][0].fileno() == -1  # pod 2's spare was closed
    clock.now += IDLE / 2
    pool.take(1, -1, socket.AF_INET6, room=100)  # pod 1's IPv6 pool is used, its IPv4 one not
    clock.now += IDLE / 2 + 0.1
    pool.tick()
    assert list(pool.pools) == [(1, socket.AF_INET6)] and pool.spare == 0
    assert made[1][0].fileno() == -1  # pod 1's IPv4 spare was closed
    pool.take(1, -1, socket.AF_INET6, room=100)  # a batch of 1 (not busy since its last)
    pool.take(1, -1, socket.AF_INET6, room=100)  # busy: a batch of 2, so 1 spare
    assert [len(b) for b in made[-2:]] == [1, 2] and pool.spare == 1
    assert pool.shed() == 1 and pool.spare == 0
    assert made[-1][0].fileno() == -1
