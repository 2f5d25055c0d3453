"""The CLI driven as a person would: separate processes, the agent in the
background, then a check that nothing at all is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from meshenv import our_iptables, redirect_args, start_agent, wait_for

MESHAGENT = [sys.executable, "-m", "meshagent"]


def residue(env, agent_pid: int | None = None) -> list[str]:
    """Everything this sandbox could have left on the machine."""
    left = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += [f"netns {line}" for line in netns.splitlines() if line.startswith(f"mt{env.tag}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left += [f"link {env.bridge}" for line in links.splitlines() if f" {env.bridge}:" in line]
    pods_cg = env.cgroup_path / "pods"
    if pods_cg.exists():
        left.append(f"cgroup {pods_cg}")
    progs = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(env.cgroup_path)], capture_output=True, text=True
    ).stdout
    if progs.strip() and json.loads(progs):
        left.append(f"bpf programs on {env.cgroup_path}")
    from meshagent.bpf.pins import Pins

    if Pins(env.state_dir).exists():
        left.append(f"pinned objects under {Pins(env.state_dir).dir}")
    for name in (
        "agent.sock",
        "agent.json",
        "agent.lock",
        "successor.lock",
        "attached.json",
        "node.json",
        "pods",
    ):
        if (env.state_dir / name).exists():
            left.append(f"state {name}")
    if agent_pid is not None and os.path.exists(f"/proc/{agent_pid}"):
        left.append(f"agent process {agent_pid}")
    return left


@pytest.mark.kernel_matrix
def test_the_whole_cli_story_leaves_nothing_behind(mesh_env, redirect):
    env = mesh_env
    for name in ("client", "server"):
        out = env.meshagent("pod", "create", name).stdout
        assert f"pod {name} created" in out
    pods = json.loads(env.meshagent("pod", "list", "-o", "json").stdout)
    assert [p["name"] for p in pods] == ["client", "server"]
    server = env.store().get("server")
    client = env.store().get("client")
    # A minimal HTTP/1.0 server: answers at once, then closes its side.
    srv = env.server(server, 8080, "--banner", "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")

    agent = start_agent(env, *redirect_args(*redirect))
    assert f"pod client attached ({redirect[0]})" in env.meshagent("attach", "client").stdout
    curl = env.meshagent(
        "pod", "exec", "client", "--", "curl", "-sS", "--max-time", "10",
        f"http://{server.ip4}:8080/",
    )  # fmt: skip
    assert curl.stdout == "ok\n"
    assert srv.next()["peer"] == client.ip4

    status = json.loads(env.meshagent("status", "-o", "json").stdout)
    assert status["backend"] == redirect[0]
    (pod,) = status["pods"]
    assert pod["name"] == "client" and pod["connections_total"] == 1
    assert any(c["orig_dst"] == f"{server.ip4}:8080" for c in status["connections"])
    text = env.meshagent("status").stdout
    assert "client" in text and redirect[0] in text
    if redirect[0] == "ebpf":
        assert "steered=1" in text
    else:
        assert our_iptables(client, redirect[1])

    assert "pod client detached" in env.meshagent("detach", "client").stdout
    if redirect[0] == "iptables":  # the rules go once the listener's grace is over
        wait_for(lambda: our_iptables(client, redirect[1]) == [], what="the rules to go")
    env.meshagent("pod", "delete", "client")
    env.meshagent("pod", "delete", "server")

    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=30) == 0
    # A stopped agent keeps its hooks for the next one; cleanup is uninstall.
    env.meshagent("cleanup")
    wait_for(lambda: not residue(env, agent.proc.pid), what="no residue")
    assert residue(env, agent.proc.pid) == []
    assert "agent stopped" in agent.log()


def test_probe_kernel_reports_and_can_turn_features_off():
    proc = subprocess.run([*MESHAGENT, "probe-kernel", "-o", "json", "--without", "netns_cookie",
                           "--without", "sockhash"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["features"]["netns_cookie"] == {"ok": False, "how": "turned off with --without"}
    assert report["auto"]["backend"] == "iptables"
    assert "netns_cookie" in report["auto"]["backend_reason"]
    assert report["auto"]["datapath"] == "splice"
    for name in ("cgroup2", "cgroup_sock_addr", "sock_ops", "kernel_headers", "bcc", "iptables"):
        assert report["features"][name]["ok"], (name, report["features"][name])
    text = subprocess.run([*MESHAGENT, "probe-kernel"], capture_output=True, text=True).stdout
    assert "auto backend:  ebpf" in text
    bad = subprocess.run([*MESHAGENT, "probe-kernel", "--without", "warp_drive"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "unknown feature" in bad.stderr


def test_bad_input_gets_one_clear_line(mesh_env):
    env = mesh_env

    def fails(*args: str, expect: str) -> None:
        proc = env.meshagent(*args, check=False)
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert expect in lines[0], lines[0]

    fails("attach", "client", expect="no agent at")
    fails("attach", "client", expect="start one with `meshagent run`")
    fails("pod", "create", "Bad_Name", expect="pod name 'Bad_Name'")
    env.meshagent("pod", "create", "a")
    fails("pod", "create", "a", expect="pod a already exists")
    fails("pod", "create", "b", "--ip", "10.1.2.300", expect="not an IP address")
    fails("pod", "create", "b", "--ip", "192.0.2.7", expect="not in the pod network")
    fails("pod", "delete", "nosuch", expect="pod nosuch: no such pod")
    fails("pod", "exec", "nosuch", "--", "true", expect="no such pod")
    fails("run", "--cgroup", "no/such/cgroup", expect="no such cgroup")
    fails("run", "--exclude-ports", "70000", expect="not a TCP port")
    fails("run", "--exclude-cidrs", "10.0.0.1/8", expect="--exclude-cidrs")
    fails("run", "--zzz", expect="meshagent: No such option '--zzz' (see meshagent run --help)")
    fails("pod", "exec", expect="Missing argument 'NAME' (see meshagent pod exec --help)")
    assert env.meshagent("trace", "--port", "0", check=False).returncode == 2  # usage: 2
    assert not (env.state_dir / "agent.sock").exists()
    assert [p.name for p in env.store().all()] == ["a"]

    # Kernel headers missing: say which, and the fix; nothing attached.
    no_headers = {**env.env, "BCC_KERNEL_SOURCE": str(env.state_dir / "no-headers")}
    proc = subprocess.run([*MESHAGENT, "run", "--cgroup", env.cgroup_rel, "--redirect", "ebpf"],
                          env=no_headers,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "kernel headers" in proc.stderr
    assert "scripts/bootstrap" in proc.stderr
    assert not (env.state_dir / "agent.sock").exists()

    # Exhaust a tiny pod network: /29 holds 5 pods besides the gateway.
    tiny = {**env.env, "MESHAGENT_STATE_DIR": str(env.state_dir / "tiny")}
    tiny["MESHAGENT_POD_CIDR"] = "10.250.99.0/29"
    tiny["MESHAGENT_BRIDGE"] = env.bridge + "t"
    for index in range(5):
        subprocess.run([*MESHAGENT, "pod", "create", f"t{index}"], env=tiny, check=True,
                       capture_output=True)  # fmt: skip
    proc = subprocess.run([*MESHAGENT, "pod", "create", "t5"], env=tiny, capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and "is exhausted" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for index in range(5):
        subprocess.run([*MESHAGENT, "pod", "delete", f"t{index}"], env=tiny, check=True,
                       capture_output=True)  # fmt: skip

    # Not root: one line, nothing made.
    proc = subprocess.run(
        [*MESHAGENT, "pod", "create", "x"], env=env.env, capture_output=True, text=True,
        preexec_fn=lambda: os.setuid(65534),
    )  # fmt: skip
    assert proc.returncode == 1 and "needs root" in proc.stderr
    assert env.store().find("x") is None
