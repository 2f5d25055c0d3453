"""[S] Slow HTTP clients on --metrics-addr: /healthz still answers within a
kubelet's probe timeout, and a stopping agent (SIGTERM, or a takeover) never
waits on them, so the state dir is free for the next agent at once."""

from __future__ import annotations

import socket
import threading

from meshenv import start_agent, wait_for
from probe import probe

SLOW_CLIENTS = 40  # more than the server keeps open at once (metrics.MAX_CLIENTS)
DRIBBLE_ROUNDS = 60  # at most a minute of one byte a second per client


class Dribblers:
    """SLOW_CLIENTS connections that each send one byte of a request a
    second, the way a local user can hold a one-thread server."""

    def __init__(self, addr: str) -> None:
        host, port = addr.rsplit(":", 1)
        self.socks = []
        for _ in range(SLOW_CLIENTS):  # connects that wait in the backlog do not block the test
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((host, int(port)))
            self.socks.append(sock)
        self.stop = threading.Event()
        self.rounds = 0
        self.thread = threading.Thread(target=self._dribble, daemon=True)
        self.thread.start()

    def _dribble(self) -> None:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 100
        for index in range(DRIBBLE_ROUNDS):
            for sock in self.socks:
                try:
                    sock.send(request[index % len(request) : index % len(request) + 1])
                except OSError:
                    pass  # not accepted yet, or cut off by the server: both allowed
            self.rounds += 1
            if self.stop.wait(1.0):
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


def test_health_answers_and_sigterm_exits_with_slow_clients_connected(mesh_env):
    agent = start_agent(mesh_env)
    addr = agent.request("status")["metrics_addr"]
    slow = Dribblers(addr)
    try:
        wait_for(lambda: slow.rounds >= 2, 30, "the slow clients to send a few bytes")
        assert [probe(addr) for _ in range(3)] == [200, 200, 200]
        assert probe(addr, "/readyz") == 200
        code = agent.stop()  # SIGTERM while every slow client is still connected
        assert slow.rounds < DRIBBLE_ROUNDS, "the slow clients gave up before the agent stopped"
        assert code == 0, agent.log()
    finally:
        slow.close()
    again = start_agent(mesh_env, log_name="again.log")  # the state dir's lock is free
    assert again.stop() == 0, again.log()


def answers(agent) -> bool:
    """The agent itself answers on the socket (not its predecessor)."""
    from meshagent.errors import MeshError

    assert agent.proc.poll() is None, f"agent exited {agent.proc.returncode}: {agent.log()}"
    try:
        return agent.request("ping")["pid"] == agent.proc.pid
    except MeshError:
        return False


def test_a_takeover_never_waits_on_a_slow_client(mesh_env):
    old = start_agent(mesh_env)
    slow = Dribblers(old.request("status")["metrics_addr"])
    try:
        wait_for(lambda: slow.rounds >= 2, 30, "the slow clients to send a few bytes")
        new = start_agent(mesh_env, "--takeover", log_name="new.log")
        try:
            wait_for(lambda: old.proc.poll() is not None, 60, "the old agent to exit")
            assert slow.rounds < DRIBBLE_ROUNDS, "the slow clients gave up before the handover"
            assert old.proc.returncode == 0, old.log()
            wait_for(lambda: answers(new), 60, "the new agent to answer")
            assert probe(new.request("status")["metrics_addr"]) == 200
        finally:
            assert new.stop() == 0, new.log()
    finally:
        slow.close()
