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
