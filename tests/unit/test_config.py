from __future__ import annotations

import pytest

from meshagent.bpf.abi import cidr_lpm_key
from meshagent.config import AgentConfig, bpf_cflags, parse_cidrs, parse_ports
from meshagent.errors import MeshError


def test_ports_single_list_and_range():
    assert parse_ports("22, 53,9000-9002") == (22, 53, 9000, 9001, 9002)
    assert parse_ports("") == ()
    assert parse_ports(None) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "not a TCP port"),
        ("70000", "not a TCP port"),
        ("ssh", "not a port or a range"),
        ("90-80", "runs backwards"),
        ("1-300", "more than 256 ports"),
    ],
)
def test_bad_ports(text, message):
    with pytest.raises(MeshError, match=message):
        parse_ports(text)


def test_cidrs_normalized_and_deduplicated():
    assert parse_cidrs("10.96.0.0/12,fd00::/8,10.96.0.0/12") == ("10.96.0.0/12", "fd00::/8")


@pytest.mark.parametrize("text", ["10.0.0.1/8", "10.0.0.0/33", "nonsense"])
def test_bad_cidrs(text):
    with pytest.raises(MeshError, match="--exclude-cidrs"):
        parse_cidrs(text)


def test_lpm_key_maps_ipv4_into_the_ipv6_space():
    prefixlen, addr = cidr_lpm_key("10.96.0.0/12")
    assert prefixlen == 96 + 12
    assert addr == bytes(10) + b"\xff\xff" + bytes([10, 96, 0, 0])
    assert cidr_lpm_key("fd00::/8") == (8, bytes([0xFD]) + bytes(15))


def test_cflags_carry_every_knob():
    cfg = AgentConfig(conns_max=1024, check_listener=False)
    flags = bpf_cflags(cfg)
    assert "-DMESH_CONNS_MAX=1024" in flags
    assert not any("SKIP_MARK" in flag for flag in flags)  # nothing trusts a mark
    assert "-DMESH_CHECK_LISTENER=0" in flags
    assert "-DMESH_DEBUG=0" in flags
    assert all(flag.startswith("-DMESH_") for flag in flags)


def test_cflags_have_defaults_in_the_c():
    """Every -D knob the Python sets has a default in bpf/include/config.h."""
    from meshagent.bpf import bpf_dir

    config_h = (bpf_dir() / "include" / "config.h").read_text()
    for flag in bpf_cflags(AgentConfig()):
        name = flag[2:].split("=")[0]
        assert f"#ifndef {name}" in config_h, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 0}, "not a TCP port"),
        ({"log_format": "xml"}, "--log-format"),
        ({"conns_max": 4}, "conns_max"),
        ({"sockmap_replies": True}, "--sockmap-replies needs --sockmap-msg"),
    ],
)
def test_bad_agent_config(kwargs, message):
    with pytest.raises(MeshError, match=message):
        AgentConfig(**kwargs)
