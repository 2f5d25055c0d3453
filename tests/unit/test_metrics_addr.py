"""--metrics-addr on a non-loopback address is accepted with a warning:
the metrics are unauthenticated (docs/security.md)."""

import pytest

from meshagent.addrs import is_loopback, metrics_exposure


@pytest.mark.parametrize(
    "text",
    [
        "",
        "off",
        "127.0.0.1:15090",
        "127.8.9.1:1",
        "[::1]:15090",
        "localhost:15090",
        "[::ffff:127.0.0.1]:9",
    ],
)
def test_loopback_or_off_is_quiet(text):
    assert metrics_exposure(text) is None


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("0.0.0.0:15090", "0.0.0.0:15090"),
        ("[::]:15090", "[::]:15090"),
        ("10.0.0.7:9090", "10.0.0.7:9090"),
        ("[fd00::1]:9090", "[fd00::1]:9090"),
        ("node.example:9090", "node.example:9090"),
    ],
)
def test_other_addresses_warn_naming_them(text, named):
    warning = metrics_exposure(text)
    assert warning is not None
    assert named in warning
    assert "unauthenticated" in warning
    assert "\n" not in warning


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("LOCALHOST")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")
