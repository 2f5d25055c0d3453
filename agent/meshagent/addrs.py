"""Addresses as people read them."""

from __future__ import annotations

from meshagent.errors import MeshError


def format_endpoint(address: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def parse_addr(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:15090' -> ('127.0.0.1', 15090); '' or 'off' -> None."""
    if text in ("", "off"):
        return None
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 <= number <= 65535:
        raise MeshError(f"--metrics-addr {text!r}: use HOST:PORT (e.g. 127.0.0.1:15090) or off")
    return host.strip("[]"), number


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, ::ffff:127.x or 'localhost'; a wildcard (0.0.0.0,
    ::), another address or another name is not."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def is_local_destination(ip: str) -> bool:
    """Where a connect() to ip goes to this host: loopback, or the
    unspecified 0.0.0.0 / :: (also v4-mapped), which Linux connects to a
    local address. (For a bind, the unspecified address means every one:
    is_loopback says no to it.) Asked for every forwarded connection: the
    forms inet_ntop writes are answered without ipaddress (a dozen calls)."""
    if ":" not in ip:
        if ip[:1].isdigit() and ip[:3] != "127" and ip[:2] != "0.":  # 10.1.2.3
            return False
    elif ip[:1] not in (":", "0"):  # fd00::1: not ::, ::1 or ::ffff:
        return False
    import ipaddress

    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback or (mapped or address).is_unspecified


def metrics_exposure(text: str) -> str | None:
    """The warning for a --metrics-addr reachable from beyond this host
    (metrics are unauthenticated: docs/security.md); None for loopback or off."""
    addr = parse_addr(text)
    if addr is None or is_loopback(addr[0]):
        return None
    return (
        f"metrics served on {format_endpoint(*addr)}, not loopback: /metrics is"
        " unauthenticated and shows pod names to whoever reaches it (docs/security.md)"
    )
