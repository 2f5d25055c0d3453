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
import struct
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


def send_random_chunks(sock: socket.socket, data: bytes, rng: random.Random) -> str:
    """Send data in chunks of random size, 1 byte to 256 KiB."""
    view = memoryview(data)
    start = 0
    while start < len(data):
        size = min(
            len(data) - start, rng.choice((1, rng.randint(1, 512), rng.randint(1, 256 * 1024)))
        )
        sock.sendall(view[start : start + size])
        start += size
    return hashlib.sha256(data).hexdigest()


def recv_all(sock: socket.socket) -> tuple[int, str]:
    total, sha, _ = recv_all_first(sock)
    return total, sha


def recv_all_first(sock: socket.socket) -> tuple[int, str, bytes]:
    """Read to EOF: (bytes, sha256, the first 8 bytes)."""
    digest = hashlib.sha256()
    total = 0
    first = b""
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return total, digest.hexdigest(), first
        if len(first) < 8:
            first += data[: 8 - len(first)]
        total += len(data)
        digest.update(data)


def reset_after(sock: socket.socket, count: int) -> dict:
    """Read count bytes, then close with an RST."""
    got = 0
    while got < count:
        data = sock.recv(count - got)
        if not data:
            break
        got += len(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return {"reset_after": got}


def converse(
    sock: socket.socket, data: bytes, args: argparse.Namespace, tagged: bool = False
) -> dict:
    """Send and receive at the same time; half-close after sending. tagged:
    the peer's first 8 bytes name its connection (stress mode)."""
    result: dict = {}

    def sender() -> None:
        try:
            if args.random_chunks:
                rng = random.Random(len(data) ^ args.seed)
                result["sent_sha"] = send_random_chunks(sock, data, rng)
            else:
                result["sent_sha"] = send_all(sock, data, args.pause_at, args.wait_file)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            result["send_error"] = type(exc).__name__

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        result["recv_bytes"], result["recv_sha"], first = recv_all_first(sock)
        if tagged:
            result["id"] = int.from_bytes(first[:8], "big")
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

    sizes = random.Random(args.seed)

    def handle(conn: socket.socket, peer: tuple, index: int) -> None:
        with conn:
            if args.reset:
                out = reset_after(conn, args.reset)
            elif args.send_after_eof:
                out = {}
                out["recv_bytes"], out["recv_sha"] = recv_all(conn)
                out["sent_sha"] = send_all(conn, data)
                out["sent_bytes"] = len(data)
            else:
                if args.banner:
                    conn.sendall(args.banner.encode())
                body = data
                if args.random_size:
                    body = payload(args.seed * 100003 + index, sizes.randint(1, args.random_size))
                out = converse(conn, body, args, tagged=args.random_size > 0)
            out["peer"] = peer[0].removeprefix("::ffff:")
            with lock:
                print(json.dumps(out), flush=True)

    count = 0
    while args.count == 0 or count < args.count:
        conn, peer = srv.accept()
        count += 1
        threading.Thread(target=handle, args=(conn, peer, count), daemon=True).start()
    while threading.active_count() > 1:
        time.sleep(0.01)


def stress(args: argparse.Namespace) -> None:
    """--conns connections at once; each writes at once, in random chunks, a
    random amount (up to --random-size) that starts with its 8-byte id."""
    lock = threading.Lock()
    sizes = random.Random(args.seed)
    plan = [(i, sizes.randint(8, max(8, args.random_size))) for i in range(args.conns)]
    failures = []

    def one(conn_id: int, size: int) -> None:
        data = conn_id.to_bytes(8, "big") + payload(args.seed * 7919 + conn_id, size - 8)
        try:
            sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
            with sock:
                out = converse(sock, data, args)
        except OSError as exc:
            out = {"connect_error": type(exc).__name__}
            failures.append(conn_id)
        out["id"] = conn_id
        with lock:
            print(json.dumps(out), flush=True)

    threads = [threading.Thread(target=one, args=item, daemon=True) for item in plan]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.timeout * 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(thread.is_alive() for thread in threads)
    print(json.dumps({"done": args.conns - stuck, "stuck": stuck}), flush=True)


def connect(args: argparse.Namespace) -> socket.socket:
    if not args.mark:
        return socket.create_connection((args.host, args.port), timeout=args.timeout)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)  # needs CAP_NET_ADMIN
    sock.settimeout(args.timeout)
    sock.connect((args.host, args.port))
    return sock


def client(args: argparse.Namespace) -> None:
    sock = connect(args)
    peer = sock.getpeername()
    if args.reset:
        sock.sendall(payload(args.seed, args.reset))
        time.sleep(0.2)
        out = reset_after(sock, 0)
        out["connected_to"] = f"{peer[0]}:{peer[1]}"
        print(json.dumps(out), flush=True)
        return
    out = converse(sock, payload(args.seed, args.send), args)
    out["connected_to"] = f"{peer[0]}:{peer[1]}"
    out["local"] = sock.getsockname()[0]
    sock.close()
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("serve", "client", "stress"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--send", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--banner", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--pause-at", type=int, default=-1)
    parser.add_argument("--wait-file", default="")
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--random-size", type=int, default=0)
    parser.add_argument("--random-chunks", action="store_true")
    parser.add_argument("--send-after-eof", action="store_true")
    parser.add_argument("--reset", type=int, default=0, help="RST after this many bytes")
    parser.add_argument(
        "--mark", type=lambda s: int(s, 0), default=0, help="SO_MARK before connect"
    )
    args = parser.parse_args()
    {"serve": serve, "client": client, "stress": stress}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
