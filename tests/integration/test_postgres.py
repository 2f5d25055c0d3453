"""A real relational database through the mesh: PostgreSQL in one pod,
libpq clients (pgbench, psql) in an attached pod, with each redirect backend
and data path that matters.

What must hold:
- `pgbench -i` loads its tables with COPY through the mesh;
- pgbench's TPC-B-like transactions with 10 clients, first on keep-alive
  connections and then with a new connection per transaction (`-C`), all
  complete, and the database's own books balance afterwards: every
  transaction wrote one history row, and the sums of the account, teller
  and branch balances each equal the sum of the history's deltas;
- a whole table read back through the mesh (COPY TO STDOUT, about 20 MB:
  long enough to move from copy to the sockmap mid-stream) is byte for
  byte what the server pod reads over its own unix socket.
"""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest
from meshenv import redirect_args, start_agent
from pgserver import missing_tools, postgres_in

SCALE = 2  # pgbench scale: 200,000 accounts
CLIENTS = 10

# (redirect backend, iptables flavour, --datapath)
CASES = [
    ("ebpf", None, "sockmap"),
    ("ebpf", None, "copy"),
    ("iptables", "legacy", "auto"),
]


@pytest.fixture
def pg_server(mesh_env):
    missing = missing_tools()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/bootstrap (postgresql)")
    pod = mesh_env.create_pod("pg")
    with postgres_in(mesh_env, pod) as server:
        yield pod, server


@pytest.mark.parametrize("backend,flavour,datapath", CASES,
                         ids=["-".join(x for x in c if x) for c in CASES])  # fmt: skip
def test_pgbench_books_balance_and_a_table_reads_back_whole(
    mesh_env, pg_server, backend, flavour, datapath
):
    server, pg = pg_server
    tools = {name: pg.tool(name) for name in ("pgbench", "psql")}
    client = mesh_env.create_pod("app")
    agent = start_agent(mesh_env, *redirect_args(backend, flavour), "--datapath", datapath)
    try:
        agent.attach(client)
        dsn = ["-h", server.ip4, "-p", str(pg.port), "-U", "postgres"]

        def run(argv: list[str], timeout: float = 240) -> str:
            proc = mesh_env.popen(client, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = proc.communicate(timeout=timeout)
            text = out.decode(errors="replace")
            assert proc.returncode == 0, f"{argv[0]} through the mesh failed: {text[-2000:]}"
            return text

        run([tools["pgbench"], *dsn, "-i", "-s", str(SCALE), "-q", "postgres"])
        done = 0
        for extra, per_client in (([], 60), (["-C"], 20)):
            out = run([tools["pgbench"], *dsn, "-c", str(CLIENTS), "-j", "2", "-t",
                       str(per_client), "-n", *extra, "postgres"])  # fmt: skip
            want = CLIENTS * per_client
            assert re.search(rf"actually processed: {want}/{want}\b", out), out
            failed = re.search(r"number of failed transactions: (\d+)", out)
            assert failed is None or failed.group(1) == "0", out
            done += want

        sums = run([tools["psql"], *dsn, "-XAtq", "-c",
                    "SELECT (SELECT count(*) FROM pgbench_history),"
                    " (SELECT coalesce(sum(delta), 0) FROM pgbench_history),"
                    " (SELECT sum(abalance) FROM pgbench_accounts),"
                    " (SELECT sum(tbalance) FROM pgbench_tellers),"
                    " (SELECT sum(bbalance) FROM pgbench_branches)", "postgres"])  # fmt: skip
        rows, delta, accounts, tellers, branches = (int(v) for v in sums.strip().split("|"))
        assert rows == done, f"{rows} history rows for {done} transactions"
        assert accounts == tellers == branches == delta, sums

        copy = "COPY (SELECT * FROM pgbench_accounts ORDER BY aid) TO STDOUT"
        proc = mesh_env.popen(client, [tools["psql"], *dsn, "-XAtq", "-c", copy, "postgres"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        through, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        direct = pg.local(copy)
        assert len(through) == len(direct) > 15_000_000
        assert hashlib.sha256(through).digest() == hashlib.sha256(direct).digest()

        status = agent.request("status")
        pod = agent.pod_status("app")
        assert pod["connections_total"] >= CLIENTS * 20 + 3  # every -C connection went through
        path = status["datapaths"][status["datapath"]]
        assert path["stalls"] == 0
        if status["datapath"] == "sockmap":
            assert status["decisions"]["spliced"]["egress"] > 0  # the kernel carried replies
    finally:
        assert agent.stop() == 0, agent.log()
