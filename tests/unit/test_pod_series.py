"""A gone pod's metric series are dropped, after a while (pod_series.py)."""

from __future__ import annotations

from collections import Counter

from meshagent.forwarder.pod_series import PodSeries


def test_a_gone_pods_series_go_after_the_keep_time_and_only_theirs():
    outcomes = Counter({("web", "sockmap", "closed"): 3, ("db", "copy", "closed"): 1})
    moved = Counter({("web", "in", "sockmap"): 100, ("db", "out", "copy"): 7})
    series = PodSeries(outcomes, moved, keep=300)
    assert series.prune({"web", "db"}, now=0) == []
    assert series.prune({"db"}, now=10) == []  # web gone: kept for a while
    assert series.prune({"db"}, now=309) == []
    assert series.prune({"db"}, now=310) == ["web"]
    assert set(outcomes) == {("db", "copy", "closed")} and set(moved) == {("db", "out", "copy")}


def test_a_pod_back_before_the_keep_time_keeps_its_series():
    outcomes = Counter({("web", "sockmap", "closed"): 3})
    series = PodSeries(outcomes, keep=300)
    series.prune(set(), now=0)  # gone
    series.prune({"web"}, now=100)  # attached again
    assert series.prune(set(), now=350) == []  # gone again at 350: the clock restarted
    assert series.prune(set(), now=650) == ["web"] and not outcomes
