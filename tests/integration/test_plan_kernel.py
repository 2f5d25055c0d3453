"""The plan against the running kernel: `run` and `probe-kernel` agree, a
program the kernel's verifier refuses makes `auto` fall through (and an
explicit --redirect ebpf say why), and the Python struct layouts match the
compiled C as the kernel holds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from meshenv import kernel_cannot, start_agent
from test_failopen import cgroup_programs

PORT = 8080
REFUSE = "--bpf-cflag=-DMESH_TEST_REFUSE=1"  # mesh_sockops calls a helper sock_ops may not


def probe_kernel(env, *args: str) -> dict:
    proc = env.meshagent("probe-kernel", "-o", "json", *args)
    return json.loads(proc.stdout)


@pytest.mark.kernel_matrix
def test_run_and_probe_kernel_agree(mesh_env):
    report = probe_kernel(mesh_env, "--load")
    agent = start_agent(mesh_env)
    try:
        status = agent.request("status")
    finally:
        assert agent.stop() == 0, agent.log()
    # What this kernel should get: ebpf and sockmap where it has them (the
    # host), iptables and splice on the matrix's 5.10.
    backend = "ebpf" if kernel_cannot("ebpf") is None else "iptables"
    datapath = "sockmap" if kernel_cannot(datapath="sockmap") is None else "splice"
    assert report["auto"]["backend"] == status["backend"] == backend
    assert report["auto"]["backend_reason"] == status["backend_reason"]
    assert report["auto"]["programs"] == status["plan"]["programs"]
    assert report["auto"]["datapaths"] == status["plan"]["datapaths"]
    assert report["auto"]["datapath"] == datapath
    # run also self-tests the candidates, in order, and keeps the first that
    # passes: a sockmap whose bound it cannot show (seen on the 6.1 and 6.12
    # guests under software emulation) gives way to splice, and says so
    why = status["datapath_reason"]
    assert status["datapath"] in report["auto"]["datapaths"], why
    if status["datapath"] != datapath:
        assert f"{datapath} self-test failed" in why, why
    assert report["refused"] == {}


def test_a_program_the_kernel_refuses_makes_auto_fall_through(mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "100")
    agent = start_agent(mesh_env, REFUSE)
    try:
        status = agent.request("status")
        assert status["backend"] == "iptables"
        reason = status["backend_reason"]
        assert reason.startswith(
            "ebpf unavailable: mesh_sockops (sockops.c) refused by the kernel:"
        )
        assert "bpf_sk_redirect_hash" in reason  # the verifier's own words
        assert status["refused"] == {"mesh_sockops": reason.removeprefix("ebpf unavailable: ")}
        # The verdict still loaded: the sockmap path is there (auto takes it
        # when its start self-test passes, which a busy machine can fail).
        assert "sockmap" in status["datapaths"], status["datapath_reason"]
        assert not cgroup_programs(mesh_env.cgroup_path)  # nothing half-attached
        assert agent.attach(client)["backend"] == "iptables"
        out = mesh_env.client(client, server.ip4, PORT, "--send", "100")
        seen = srv.next()
        assert seen["peer"] == client.ip4 and seen["recv_sha"] == out["sent_sha"]
        assert agent.pod_status("client")["connections_total"] == 1
        report = probe_kernel(mesh_env, "--load", REFUSE)
        assert report["auto"]["backend"] == "iptables"
        assert report["auto"]["backend_reason"] == reason
    finally:
        assert agent.stop() == 0, agent.log()


def test_an_explicit_ebpf_redirect_the_kernel_refuses_is_one_line(mesh_env):
    proc = subprocess.run(
        [sys.executable, "-m", "meshagent", "run", "--cgroup", mesh_env.cgroup_rel,
         "--redirect", "ebpf", REFUSE],
        env=mesh_env.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--redirect ebpf" in errors[0] and "refused by the kernel" in errors[0]
    assert not cgroup_programs(mesh_env.cgroup_path)
    assert not (mesh_env.state_dir / "agent.sock").exists()


def test_every_python_struct_matches_the_compiled_c():
    """Each map's key and value as the kernel holds them after BCC compiled
    the C (its sizeof), and every field's offset and size as BCC compiled
    them, against bpf/abi.py; a wrong layout is refused."""
    from meshagent.bpf import abi, loader, objects, syscall
    from meshagent.bpf.programs import PROGRAMS
    from meshagent.config import AgentConfig, bpf_cflags

    cfg = AgentConfig()
    maps, fds, refused = loader.load_programs(cfg, PROGRAMS)  # checks every size and offset
    try:
        assert not refused
        compiled = {m.name: m for m in objects.obtain(bpf_cflags(cfg), cfg.cache_dir).maps}
        for spec in abi.MAPS:
            mapdef = compiled[spec.name]
            for python, layout in (
                (spec.key, mapdef.key_struct),
                (spec.value, mapdef.value_struct),
            ):
                if isinstance(python, abi.CStruct):
                    assert layout == (python.name, python.layout()), spec.name
                else:
                    assert layout is None, spec.name
        # Same size, fields swapped: only the offsets tell.
        swapped = abi.CStruct(
            "mesh_orig",
            ("addr", "16s"), ("pod_id", "I"), ("port", "H"), ("flags", "H"), ("netns", "Q"),
            ("cookie", "Q"),
        )  # fmt: skip
        tup = compiled["mesh_orig_tup"]
        with pytest.raises(ValueError, match=r"mesh_orig\.port: Python packs 2 bytes at offset 20"):
            abi.check_layouts(
                abi.MapSpec("mesh_orig_tup", abi.TUPLE, swapped), tup.key_struct, tup.value_struct
            )
        for spec in abi.MAPS:
            info = maps[spec.name].info
            assert (info.key_size, info.value_size) == (spec.key.size, spec.value.size), spec.name
            assert info.name == spec.name
            assert (info.map_type in syscall.PERCPU_MAP_TYPES) == spec.percpu, spec.name
        wrong = abi.MapSpec("mesh_orig_tup", abi.U64, abi.ORIG)
        with pytest.raises(ValueError, match="the compiled C has key 32"):
            syscall.check_spec(wrong, maps["mesh_orig_tup"].info)
        with pytest.raises(ValueError, match="value of 4 bytes"):
            maps["mesh_peer"].update(abi.U64.pack(1), b"\0" * 4)
        # Every raw map operation against the kernel, both key shapes.
        peer = maps["mesh_peer"]
        peer.update_u64(7, 8)
        assert peer.lookup_u64(7) == 8 and peer.count() == 1
        assert peer.delete_u64(7) is True and peer.lookup_u64(7) is None
        assert peer.delete_u64(7) is False
        pods = maps["mesh_pods"]
        pods.update(abi.U64.pack(5), abi.pod_value(1, 15001))
        assert pods.lookup(abi.U64.pack(5)) == abi.pod_value(1, 15001)
        assert pods.delete(abi.U64.pack(5)) is True and pods.count() == 0
        peer.update_u64(1, 2)
        peer.update_u64(3, 4)
        peer.delete_many_u64([1, 99, 3])  # a missing key in the middle
        assert peer.count() == 0
        # The loop's fast paths: a u64 key with a 1-byte value (mesh_own), a
        # 32-byte key on the preallocated buffers (mesh_orig_tup).
        own = maps["mesh_own"]
        own.update_u64(1 << 40 | 9, 1)
        assert own.lookup(abi.U64.pack(1 << 40 | 9)) == b"\x01"
        assert own.lookup_u64(1 << 40 | 9) == 1 and own.delete_u64(1 << 40 | 9)
        key, value = abi.client_key(11, "10.1.2.3", 4567), bytes(range(tup.value_size))
        tup_map = maps["mesh_orig_tup"]
        tup_map.update(key, value)
        assert tup_map.lookup_loop(key) == value
        assert tup_map.lookup_loop(abi.client_key(11, "10.1.2.3", 4568)) is None
        assert tup_map.lookup_loop(key) == value and tup_map.delete(key)
        with pytest.raises(ValueError, match="key of 8 bytes"):
            tup_map.lookup_loop(abi.U64.pack(1))
    finally:
        loader.release(maps, fds)
