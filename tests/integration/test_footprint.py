"""[I] A small agent: BCC and LLVM compile in a child process and are never
mapped into the agent; the compiled object is cached per source, flags and
kernel, so a warm start compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meshenv import start_agent

HEAVY = ("libbcc", "libLLVM", "libclang")


def mapped(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "/" in line}  # fmt: skip


def test_the_agent_never_maps_bcc_or_llvm(mesh_env):
    client = mesh_env.create_pod("client")
    agent = start_agent(mesh_env)
    try:
        agent.attach(client)
        status = agent.request("status")
        assert "mesh_connect4" in status["plan"]["programs"]
        libs = mapped(agent.proc.pid)
        assert not [lib for lib in libs if any(h in lib for h in HEAVY)], sorted(libs)
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_warm_start_takes_the_compiled_object_from_the_cache(mesh_env, tmp_path):
    cache = tmp_path / "cache"
    mesh_env.extra_env["MESHAGENT_CACHE_DIR"] = str(cache)
    logs = []
    for _ in range(2):
        agent = start_agent(mesh_env)
        assert agent.stop() == 0, agent.log()
        logs.append(agent.log())
    assert "compiling the BPF programs" in logs[0]
    assert "compiling the BPF programs" not in logs[1]
    objects = list(cache.glob("bpf-*.json"))
    assert len(objects) == 1
    # Other -D flags are another object.
    agent = start_agent(mesh_env, "--bpf-cflag", "-DMESH_UNUSED_TEST_FLAG=1")
    assert agent.stop() == 0, agent.log()
    assert len(list(cache.glob("bpf-*.json"))) == 2


def test_a_cache_others_may_write_is_refused(mesh_env, tmp_path):
    cache = tmp_path / "open"
    cache.mkdir()
    os.chmod(cache, 0o777)
    proc = subprocess.run(
        [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel,
         "--cache-dir", str(cache)],
        env=mesh_env.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cache dir {cache}" in lines[0] and "chmod go-w" in lines[0]
