"""[S] The metrics server on loopback, without an agent: a probe is answered
while slow clients hold connections, a client that dribbles is cut off at its
total deadline (not a per-recv timeout), and close() never waits on a client."""

from __future__ import annotations

import socket
import threading

import pytest
from probe import PROBE_TIMEOUT, probe

from meshagent import metrics
from meshagent.metrics import Collector, MetricsServer


@pytest.fixture
def server():
    srv = MetricsServer(("127.0.0.1", 0), Collector(lambda: {}, None), lambda: True, lambda: True)
    yield srv
    srv.close()


def slow_clients(address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    socks = [
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT) for _ in range(count)
    ]
    for sock in socks:
        sock.sendall(b"G")  # the start of a request that never ends
    return socks


def test_a_probe_is_answered_past_more_slow_clients_than_the_cap(server):
    socks = slow_clients(server.address, metrics.MAX_CLIENTS + 8)
    try:
        assert [probe(server.address) for _ in range(3)] == [200, 200, 200]
        assert probe(server.address, "/readyz") == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_dribbling_client_is_cut_off_at_its_deadline(server, monkeypatch):
    monkeypatch.setattr(metrics, "CLIENT_SECONDS", 0.5)
    (sock,) = slow_clients(server.address, 1)
    sock.settimeout(0.2)  # shorter than the deadline: each byte restarts no timer of ours
    got = None
    try:
        for _ in range(100):  # bounded: 20 s at most, the deadline is 0.5 s (+ a reap)
            try:
                sock.sendall(b"E")
                got = sock.recv(1)
                break
            except TimeoutError:
                continue
            except OSError:  # cut off while sending: a reset is a cut too
                got = b""
                break
    finally:
        sock.close()
    assert got == b""


def test_close_never_waits_on_a_client(server):
    socks = slow_clients(server.address, 4)
    done = threading.Event()

    def dribble() -> None:  # a byte every half second, for 30 s at most
        for _ in range(60):
            for sock in socks:
                try:
                    sock.send(b"E")
                except OSError:
                    pass  # cut off: allowed
            if done.wait(0.5):
                return

    dribbler = threading.Thread(target=dribble, daemon=True)
    closer = threading.Thread(target=server.close, daemon=True)
    try:
        dribbler.start()
        closer.start()
        closer.join(15)  # a bound on a blocking call, not a measurement
        assert not closer.is_alive()
        done.set()
        dribbler.join(5)
        for sock in socks:  # each slow client was cut off, none left half-served
            sock.settimeout(PROBE_TIMEOUT)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass  # cut off with its request unread: a reset
    finally:
        done.set()
        for sock in socks:
            sock.close()


SNAPSHOT = {
    "kernel": "6.1.0", "backend": "ebpf", "datapath": "sockmap", "outcomes": {}, "bytes": {},
    "active": {}, "errors": {}, "handoff_bytes": 0, "map_entries": {}, "attach_seconds": (),
}  # fmt: skip


def rendered(snapshot: dict) -> dict[str, float]:
    """{sample name: value} of what a scrape would show, through
    prometheus_client's own text format and parser."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: snapshot, None))
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_sockmap_back_pressure_is_exposed_by_name():
    sockmap = {"throttles": 7, "throttled_connections": 2, "held_bytes": 12345,
               "budget_bytes": 16384, "stalls": 0, "fallbacks": 0, "msg": True}  # fmt: skip
    got = rendered({**SNAPSHOT, "datapaths": {"copy": {}, "sockmap": sockmap}})
    assert got["meshagent_sockmap_throttles_total"] == 7
    assert got["meshagent_sockmap_throttled_connections"] == 2
    assert got["meshagent_sockmap_held_bytes"] == 12345
    assert got["meshagent_sockmap_budget_bytes"] == 16384


def test_no_sockmap_path_no_sockmap_back_pressure_metrics():
    for snapshot in (SNAPSHOT, {**SNAPSHOT, "datapaths": {"copy": {}, "splice": {}}}):
        got = rendered(snapshot)
        assert "meshagent_build_info" in got  # the rest is rendered
        back_pressure = ("meshagent_sockmap_throttle", "meshagent_sockmap_held",
                         "meshagent_sockmap_budget")  # fmt: skip
        assert not [name for name in got if name.startswith(back_pressure)]
