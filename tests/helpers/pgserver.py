"""A throwaway PostgreSQL server inside a test pod, for the tests and the
benchmark: initdb into a temporary directory, the server as the `postgres`
user (it refuses root) listening on every address of the pod, trust
authentication, durability off (nothing here must survive), and a fast
shutdown at the end that takes its backends with it."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PORT = 5432
TOOLS = ("initdb", "postgres", "pgbench", "psql")
AS_PG = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


def pg_bin(name: str) -> str | None:
    """Debian keeps the server's programs in /usr/lib/postgresql/N/bin."""

    def version(path: str) -> int:
        digits = re.findall(r"\d+", path)
        return int(digits[-1]) if digits else 0

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(os.path.join(bindir, name), os.X_OK):
            return os.path.join(bindir, name)
    return shutil.which(name)


def missing_tools() -> list[str]:
    return [name for name in TOOLS if not pg_bin(name)]


@dataclass
class PgServer:
    datadir: str
    port: int

    def tool(self, name: str) -> str:
        path = pg_bin(name)
        assert path, f"{name} is missing: run scripts/bootstrap (postgresql)"
        return path

    def local(self, sql: str, timeout: float = 120) -> bytes:
        """psql in the server's own unix socket: never through the mesh."""
        out = subprocess.run(
            [*AS_PG, self.tool("psql"), "-h", self.datadir, "-p", str(self.port), "-U",
             "postgres", "-XAtq", "-c", sql],
            capture_output=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"psql on the server's socket: {out.stderr.decode().strip()}")
        return out.stdout

    def init_pgbench(self, scale: int) -> None:
        """pgbench's tables, loaded over the server's own socket."""
        subprocess.run(
            [*AS_PG, self.tool("pgbench"), "-h", self.datadir, "-p", str(self.port), "-U",
             "postgres", "-i", "-q", "-s", str(scale), "postgres"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip


@contextmanager
def postgres_in(
    env, pod, port: int = PORT, max_connections: int = 60, prefix: tuple[str, ...] = ()
) -> Iterator[PgServer]:
    """env: the tests' MeshEnv (its popen starts the server in pod); prefix:
    what the server runs under (the benchmark's taskset)."""
    datadir = tempfile.mkdtemp(prefix="meshtest-pg-")
    shutil.chown(datadir, "postgres", "postgres")
    server = PgServer(datadir, port)
    proc = None
    try:
        subprocess.run(
            [*AS_PG, server.tool("initdb"), "-D", datadir, "--auth=trust", "-U", "postgres", "--no-locale", "-E", "UTF8",
             "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
        with open(os.path.join(datadir, "pg_hba.conf"), "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n")
        proc = env.popen(
            pod,
            [*prefix, *AS_PG, server.tool("postgres"), "-D", datadir, "-k", datadir, "-p", str(port),
             "-c", "listen_addresses=*", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", f"max_connections={max_connections}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"postgres in pod {pod.name} exited {proc.returncode}")
            try:
                if server.local("SELECT 1", timeout=10).strip() == b"1":
                    break
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres in pod {pod.name} did not start in 60 s")
            time.sleep(0.1)
        yield server
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: its backends go with it
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(datadir, ignore_errors=True)
