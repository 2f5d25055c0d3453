"""Real databases across two nodes of a mesh: the servers in a pod of
node-b, their own clients in an attached pod of node-a, every connection
over the mutual-TLS hop. Nothing in the clients or servers changes."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
import time

import pytest
from meshenv import wait_for
from pgserver import missing_tools, postgres_in
from test_redis import BENCH, CHECKER, REDIS

REDIS_PORT = 6379
MARIADB_PORT = 3306


def _run(env, pod, argv: list[str], timeout: float = 240) -> str:
    proc = env.popen(pod, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{argv[0]} across the mesh failed: {text[-2000:]}"
    return text


def _hops_ok(nodes) -> int:
    """Streams node-b took: on new connections (a full handshake or a
    resumed session) and on links reused (no handshake)."""
    counted = nodes.agents[1].request("status")["mesh"]["handshakes"]
    return sum(counted.get(f"in {how}", 0) for how in ("ok", "resumed", "reused"))


def test_redis_across_nodes(mesh_pair, tmp_path):
    """Values of 1 B to 200 KiB come back whole; redis-benchmark's 20
    clients, keep-alive and a connection per request, all finish."""
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    env_b.popen(
        server, [REDIS, "--port", str(REDIS_PORT), "--bind", "*", "-::*", "--protected-mode",
                 "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip

    def ping() -> bool:
        proc = env_a.popen(client, ["redis-cli", "-h", server.ip4, "-p", str(REDIS_PORT), "PING"],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
        return proc.communicate(timeout=30)[0].strip() == "PONG"

    wait_for(ping, 30, "redis-server to answer across the mesh")
    out = env_a.script(client, CHECKER, server.ip4, str(REDIS_PORT), "1")
    assert "400 values, 0 wrong" in out
    for keepalive in ("1", "0"):
        out = _run(env_a, client, [BENCH, "-h", server.ip4, "-p", str(REDIS_PORT), "-t",
                                   "set,get", "-n", "2000", "-c", "20", "-k", keepalive, "-d",
                                   "512", "--csv"])  # fmt: skip
        rows = {line.split(",")[0].strip('"') for line in out.splitlines() if line}
        assert {"SET", "GET"} <= rows, out
    assert _hops_ok(nodes) >= 4000  # a hop per request without keep-alive


def test_postgres_across_nodes(mesh_pair):
    """pgbench (keep-alive and -C) completes and the books balance; a 15 MB
    table read back across the mesh is what the server reads locally."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/bootstrap (postgresql)")
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    with postgres_in(env_b, server) as pg:
        dsn = ["-h", server.ip4, "-p", str(pg.port), "-U", "postgres"]
        pgbench, psql = pg.tool("pgbench"), pg.tool("psql")
        _run(env_a, client, [pgbench, *dsn, "-i", "-s", "2", "-q", "postgres"])
        done = 0
        for extra, per_client in (([], 40), (["-C"], 10)):
            out = _run(env_a, client, [pgbench, *dsn, "-c", "8", "-j", "2", "-t",
                                       str(per_client), "-n", *extra, "postgres"])  # fmt: skip
            want = 8 * per_client
            assert re.search(rf"actually processed: {want}/{want}\b", out), out
            done += want
        sums = _run(env_a, client, [psql, *dsn, "-XAtq", "-c",
                    "SELECT (SELECT count(*) FROM pgbench_history),"
                    " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
                    " (SELECT sum(abalance) FROM pgbench_accounts)", "postgres"])  # fmt: skip
        rows, delta, accounts = (int(v) for v in sums.strip().split("|"))
        assert rows == done and accounts == delta, sums
        copy = "COPY (SELECT * FROM pgbench_accounts ORDER BY aid) TO STDOUT"
        proc = env_a.popen(client, [psql, *dsn, "-XAtq", "-c", copy, "postgres"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        through, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        direct = pg.local(copy)
        assert len(through) == len(direct) > 15_000_000
        assert hashlib.sha256(through).digest() == hashlib.sha256(direct).digest()
    assert _hops_ok(nodes) >= 8 * 10


MARIADB_SQL = """
CREATE DATABASE mesh;
CREATE TABLE mesh.kv (k INT PRIMARY KEY, v LONGBLOB);
"""


def test_mariadb_across_nodes(mesh_pair):
    """The mariadb client on node-a writes rows of up to 1 MB to a server on
    node-b and reads them back: the checksums match; mariadb-slap's 10
    clients all finish."""
    mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    if not shutil.which("mariadb") or not shutil.which("mariadb-install-db"):
        pytest.fail("mariadb-server is missing: run scripts/bootstrap")
    nodes, client, server = mesh_pair
    env_a, env_b = nodes.envs
    datadir = tempfile.mkdtemp(prefix="meshtest-mariadb-")
    shutil.chown(datadir, "mysql", "mysql")
    sock = f"{datadir}/mysqld.sock"
    proc = None
    try:
        subprocess.run(["mariadb-install-db", "--user=mysql", f"--datadir={datadir}",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=180)  # fmt: skip
        proc = env_b.popen(
            server, [mariadbd, "--user=mysql", f"--datadir={datadir}", f"--socket={sock}",
                     f"--port={MARIADB_PORT}", "--bind-address=*",
                     f"--pid-file={datadir}/pid", "--max-allowed-packet=64M",
                     "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        local = ["mariadb", f"--socket={sock}", "-uroot"]
        deadline = time.monotonic() + 90
        while subprocess.run([*local, "-e", "SELECT 1"], capture_output=True).returncode != 0:
            assert proc.poll() is None, f"mariadbd exited {proc.returncode}"
            assert time.monotonic() < deadline, "mariadbd did not start in 90 s"
            time.sleep(0.2)
        subprocess.run([*local, "-e", MARIADB_SQL + "CREATE USER 'mesh'@'%' IDENTIFIED BY"
                        " 'mesh'; GRANT ALL ON *.* TO 'mesh'@'%';"], check=True)  # fmt: skip
        remote = ["mariadb", "-h", server.ip4, f"-P{MARIADB_PORT}", "-umesh", "-pmesh",
                  "--max-allowed-packet=64M", "mesh"]  # fmt: skip
        rows = ";".join(
            f"INSERT INTO kv VALUES ({i}, REPEAT(SHA2('{i}', 256), {4 ** (i % 8)}))"
            for i in range(200)
        )
        _run(env_a, client, [*remote, "-e", rows])
        check = "SELECT SHA2(GROUP_CONCAT(SHA2(v, 256) ORDER BY k), 256), SUM(LENGTH(v)) FROM kv"
        through = _run(env_a, client, [*remote, "-N", "-e", check]).split()
        direct = subprocess.run([*local, "-N", "mesh", "-e", check], capture_output=True,
                                text=True, check=True).stdout.split()  # fmt: skip
        assert through == direct and int(direct[1]) > 10_000_000, (through, direct)
        blob = _run(env_a, client, [*remote, "-N", "-e", "SELECT v FROM kv WHERE k = 7"])
        assert len(blob.strip()) == 64 * 4**7
        out = _run(env_a, client, ["mariadb-slap", "-h", server.ip4, f"-P{MARIADB_PORT}",
                                   "-umesh", "-pmesh", "--concurrency=10", "--iterations=3",
                                   "--auto-generate-sql", "--number-of-queries=500"])  # fmt: skip
        assert "Average number of seconds" in out, out
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # ours, by its PID
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(datadir, ignore_errors=True)
    assert _hops_ok(nodes) >= 3
