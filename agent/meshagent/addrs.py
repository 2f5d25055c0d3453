"""Addresses as the BPF maps hold them: 16 bytes, IPv4 as IPv4-mapped IPv6."""

from __future__ import annotations

import socket

_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def to_addr16(address: str) -> bytes:
    """'10.0.0.1' -> ::ffff:10.0.0.1 as 16 bytes; IPv6 as is."""
    if ":" in address:
        return socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    return _MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, address)


def from_addr16(raw: bytes) -> str:
    """The inverse of to_addr16: IPv4-mapped back to dotted IPv4."""
    if raw[:12] == _MAPPED_PREFIX:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, bytes(raw))


def format_endpoint(address: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"
