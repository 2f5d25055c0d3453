"""A TCP client and server for tests, run inside pods as real processes.

server: accepts connections (each in a thread); optionally sends a banner
at once; reads to EOF while sending --send bytes; prints one JSON line per
connection: peer, bytes and sha256 both ways.
client: connects, sends --send bytes (optionally pausing until a file
exists) while reading to EOF; prints one JSON line.
Data is deterministic per --seed, so both ends can check digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
import threading
import time

CHUNK = 64 * 1024


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def send_all(sock: socket.socket, data: bytes, pause_at: int = -1, wait_file: str = "") -> str:
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        if start <= pause_at < start + CHUNK and wait_file:
            sock.sendall(view[start:pause_at])
            digest.update(view[start:pause_at])
            deadline = time.monotonic() + 60
            while not os.path.exists(wait_file) and time.monotonic() < deadline:
                time.sleep(0.02)
            sock.sendall(view[pause_at : start + CHUNK])
            digest.update(view[pause_at : start + CHUNK])
            continue
        sock.sendall(view[start : start + CHUNK])
        digest.update(view[start : start + CHUNK])
    return digest.hexdigest()


def recv_all(sock: socket.socket) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return total, digest.hexdigest()
        total += len(data)
        digest.update(data)


def converse(sock: socket.socket, data: bytes, args: argparse.Namespace) -> dict:
    """Send and receive at the same time; half-close after sending."""
    result: dict = {}

    def sender() -> None:
        try:
            result["sent_sha"] = send_all(sock, data, args.pause_at, args.wait_file)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            result["send_error"] = str(exc)

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        result["recv_bytes"], result["recv_sha"] = recv_all(sock)
    except OSError as exc:
        result["recv_error"] = type(exc).__name__
    thread.join()
    result["sent_bytes"] = len(data)
    return result


def serve(args: argparse.Namespace) -> None:
    family = socket.AF_INET6
    srv = socket.create_server(("::", args.port), family=family, dualstack_ipv6=True, backlog=512)
    print(json.dumps({"listening": args.port}), flush=True)
    lock = threading.Lock()
    data = payload(args.seed + 1, args.send)

    def handle(conn: socket.socket, peer: tuple) -> None:
        with conn:
            if args.banner:
                conn.sendall(args.banner.encode())
            out = converse(conn, data, args)
            host = peer[0].removeprefix("::ffff:")
            out["peer"] = host
            with lock:
                print(json.dumps(out), flush=True)

    count = 0
    while args.count == 0 or count < args.count:
        conn, peer = srv.accept()
        count += 1
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()
    while threading.active_count() > 1:
        time.sleep(0.01)


def client(args: argparse.Namespace) -> None:
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    peer = sock.getpeername()
    out = converse(sock, payload(args.seed, args.send), args)
    out["connected_to"] = f"{peer[0]}:{peer[1]}"
    out["local"] = sock.getsockname()[0]
    sock.close()
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("serve", "client"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--send", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--banner", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--pause-at", type=int, default=-1)
    parser.add_argument("--wait-file", default="")
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    serve(args) if args.mode == "serve" else client(args)


if __name__ == "__main__":
    sys.exit(main())
