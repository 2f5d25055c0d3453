"""The iptables backend in real pod network namespaces, both flavours."""

from __future__ import annotations

import fcntl
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from meshenv import our_iptables, start_agent, wait_for

PORT = 9100
FLAVOURS = ("legacy", "nft")


def save(pod, flavour: str, family: int = 4) -> str:
    tool = f"{'ip6' if family == 6 else 'ip'}tables-{flavour}-save"
    out = subprocess.run(["ip", "netns", "exec", pod.netns, tool], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    lines = (re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines())
    return "\n".join(line for line in lines if not line.startswith("#"))


def ipt(pod, flavour: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", pod.netns, f"iptables-{flavour}", *args], check=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_foreign_rules_and_chains_survive_attach_and_detach(mesh_env, flavour):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    ipt(client, flavour, "-t", "nat", "-N", "FOREIGN")
    ipt(client, flavour, "-t", "nat", "-A", "FOREIGN", "-d", "10.9.9.9/32", "-j", "RETURN")
    ipt(client, flavour, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "FOREIGN")
    ipt(client, flavour, "-t", "filter", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "DROP")
    before = save(client, flavour)
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", flavour)
    try:
        assert agent.request("status")["iptables_flavour"] == flavour
        agent.attach(client)
        during = save(client, flavour)
        assert "MESHAGENT_OUTPUT" in during
        for line in before.splitlines():
            assert line in during, f"attach lost {line!r}"
        srv = mesh_env.server(server, PORT)
        mesh_env.client(client, server.ip4, PORT)
        assert srv.next()["peer"] == client.ip4
        assert agent.pod_status("client")["connections_total"] == 1
        agent.detach(client)
        wait_for(lambda: not our_iptables(client, flavour), what="our chain to go")
        assert save(client, flavour) == before
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_attach_twice_and_reattach_keep_one_jump(mesh_env, flavour):
    from meshagent.host import netns
    from meshagent.redirect.iptables import IptablesBackend, Tools
    from meshagent.redirect.rules import RuleConfig
    from meshagent.steering import PodHandle

    client = mesh_env.create_pod("client")
    backend = IptablesBackend(RuleConfig(15001, "/" + mesh_env.cgroup_rel), Tools.of(flavour))
    fd = netns.open_fd(client.netns)
    handle = PodHandle("client", client.netns, fd, 1)
    try:
        backend.attach(handle)
        backend.attach(handle)
        rules = our_iptables(client, flavour)
        assert rules.count("-A OUTPUT -p tcp -j MESHAGENT_OUTPUT") == 2  # one per family
        backend.stop_new(handle)  # draining: new connects RETURN first
        assert "-A MESHAGENT_OUTPUT -j RETURN" in our_iptables(client, flavour)
        backend.remove("client", client.netns)
        assert our_iptables(client, flavour) == []
        backend.attach(handle)
        assert our_iptables(client, flavour) == rules
        # Pod identity here is the netns inode: the netns cookie (SO_NETNS_COOKIE,
        # 5.14+) was never read, so this backend works on older kernels.
        assert handle._cookie is None and handle.netns_id[1] > 0
    finally:
        backend.remove("client", client.netns, quiet=True)
        import os

        os.close(fd)


def test_auto_picks_iptables_without_the_netns_cookie_and_it_works(mesh_env):
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "100")
    agent = start_agent(mesh_env, "--without", "netns_cookie")
    try:
        status = agent.request("status")
        assert status["backend"] == "iptables"
        assert "netns_cookie" in status["backend_reason"]
        assert agent.attach(client)["backend"] == "iptables"
        for host, source in ((server.ip4, client.ip4), (server.ip6, client.ip6)):
            out = mesh_env.client(client, host, PORT, "--send", "100")
            seen = srv.next()
            assert seen["peer"] == source and seen["recv_sha"] == out["sent_sha"]
        assert agent.pod_status("client")["connections_total"] == 2
    finally:
        assert agent.stop() == 0, agent.log()
    mesh_env.meshagent("cleanup")
    assert not our_iptables(client, status["iptables_flavour"])


def test_a_restarted_agent_removes_rules_a_crash_left_without_an_owner(mesh_env):
    """A pod detached with a connection still open keeps its rules until
    that connection ends; the agent crashes meanwhile. The next agent does
    not take that pod over and removes its rules."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", "nft")
    agent.attach(client)
    held = mesh_env.popen(client, [sys.executable, "-c", HOLD, server.ip4, str(PORT)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert held.stdout.readline().strip() == "held"
    assert agent.detach(client)["open_connections"] == 1
    agent.proc.kill()
    agent.proc.wait(timeout=30)
    assert our_iptables(client, "nft"), "a crash leaves the rules (nobody removed them)"
    again = start_agent(mesh_env, "--redirect", "iptables", "--iptables", "nft")
    try:
        assert our_iptables(client, "nft") == []
        assert again.request("status")["adopted_pods"] == []
        assert "it was being detached" in again.log()
    finally:
        held.stdin.close()
        assert again.stop() == 0, again.log()


def test_rule_work_moves_only_its_own_thread_and_always_comes_back(mesh_env):
    """The backend enters the pod's netns on the calling thread only (the
    child inherits it; no preexec_fn), and the thread comes back even when
    the tool cannot run: the worker thread is reused for the next pod."""
    import os
    import threading

    from meshagent.errors import MeshError
    from meshagent.host import netns
    from meshagent.redirect.iptables import IptablesBackend, Tools, Where
    from meshagent.redirect.rules import RuleConfig

    def here() -> tuple[int, int]:
        st = os.stat("/proc/thread-self/ns/net")
        return st.st_dev, st.st_ino

    client = mesh_env.create_pod("client")
    pod_ns = os.stat(netns.path(client.netns)).st_ino
    backend = IptablesBackend(RuleConfig(15001, "/" + mesh_env.cgroup_rel), Tools.of("nft"))
    child = [sys.executable, "-c", "import os; print(os.stat('/proc/self/ns/net').st_ino)"]
    home, seen, errors = here(), [], []
    stop = threading.Event()

    def watch() -> None:  # another thread meanwhile: never moved
        while not stop.is_set():
            seen.append(here())

    def work() -> None:
        try:
            assert here() == home
            held = netns.open_fd(client.netns)  # as an attached pod's
            try:
                for where in [Where(client.netns), Where(client.netns, held)] * 10:
                    assert int(backend._run(where, child, None, "client")) == pod_ns
                    assert here() == home
                    with pytest.raises(MeshError, match="cannot run"):
                        backend._run(where, ["/nonexistent/iptables"], None, "client")
                    assert here() == home
            finally:
                os.close(held)
            with pytest.raises(MeshError, match="is gone"):
                backend._run(Where("meshagent-no-such-netns"), child, None, "client")
            assert here() == home
        except BaseException as exc:
            errors.append(exc)

    watcher, worker = threading.Thread(target=watch), threading.Thread(target=work)
    watcher.start()
    worker.start()
    worker.join(120)
    stop.set()
    watcher.join(10)
    assert not errors, errors
    assert seen and set(seen) == {home} and here() == home


HOLD = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("held", flush=True)
sys.stdin.read()
"""


def test_xtables_lock_held_too_long_is_one_clear_line(mesh_env):
    client = mesh_env.create_pod("client")
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", "legacy")
    try:
        with open("/run/xtables.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                agent.attach(client)
                raise AssertionError("attach succeeded while the lock was held")
            except Exception as exc:
                message = str(exc)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        assert "xtables lock" in message and "\n" not in message
        assert agent.pod_status("client") is None
        assert our_iptables(client, "legacy") == []
        assert agent.attach(client)["backend"] == "iptables"  # works once the lock is free
    finally:
        assert agent.stop() == 0, agent.log()


def test_iptables_work_never_holds_up_the_loop(mesh_env):
    """While an attach waits for the xtables lock (iptables-restore -w), the
    agent keeps answering and forwarding: the rule work runs off the loop.
    Held by this test, the lock keeps that attach unanswered until the
    checks are done, so the order of the replies is the proof."""
    import threading

    first, second = mesh_env.create_pod("first"), mesh_env.create_pod("second")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT)
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", "legacy")
    try:
        agent.attach(first)
        order: list[str] = []
        outcome: list[str] = []

        def attach_second() -> None:
            try:
                agent.attach(second)
                outcome.append("attached")
            except Exception as exc:
                outcome.append(str(exc))
            order.append("attach")

        with open("/run/xtables.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                waiting = threading.Thread(target=attach_second)
                waiting.start()
                wait_for(lambda: "second" in agent.request("status")["busy_pods"] or order, 30,
                         "the attach to wait for the lock")  # fmt: skip
                assert agent.request("ping")["pid"] == agent.proc.pid
                result = mesh_env.client(first, server.ip4, PORT, "--send", "4096")
                assert result["sent_sha"] == srv.next()["recv_sha"]
                with pytest.raises(Exception, match="under way"):
                    agent.attach(second)  # the same pod: refused while its attach runs
                order.append("loop answered")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            waiting.join(60)
        assert order == ["loop answered", "attach"], order
        assert agent.pod_status("first")["connections_total"] == 1
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_vanished_pod_netns_is_one_clear_line(mesh_env):
    from pyroute2 import netns as pyr_netns

    client = mesh_env.create_pod("client")
    agent = start_agent(mesh_env, "--redirect", "iptables")
    try:
        pyr_netns.remove(client.netns)
        with pytest.raises(Exception, match="does not exist"):
            agent.attach(client)
        assert agent.request("status")["pods"] == []
    finally:
        assert agent.stop() == 0, agent.log()


def test_missing_iptables_binaries_are_named(monkeypatch):
    from meshagent.errors import MeshError
    from meshagent.redirect import iptables

    monkeypatch.setattr(iptables.shutil, "which", lambda _name: None)
    monkeypatch.setattr(iptables.os.path, "exists", lambda _path: False)
    with pytest.raises(
        MeshError, match=r"iptables-legacy-restore is missing: run scripts/bootstrap"
    ):
        iptables.Tools.of("legacy")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_pod_that_sets_the_old_skip_mark_is_still_redirected(mesh_env, flavour):
    """The rules know the forwarder's own sockets by the agent's cgroup (a
    pod's socket cannot be made in it), no longer by a mark: since 5.17 a
    pod with CAP_NET_RAW, which runtimes grant by default, can set any
    mark. The old mark bypassed the redirect (the connection went direct);
    now it is forwarded, exactly once: the forwarder's own upstream, with
    no mark, is not redirected back to itself."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "10")
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", flavour)
    try:
        agent.attach(client)
        out = mesh_env.client(client, server.ip4, PORT, "--mark", "0x4d455348", "--send", "10")
        seen = srv.next()
        assert seen["peer"] == client.ip4 and seen["recv_sha"] == out["sent_sha"]
        assert agent.pod_status("client")["connections_total"] == 1  # forwarded, once
        rules = save(client, flavour)
        own = f"/{mesh_env.cgroup_rel}/agent"  # iptables-save quotes it
        assert f'-m cgroup --path "{own}" -j RETURN' in rules, rules
        assert "--mark" not in rules, rules
    finally:
        assert agent.stop() == 0, agent.log()


def test_an_agent_in_the_root_cgroup_moves_into_its_own_and_back(mesh_env):
    """The rule matches the agent's cgroup and everything below it, so an
    agent started in the root cgroup (a root shell on a host without
    systemd) moves into meshagent-<instance> for its lifetime, forwards
    from there, and at stop moves back and removes it."""
    from meshagent.bpf.pins import instance_name
    from meshagent.host import cgroup

    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "10")
    own = cgroup.cgroup2_mount() / f"meshagent-{instance_name(mesh_env.state_dir)}"
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", "nft", in_cgroup=False)
    try:
        proc_cgroup = Path(f"/proc/{agent.proc.pid}/cgroup").read_text()
        assert f"0::/{own.name}\n" in proc_cgroup, proc_cgroup
        agent.attach(client)
        assert f'-m cgroup --path "/{own.name}" -j RETURN' in save(client, "nft")
        out = mesh_env.client(client, server.ip4, PORT, "--send", "10")
        assert srv.next()["recv_sha"] == out["sent_sha"]
        assert agent.pod_status("client")["connections_total"] == 1
    finally:
        assert agent.stop() == 0, agent.log()
    assert not own.exists()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_pod_recreated_behind_the_agents_back_gets_no_rules(mesh_env, flavour):
    """A pod's netns is replaced by a new one at the same path (the pod was
    re-created): the agent forgets the old attachment, and its last rule
    work goes to the netns it held, not to whatever the path names now.
    By path, the drain rules landed in the new pod, where nothing would
    ever remove them."""
    client = mesh_env.create_pod("client")
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", flavour)
    try:
        agent.attach(client)
        assert our_iptables(client, flavour)
        subprocess.run(["ip", "netns", "del", client.netns], check=True)
        subprocess.run(["ip", "netns", "add", client.netns], check=True)  # the new pod
        wait_for(lambda: agent.pod_status("client") is None, 30, "the agent to drop the pod")
        time.sleep(1.0)  # its rule work runs off the loop, after
        assert our_iptables(client, flavour) == []
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_pod_holding_the_forwarder_port_is_attached_on_another(mesh_env):
    """A pod whose own server holds the agent's --port (15001) in its netns:
    attach listens on a port the kernel picks there instead (it used to
    fail, so such a pod could never be meshed), the rules redirect to that
    one, and the pod's server keeps its port and gets none of the pod's
    outbound connections."""
    client = mesh_env.create_pod("client")
    server = mesh_env.create_pod("server")
    srv = mesh_env.server(server, PORT, "--send", "10")
    own = mesh_env.server(client, 15001)  # [::]:15001, dual-stack, in the pod
    agent = start_agent(mesh_env, "--redirect", "iptables", "--iptables", "nft")
    try:
        agent.attach(client)
        listeners = agent.pod_status("client")["listeners"]
        port = int(listeners[0].rsplit(":", 1)[1])
        assert port != 15001 and listeners == [f"127.0.0.1:{port}", f"[::1]:{port}"]
        assert f"--to-ports {port}" in save(client, "nft")
        for host in (server.ip4, server.ip6):
            out = mesh_env.client(client, host, PORT, "--send", "10")
            assert srv.next(timeout=10)["recv_sha"] == out["sent_sha"]
        assert agent.pod_status("client")["connections_total"] == 2
    finally:
        assert agent.stop() == 0, agent.log()
        own.proc.kill()
        own.proc.wait(timeout=10)
    assert own.lines.get(timeout=5) is None  # nothing reached the pod's own server
