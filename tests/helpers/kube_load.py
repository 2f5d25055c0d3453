"""Load for a meshed pod during an agent upgrade, run with the pod's own
python3 (`kubectl exec POD -- python3 -c SOURCE ROLE ...`; the agent's image
has it). Standard library only.

    server                 port 9000: hashes what each connection sends
                           until EOF, answers the digest; port 9001: echo
    client HOST SECONDS    one connection sending paced random bytes for
                           SECONDS (hashed as sent) while new connections
                           to the echo port open every 0.1 s; prints JSON:
                           {"sent", "digest", "server_digest", "connects",
                            "failed", "errors"}
"""

import hashlib
import json
import os
import socket
import sys
import threading
import time


def serve_digest(conn):
    digest = hashlib.sha256()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            digest.update(data)
        conn.sendall(digest.hexdigest().encode())


def serve_echo(conn):
    with conn:
        data = conn.recv(64)
        conn.sendall(data)


def server():
    def accept(port, handler):
        lsn = socket.socket()
        lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsn.bind(("0.0.0.0", port))
        lsn.listen(128)
        while True:
            conn, _ = lsn.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, args=(9001, serve_echo), daemon=True).start()
    accept(9000, serve_digest)


def client(host, seconds):
    seconds = float(seconds)
    out = {"sent": 0, "connects": 0, "failed": 0, "errors": []}
    stop = threading.Event()

    def connects():
        while not stop.is_set():
            token = os.urandom(16)
            try:
                with socket.create_connection((host, 9001), timeout=10) as conn:
                    conn.sendall(token)
                    got = b""
                    while len(got) < len(token):
                        piece = conn.recv(64)
                        if not piece:
                            break
                        got += piece
                if got != token:
                    raise OSError(f"echo returned {len(got)} of {len(token)} bytes")
                out["connects"] += 1
            except OSError as exc:
                out["failed"] += 1
                out["errors"].append(f"{time.time():.1f} {exc!r}")
            time.sleep(0.1)

    worker = threading.Thread(target=connects)
    worker.start()
    digest = hashlib.sha256()
    try:
        with socket.create_connection((host, 9000), timeout=30) as conn:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                chunk = os.urandom(32768)
                conn.sendall(chunk)
                digest.update(chunk)
                out["sent"] += len(chunk)
                time.sleep(0.02)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while True:
                piece = conn.recv(128)
                if not piece:
                    break
                answer += piece
            out["server_digest"] = answer.decode()
    except OSError as exc:
        out["errors"].append(f"transfer: {exc!r}")
    finally:
        stop.set()
        worker.join()
    out["digest"] = digest.hexdigest()
    print(json.dumps(out))


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    server() if role == "server" else client(*args)
