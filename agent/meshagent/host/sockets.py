"""Socket facts the kernel keeps: the socket cookie."""

from __future__ import annotations

import socket

SO_COOKIE = 57


def socket_cookie(sock: socket.socket) -> int:
    """The socket's cookie: what BPF programs call bpf_get_socket_cookie()."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
