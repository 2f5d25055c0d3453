"""The one OpenSSL call Python's ssl module lacks: SSL_shutdown once.

A TLS half-close is our close_notify while the peer still sends. Python's
`SSLSocket.unwrap()` calls SSL_shutdown a second time at once, to read the
peer's close_notify from the socket, and OpenSSL discards (or fails on)
application data it reads that way: bytes lost, measured (a peer's 100 KB
waiting in the socket: "application data after close notify", 0 of them
read). One SSL_shutdown sends the alert and reads nothing; SSL_read goes on
delivering the peer's data afterwards.

The SSL pointer is read from CPython's _ssl._SSLSocket object, whose C
struct starts (3.10 to 3.13) with PyObject_HEAD, the weakref to the
socket, then `SSL *ssl`. check() proves it on a live pair (SSL_get_fd
must be the socket's fd) before a hop relies on it.
"""

from __future__ import annotations

import ctypes
import socket
import ssl
import sys

KNOWN = {(3, 10), (3, 11), (3, 12), (3, 13)}
SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE = 2, 3
_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)  # ob_refcnt, ob_type, Socket


class Unavailable(Exception):
    pass


def _lib() -> ctypes.CDLL:
    import _ssl  # the libssl that Python itself loaded: its symbols resolve through it

    path = getattr(_ssl, "__file__", None)
    lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
    for name in ("SSL_shutdown", "SSL_get_fd", "SSL_get_error"):
        getattr(lib, name).restype = ctypes.c_int
    lib.SSL_shutdown.argtypes = [ctypes.c_void_p]
    lib.SSL_get_fd.argtypes = [ctypes.c_void_p]
    lib.SSL_get_error.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


_LIB: ctypes.CDLL | None = None


def _pointer(sock: ssl.SSLSocket) -> int:
    obj = sock._sslobj  # the C object: nothing public names its SSL*
    if obj is None:
        raise Unavailable("the TLS socket has no TLS object (closed or unwrapped)")
    return ctypes.c_void_p.from_address(id(obj) + _OFFSET).value or 0


def check() -> None:
    """Unavailable unless the pointer is found where this module reads it:
    a TLS pair on a socketpair, whose client's SSL_get_fd must match."""
    global _LIB
    if sys.implementation.name != "cpython" or sys.version_info[:2] not in KNOWN:
        raise Unavailable(f"Python {sys.version.split()[0]} ({sys.implementation.name}) "
                          "is not one whose _ssl layout is known")  # fmt: skip
    lib = _lib()
    a, b = socket.socketpair()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls = ctx.wrap_socket(a, do_handshake_on_connect=False, server_hostname="check")
        if lib.SSL_get_fd(_pointer(tls)) != tls.fileno():
            raise Unavailable("the SSL object is not where this Python keeps it")
        tls.close()
    finally:
        a.close()
        b.close()
    _LIB = lib


def send_close_notify(sock: ssl.SSLSocket) -> bool:
    """Our close_notify, without reading anything: True once it went out
    (or OpenSSL had sent it already), False if the socket is full (call
    again on EPOLLOUT). ssl.SSLError if the TLS connection failed."""
    if _LIB is None:
        check()
    lib = _LIB
    ptr = _pointer(sock)
    ret = lib.SSL_shutdown(ptr)
    if ret >= 0:
        return True
    err = lib.SSL_get_error(ptr, ret)
    if err == SSL_ERROR_WANT_WRITE:
        return False
    raise ssl.SSLError(err, f"SSL_shutdown: error {err}")
