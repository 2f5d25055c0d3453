"""Traffic that must survive an agent upgrade (the [I] takeover test).

`stream HOST PORT SECONDS`: one connection to an echo server; for SECONDS
it sends 32 KiB every 20 ms while a thread reads the echo, then half-closes
and reads to EOF. Prints one JSON line: bytes and sha256 each way, the
error if any. `stream-slow`: the reader rests 100 ms after every 128 KiB,
slower than the sender: the echo backs up and both ends are held back.

`connects HOST PORT SECONDS`: for SECONDS, a new connection every 20 ms
that sends 100 bytes and reads them back. Prints {"ok": n, "failed": {...}}.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import sys
import threading
import time


def stream(host: str, port: int, seconds: float, slow: bool = False) -> None:
    sock = socket.create_connection((host, port), timeout=30)
    sent, got = hashlib.sha256(), hashlib.sha256()
    counts = {"sent": 0, "received": 0}
    error: list[str] = []

    def reader() -> None:
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                got.update(data)
                counts["received"] += len(data)
                if slow and counts["received"] // (128 << 10) != (
                    counts["received"] - len(data)
                ) // (128 << 10):
                    time.sleep(0.1)
        except OSError as exc:
            error.append(f"recv: {errno.errorcode.get(exc.errno, exc)}")

    thread = threading.Thread(target=reader)
    thread.start()
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not error:
            chunk = os.urandom(32768)
            sock.sendall(chunk)
            sent.update(chunk)
            counts["sent"] += len(chunk)
            time.sleep(0.02)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        error.append(f"send: {errno.errorcode.get(exc.errno, exc)}")
    thread.join(60)
    sock.close()
    print(json.dumps({**counts, "sent_sha": sent.hexdigest(), "recv_sha": got.hexdigest(),
                      "error": error[0] if error else None}), flush=True)  # fmt: skip


def connects(host: str, port: int, seconds: float) -> None:
    ok, failed = 0, {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(b"x" * 100)
                data = b""
                while len(data) < 100:
                    more = sock.recv(100 - len(data))
                    if not more:
                        raise ConnectionError(errno.ECONNABORTED, "closed early")
                    data += more
            ok += 1
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, type(exc).__name__)
            failed[name] = failed.get(name, 0) + 1
        time.sleep(0.02)
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)


if __name__ == "__main__":
    kind, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if kind.startswith("stream"):
        stream(host, port, seconds, slow=kind == "stream-slow")
    else:
        connects(host, port, seconds)
