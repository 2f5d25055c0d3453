import pytest

from meshagent.addrs import format_endpoint, is_local_destination
from meshagent.bpf.abi import from_addr16, to_addr16


def test_roundtrip_and_mapping():
    assert to_addr16("10.1.2.3") == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    for address in ("10.1.2.3", "fd00::1", "::1", "127.0.0.1"):
        assert from_addr16(to_addr16(address)) == address
    assert from_addr16(to_addr16("::ffff:10.0.0.1")) == "10.0.0.1"


def test_endpoint_format():
    assert format_endpoint("10.0.0.1", 80) == "10.0.0.1:80"
    assert format_endpoint("fd00::1", 80) == "[fd00::1]:80"


@pytest.mark.parametrize(
    ("ip", "local"),
    [
        ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True),
        ("0.0.0.0", True), ("::", True), ("::ffff:0.0.0.0", True),  # connect() goes local
        ("10.0.0.1", False), ("fd00::1", False), ("::ffff:10.0.0.1", False), ("::2", False),
        # the forms answered without ipaddress, and their neighbours that are not
        ("12.7.0.1", False), ("1.2.3.4", False), ("0.1.2.3", False), ("0:0::1", True),
        ("0::", True), ("2001:db8::127", False), ("127.255.255.255", True),
    ],
)  # fmt: skip
def test_a_local_destination_is_loopback_or_unspecified(ip, local):
    assert is_local_destination(ip) is local
