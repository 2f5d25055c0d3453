"""The iptables backend's own-socket rule: the agent's cgroup, read and
checked (redirect/own_cgroup.py); nothing rendered trusts a mark."""

from __future__ import annotations

import pytest

from meshagent.errors import MeshError
from meshagent.redirect.own_cgroup import check, is_within, parse_proc_cgroup
from meshagent.redirect.rules import RuleConfig, render_rules

HYBRID = "9:name=systemd:/\n4:memory:/x/y\n0::/meshtest-ab12/agent\n"


def test_the_v2_line_is_the_path_on_a_hybrid_host_too():
    assert parse_proc_cgroup(HYBRID) == "/meshtest-ab12/agent"
    assert parse_proc_cgroup("0::/\n") == "/"
    with pytest.raises(MeshError, match="cgroup v2"):
        parse_proc_cgroup("4:memory:/x\n")  # v1 only


@pytest.mark.parametrize(
    ("path", "ancestor", "within"),
    [
        ("/a/b", "/a", True),
        ("/a", "/a", True),
        ("/ab", "/a", False),  # a sibling whose name starts the same
        ("/a", "/a/b", False),
        ("/anything", "/", True),
    ],
)
def test_within_is_by_whole_components(path, ancestor, within):
    assert is_within(path, ancestor) is within


def test_a_path_that_would_match_pods_or_everything_is_refused():
    assert check("/meshtest-ab12/agent", "/meshtest-ab12") is None  # the tests' layout
    assert check("/kubepods/burstable/pod1/ctr", "/") is None  # a DaemonSet's container
    assert "root cgroup" in check("/", "/")
    assert "holds the cgroup it attaches at" in check("/meshtest-ab12", "/meshtest-ab12/pods")
    assert "holds the cgroup it attaches at" in check("/a", "/a")
    assert "over 511 bytes" in check("/" + "x" * 600, "/")
    assert "characters" in check("/a b", "/")  # would split the rule in iptables-restore


def test_no_rendered_rule_trusts_a_mark():
    cfg = RuleConfig(port=15001, skip_cgroup="/meshtest-ab12/agent")
    for family in (4, 6):
        for draining in (False, True):
            text = render_rules(cfg, family, draining=draining)
            assert "--mark" not in text and "MARK" not in text
            assert "-m cgroup --path /meshtest-ab12/agent -j RETURN" in text
    with pytest.raises(ValueError, match="skip_cgroup"):
        render_rules(RuleConfig(port=15001, skip_cgroup=""), 4)  # teardown's config cannot attach
