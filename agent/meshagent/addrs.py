"""Addresses as people read them."""

from __future__ import annotations


def format_endpoint(address: str, port: int) -> str:
    """'10.0.0.1:80' or '[fd00::1]:80'."""
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"
