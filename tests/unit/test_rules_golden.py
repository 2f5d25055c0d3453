"""Rendered iptables rules against golden files, per case and family (as
istio-iptables does). Regenerate: MESHAGENT_UPDATE_GOLDEN=1 pytest tests/unit"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshagent.redirect.rules import (
    CHAIN,
    RuleConfig,
    parse_state,
    render_rules,
    render_teardown,
)

GOLDEN = Path(__file__).parent / "golden"
OWN = "/system.slice/meshagent.service"  # the agent's cgroup

CASES = {
    "default": RuleConfig(port=15001, skip_cgroup=OWN),
    "excludes": RuleConfig(
        port=15006,
        skip_cgroup=OWN,
        exclude_ports=(22, 9000, 9001),
        exclude_cidrs=("10.96.0.0/12", "fd00:10::/64", "192.168.7.0/24"),
    ),
}


def check(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("MESHAGENT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden {path.name}: run with MESHAGENT_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} differs (MESHAGENT_UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("family", [4, 6])
def test_attach_rules(case, family):
    check(f"attach_{case}_v{family}", render_rules(CASES[case], family))


@pytest.mark.parametrize("family", [4, 6])
def test_draining_rules(family):
    check(f"drain_default_v{family}", render_rules(CASES["default"], family, True, True))


@pytest.mark.parametrize(("jumps", "chain"), [(1, True), (2, True), (0, True), (1, False)])
def test_teardown(jumps, chain):
    check(f"teardown_{jumps}jumps_{'chain' if chain else 'nochain'}", render_teardown(jumps, chain))


def test_idempotent_attach_adds_no_second_jump():
    first = render_rules(CASES["default"], 4)
    again = render_rules(CASES["default"], 4, jump_present=True)
    assert first.count("-A OUTPUT") == 1
    assert again.count("-A OUTPUT") == 0
    assert first.replace(f"-A OUTPUT -p tcp -j {CHAIN}\n", "") == again


def test_families_keep_their_own_networks():
    v4 = render_rules(CASES["excludes"], 4)
    v6 = render_rules(CASES["excludes"], 6)
    assert "10.96.0.0/12" in v4 and "fd00:10::/64" not in v4
    assert "fd00:10::/64" in v6 and "10.96.0.0/12" not in v6
    assert "-d 127.0.0.0/8 -j RETURN" in v4 and "-d ::1/128 -j RETURN" in v6


def test_state_is_read_from_save_output():
    save = (GOLDEN / "save_with_foreign_rules.txt").read_text()
    assert parse_state(save) == (1, True)
    assert parse_state("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n") == (0, False)
