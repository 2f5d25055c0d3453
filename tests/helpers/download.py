"""A long download, for the crash test ([S]): how did it end, by a FIN or
by a reset?

`serve PORT TOTAL`: accept one connection, send TOTAL bytes in 64 KiB
chunks (a pause of 1 ms every chunk keeps it long), then close (FIN).
Prints "listening" once it listens.

`fetch HOST PORT MARK`: connect, print "started" once MARK bytes arrived,
read until EOF or an error; print one JSON line {"received": n, "error":
"ECONNRESET" | null}.
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time

CHUNK = 64 * 1024


def serve(port: int, total: int) -> None:
    listener = socket.create_server(("0.0.0.0", port))
    print("listening", flush=True)
    conn, _peer = listener.accept()
    chunk = b"d" * CHUNK
    sent = 0
    try:
        while sent < total:
            sent += conn.send(chunk[: min(CHUNK, total - sent)])
            time.sleep(0.001)
    except OSError as exc:
        print(json.dumps({"sent": sent, "error": errno.errorcode.get(exc.errno, str(exc))}),
              flush=True)  # fmt: skip
        return
    conn.close()
    print(json.dumps({"sent": sent, "error": None}), flush=True)


def fetch(host: str, port: int, mark: int) -> None:
    sock = socket.create_connection((host, port), timeout=60)
    received, error, told = 0, None, False
    buf = bytearray(1 << 16)
    try:
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            received += got
            if not told and received >= mark:
                print("started", flush=True)
                told = True
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc)) if exc.errno else type(exc).__name__
    print(json.dumps({"received": received, "error": error}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        fetch(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
