"""What a hop's handshake costs in CPU: both ends of the mutual TLS
handshake meshagent's hop makes (mesh/certs.py's contexts, ECDSA P-256
node certificates from a fresh mesh CA), in one process over memory
BIOs, so no network or event loop is counted: full against resumed, for
the OpenSSL mode (TLS 1.3) and the kernel-TLS mode's contexts (TLS 1.2,
whose handshake is OpenSSL's too). Interleaved rounds, median and spread.

Writes bench/results/handshake.json and prints a table:
`.venv/bin/python bench/handshake.py` (no root needed; BENCH_ROUNDS,
default 5; BENCH_PAIRS per round, default 200).
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "agent"))
sys.path.insert(0, str(ROOT / "bench"))

from run import save_results, spread  # noqa: E402

from meshagent.mesh import ca as mesh_ca  # noqa: E402
from meshagent.mesh.certs import _context  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
PAIRS = int(os.environ.get("BENCH_PAIRS", "200"))


def handshake(client_ctx, server_ctx, session=None) -> tuple[ssl.SSLObject, float, float]:
    """One mutual handshake and a 3-byte reply (which carries TLS 1.3's
    ticket to the client): the client, and the server's CPU seconds."""
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(ci, co, server_side=False, session=session)
    server = server_ctx.wrap_bio(si, so, server_side=True)
    spent = [0.0, 0.0]
    done = [False, False]
    for _ in range(8):
        for side, (tls, out, peer_in) in enumerate(((client, co, si), (server, so, ci))):
            start = time.process_time()
            try:
                tls.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
            spent[side] += time.process_time() - start
            peer_in.write(out.read())
        if all(done):
            break
    else:
        raise RuntimeError("the handshake did not finish")
    start = time.process_time()
    server.write(b"OK\n")
    ci.write(so.read())
    spent[1] += time.process_time() - start
    start = time.process_time()
    if client.read(3) != b"OK\n":
        raise RuntimeError("no reply")
    spent[0] += time.process_time() - start
    return client, spent[0], spent[1]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="meshagent-bench-handshake-"))
    mesh_ca.init(work / "ca", "mesh.test")
    for node in ("node-a", "node-b"):
        mesh_ca.issue(work / "ca", node, work / node)
    samples: dict[str, list[dict]] = {}
    for mode, kernel in (("tls13", False), ("tls12_ktls_mode", True)):
        client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, work / "node-a", kernel_tls=kernel)
        server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, work / "node-b", kernel_tls=kernel)
        first, _, _ = handshake(client_ctx, server_ctx)
        session = first.session
        for round_no in range(ROUNDS):
            kinds = (("full", None), ("resumed", session))
            for kind, offered in kinds if round_no % 2 == 0 else reversed(kinds):
                client_s = server_s = 0.0
                for _ in range(PAIRS):
                    tls, c, s = handshake(client_ctx, server_ctx, offered)
                    if tls.session_reused != (offered is not None):
                        raise RuntimeError(f"{mode} {kind}: resumed={tls.session_reused}")
                    client_s, server_s = client_s + c, server_s + s
                samples.setdefault(f"{mode} {kind}", []).append(
                    {"client_ms": client_s / PAIRS * 1e3, "server_ms": server_s / PAIRS * 1e3,
                     "pair_ms": (client_s + server_s) / PAIRS * 1e3}
                )  # fmt: skip
    summary = {
        name: {fig: spread([r[fig] for r in rounds]) for fig in rounds[0]}
        for name, rounds in samples.items()
    }
    meta = {"rounds": ROUNDS, "pairs_per_round": PAIRS, "openssl": ssl.OPENSSL_VERSION,
            "key": "ECDSA P-256, mutual"}  # fmt: skip
    path = save_results("handshake", meta, {"summary": summary, "samples": samples})
    print("| handshake | client ms | server ms | both ms (min-max) |")
    print("|---|---|---|---|")
    for name, figs in summary.items():
        pair = figs["pair_ms"]
        print(f"| {name} | {figs['client_ms']['median']:.2f} | {figs['server_ms']['median']:.2f} "
              f"| {pair['median']:.2f} ({pair['min']:.2f}-{pair['max']:.2f}) |")  # fmt: skip
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
