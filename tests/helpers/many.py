"""Thousands of connections at once, for the [F] load test: `serve PORT`
echoes every byte back on every connection (one selector, no threads;
it reads no more while 1 MiB waits to go back, and after a client's EOF
it sends the rest, then closes);
`client HOST PORT N SIZE` opens N connections, holds them all open at once,
sends SIZE random bytes on each, checks each echo by digest, and prints one
JSON line: {"open_at_once": N, "ok": n, "bad": [...]}."""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import sys
import time


def serve(port: int) -> None:
    sel = selectors.DefaultSelector()
    srv = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True,
                               backlog=16384)  # fmt: skip
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ)
    pending: dict[socket.socket, bytearray] = {}
    ended: set[socket.socket] = set()  # the client's EOF came: send the rest, then close
    print(json.dumps({"listening": port}), flush=True)
    while True:
        for key, events in sel.select():
            sock = key.fileobj
            if sock is srv:
                while True:
                    try:
                        conn, _ = srv.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    pending[conn] = bytearray()
                    sel.register(conn, selectors.EVENT_READ)
                continue
            out = pending[sock]
            if events & selectors.EVENT_READ and sock not in ended and len(out) < 1 << 20:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    data = None
                if data == b"":
                    ended.add(sock)
                if data:
                    out += data
            if out:
                try:
                    del out[: sock.send(out)]
                except BlockingIOError:
                    pass
                except OSError:
                    out.clear()
                    ended.add(sock)
            if sock in ended and not out:
                sel.unregister(sock)
                del pending[sock]
                ended.discard(sock)
                sock.close()
                continue
            reading = sock not in ended and len(out) < 1 << 20
            sel.modify(sock, (selectors.EVENT_READ if reading else 0)
                       | (selectors.EVENT_WRITE if out else 0))  # fmt: skip


def client(host: str, port: int, count: int, size: int) -> None:
    deadline = time.monotonic() + 120
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        sock.setblocking(False)
        socks.append(sock)
    payloads = {sock: os.urandom(size) for sock in socks}
    sent = {sock: 0 for sock in socks}
    got = {sock: hashlib.sha256() for sock in socks}
    received = {sock: 0 for sock in socks}
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    left = set(socks)
    while left and time.monotonic() < deadline:
        for key, events in sel.select(1.0):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE and sent[sock] < size:
                try:
                    sent[sock] += sock.send(payloads[sock][sent[sock] :])
                except BlockingIOError:
                    pass
                if sent[sock] == size:
                    sel.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    data = None
                if data:
                    got[sock].update(data)
                    received[sock] += len(data)
                if received[sock] >= size or data == b"":
                    sel.unregister(sock)
                    left.discard(sock)
    bad = [i for i, sock in enumerate(socks)
           if got[sock].digest() != hashlib.sha256(payloads[sock]).digest()]  # fmt: skip
    for sock in socks:
        sock.close()
    print(json.dumps({"open_at_once": len(socks), "ok": len(socks) - len(bad),
                      "bad": bad[:10], "unfinished": len(left)}))  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
