"""--exclude-cidrs on the ebpf backend: the trie entries written, per family
as the iptables backend treats the flag (an IPv6 network never covers IPv4,
which the trie keys as ::ffff:a.b.c.d)."""

from __future__ import annotations

import ipaddress

import pytest

from meshagent.bpf import abi
from meshagent.config import parse_cidrs
from meshagent.errors import MeshError
from meshagent.redirect.ebpf import exclude_entries


def decode(entries: dict[bytes, bytes]) -> dict[str, int]:
    out = {}
    for key, value in entries.items():
        prefixlen, addr = abi.LPM.unpack(key)
        text = abi.from_addr16(addr)  # IPv4-mapped as dotted IPv4
        text = f"::ffff:{text}" if "." in text else text
        out[f"{text}/{prefixlen}"] = abi.BYTE.unpack(value)[0]
    return out


def excluded(entries: dict[bytes, bytes], address: str) -> bool:
    """What the hook decides: the longest matching prefix, excluded if 1."""
    addr = ipaddress.ip_address(address)
    if addr.version == 4:
        addr = ipaddress.IPv6Address(f"::ffff:{addr}")
    best = None
    for net, value in decode(entries).items():
        net = ipaddress.ip_network(net)
        if addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, value)
    return bool(best and best[1])


def test_ipv6_everything_leaves_ipv4_alone():
    entries = exclude_entries(("::/0",))
    assert decode(entries) == {"::/0": 1, "::ffff:0.0.0.0/96": 0}
    assert excluded(entries, "2001:db8::1") and excluded(entries, "fd00::7")
    assert not excluded(entries, "10.1.2.3") and not excluded(entries, "::ffff:10.1.2.3")


def test_ipv4_everything_leaves_ipv6_alone():
    entries = exclude_entries(("0.0.0.0/0",))
    assert decode(entries) == {"::ffff:0.0.0.0/96": 1}
    assert excluded(entries, "10.1.2.3") and excluded(entries, "::ffff:192.0.2.1")
    assert not excluded(entries, "2001:db8::1") and not excluded(entries, "::1")


def test_both_families_everything():
    for cidrs in (("::/0", "0.0.0.0/0"), ("0.0.0.0/0", "::/0")):
        entries = exclude_entries(cidrs)
        assert decode(entries) == {"::/0": 1, "::ffff:0.0.0.0/96": 1}
        assert excluded(entries, "10.1.2.3") and excluded(entries, "2001:db8::1")


def test_ipv4_network_inside_an_ipv6_hole_is_still_excluded():
    entries = exclude_entries(("::/80", "10.96.0.0/12"))
    assert decode(entries) == {"::/80": 1, "::ffff:0.0.0.0/96": 0, "::ffff:10.96.0.0/108": 1}
    assert excluded(entries, "10.100.0.1") and not excluded(entries, "10.200.0.1")
    assert excluded(entries, "::7")


def test_ipv6_networks_off_the_mapped_range_need_no_hole():
    entries = exclude_entries(("fd00::/8", "2001:db8::/32", "192.168.0.0/16"))
    assert decode(entries) == {
        "fd00::/8": 1, "2001:db8::/32": 1, "::ffff:192.168.0.0/112": 1,
    }  # fmt: skip


def test_mapped_ipv6_networks_are_ipv4():
    assert parse_cidrs("::ffff:10.0.0.0/104,::ffff:0:0/96") == ("10.0.0.0/8", "0.0.0.0/0")
    assert parse_cidrs("::ffff:10.0.0.0/104,10.0.0.0/8") == ("10.0.0.0/8",)
    assert parse_cidrs("::/0") == ("::/0",)  # covers the mapped range but is IPv6


def test_one_trie_entry_is_kept_for_the_hole():
    nets = ",".join(f"fd00:{i:x}::/32" for i in range(255))
    assert len(parse_cidrs(nets)) == 255
    with pytest.raises(MeshError, match="more than 255 networks"):
        parse_cidrs(nets + ",::/0")
